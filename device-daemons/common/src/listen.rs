//! The daemon's listening socket.
//!
//! A daemon either binds a path (`--socket PATH`) or inherits an already listening socket
//! (`--fd N`, e.g. from systemd socket activation or a container runtime). Either way it gets a
//! `UnixListener` that survives any number of frontend connections.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Errors getting the listening socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Neither or both of a path and an fd were given.
    #[error("give exactly one of --socket PATH and --fd N")]
    Usage,
    /// Something that is not a socket exists at the path: refuse to remove it.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Another process is serving this socket.
    #[error("{0} is in use by another process")]
    InUse(PathBuf),
    /// Binding failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The inherited fd is unusable.
    #[error("fd {fd} is not a listening UNIX stream socket: {why}")]
    BadFd {
        /// The fd number.
        fd: RawFd,
        /// What is wrong with it.
        why: String,
    },
}

/// Where to listen.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// Bind this path (a stale socket left by a dead daemon is replaced).
    Path(PathBuf),
    /// Use this inherited, already listening fd.
    Fd(RawFd),
}

impl Endpoint {
    /// From the usual `--socket` / `--fd` pair of options.
    pub fn from_args(socket: Option<PathBuf>, fd: Option<RawFd>) -> Result<Self, ListenError> {
        match (socket, fd) {
            (Some(p), None) => Ok(Endpoint::Path(p)),
            (None, Some(fd)) => Ok(Endpoint::Fd(fd)),
            _ => Err(ListenError::Usage),
        }
    }

    /// Opens the listening socket.
    pub fn listen(&self) -> Result<UnixListener, ListenError> {
        match self {
            Endpoint::Path(p) => bind_path(p),
            Endpoint::Fd(fd) => inherit_fd(*fd),
        }
    }
}

fn bind_path(path: &Path) -> Result<UnixListener, ListenError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ListenError::NotASocket(path.to_owned()))
        }
        Ok(_) => {
            // A socket file: stale if nobody accepts on it.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::InUse(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(|source| ListenError::Bind {
        path: path.to_owned(),
        source,
    })
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val` and `len` are valid for writes of the sizes given; the kernel validates fd.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(val)
    }
}

fn inherit_fd(fd: RawFd) -> Result<UnixListener, ListenError> {
    let bad = |why: String| ListenError::BadFd { fd, why };
    if fd < 3 {
        return Err(bad("stdio fds cannot be listening sockets".into()));
    }
    let domain = sockopt(fd, libc::SO_DOMAIN).map_err(|e| bad(e.to_string()))?;
    let kind = sockopt(fd, libc::SO_TYPE).map_err(|e| bad(e.to_string()))?;
    let listening = sockopt(fd, libc::SO_ACCEPTCONN).map_err(|e| bad(e.to_string()))?;
    if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM {
        return Err(bad(format!("domain {domain}, type {kind}")));
    }
    if listening == 0 {
        return Err(bad("listen() was not called on it".into()));
    }
    // SAFETY: fd is an open socket (getsockopt succeeded on it); from here on the listener owns
    // it. The caller hands it over by passing --fd.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // SAFETY: plain fcntl on an fd we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn binds_and_replaces_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let l = Endpoint::Path(p.clone()).listen().unwrap();
        // While it is served, a second daemon is refused.
        assert!(matches!(
            Endpoint::Path(p.clone()).listen(),
            Err(ListenError::InUse(_))
        ));
        drop(l);
        // The socket file is stale now: replaced.
        Endpoint::Path(p).listen().unwrap();
    }

    #[test]
    fn refuses_to_clobber_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("file");
        std::fs::write(&p, b"precious").unwrap();
        assert!(matches!(
            Endpoint::Path(p.clone()).listen(),
            Err(ListenError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
    }

    #[test]
    fn inherits_listening_fd_only() {
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("a")).unwrap();
        let fd = l.into_raw_fd();
        Endpoint::Fd(fd).listen().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let err = Endpoint::Fd(f.into_raw_fd()).listen().unwrap_err();
        assert!(matches!(err, ListenError::BadFd { .. }), "{err}");
        assert!(matches!(
            Endpoint::from_args(None, None),
            Err(ListenError::Usage)
        ));
    }
}
