//! Register accesses: the ring fast path and the socket fallback. Neither allocates; both
//! complete within the handle's timeout whatever the daemon does, filling reads with all ones
//! on failure.

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use super::{Handle, RingClient};
use crate::handshake::{Space, WINDOW_POSTED};
use crate::messages::{
    self, Access, AccessReply, OP_POSTED_WRITE, OP_READ, OP_WRITE, STATUS_OK, TAG_ACCESS_REPLY,
};
use crate::ring::{Poll, SLOTS};
use crate::sys::poll_raw;

/// How long the VMM spins on a ring before sleeping on its doorbell.
pub const VMM_SPIN: Duration = Duration::from_micros(50);

/// Why a forwarded access failed (reads then return all ones; writes are dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The access size is not 1, 2, 4 or 8.
    #[error("unsupported access size {0}")]
    BadSize(usize),
    /// The address is not in a window granted to this device.
    #[error("{space:?} {addr:#x} is not in a granted window")]
    NotClaimed {
        /// Space.
        space: Space,
        /// Address.
        addr: u64,
    },
    /// The daemon did not answer within the timeout.
    #[error("daemon did not answer within the timeout")]
    Timeout,
    /// The daemon is gone.
    #[error("daemon disconnected")]
    Disconnected,
    /// The daemon answered another request than the one asked.
    #[error("sequence mismatch: expected {expected}, got {got}")]
    SequenceMismatch {
        /// Request sequence number.
        expected: u64,
        /// What the daemon wrote.
        got: u64,
    },
    /// The daemon rejected the request.
    #[error("daemon rejected the access (status {0})")]
    Rejected(u8),
    /// The daemon broke the protocol (bad ring tail, unexpected message).
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// A socket error.
    #[error("socket error: {0:?}")]
    Io(std::io::ErrorKind),
}

fn to_u64(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..data.len()].copy_from_slice(data);
    u64::from_le_bytes(b)
}

fn from_u64(v: u64, data: &mut [u8]) {
    let n = data.len();
    data.copy_from_slice(&v.to_le_bytes()[..n]);
}

enum Wait<T> {
    Ready(T),
    Again,
}

impl Handle {
    /// Checks size and window; returns whether the window allows posted writes.
    fn check(&self, space: Space, addr: u64, len: usize) -> Result<bool, AccessError> {
        if !messages::valid_len(len) {
            return Err(AccessError::BadSize(len));
        }
        let w = self
            .0
            .windows
            .iter()
            .find(|w| w.offset_of(space, addr, len as u64).is_some())
            .ok_or(AccessError::NotClaimed { space, addr })?;
        if !self.is_alive() {
            return Err(AccessError::Disconnected);
        }
        Ok(w.flags & WINDOW_POSTED != 0 && self.0.posted)
    }

    /// Reads `data.len()` bytes at `addr` on behalf of `vcpu` (its ring if it has one, else the
    /// socket). On error `data` is all ones.
    pub fn read(
        &self,
        vcpu: usize,
        space: Space,
        addr: u64,
        data: &mut [u8],
    ) -> Result<(), AccessError> {
        let r = self.access(vcpu, OP_READ, space, addr, data.len(), 0, false);
        self.finish_read(r, data)
    }

    /// Writes `data` at `addr` on behalf of `vcpu`. Posted (not awaited) when the window is
    /// flagged posted and the feature was negotiated.
    pub fn write(
        &self,
        vcpu: usize,
        space: Space,
        addr: u64,
        data: &[u8],
    ) -> Result<(), AccessError> {
        self.access(
            vcpu,
            OP_WRITE,
            space,
            addr,
            data.len(),
            to_u64_checked(data),
            false,
        )
        .map(|_| ())
    }

    /// [`read`](Handle::read) forced over the socket (the slow path).
    pub fn read_socket(&self, space: Space, addr: u64, data: &mut [u8]) -> Result<(), AccessError> {
        let r = self.access(0, OP_READ, space, addr, data.len(), 0, true);
        self.finish_read(r, data)
    }

    /// [`write`](Handle::write) forced over the socket (the slow path; never posted).
    pub fn write_socket(&self, space: Space, addr: u64, data: &[u8]) -> Result<(), AccessError> {
        self.access(
            0,
            OP_WRITE,
            space,
            addr,
            data.len(),
            to_u64_checked(data),
            true,
        )
        .map(|_| ())
    }

    fn finish_read(&self, r: Result<u64, AccessError>, data: &mut [u8]) -> Result<(), AccessError> {
        match r {
            Ok(v) => {
                from_u64(v, data);
                Ok(())
            }
            Err(e) => {
                data.fill(0xff);
                self.log_failure(e);
                Err(e)
            }
        }
    }

    fn log_failure(&self, e: AccessError) {
        match e {
            AccessError::Disconnected => self.mark_dead(),
            AccessError::BadSize(_) | AccessError::NotClaimed { .. } => {}
            e => tracing::warn!("device daemon {}: {e}", self.0.name),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn access(
        &self,
        vcpu: usize,
        op: u8,
        space: Space,
        addr: u64,
        len: usize,
        data: u64,
        force_socket: bool,
    ) -> Result<u64, AccessError> {
        let posted = self.check(space, addr, len)?;
        let deadline = Instant::now() + self.0.timeout;
        let r = match self.0.rings.get(vcpu) {
            Some(ring) if !force_socket => {
                let op = if op == OP_WRITE && posted {
                    OP_POSTED_WRITE
                } else {
                    op
                };
                if op != OP_POSTED_WRITE {
                    self.drain_posted(Some(vcpu), deadline)?;
                }
                let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
                self.ring_access(&mut ring, vcpu, op, space, addr, len as u8, data, deadline)
            }
            _ => self
                .drain_posted(None, deadline)
                .and_then(|_| self.socket_access(op, space, addr, len as u8, data, deadline)),
        };
        if op != OP_READ {
            if let Err(e) = r {
                self.log_failure(e);
            }
        }
        r
    }

    /// Spins, then sleeps on the ring's to-VMM doorbell (and the socket's hang-up), until
    /// `ready` yields a value or the deadline passes.
    fn wait_ring<T>(
        &self,
        ring: &RingClient,
        deadline: Instant,
        mut ready: impl FnMut(&RingClient) -> Result<Wait<T>, AccessError>,
    ) -> Result<T, AccessError> {
        let spin_end = Instant::now() + VMM_SPIN;
        let mut i = 0u32;
        loop {
            if let Wait::Ready(v) = ready(ring)? {
                return Ok(v);
            }
            crate::server::spin_pause(i);
            i = i.wrapping_add(1);
            if i % 64 == 0 && Instant::now() > spin_end {
                break;
            }
        }
        loop {
            ring.view.set_vmm_sleeping(true);
            let r = ready(ring);
            if !matches!(r, Ok(Wait::Again)) {
                ring.view.set_vmm_sleeping(false);
                return r.map(|w| match w {
                    Wait::Ready(v) => v,
                    Wait::Again => unreachable!(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                ring.view.set_vmm_sleeping(false);
                return Err(AccessError::Timeout);
            }
            let mut rev = [0i16; 2];
            let fds = [(ring.to_vmm_fd(), libc::POLLIN), (self.0.sock_fd, 0)];
            let res = poll_raw(&fds, Some(deadline - now), &mut rev);
            ring.view.set_vmm_sleeping(false);
            ring.to_vmm.drain();
            res.map_err(|e| AccessError::Io(e.kind()))?;
            if rev[1] & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                return Err(AccessError::Disconnected);
            }
        }
    }

    /// Waits until the posted writes of every ring except `skip` (whose own later requests are
    /// ordered behind them anyway) have been performed, so a non-posted access never overtakes
    /// a posted write issued before it.
    pub(crate) fn drain_posted(
        &self,
        skip: Option<usize>,
        deadline: Instant,
    ) -> Result<(), AccessError> {
        for (i, (view, mark)) in self.0.posted_marks.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            let want = mark.load(std::sync::atomic::Ordering::Acquire);
            let mut spins = 0u32;
            while want != 0 && view.tail() < want {
                if Instant::now() >= deadline {
                    return Err(AccessError::Timeout);
                }
                if !self.is_alive() {
                    return Err(AccessError::Disconnected);
                }
                spins = spins.saturating_add(1);
                if spins < 1000 {
                    std::hint::spin_loop();
                } else {
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn ring_access(
        &self,
        ring: &mut RingClient,
        vcpu: usize,
        op: u8,
        space: Space,
        addr: u64,
        len: u8,
        data: u64,
        deadline: Instant,
    ) -> Result<u64, AccessError> {
        let head = ring.head;
        // Room for one more request? The tail is the daemon's and untrusted.
        self.wait_ring(ring, deadline, |r| {
            let inflight = head.wrapping_sub(r.view.tail());
            if inflight > SLOTS {
                Err(AccessError::Protocol("ring tail beyond head"))
            } else if inflight == SLOTS {
                Ok(Wait::Again)
            } else {
                Ok(Wait::Ready(()))
            }
        })?;
        let seq = head + 1;
        let a = Access {
            seq,
            op,
            space,
            len,
            addr,
            data,
        };
        let kick = ring.view.publish(&a);
        ring.head = seq;
        if kick {
            let _ = ring.to_dev.signal();
        }
        if op == OP_POSTED_WRITE {
            if let Some((_, mark)) = self.0.posted_marks.get(vcpu) {
                mark.store(seq, std::sync::atomic::Ordering::Release);
            }
            return Ok(0);
        }
        let (status, value) = self.wait_ring(ring, deadline, |r| match r.view.poll(seq) {
            Poll::Pending => Ok(Wait::Again),
            Poll::Done(s, d) => Ok(Wait::Ready((s, d))),
            Poll::Mismatch(got) => Err(AccessError::SequenceMismatch { expected: seq, got }),
        })?;
        if status != STATUS_OK {
            return Err(AccessError::Rejected(status));
        }
        Ok(value)
    }

    #[allow(clippy::too_many_arguments)]
    fn socket_access(
        &self,
        op: u8,
        space: Space,
        addr: u64,
        len: u8,
        data: u64,
        deadline: Instant,
    ) -> Result<u64, AccessError> {
        let mut st = self.0.sock.lock().unwrap_or_else(|e| e.into_inner());
        st.seq += 1;
        let seq = st.seq;
        let a = Access {
            seq,
            op,
            space,
            len,
            addr,
            data,
        };
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::TimedOut => AccessError::Timeout,
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset => AccessError::Disconnected,
            k => AccessError::Io(k),
        };
        st.sock.send(&a.encode(), &[]).map_err(io)?;
        // Fds the daemon might attach are collected here and closed; the Vec only allocates
        // when that protocol violation happens.
        let mut fds = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // A daemon flooding stale replies cannot keep the VMM here past the deadline.
            if left.is_zero() {
                return Err(AccessError::Timeout);
            }
            let st = &mut *st;
            let n = st
                .sock
                .recv(&mut st.buf, &mut fds, Some(left))
                .map_err(io)?;
            if !fds.is_empty() {
                return Err(AccessError::Protocol("fds attached to an access reply"));
            }
            let (tag, p) =
                messages::unframe(&st.buf[..n]).map_err(|_| AccessError::Protocol("bad frame"))?;
            if tag != TAG_ACCESS_REPLY {
                return Err(AccessError::Protocol(
                    "unexpected message instead of an access reply",
                ));
            }
            let r =
                AccessReply::decode(p).map_err(|_| AccessError::Protocol("bad access reply"))?;
            if r.seq < seq {
                continue; // a late answer to an access that timed out
            }
            if r.seq > seq {
                return Err(AccessError::SequenceMismatch {
                    expected: seq,
                    got: r.seq,
                });
            }
            if r.status != STATUS_OK {
                return Err(AccessError::Rejected(r.status));
            }
            return Ok(r.data);
        }
    }
}

fn to_u64_checked(data: &[u8]) -> u64 {
    if data.len() <= 8 {
        to_u64(data)
    } else {
        0
    }
}

impl RingClient {
    fn to_vmm_fd(&self) -> i32 {
        self.to_vmm.as_fd().as_raw_fd()
    }
}
