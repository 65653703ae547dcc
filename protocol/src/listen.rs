//! The listening socket of every rqemu daemon, for both protocols: `SOCK_STREAM` (vhost-user)
//! and `SOCK_SEQPACKET` (the forwarding protocol). One routine, so both kinds of daemon treat
//! the socket path alike:
//!
//! * a path that does not exist is bound;
//! * a socket file nobody accepts on (left by a daemon that died) is replaced;
//! * a socket somebody serves — with either socket type — is refused (`InUse`);
//! * anything that is not a socket (a regular file, a directory, ...) is never removed;
//! * an inherited fd (`--fd N`, socket activation) must be a listening UNIX socket of the
//!   expected type.
//!
//! It lives in `rqemu-protocol` (which the VMM links too) so that `sys::SeqListener` can use it;
//! daemons reach it through `rqemu_daemon::listen`.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Backlog of every listening socket (the standard library's for `UnixListener`).
const BACKLOG: libc::c_int = 128;

/// The socket type a daemon listens with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketType {
    /// `SOCK_STREAM`: vhost-user daemons.
    Stream,
    /// `SOCK_SEQPACKET`: forwarding-protocol daemons.
    SeqPacket,
}

impl SocketType {
    fn raw(self) -> libc::c_int {
        match self {
            SocketType::Stream => libc::SOCK_STREAM,
            SocketType::SeqPacket => libc::SOCK_SEQPACKET,
        }
    }
}

impl fmt::Display for SocketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SocketType::Stream => "stream",
            SocketType::SeqPacket => "seqpacket",
        })
    }
}

/// Where a daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Bind this path.
    Path(PathBuf),
    /// Adopt this inherited, already listening fd.
    Fd(RawFd),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Path(p) => write!(f, "{}", p.display()),
            Endpoint::Fd(fd) => write!(f, "inherited fd {fd}"),
        }
    }
}

/// Errors getting the listening socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Neither or both of a path and an fd were given.
    #[error("give exactly one of --socket PATH and --fd N")]
    Usage,
    /// Something that is not a socket exists at the path: it is never removed.
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    /// Another process is serving this socket.
    #[error("{} is in use by another process", .0.display())]
    InUse(PathBuf),
    /// Creating, binding or listening failed.
    #[error("cannot listen on {}: {source}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The inherited fd is unusable.
    #[error("fd {fd} is not a listening UNIX {kind} socket: {why}")]
    BadFd {
        /// The fd number.
        fd: RawFd,
        /// The socket type wanted.
        kind: SocketType,
        /// What is wrong with it.
        why: String,
    },
}

impl From<ListenError> for io::Error {
    fn from(e: ListenError) -> Self {
        let kind = match &e {
            ListenError::Usage | ListenError::BadFd { .. } => io::ErrorKind::InvalidInput,
            ListenError::NotASocket(_) => io::ErrorKind::AlreadyExists,
            ListenError::InUse(_) => io::ErrorKind::AddrInUse,
            ListenError::Bind { source, .. } => source.kind(),
        };
        io::Error::new(kind, e)
    }
}

impl Endpoint {
    /// From the usual `--socket PATH` / `--fd N` pair of options (exactly one given).
    pub fn from_args(socket: Option<PathBuf>, fd: Option<RawFd>) -> Result<Self, ListenError> {
        match (socket, fd) {
            (Some(p), None) => Ok(Endpoint::Path(p)),
            (None, Some(fd)) => Ok(Endpoint::Fd(fd)),
            _ => Err(ListenError::Usage),
        }
    }

    /// Opens the listening socket of type `kind` (see the module documentation).
    pub fn listen(&self, kind: SocketType) -> Result<OwnedFd, ListenError> {
        match self {
            Endpoint::Path(p) => bind_path(p, kind),
            Endpoint::Fd(fd) => inherit_fd(*fd, kind),
        }
    }
}

/// The `sockaddr_un` of `path` and its length (`InvalidInput` when the path is too long).
pub(crate) fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A new UNIX socket of type `kind` (close-on-exec).
fn socket(kind: SocketType) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = cvt(unsafe { libc::socket(libc::AF_UNIX, kind.raw() | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects a socket of type `kind` to `path` (used to tell a live socket from a stale one).
fn connect(path: &Path, kind: SocketType) -> io::Result<OwnedFd> {
    let s = socket(kind)?;
    let (addr, len) = sockaddr(path)?;
    // SAFETY: addr is a valid sockaddr_un of length len.
    cvt(unsafe {
        libc::connect(
            s.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    Ok(s)
}

/// Whether somebody accepts on the socket at `path`, with either socket type: a live listener
/// of the other type answers `EPROTOTYPE`, which still means "in use".
fn is_served(path: &Path, kind: SocketType) -> bool {
    match connect(path, kind) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() == Some(libc::EPROTOTYPE),
    }
}

/// A confined daemon killed outright (SIGKILL) serves on until its pid-namespace child has
/// followed its parent (`PR_SET_PDEATHSIG`), a few milliseconds: a restart right after must
/// not take that for a live daemon. A socket still answering after a second is one.
fn is_served_for_a_while(path: &Path, kind: SocketType) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while is_served(path, kind) {
        if std::time::Instant::now() >= deadline {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

fn bind_path(path: &Path, kind: SocketType) -> Result<OwnedFd, ListenError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ListenError::NotASocket(path.to_owned()));
        }
        if is_served_for_a_while(path, kind) {
            return Err(ListenError::InUse(path.to_owned()));
        }
        // A stale socket file left by a daemon that died: replace it.
        let _ = std::fs::remove_file(path);
    }
    let bind = || -> io::Result<OwnedFd> {
        let s = socket(kind)?;
        let (addr, len) = sockaddr(path)?;
        // SAFETY: addr is a valid sockaddr_un of length len.
        cvt(unsafe {
            libc::bind(
                s.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        })?;
        // Owner only (issue #12), before anyone can connect (not listening yet).
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        // SAFETY: plain listen(2) on our socket.
        cvt(unsafe { libc::listen(s.as_raw_fd(), BACKLOG) })?;
        Ok(s)
    };
    bind().map_err(|source| ListenError::Bind {
        path: path.to_owned(),
        source,
    })
}

static ALLOWED_UIDS: std::sync::OnceLock<Vec<libc::uid_t>> = std::sync::OnceLock::new();

/// Sets the uids besides the daemon's own whose connections are served (`--allow-uid`); once,
/// at start-up (later calls are ignored).
pub fn allow_uids(uids: Vec<libc::uid_t>) {
    let _ = ALLOWED_UIDS.set(uids);
}

/// The uid of the process at the other end of a connected UNIX socket (`SO_PEERCRED`).
pub fn peer_uid(fd: RawFd) -> io::Result<libc::uid_t> {
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred`/`len` describe a valid ucred buffer.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    })?;
    Ok(cred.uid)
}

/// Whether an accepted connection may be served: its peer runs as the daemon's own uid or one
/// `allow_uids` listed. A refusal is logged; the caller closes the connection and goes on.
pub fn peer_allowed(fd: RawFd) -> bool {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    match peer_uid(fd) {
        Ok(uid) if uid == me || ALLOWED_UIDS.get().is_some_and(|l| l.contains(&uid)) => true,
        Ok(uid) => {
            tracing::warn!("refused a connection from uid {uid} (not {me} nor --allow-uid)");
            false
        }
        Err(e) => {
            tracing::warn!("refused a connection: SO_PEERCRED: {e}");
            false
        }
    }
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val` and `len` are valid for writes of the sizes given; the kernel validates fd.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(val)
}

fn inherit_fd(fd: RawFd, kind: SocketType) -> Result<OwnedFd, ListenError> {
    let bad = |why: String| ListenError::BadFd { fd, kind, why };
    if fd < 3 {
        return Err(bad("stdio fds cannot be listening sockets".into()));
    }
    let domain = sockopt(fd, libc::SO_DOMAIN).map_err(|e| bad(e.to_string()))?;
    let ty = sockopt(fd, libc::SO_TYPE).map_err(|e| bad(e.to_string()))?;
    if domain != libc::AF_UNIX || ty != kind.raw() {
        return Err(bad(format!("socket domain {domain}, type {ty}")));
    }
    if sockopt(fd, libc::SO_ACCEPTCONN).map_err(|e| bad(e.to_string()))? == 0 {
        return Err(bad("listen() was not called on it".into()));
    }
    // SAFETY: fd is an open socket (getsockopt succeeded on it); the caller hands it over by
    // passing --fd, and from here on it is owned here.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain fcntl on an fd we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    const BOTH: [SocketType; 2] = [SocketType::Stream, SocketType::SeqPacket];

    #[test]
    fn binds_refuses_live_and_replaces_stale_sockets() {
        for kind in BOTH {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("s.sock");
            let e = Endpoint::Path(p.clone());
            let l = e.listen(kind).unwrap();
            connect(&p, kind).expect("the socket accepts connections");
            let err = e.listen(kind).unwrap_err();
            assert!(matches!(err, ListenError::InUse(_)), "{kind}: {err}");
            assert!(err.to_string().contains("s.sock"), "{err}");
            drop(l);
            // Stale now: replaced, and served again.
            let _l = e.listen(kind).unwrap();
            connect(&p, kind).unwrap();
        }
    }

    #[test]
    fn a_live_socket_of_the_other_type_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let e = Endpoint::Path(p.clone());
        let _stream = e.listen(SocketType::Stream).unwrap();
        let err = e.listen(SocketType::SeqPacket).unwrap_err();
        assert!(matches!(err, ListenError::InUse(_)), "{err}");
        connect(&p, SocketType::Stream).expect("the first daemon still serves");
    }

    #[test]
    fn never_removes_what_is_not_a_socket() {
        for kind in BOTH {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("file");
            std::fs::write(&p, b"precious").unwrap();
            let err = Endpoint::Path(p.clone()).listen(kind).unwrap_err();
            assert!(matches!(err, ListenError::NotASocket(_)), "{err}");
            assert!(err.to_string().contains("file exists and is not a socket"));
            assert_eq!(std::fs::read(&p).unwrap(), b"precious");
            let err = Endpoint::Path(dir.path().to_owned())
                .listen(kind)
                .unwrap_err();
            assert!(matches!(err, ListenError::NotASocket(_)), "{err}");
        }
    }

    #[test]
    fn bind_errors_name_the_path() {
        let err = Endpoint::Path("/nonexistent-dir/s".into())
            .listen(SocketType::Stream)
            .unwrap_err();
        assert!(matches!(err, ListenError::Bind { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent-dir/s"), "{err}");
    }

    #[test]
    fn inherits_only_listening_sockets_of_the_right_type() {
        for kind in BOTH {
            let dir = tempfile::tempdir().unwrap();
            let fd = Endpoint::Path(dir.path().join("a"))
                .listen(kind)
                .unwrap()
                .into_raw_fd();
            Endpoint::Fd(fd).listen(kind).unwrap();
            let other = if kind == SocketType::Stream {
                SocketType::SeqPacket
            } else {
                SocketType::Stream
            };
            let fd = Endpoint::Path(dir.path().join("b"))
                .listen(other)
                .unwrap()
                .into_raw_fd();
            let err = Endpoint::Fd(fd).listen(kind).unwrap_err();
            assert!(matches!(err, ListenError::BadFd { .. }), "{err}");
            assert!(err.to_string().contains(&format!("fd {fd} ")), "{err}");
            let f = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
            assert!(Endpoint::Fd(f).listen(kind).is_err());
            let s = socket(kind).unwrap().into_raw_fd();
            let err = Endpoint::Fd(s).listen(kind).unwrap_err();
            assert!(err.to_string().contains("listen() was not called"), "{err}");
            let err = Endpoint::Fd(1).listen(kind).unwrap_err();
            assert!(err.to_string().contains("stdio"), "{err}");
        }
        assert!(matches!(
            Endpoint::from_args(None, None),
            Err(ListenError::Usage)
        ));
        assert!(matches!(
            Endpoint::from_args(Some("/s".into()), Some(3)),
            Err(ListenError::Usage)
        ));
    }
}
