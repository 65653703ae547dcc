//! The vhost-user wire as the relay sees it: a 12-byte header (request, flags, payload size),
//! the payload, and fds as SCM_RIGHTS; read and written whole, bounded.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use super::RelayError;

pub(super) const HDR_LEN: usize = 12;
/// Largest payload relayed (vhost-user messages are at most a few KiB).
pub(super) const MAX_PAYLOAD: usize = 0x1_0000;
/// Most fds attached to one message.
pub(super) const MAX_FDS: usize = 32;

/// One message: `buf[..len]` (header and payload) and its fds.
pub(super) struct Msg {
    pub(super) buf: Vec<u8>,
    pub(super) len: usize,
    pub(super) fds: Vec<OwnedFd>,
}

impl Msg {
    /// The whole message, header included.
    pub(super) fn bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    pub(super) fn request(&self) -> u32 {
        word(&self.buf, 0)
    }
    pub(super) fn flags(&self) -> u32 {
        word(&self.buf, 4)
    }
    pub(super) fn payload(&self) -> &[u8] {
        self.buf.get(HDR_LEN..self.len).unwrap_or_default()
    }
}

pub(super) fn word(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

/// `recvmsg` of up to `buf.len()` bytes, collecting SCM_RIGHTS fds.
pub(super) fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = [0u64; (MAX_FDS * 4 + 64) / 8];
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr().cast();
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    let n = loop {
        // SAFETY: `msg` points at live buffers of the sizes it declares.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: `msg` was filled by recvmsg; the CMSG macros walk its control buffer.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is a valid cmsghdr inside the control buffer (CMSG_FIRSTHDR/NXTHDR).
        let (level, kind, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a constant computation.
            let hdr = unsafe { libc::CMSG_LEN(0) } as usize;
            let data_len = len.saturating_sub(hdr);
            let count = data_len / std::mem::size_of::<RawFd>();
            // SAFETY: the data of an SCM_RIGHTS cmsg is `count` fds, possibly unaligned.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: within the cmsg data; the kernel installed these fds for us.
                let fd = unsafe { data.add(i).read_unaligned() };
                // SAFETY: a freshly received fd, owned by nobody else.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        // More fds than the control buffer holds: the kernel dropped (closed) the rest, so the
        // message cannot be relayed faithfully (issue #12). The fds received are closed with
        // the message.
        return Err(io::Error::other(
            "a message carried more file descriptors than a vhost-user message can (MSG_CTRUNC)",
        ));
    }
    Ok(n)
}

pub(super) fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many fds in one message",
        ));
    }
    let mut sent = 0;
    while sent < data.len() {
        let rest = data.get(sent..).unwrap_or_default();
        let iov = [IoSlice::new(rest)];
        let mut cmsg = [0u64; (MAX_FDS * 4 + 64) / 8];
        // SAFETY: as in recv_with_fds.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = 1;
        if sent == 0 && !fds.is_empty() {
            let bytes = std::mem::size_of_val(fds) as u32;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            // SAFETY: constant computation.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes) } as _;
            // SAFETY: the control buffer holds CMSG_SPACE(MAX_FDS fds) and fds.len() <= MAX_FDS.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(bytes) as _;
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for (i, fd) in fds.iter().enumerate() {
                    p.add(i).write_unaligned(fd.as_raw_fd());
                }
            }
        }
        // SAFETY: `msg` points at live buffers of the sizes it declares.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

/// Reads one whole message; `None` at end of stream.
pub(super) fn read_msg(sock: &UnixStream, msg: &mut Msg) -> Result<Option<()>, RelayError> {
    msg.fds.clear();
    msg.len = 0;
    while msg.len < HDR_LEN {
        let n = recv_with_fds(
            sock,
            msg.buf.get_mut(msg.len..HDR_LEN).unwrap_or_default(),
            &mut msg.fds,
        )?;
        if n == 0 {
            return Ok(None);
        }
        msg.len += n;
        if msg.fds.len() > MAX_FDS {
            return Err(RelayError::TooLarge(msg.fds.len()));
        }
    }
    let size = word(&msg.buf, 8) as usize;
    if size > MAX_PAYLOAD {
        return Err(RelayError::TooLarge(size));
    }
    let total = HDR_LEN + size;
    while msg.len < total {
        let n = recv_with_fds(
            sock,
            msg.buf.get_mut(msg.len..total).unwrap_or_default(),
            &mut msg.fds,
        )?;
        if n == 0 {
            return Ok(None);
        }
        msg.len += n;
    }
    Ok(Some(()))
}

pub(super) fn new_msg() -> Msg {
    Msg {
        buf: vec![0u8; HDR_LEN + MAX_PAYLOAD],
        len: 0,
        fds: Vec::new(),
    }
}
