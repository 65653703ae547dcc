//! The VMM end. [`ForwardedDevice::connect`] runs the handshake under a [`GrantPolicy`] and
//! returns what the device got ([`Claims`]: windows to map on the bus, GSIs with the eventfds to
//! register as irqfds) and a [`Handle`] for register accesses and control messages. A VMM bus
//! device wraps the handle; every access completes (all ones on failure) within the policy's
//! timeout, whatever the daemon does.

mod access;
mod attach;

pub use access::AccessError;

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::handshake::{
    DeviceClass, Grant, HandshakeError, Hello, Space, Trigger, Window, FEATURE_RING, PIO_END,
};
use crate::messages::{self, Control, ControlReply, MemRegion, MessageError, TAG_CONTROL};
use crate::ring::RingView;
use crate::sys::{EventFd, SeqSocket, SharedMem};

/// Errors connecting to a daemon or exchanging control messages with it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket or system error.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The daemon's handshake is malformed.
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// A malformed reply.
    #[error("message: {0}")]
    Message(#[from] MessageError),
    /// The policy refused the claims (the reason was sent to the daemon too).
    #[error("device refused: {0}")]
    Refused(String),
    /// The daemon rejected a control message.
    #[error("daemon error: {0}")]
    Daemon(String),
    /// The daemon did not answer in time.
    #[error("daemon did not answer within the timeout")]
    Timeout,
    /// The connection is gone.
    #[error("daemon disconnected")]
    Disconnected,
}

/// Connecting is named `ConnectError` in the VMM-facing API.
pub type ConnectError = ClientError;

/// What the VMM lets a device have.
#[derive(Debug, Clone)]
pub struct GrantPolicy {
    /// Allowed PIO ranges `[start, end)`.
    pub pio: Vec<(u64, u64)>,
    /// Allowed MMIO ranges `[start, end)`.
    pub mmio: Vec<(u64, u64)>,
    /// Windows already used by other devices.
    pub taken: Vec<Window>,
    /// GSIs still free, in preference order.
    pub free_gsis: Vec<u32>,
    /// Number of vCPUs (one ring each).
    pub vcpus: u16,
    /// Features the VMM accepts.
    pub features: u64,
    /// Per-access and per-control-message timeout.
    pub timeout: Duration,
    /// Whether level-triggered lines (with a resample eventfd) can be granted; a VMM whose
    /// interrupt controller cannot resample refuses devices that ask for one.
    pub allow_level: bool,
}

impl GrantPolicy {
    /// All of PIO space, the 32-bit MMIO hole (0xd000_0000..0xfec0_0000), ISA GSIs 3..=15, all
    /// features, a 1 s timeout.
    pub fn isa_default(vcpus: u16) -> Self {
        GrantPolicy {
            pio: vec![(0, PIO_END)],
            mmio: vec![(0xd000_0000, 0xfec0_0000)],
            taken: Vec::new(),
            free_gsis: (3..=15).collect(),
            vcpus,
            features: u64::MAX,
            timeout: Duration::from_secs(1),
            allow_level: true,
        }
    }

    /// Decides a grant for `hello`, or a refusal reason.
    pub fn decide(&self, hello: &Hello) -> Result<Grant, String> {
        for (i, w) in hello.windows.iter().enumerate() {
            let allowed = match w.space {
                Space::Pio => &self.pio,
                Space::Mmio => &self.mmio,
            };
            let end = w.end().ok_or_else(|| format!("window {i} wraps"))?;
            if !allowed.iter().any(|&(s, e)| w.base >= s && end <= e) {
                return Err(format!(
                    "window {i} ({:?} {:#x}+{:#x}) is outside the allowed space",
                    w.space, w.base, w.size
                ));
            }
            if let Some(t) = self.taken.iter().find(|t| t.overlaps(w)) {
                return Err(format!(
                    "window {i} overlaps {:?} {:#x}+{:#x}, already in use",
                    t.space, t.base, t.size
                ));
            }
        }
        let mut free = self.free_gsis.clone();
        let mut gsis = Vec::new();
        for (i, q) in hello.irqs.iter().enumerate() {
            if q.trigger == Trigger::Level && !self.allow_level {
                return Err(format!(
                    "line {i}: level-triggered lines are not supported by this VMM"
                ));
            }
            let pos = match q.gsi_hint {
                Some(g) => free
                    .iter()
                    .position(|&f| f == g)
                    .ok_or_else(|| format!("line {i}: GSI {g} is not available"))?,
                None if free.is_empty() => return Err(format!("line {i}: no free GSI")),
                None => 0,
            };
            gsis.push(free.remove(pos));
        }
        let features = hello.features & self.features;
        Ok(Grant {
            features,
            vcpus: if features & FEATURE_RING != 0 {
                self.vcpus
            } else {
                0
            },
            windows: hello.windows.clone(),
            gsis,
        })
    }
}

/// One granted interrupt line: register `event` with KVM as an irqfd on `gsi` (with
/// `resample` as the resample fd for level lines).
#[derive(Debug)]
pub struct GrantedIrq {
    /// The GSI.
    pub gsi: u32,
    /// Trigger mode.
    pub trigger: Trigger,
    /// Signalled by the daemon to raise the line.
    pub event: EventFd,
    /// Level lines: signalled by the VMM on EOI.
    pub resample: Option<EventFd>,
}

/// What the daemon is and what it was granted.
#[derive(Debug)]
pub struct Claims {
    /// Device class.
    pub class: DeviceClass,
    /// Daemon name.
    pub name: String,
    /// Granted windows, to map on the VMM's buses.
    pub windows: Vec<Window>,
    /// Granted interrupt lines.
    pub irqs: Vec<GrantedIrq>,
    /// Negotiated features.
    pub features: u64,
}

/// Namespace of the connect functions.
#[derive(Debug)]
pub struct ForwardedDevice;

pub(crate) struct SockState {
    pub(crate) sock: SeqSocket,
    pub(crate) seq: u64,
    pub(crate) buf: Box<[u8]>,
}

pub(crate) struct RingClient {
    pub(crate) view: RingView,
    pub(crate) head: u64,
    pub(crate) to_dev: EventFd,
    pub(crate) to_vmm: EventFd,
}

pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) sock: Mutex<SockState>,
    /// The socket's fd number, polled (for hang-up only) while waiting on a ring.
    pub(crate) sock_fd: i32,
    pub(crate) rings: Vec<Mutex<RingClient>>,
    /// Per ring: its view (lock-free reads of the tail) and the sequence number of the last
    /// posted write, so other paths can wait for posted writes to land first.
    pub(crate) posted_marks: Vec<(RingView, std::sync::atomic::AtomicU64)>,
    pub(crate) windows: Vec<Window>,
    pub(crate) posted: bool,
    pub(crate) timeout: Duration,
    pub(crate) dead: AtomicBool,
    pub(crate) _mem: Option<SharedMem>,
}

/// Register access and control handle of a connected daemon. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Handle(pub(crate) Arc<Inner>);

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("name", &self.0.name)
            .field("rings", &self.0.rings.len())
            .finish()
    }
}

fn io_err(e: io::Error) -> ClientError {
    match e.kind() {
        io::ErrorKind::TimedOut => ClientError::Timeout,
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset => ClientError::Disconnected,
        _ => ClientError::Io(e),
    }
}

/// Sends a control message and waits for its reply (skipping late access replies).
fn control_on(
    st: &mut SockState,
    c: &Control,
    fds: &[BorrowedFd<'_>],
    timeout: Duration,
) -> Result<ControlReply, ClientError> {
    let n = messages::encode_postcard(TAG_CONTROL, c, &mut st.buf)?;
    st.sock.send(&st.buf[..n], fds).map_err(io_err)?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // A daemon flooding stale replies cannot keep the VMM here past the deadline.
        if left.is_zero() {
            return Err(ClientError::Timeout);
        }
        let mut fds = Vec::new();
        let n = st
            .sock
            .recv(&mut st.buf, &mut fds, Some(left))
            .map_err(io_err)?;
        let (tag, p) = messages::unframe(&st.buf[..n])?;
        match tag {
            messages::TAG_CONTROL_REPLY if fds.is_empty() => {
                return match messages::decode_postcard::<ControlReply>(p)? {
                    ControlReply::Error(e) => Err(ClientError::Daemon(e)),
                    r => Ok(r),
                }
            }
            messages::TAG_ACCESS_REPLY if fds.is_empty() => continue, // late answer to a timed-out access
            messages::TAG_CONTROL_REPLY | messages::TAG_ACCESS_REPLY => {
                return Err(MessageError::Fds {
                    got: fds.len(),
                    want: 0,
                }
                .into())
            }
            t => return Err(MessageError::Tag(t).into()),
        }
    }
}

impl Handle {
    /// Granted windows.
    pub fn windows(&self) -> &[Window] {
        &self.0.windows
    }

    /// Number of rings (vCPUs with a fast path).
    pub fn rings(&self) -> usize {
        self.0.rings.len()
    }

    /// Whether the daemon is still believed alive.
    pub fn is_alive(&self) -> bool {
        !self.0.dead.load(Ordering::Relaxed)
    }

    /// Checks the connection without blocking: a daemon that hung up (crashed, exited) is
    /// marked dead here even if the guest has not touched the device since. Returns
    /// [`is_alive`](Handle::is_alive).
    pub fn check_alive(&self) -> bool {
        if self.is_alive() {
            let mut rev = [0i16];
            let hup = crate::sys::poll_raw(&[(self.0.sock_fd, 0)], Some(Duration::ZERO), &mut rev)
                .map(|_| rev[0] & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0)
                .unwrap_or(true);
            if hup {
                self.mark_dead();
            }
        }
        self.is_alive()
    }

    /// The daemon's name (from its `HELLO`).
    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub(crate) fn mark_dead(&self) {
        if !self.0.dead.swap(true, Ordering::Relaxed) {
            tracing::error!(
                "device daemon {} disconnected; its registers now read as all ones",
                self.0.name
            );
        }
    }

    fn control(&self, c: &Control, fds: &[BorrowedFd<'_>]) -> Result<ControlReply, ClientError> {
        if !self.is_alive() {
            return Err(ClientError::Disconnected);
        }
        let mut st = self.0.sock.lock().unwrap_or_else(|e| e.into_inner());
        let r = control_on(&mut st, c, fds, self.0.timeout);
        if matches!(r, Err(ClientError::Disconnected)) {
            self.mark_dead();
        }
        r
    }

    /// Machine reset.
    pub fn reset(&self) -> Result<(), ClientError> {
        self.control(&Control::Reset, &[]).map(|_| ())
    }

    /// Asks the daemon to drop this connection (it then waits for the next VMM).
    pub fn shutdown(&self) -> Result<(), ClientError> {
        // Posted writes land before the daemon lets go of the rings.
        let deadline = std::time::Instant::now() + self.0.timeout;
        if let Err(e) = self.drain_posted(None, deadline) {
            tracing::warn!(
                "device daemon {}: posted writes not drained: {e}",
                self.0.name
            );
        }
        let r = self.control(&Control::Shutdown, &[]).map(|_| ());
        self.0.dead.store(true, Ordering::Relaxed);
        r
    }

    /// The device state.
    pub fn snapshot(&self) -> Result<Vec<u8>, ClientError> {
        match self.control(&Control::Snapshot, &[])? {
            ControlReply::State(s) => Ok(s),
            _ => Err(ClientError::Daemon("snapshot reply without state".into())),
        }
    }

    /// Restores a device state.
    pub fn restore(&self, state: &[u8]) -> Result<(), ClientError> {
        self.control(
            &Control::Restore {
                state: state.to_vec(),
            },
            &[],
        )
        .map(|_| ())
    }

    /// Hands guest memory to the daemon (one fd per region, same order).
    pub fn set_mem_table(
        &self,
        regions: &[MemRegion],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        self.control(
            &Control::SetMemTable {
                regions: regions.to_vec(),
            },
            fds,
        )
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests;
