//! `--console-socket`: as runc does, a pseudo-terminal whose master goes to the engine over the
//! UNIX socket (SCM_RIGHTS); the monitor keeps the slave as the container's terminal, in raw
//! mode (the guest's own terminal does echo and line editing), as its controlling terminal so
//! that the engine's resizes arrive as SIGWINCH.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pseudo-terminal: {0}: {1}")]
    Pty(&'static str, #[source] io::Error),
    #[error("console socket {0}: {1}")]
    Socket(String, #[source] io::Error),
}

pub struct Pty {
    pub master: OwnedFd,
    pub slave: File,
    pub name: String,
}

fn os(what: &'static str) -> Error {
    Error::Pty(what, io::Error::last_os_error())
}

/// Opens a new pseudo-terminal pair, the slave in raw mode with this size (0 = unset).
pub fn open(rows: u16, cols: u16) -> Result<Pty, Error> {
    // SAFETY: plain libc calls on fds we own; ptsname_r writes into our buffer.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if m < 0 {
            return Err(os("posix_openpt"));
        }
        let master = OwnedFd::from_raw_fd(m);
        if libc::grantpt(m) != 0 {
            return Err(os("grantpt"));
        }
        if libc::unlockpt(m) != 0 {
            return Err(os("unlockpt"));
        }
        let mut buf = [0 as libc::c_char; 128];
        if libc::ptsname_r(m, buf.as_mut_ptr(), buf.len()) != 0 {
            return Err(os("ptsname_r"));
        }
        let name = std::ffi::CStr::from_ptr(buf.as_ptr())
            .to_string_lossy()
            .into_owned();
        let s = libc::open(
            buf.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if s < 0 {
            return Err(os("open slave"));
        }
        let slave = File::from_raw_fd(s);
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(s, &mut t) != 0 {
            return Err(os("tcgetattr"));
        }
        libc::cfmakeraw(&mut t);
        if libc::tcsetattr(s, libc::TCSANOW, &t) != 0 {
            return Err(os("tcsetattr"));
        }
        if rows > 0 && cols > 0 {
            set_size(&slave, rows, cols);
        }
        Ok(Pty {
            master,
            slave,
            name,
        })
    }
}

pub fn set_size(tty: &File, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from our stack.
    unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// The terminal's size (rows, cols).
pub fn size(tty: &File) -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ writes a winsize into our zeroed stack value.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(tty.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) == 0)
            .then_some((ws.ws_row, ws.ws_col))
    }
}

/// Makes `tty` the caller's controlling terminal (the caller leads a session without one).
pub fn make_controlling(tty: &File) -> Result<(), Error> {
    // SAFETY: TIOCSCTTY on our own fd.
    if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
        return Err(os("TIOCSCTTY"));
    }
    Ok(())
}

/// Sends `fd` over the UNIX socket at `path` with `name` as the message (runc's way).
pub fn send_fd(path: &Path, fd: &OwnedFd, name: &str) -> Result<(), Error> {
    let err = |e| Error::Socket(path.display().to_string(), e);
    let sock = UnixStream::connect(path).map_err(err)?;
    let raw = fd.as_raw_fd();
    let mut data = name.as_bytes().to_vec();
    // SAFETY: the control buffer is sized with CMSG_SPACE for one fd and aligned for cmsghdr;
    // the CMSG_* macros address inside it; sendmsg reads the iovec and control buffers only.
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), raw);
        if libc::sendmsg(sock.as_raw_fd(), &msg, 0) < 0 {
            return Err(err(io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    /// Receives one fd as conmon does.
    fn recv_fd(s: &UnixStream) -> (OwnedFd, String) {
        // SAFETY: buffers sized for one fd; recvmsg fills them; the fd is then ours.
        unsafe {
            let mut data = [0u8; 256];
            let mut iov = libc::iovec {
                iov_base: data.as_mut_ptr().cast(),
                iov_len: data.len(),
            };
            let mut control = [0u64; 8];
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            let n = libc::recvmsg(s.as_raw_fd(), &mut msg, 0);
            assert!(n > 0);
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            assert!(!cmsg.is_null());
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
            (
                OwnedFd::from_raw_fd(fd),
                String::from_utf8_lossy(&data[..n as usize]).into_owned(),
            )
        }
    }

    #[test]
    fn master_travels_and_bytes_pass_raw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let l = UnixListener::bind(&path).unwrap();
        let pty = open(24, 80).unwrap();
        assert_eq!(size(&pty.slave), Some((24, 80)));
        send_fd(&path, &pty.master, &pty.name).unwrap();
        let (s, _) = l.accept().unwrap();
        let (master, name) = recv_fd(&s);
        assert_eq!(name, pty.name);
        drop(pty.master);
        let mut master = File::from(master);
        let mut slave = pty.slave;
        // Raw: no echo, no CR/LF translation either way.
        master.write_all(b"ab\r\n").unwrap();
        let mut buf = [0u8; 4];
        slave.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ab\r\n");
        slave.write_all(b"x\n").unwrap();
        let mut buf = [0u8; 2];
        master.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"x\n");
    }
}
