//! The host side of the link: a small [`Tap`] seam and the Linux tap implementation
//! ([`TapQueue`]: one fd of a — possibly multi-queue — `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`
//! device, non-blocking, with a 12-byte virtio 1.x vnet header).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::header::VNET_HDR_LEN;

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or contains NUL.
    #[error("invalid tap name {0:?} (1 to 15 bytes, no NUL)")]
    BadName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    /// An ioctl failed.
    #[error("{what} on tap {name}: {source}")]
    Ioctl {
        /// The request.
        what: &'static str,
        /// The interface.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An inherited fd is not a tap with a vnet header.
    #[error("fd {fd} is not a usable tap: {why}")]
    BadFd {
        /// The fd.
        fd: RawFd,
        /// What is wrong.
        why: String,
    },
}

/// One queue of the host network device, as the device logic needs it. Implemented by
/// [`TapQueue`]; tests use a socketpair.
pub trait Tap: Send + Sync {
    /// Reads one packet (vnet header + frame). `WouldBlock` when none is queued.
    fn read_packet(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one packet (vnet header + frame).
    fn write_packet(&self, buf: &[u8]) -> io::Result<usize>;
    /// Writes one packet gathered from an I/O vector (`writev`). The default copies the
    /// pieces into one buffer and calls [`Tap::write_packet`].
    ///
    /// # Safety
    /// Every iovec must describe memory that is readable for the duration of the call.
    unsafe fn write_iov(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let mut buf = Vec::new();
        for v in iov {
            // SAFETY: the caller guarantees each iovec is readable memory of that length.
            buf.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
            });
        }
        self.write_packet(&buf)
    }
    /// Sets the offloads the guest accepts on receive (`TUN_F_*`).
    fn set_offload(&self, flags: u32) -> io::Result<()>;
    /// Attaches (or detaches) this queue so the kernel steers traffic to it (or not).
    fn set_queue_enabled(&self, _enabled: bool) -> io::Result<()> {
        Ok(())
    }
    /// The fd to poll for readability.
    fn raw_fd(&self) -> RawFd;
}

/// `TUN_F_CSUM`: the reader accepts partial checksums.
pub const TUN_F_CSUM: u32 = 0x01;
/// `TUN_F_TSO4`.
pub const TUN_F_TSO4: u32 = 0x02;
/// `TUN_F_TSO6`.
pub const TUN_F_TSO6: u32 = 0x04;
/// `TUN_F_UFO`.
pub const TUN_F_UFO: u32 = 0x10;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;

// _IOW('T', n, int) / _IOR('T', n, unsigned int), as in <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const SIOCSIFMTU: libc::c_ulong = 0x8922;

/// `struct ifreq` restricted to the members used here (name + flags/mtu union).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    /// `ifr_flags` (short) or `ifr_mtu` (int), padded to the union's 24 bytes.
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(TapError::BadName(name.to_string()));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        Ok(req)
    }

    fn set_short(&mut self, v: libc::c_short) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn short(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: every caller passes a request whose argument is a pointer to a live `T` of the
    // layout the kernel expects (ifreq or int); the kernel validates the fd.
    let r = unsafe { libc::ioctl(fd, req as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_val(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: requests taking an integer argument by value (TUNSETOFFLOAD); no memory access.
    let r = unsafe { libc::ioctl(fd, req as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One queue (fd) of a Linux tap device.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
    name: String,
}

impl TapQueue {
    /// Creates or attaches tap `name` with `queues` queues (`IFF_MULTI_QUEUE` when more
    /// than one) and configures each fd (vnet header size, non-blocking).
    pub fn open(name: &str, queues: usize) -> Result<Vec<TapQueue>, TapError> {
        let mut out = Vec::with_capacity(queues);
        for _ in 0..queues.max(1) {
            // SAFETY: open(2) on a constant NUL-terminated path.
            let fd = unsafe {
                libc::open(
                    c"/dev/net/tun".as_ptr(),
                    libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(TapError::OpenTun(io::Error::last_os_error()));
            }
            // SAFETY: `fd` was just opened and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let mut req = IfReq::new(name)?;
            let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
            if queues > 1 {
                flags |= IFF_MULTI_QUEUE;
            }
            req.set_short(flags);
            ioctl_ptr(fd.as_raw_fd(), TUNSETIFF, &mut req).map_err(|source| TapError::Ioctl {
                what: "TUNSETIFF",
                name: name.to_string(),
                source,
            })?;
            let q = TapQueue {
                fd,
                name: req.name(),
            };
            q.configure()?;
            out.push(q);
        }
        Ok(out)
    }

    /// Adopts an fd attached to a tap by a privileged parent. It must have been created with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
    ///
    /// # Safety
    /// `fd` must be an open fd that the caller hands over (nothing else closes or uses it).
    pub unsafe fn from_raw_fd(fd: RawFd) -> Result<TapQueue, TapError> {
        let bad = |why: String| TapError::BadFd { fd, why };
        if fd < 3 {
            return Err(bad("stdio fds are not taps".into()));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        ioctl_ptr(fd, TUNGETIFF, &mut req).map_err(|e| bad(format!("TUNGETIFF: {e}")))?;
        let flags = req.short();
        if flags & IFF_TAP == 0 || flags & IFF_NO_PI == 0 || flags & IFF_VNET_HDR == 0 {
            return Err(bad(format!(
                "flags {flags:#x} lack IFF_TAP|IFF_NO_PI|IFF_VNET_HDR"
            )));
        }
        // SAFETY: per this function's contract the fd is ours from now on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let q = TapQueue {
            fd,
            name: req.name(),
        };
        // SAFETY: fcntl on an fd we own; no memory access.
        let fl = unsafe { libc::fcntl(q.fd.as_raw_fd(), libc::F_GETFL) };
        let set = if fl < 0 {
            -1
        } else {
            // SAFETY: as above.
            unsafe { libc::fcntl(q.fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) }
        };
        if set < 0 {
            return Err(TapError::BadFd {
                fd: q.fd.as_raw_fd(),
                why: "cannot set O_NONBLOCK".into(),
            });
        }
        // SAFETY: as above.
        unsafe { libc::fcntl(q.fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        q.configure()?;
        Ok(q)
    }

    fn configure(&self) -> Result<(), TapError> {
        let mut sz: libc::c_int = VNET_HDR_LEN as libc::c_int;
        ioctl_ptr(self.fd.as_raw_fd(), TUNSETVNETHDRSZ, &mut sz).map_err(|source| {
            TapError::Ioctl {
                what: "TUNSETVNETHDRSZ",
                name: self.name.clone(),
                source,
            }
        })?;
        // No receive offloads until the guest negotiates them.
        ioctl_val(self.fd.as_raw_fd(), TUNSETOFFLOAD, 0).map_err(|source| TapError::Ioctl {
            what: "TUNSETOFFLOAD",
            name: self.name.clone(),
            source,
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the interface MTU (`SIOCSIFMTU`).
    pub fn set_mtu(&self, mtu: u16) -> Result<(), TapError> {
        let err = |source| TapError::Ioctl {
            what: "SIOCSIFMTU",
            name: self.name.clone(),
            source,
        };
        // SAFETY: socket(2) with constant arguments.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: `s` was just created and is owned here.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        let mut req = IfReq::new(&self.name)?;
        req.data[..4].copy_from_slice(&libc::c_int::from(mtu).to_ne_bytes());
        ioctl_ptr(s.as_raw_fd(), SIOCSIFMTU, &mut req).map_err(err)
    }
}

fn io_result(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl Tap for TapQueue {
    fn read_packet(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        io_result(unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
    }

    fn write_packet(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
        io_result(unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
    }

    unsafe fn write_iov(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let n = libc::c_int::try_from(iov.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "iovec too long"))?;
        // SAFETY: `iov` is a valid array of `n` iovecs; the caller guarantees each points to
        // readable memory.
        io_result(unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), n) })
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        ioctl_val(
            self.fd.as_raw_fd(),
            TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    }

    fn set_queue_enabled(&self, enabled: bool) -> io::Result<()> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        req.set_short(if enabled {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        });
        match ioctl_ptr(self.fd.as_raw_fd(), TUNSETQUEUE, &mut req) {
            // Not a multi-queue tap, or already in that state.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            r => r,
        }
    }

    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(matches!(IfReq::new(""), Err(TapError::BadName(_))));
        assert!(matches!(
            IfReq::new("0123456789abcdef"),
            Err(TapError::BadName(_))
        ));
        assert!(matches!(IfReq::new("a\0b"), Err(TapError::BadName(_))));
        assert_eq!(IfReq::new("tap0").unwrap().name(), "tap0");
    }

    /// Needs CAP_NET_ADMIN (the tests run as root); the tap is not persistent and goes away
    /// with its fds.
    #[test]
    fn real_multiqueue_tap_is_configured() {
        let name = format!("rqt{}", std::process::id() % 100_000);
        let qs = TapQueue::open(&name, 2).expect("creating a tap needs root / CAP_NET_ADMIN");
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[0].name(), name);
        for q in &qs {
            q.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO)
                .unwrap();
            q.set_offload(0).unwrap();
            let mut buf = [0u8; 100];
            let e = q.read_packet(&mut buf).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        }
        qs[1].set_queue_enabled(false).unwrap();
        qs[1].set_queue_enabled(true).unwrap();
        qs[0].set_mtu(9000).unwrap();
        let mtu = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu")).unwrap();
        assert_eq!(mtu.trim(), "9000");
        // An inherited fd of the same tap is accepted.
        let dup = nix_dup(qs[1].raw_fd());
        // SAFETY: `dup` is a fresh fd handed over.
        let q = unsafe { TapQueue::from_raw_fd(dup) }.unwrap();
        assert_eq!(q.name(), name);
    }

    fn nix_dup(fd: RawFd) -> RawFd {
        // SAFETY: dup(2) of a valid fd.
        let d = unsafe { libc::dup(fd) };
        assert!(d >= 0);
        d
    }

    #[test]
    fn non_tap_fds_are_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
        // SAFETY: the fd was just released by the File and is handed over.
        let err = unsafe { TapQueue::from_raw_fd(fd) }.unwrap_err();
        assert!(matches!(err, TapError::BadFd { .. }), "{err}");
        // SAFETY: from_raw_fd refused it before taking ownership; close it here.
        unsafe { libc::close(fd) };
    }
}
