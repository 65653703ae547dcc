//! The host side in Firecracker's hybrid-vsock convention: the host connects to the daemon's
//! UNIX socket `PATH` and writes `CONNECT <port>\n` to reach guest port `port` (answered
//! `OK <host_port>\n` once the guest accepted); a guest connecting to host port `P` reaches the
//! UNIX socket `PATH_P`, on which a host program listens.

use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Longest handshake line accepted (`CONNECT 4294967295\n` is 19 bytes).
pub const MAX_LINE: usize = 32;

/// Errors of the handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The line is not `CONNECT <port>`.
    #[error("bad handshake line {0:?}")]
    BadLine(String),
    /// No newline within [`MAX_LINE`] bytes.
    #[error("handshake line longer than {MAX_LINE} bytes")]
    TooLong,
    /// The host closed before a full line.
    #[error("host closed during the handshake")]
    Closed,
    /// Reading failed.
    #[error("reading the handshake: {0}")]
    Io(#[from] io::Error),
}

/// The socket a guest connection to host port `port` goes to: `PATH_<port>`.
pub fn port_path(base: &Path, port: u32) -> PathBuf {
    let mut p = base.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Connects to `PATH_<port>` without blocking: a listener whose backlog is full refuses
/// (`EAGAIN`) rather than stalling the queue worker.
pub fn connect_port(base: &Path, port: u32) -> io::Result<UnixStream> {
    let path = port_path(base, port);
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
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un of length len; fd is ours.
    let r = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// Parses `CONNECT <port>` (without the newline; a trailing `\r` is tolerated).
pub fn parse_connect(line: &[u8]) -> Result<u32, HandshakeError> {
    let bad = || HandshakeError::BadLine(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let port = text.strip_prefix("CONNECT ").ok_or_else(bad)?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    port.parse().map_err(|_| bad())
}

/// A host connection that has not finished its `CONNECT` line.
#[derive(Debug)]
pub struct Handshake {
    /// The accepted socket (non-blocking).
    pub stream: UnixStream,
    buf: Vec<u8>,
}

impl Handshake {
    /// Starts reading the line on `stream`.
    pub fn new(stream: UnixStream) -> Self {
        Handshake {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads what is there: `Ok(None)` until the line is complete, then the port and the
    /// bytes that followed the newline.
    pub fn advance(&mut self) -> Result<Option<(u32, Vec<u8>)>, HandshakeError> {
        loop {
            let mut chunk = [0u8; MAX_LINE];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                if nl > MAX_LINE {
                    return Err(HandshakeError::TooLong);
                }
                let port = parse_connect(&self.buf[..nl])?;
                return Ok(Some((port, self.buf[nl + 1..].to_vec())));
            }
            if self.buf.len() > MAX_LINE {
                return Err(HandshakeError::TooLong);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52").unwrap(), 52);
        assert_eq!(parse_connect(b"CONNECT 52\r").unwrap(), 52);
        assert_eq!(parse_connect(b"CONNECT 4294967295").unwrap(), u32::MAX);
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT 4294967296",
            b"CONNECT -1",
            b"CONNECT +1",
            b"connect 1",
            b"CONNECT 1 2",
            b"\xff",
        ] {
            assert!(parse_connect(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            port_path(Path::new("/run/v.sock"), 1024),
            Path::new("/run/v.sock_1024")
        );
    }

    #[test]
    fn a_line_in_pieces_and_the_bytes_after_it() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut h = Handshake::new(a);
        assert!(h.advance().unwrap().is_none());
        b.write_all(b"CONN").unwrap();
        assert!(h.advance().unwrap().is_none());
        b.write_all(b"ECT 1234\nhello").unwrap();
        assert_eq!(h.advance().unwrap(), Some((1234, b"hello".to_vec())));
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.write_all(&[b'x'; 40]).unwrap();
        assert!(matches!(
            Handshake::new(a).advance(),
            Err(HandshakeError::TooLong)
        ));
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        drop(b);
        assert!(matches!(
            Handshake::new(a).advance(),
            Err(HandshakeError::Closed)
        ));
    }

    #[test]
    fn connecting_to_a_missing_port_fails_and_a_listening_one_works() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("v.sock");
        assert!(connect_port(&base, 5).is_err());
        let l = std::os::unix::net::UnixListener::bind(port_path(&base, 5)).unwrap();
        let s = connect_port(&base, 5).unwrap();
        let (mut peer, _) = l.accept().unwrap();
        peer.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        // Non-blocking: wait for the byte.
        let mut s = s;
        s.set_nonblocking(false).unwrap();
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");
    }
}
