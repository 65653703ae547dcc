//! Thin, safe wrappers over the Linux primitives the protocol uses: `SOCK_SEQPACKET` sockets with
//! `SCM_RIGHTS`, eventfds and sealed memfd mappings. Plain `libc`, every call checked.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use crate::listen::{sockaddr, Endpoint, ListenError, SocketType};

/// Most fds one message may carry; more is an fd flood and the message is rejected.
pub const MAX_FDS: usize = 64;
/// Most fds [`SeqSocket::send`] attaches (the kernel's `SCM_MAX_FD`).
pub const SEND_MAX_FDS: usize = 253;
/// Largest socket message.
pub const MAX_MSG: usize = 8192;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Waits until one of `fds` is readable (or hung up / in error). `out` receives each fd's
/// `revents`; returns false on timeout. `None` timeout waits forever. EINTR is retried.
pub fn poll_in(
    fds: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
    out: &mut [i16],
) -> io::Result<bool> {
    let mut ev = [(-1, 0i16); 16];
    for (e, f) in ev.iter_mut().zip(fds) {
        *e = (f.as_raw_fd(), libc::POLLIN);
    }
    poll_raw(&ev[..fds.len().min(16)], timeout, out)
}

/// `poll(2)` on `(fd, events)` pairs (at most 16); `out` receives the `revents`.
pub fn poll_raw(
    fds: &[(RawFd, i16)],
    timeout: Option<Duration>,
    out: &mut [i16],
) -> io::Result<bool> {
    let mut pfds = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 16];
    let n = fds.len().min(pfds.len());
    for (p, &(fd, events)) in pfds.iter_mut().zip(fds) {
        p.fd = fd;
        p.events = events;
    }
    let ms = match timeout {
        None => -1,
        // Round up so a short positive timeout does not become a busy 0 ms poll.
        Some(d) => d.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int,
    };
    loop {
        // SAFETY: pfds is a valid array of at least n pollfd entries.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), n as libc::nfds_t, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for (o, p) in out.iter_mut().zip(&pfds[..n]) {
            *o = p.revents;
        }
        return Ok(r > 0);
    }
}

/// A connected `SOCK_SEQPACKET` UNIX socket: message boundaries kept, fds passed alongside.
#[derive(Debug)]
pub struct SeqSocket(OwnedFd);

impl SeqSocket {
    /// A connected pair (both ends in one process; tests and benchmarks).
    pub fn pair() -> io::Result<(SeqSocket, SeqSocket)> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid out array of two ints.
        cvt(unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        })?;
        // SAFETY: socketpair succeeded: both fds are new and owned by us.
        Ok(unsafe {
            (
                Self(OwnedFd::from_raw_fd(fds[0])),
                Self(OwnedFd::from_raw_fd(fds[1])),
            )
        })
    }

    /// Connects to a listening seqpacket socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let (addr, len) = sockaddr(path)?;
        // SAFETY: plain socket(2).
        let fd = cvt(unsafe {
            libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: fd was just created and is owned by nobody else.
        let sock = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        // SAFETY: addr is a valid sockaddr_un of length len.
        cvt(unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) })?;
        Ok(sock)
    }

    /// Sends one message with `fds` attached.
    pub fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > SEND_MAX_FDS {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many fds"));
        }
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let mut cbuf = [0u64; (SEND_MAX_FDS * 4 + 64) / 8];
        // SAFETY: msghdr is plain data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let data_len = (fds.len() * std::mem::size_of::<RawFd>()) as u32;
            // SAFETY: CMSG_SPACE is a pure computation.
            let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: msg_control points to cbuf, large enough for `space` bytes (SEND_MAX_FDS);
            // CMSG_FIRSTHDR then returns a header inside it.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(data_len) as usize;
                let p = libc::CMSG_DATA(c) as *mut RawFd;
                for (i, f) in fds.iter().enumerate() {
                    p.add(i).write_unaligned(f.as_raw_fd());
                }
            }
        }
        // SAFETY: msg points to valid iovec/control buffers that outlive the call.
        let r = unsafe { libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if r as usize != bytes.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short send"));
        }
        Ok(())
    }

    /// Receives one message into `buf`, appending attached fds to `fds` (they are owned, so
    /// dropped fds are closed). Errors: timeout (`TimedOut`), peer closed (`UnexpectedEof`), a
    /// message longer than `buf` or with more than [`MAX_FDS`] fds (`InvalidData`).
    pub fn recv(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        if timeout.is_some() {
            let mut rev = [0i16];
            if !poll_in(&[self.0.as_fd()], timeout, &mut rev)? {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "peer did not answer",
                ));
            }
        }
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut cbuf = [0u64; (MAX_FDS * 4 + 64) / 8];
        // SAFETY: msghdr is plain data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        let n = loop {
            // SAFETY: msg points to valid buffers that outlive the call.
            let r = unsafe { libc::recvmsg(self.0.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            break r as usize;
        };
        // Take ownership of every fd received first, so nothing leaks on any error below.
        let before = fds.len();
        // SAFETY: msg was filled by recvmsg; the CMSG_* macros walk its control buffer within
        // msg_controllen, and SCM_RIGHTS payloads are arrays of fds now owned by this process.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const RawFd;
                    let hdr = libc::CMSG_LEN(0) as usize;
                    let count = ((*c).cmsg_len as usize).saturating_sub(hdr) / 4;
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() - before > MAX_FDS {
            fds.truncate(before);
            return Err(io::Error::new(io::ErrorKind::InvalidData, "fd flood"));
        }
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            fds.truncate(before);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "message too long",
            ));
        }
        if n == 0 && buf.is_empty() {
            return Ok(0);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed"));
        }
        Ok(n)
    }
}

impl AsFd for SeqSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A listening `SOCK_SEQPACKET` UNIX socket.
#[derive(Debug)]
pub struct SeqListener(OwnedFd);

impl SeqListener {
    /// Listens on `endpoint` with the daemons' one listening routine
    /// ([`crate::listen`]: a stale socket is replaced, a live one or a non-socket refused, an
    /// inherited fd checked).
    pub fn listen(endpoint: &Endpoint) -> Result<Self, ListenError> {
        endpoint.listen(SocketType::SeqPacket).map(Self)
    }

    /// Binds `path` (see [`SeqListener::listen`]).
    pub fn bind(path: &Path) -> Result<Self, ListenError> {
        Self::listen(&Endpoint::Path(path.to_owned()))
    }

    /// Adopts an inherited fd (`--fd N`) after checking it is a listening UNIX seqpacket socket.
    pub fn from_fd(fd: RawFd) -> Result<Self, ListenError> {
        Self::listen(&Endpoint::Fd(fd))
    }

    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<SeqSocket> {
        loop {
            // SAFETY: null address pointers are allowed by accept4.
            let r = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // SAFETY: accept4 returned a new fd we now own.
            return Ok(SeqSocket(unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
}

/// An eventfd doorbell / interrupt line.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain eventfd(2).
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: fd is new and owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Wraps a received fd (checked to be an eventfd by a test write of 0).
    pub fn from_owned(fd: OwnedFd) -> io::Result<Self> {
        let e = Self(fd);
        let zero = 0u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid buffer; a non-eventfd either fails or is harmless.
        let r = unsafe { libc::write(e.0.as_raw_fd(), zero.as_ptr().cast(), 8) };
        if r != 8 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fd is not an eventfd",
            ));
        }
        Ok(e)
    }

    /// Adds 1 to the counter (wakes a waiter).
    pub fn signal(&self) -> io::Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid buffer.
        let r = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), 8) };
        if r == 8 || io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Reads and clears the counter; 0 if it was not signalled.
    pub fn drain(&self) -> u64 {
        let mut b = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a valid buffer.
        let r = unsafe { libc::read(self.0.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        if r == 8 {
            u64::from_ne_bytes(b)
        } else {
            0
        }
    }

    /// Waits up to `timeout` for a signal and drains it; true if it was signalled.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let mut rev = [0i16];
        let ready = poll_in(&[self.0.as_fd()], timeout, &mut rev)?;
        Ok(ready && self.drain() > 0)
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl From<EventFd> for OwnedFd {
    /// The eventfd itself, e.g. to register it with KVM or wrap it in another eventfd type.
    fn from(e: EventFd) -> OwnedFd {
        e.0
    }
}

/// A shared-memory mapping backed by a memfd whose size is sealed, so the peer can neither
/// shrink it (which would SIGBUS this process) nor grow it.
#[derive(Debug)]
pub struct SharedMem {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is only accessed through atomics (see ring.rs); the raw pointer is valid
// for the lifetime of the value on any thread.
unsafe impl Send for SharedMem {}
// SAFETY: as above.
unsafe impl Sync for SharedMem {}

impl SharedMem {
    /// Creates a zeroed, size-sealed memfd of `len` bytes and maps it.
    pub fn create(name: &str, len: usize) -> io::Result<Self> {
        let cname = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: cname is a valid C string.
        let fd = cvt(unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        })?;
        // SAFETY: fd is new and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain ftruncate/fcntl on our fd.
        cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })?;
        // SAFETY: as above.
        cvt(unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        })?;
        Self::map(fd, len)
    }

    /// Maps a received memfd after checking it is sealed against resizing and at least `len`
    /// bytes long.
    pub fn from_fd(fd: OwnedFd, len: usize) -> io::Result<Self> {
        // SAFETY: plain fcntl on an owned fd.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "memfd not sealed against shrinking",
            ));
        }
        // SAFETY: stat is plain data; fstat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid out pointer.
        cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
        if (st.st_size as u64) < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "memfd smaller than announced",
            ));
        }
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: a fresh shared mapping of an fd we own; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            ptr: p.cast(),
            len,
        })
    }

    /// Base pointer of the mapping.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length of the mapping.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `map` refuses that).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl AsFd for SharedMem {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe the mapping made in `map`, unmapped exactly once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqpacket_keeps_boundaries_and_passes_fds() {
        let (a, b) = SeqSocket::pair().unwrap();
        let e = EventFd::new().unwrap();
        a.send(b"one", &[e.as_fd()]).unwrap();
        a.send(b"three", &[]).unwrap();
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        assert_eq!(b.recv(&mut buf, &mut fds, None).unwrap(), 3);
        assert_eq!(fds.len(), 1);
        let got = EventFd::from_owned(fds.pop().unwrap()).unwrap();
        e.signal().unwrap();
        assert_eq!(got.drain(), 1);
        assert_eq!(b.recv(&mut buf, &mut fds, None).unwrap(), 5);
        let err = b
            .recv(&mut buf, &mut fds, Some(Duration::from_millis(10)))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(a);
        let err = b.recv(&mut buf, &mut fds, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn oversized_messages_are_rejected() {
        let (a, b) = SeqSocket::pair().unwrap();
        a.send(&[0u8; 64], &[]).unwrap();
        let mut buf = [0u8; 16];
        let err = b.recv(&mut buf, &mut Vec::new(), None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn listener_binds_inherits_and_probes() {
        use std::os::fd::IntoRawFd;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let l = SeqListener::bind(&p).unwrap();
        let c = SeqSocket::connect(&p).unwrap();
        let s = l.accept().unwrap();
        c.send(b"x", &[]).unwrap();
        assert_eq!(s.recv(&mut [0u8; 4], &mut Vec::new(), None).unwrap(), 1);
        assert!(
            SeqListener::bind(&p).is_err(),
            "served socket is not replaced"
        );
        assert_eq!(
            crate::probe_socket_kind(&p).unwrap(),
            crate::SocketKind::Forwarding
        );
        let fd = l.0.try_clone().unwrap().into_raw_fd();
        SeqListener::from_fd(fd).unwrap();
        // A vhost-user style stream listener is told apart, and refused as --fd.
        let q = dir.path().join("stream");
        let stream = std::os::unix::net::UnixListener::bind(&q).unwrap();
        assert_eq!(
            crate::probe_socket_kind(&q).unwrap(),
            crate::SocketKind::VhostUser
        );
        assert!(SeqListener::from_fd(stream.into_raw_fd()).is_err());
        std::fs::write(dir.path().join("f"), b"keep").unwrap();
        assert!(SeqListener::bind(&dir.path().join("f")).is_err());
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"keep");
    }

    #[test]
    fn memfd_is_sealed() {
        let m = SharedMem::create("t", 4096).unwrap();
        // SAFETY: plain ftruncate on the memfd; it must fail because of the seals.
        let r = unsafe { libc::ftruncate(m.as_fd().as_raw_fd(), 0) };
        assert!(r < 0);
        let dup = m.as_fd().try_clone_to_owned().unwrap();
        let m2 = SharedMem::from_fd(dup, 4096).unwrap();
        assert_eq!(m2.len(), 4096);
        let dup = m.as_fd().try_clone_to_owned().unwrap();
        assert!(SharedMem::from_fd(dup, 8192).is_err());
    }
}
