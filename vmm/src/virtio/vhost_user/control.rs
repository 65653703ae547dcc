//! The control thread of one vhost-user device: every message to the daemon is sent from
//! here, never from a vCPU, and a daemon that hangs up is reconnected under the running guest.
//!
//! The vCPU side ([`super::VhostUserDevice`]) only posts [`Command`]s (activate, reset, config
//! write) and returns. This thread keeps the *desired* state (the driver's features and rings,
//! its config writes) and applies it to whichever daemon is connected.
//!
//! States:
//! * **connected** — commands are applied as they come; the socket is polled for a hang-up
//!   every [`POLL`];
//! * **reconnecting** — entered on a hang-up or a failed request. The guest keeps running; its
//!   queue notifications stay pending in the kick eventfds (nobody reads them). The socket path
//!   is retried with a backoff ([`FIRST_BACKOFF`] doubling to [`MAX_BACKOFF`]). A daemon that
//!   answers is checked: it must offer every virtio feature the driver acked (every feature
//!   first offered, before the driver is up), every protocol feature negotiated first, and at
//!   least as many queues; otherwise it is refused with a log line naming what is missing
//!   (the connection is closed and retried after [`REFUSED_BACKOFF`]). An accepted daemon gets
//!   the replay: (SET_OWNER, SET_PROTOCOL_FEATURES in the handshake) the driver's config
//!   writes, SET_FEATURES, SET_MEM_TABLE, per ring VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE; then
//!   every kick eventfd and every call eventfd is signalled once (the daemon rescans its
//!   rings, the driver its used rings).
//!
//! Where a ring resumes ([`Control::resume_base`]): the daemon restarts at the used ring's `idx`
//! in guest memory (QEMU does the same for split rings). Requests the dead daemon popped but
//! never completed sit between that index and the avail index. Without inflight tracking the
//! new daemon takes them again: redone at least once with in-order completion, but a daemon
//! that completed out of order (io_uring) leaves a completed request beyond the used index
//! (done twice) or loses one. With `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` each fresh activation
//! gets the daemon's inflight region (GET_INFLIGHT_FD), kept here until the driver resets the
//! device, and every daemon that takes over gets it back (SET_INFLIGHT_FD, before the rings):
//! it resubmits the heads still marked in flight and resumes the avail ring past them, so each
//! request completes exactly once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::conn::{Conn, InflightDesc, InflightFd, InflightStep, RingStart};
use super::features;
use super::VhostUserKind;
use crate::exit::ExitRequester;
use crate::memory::GuestMemory;
use crate::virtio::{QueueConfig, VirtioError};

/// How often the control thread looks at the connection (and the longest a command waits).
pub const POLL: Duration = Duration::from_millis(50);
/// First delay between reconnection attempts.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest delay between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Delay before retrying after refusing a daemon.
pub const REFUSED_BACKOFF: Duration = Duration::from_secs(1);

/// What the vCPU side asks of the daemon.
#[derive(Debug)]
pub(super) enum Command {
    /// The transport's kick and call eventfds (once, when the transport is made).
    Notifiers(Vec<EventFd>, Vec<EventFd>),
    /// The driver set DRIVER_OK.
    Activate(Activation),
    /// The driver reset the device.
    Reset,
    /// The driver wrote config space.
    WriteConfig(u32, Vec<u8>),
}

/// The driver's features and ready rings.
#[derive(Debug, Clone)]
pub(super) struct Activation {
    /// Features the driver acked.
    pub features: u64,
    /// Ready rings.
    pub queues: Vec<(usize, QueueConfig)>,
}

/// The connection state of a vhost-user device, shared with the management API.
#[derive(Debug, Default)]
pub struct ControlStatus {
    connected: AtomicBool,
    reconnects: AtomicU64,
    refusals: AtomicU64,
    /// A duplicate of the inflight region's memfd (for inspection).
    inflight: std::sync::Mutex<Option<std::fs::File>>,
}

impl ControlStatus {
    /// Whether a daemon is connected.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// How many times a restarted daemon took over.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// How many restarted daemons were refused.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    /// The inflight region (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) of the current
    /// activation, if the daemon tracks requests in flight: a new open file of its memfd, for
    /// inspection (tests, debugging).
    pub fn inflight_region(&self) -> Option<std::fs::File> {
        let g = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref().and_then(|f| f.try_clone().ok())
    }

    fn set_inflight(&self, f: Option<std::fs::File>) {
        *self.inflight.lock().unwrap_or_else(|e| e.into_inner()) = f;
    }
}

struct Down {
    since: Instant,
    retry_at: Instant,
    backoff: Duration,
    last_refusal: Option<String>,
}

/// The control side of a vhost-user device; [`Control::spawn`] runs it on its thread.
pub struct Control {
    kind: VhostUserKind,
    mem: GuestMemory,
    /// Features offered to the driver (fixed by the first daemon).
    offered: u64,
    /// Protocol features negotiated with the first daemon.
    protocol: VhostUserProtocolFeatures,
    queues: usize,
    conn: Option<Conn>,
    down: Option<Down>,
    path: std::path::PathBuf,
    rx: Receiver<Command>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    active: Option<Activation>,
    config_writes: Vec<(u32, Vec<u8>)>,
    /// The inflight region of the current activation (with `INFLIGHT_SHMFD`).
    inflight: Option<InflightFd>,
    status: Arc<ControlStatus>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("kind", &self.kind)
            .field("path", &self.path)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl Control {
    /// The control of the device whose first daemon is `conn`.
    pub(super) fn new(
        kind: VhostUserKind,
        mem: GuestMemory,
        conn: Conn,
        queues: usize,
        rx: Receiver<Command>,
    ) -> Self {
        let status = Arc::new(ControlStatus::default());
        status.connected.store(true, Ordering::Relaxed);
        Control {
            kind,
            mem,
            offered: conn.virtio_features(),
            protocol: conn.protocol(),
            queues,
            path: conn.path().to_path_buf(),
            conn: Some(conn),
            down: None,
            rx,
            kicks: Vec::new(),
            calls: Vec::new(),
            active: None,
            config_writes: Vec::new(),
            inflight: None,
            status,
        }
    }

    /// The connection state, for the management API.
    pub fn status(&self) -> Arc<ControlStatus> {
        self.status.clone()
    }

    /// Starts the thread; it ends when `exit` says the VM stops or the device is dropped.
    pub fn spawn(mut self, exit: ExitRequester) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("vhost-ctl".into())
            .spawn(move || {
                crate::sandbox::confine_current(crate::sandbox::VmmThread::VhostControl);
                self.run(&exit);
            })
    }

    fn run(&mut self, exit: &ExitRequester) {
        while !exit.should_stop() {
            match self.rx.recv_timeout(POLL) {
                Ok(cmd) => self.apply(cmd),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.apply(cmd);
            }
            if self.conn.as_ref().is_some_and(Conn::hung_up) {
                self.lost("it hung up");
            }
            if self
                .down
                .as_ref()
                .is_some_and(|d| Instant::now() >= d.retry_at)
            {
                self.try_reconnect();
            }
        }
    }

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Notifiers(kicks, calls) => {
                self.kicks = kicks;
                self.calls = calls;
            }
            Command::Activate(a) => {
                self.active = Some(a);
                // A fresh activation: the driver's rings start at index 0, and nothing is
                // in flight (a new inflight region).
                self.inflight = None;
                match self.start(|_| 0) {
                    Ok(()) => self.kick(),
                    Err(e) => self.lost(&e.to_string()),
                }
            }
            Command::Reset => {
                // A reset returns the config space to the daemon's defaults too.
                self.config_writes.clear();
                self.inflight = None;
                self.status.set_inflight(None);
                if let (Some(a), Some(c)) = (self.active.take(), self.conn.as_mut()) {
                    c.stop(a.queues.iter().map(|(i, _)| *i));
                }
            }
            Command::WriteConfig(off, data) => {
                if let Some(c) = self.conn.as_mut() {
                    if let Err(e) = c.set_config(off, &data) {
                        tracing::warn!(path = %self.path.display(), "{e}");
                    }
                }
                self.config_writes
                    .retain(|(o, d)| (*o, d.len()) != (off, data.len()));
                self.config_writes.push((off, data));
            }
        }
    }

    /// Starts the active rings on the connected daemon (resuming ring `i` at `base(cfg)`).
    fn start(&mut self, base: impl Fn(&QueueConfig) -> u16) -> Result<(), VirtioError> {
        let (Some(a), Some(c)) = (self.active.as_ref(), self.conn.as_mut()) else {
            return Ok(());
        };
        let rings: Vec<RingStart> = a
            .queues
            .iter()
            .map(|(index, cfg)| RingStart {
                index: *index,
                cfg: *cfg,
                base: base(cfg),
            })
            .collect();
        let step = match &self.inflight {
            Some(r) => InflightStep::Handover(r),
            None => InflightStep::Fresh(self.queues),
        };
        if let Some(r) = c.start(
            &self.mem,
            a.features,
            &rings,
            &self.kicks,
            &self.calls,
            step,
        )? {
            self.status.set_inflight(r.file.try_clone().ok());
            self.inflight = Some(r);
        }
        Ok(())
    }

    /// Kicks every active ring once (what the guest signalled while no daemon had the kick
    /// eventfd, or while its ring was not enabled yet, is then seen).
    fn kick(&self) {
        for (i, _) in self.active.iter().flat_map(|a| a.queues.iter()) {
            if let Some(k) = self.kicks.get(*i) {
                let _ = k.write(1);
            }
        }
    }

    /// Where a ring resumes on a new daemon: the used ring's `idx` in guest memory (see the
    /// module docs). With `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` the daemon moves its avail
    /// index past the requests it resubmits (the region says how many).
    fn resume_base(mem: &GuestMemory, q: &QueueConfig) -> u16 {
        ring_idx(mem, q.used)
    }

    fn lost(&mut self, why: &str) {
        self.conn = None;
        self.status.connected.store(false, Ordering::Relaxed);
        let now = Instant::now();
        tracing::warn!(
            "vhost-user daemon at {} lost ({why}): the guest keeps running, its {:?} device \
             waits (queue notifications held); reconnecting",
            self.path.display(),
            self.kind
        );
        self.down = Some(Down {
            since: now,
            retry_at: now,
            backoff: FIRST_BACKOFF,
            last_refusal: None,
        });
    }

    fn try_reconnect(&mut self) {
        let Some(mut down) = self.down.take() else {
            return;
        };
        let now = Instant::now();
        let mut conn = match Conn::connect(&self.path, self.protocol, false) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("{e}");
                down.retry_at = now + down.backoff;
                down.backoff = (down.backoff * 2).min(MAX_BACKOFF);
                self.down = Some(down);
                return;
            }
        };
        if let Err(why) = self.check(&mut conn) {
            self.status.refusals.fetch_add(1, Ordering::Relaxed);
            if down.last_refusal.as_deref() != Some(&why) {
                tracing::error!(
                    "refusing the vhost-user daemon at {}: {why}; retrying every {:?}",
                    self.path.display(),
                    REFUSED_BACKOFF
                );
            }
            down.last_refusal = Some(why);
            down.retry_at = now + REFUSED_BACKOFF;
            self.down = Some(down);
            return; // dropping `conn` closes the connection
        }
        self.conn = Some(conn);
        let mem = self.mem.clone();
        let replayed = self
            .replay_config()
            .and_then(|()| self.start(|q| Self::resume_base(&mem, q)));
        if let Err(e) = replayed {
            tracing::warn!(
                "vhost-user daemon at {}: replay failed: {e}",
                self.path.display()
            );
            self.conn = None;
            down.retry_at = now + down.backoff;
            down.backoff = (down.backoff * 2).min(MAX_BACKOFF);
            self.down = Some(down);
            return;
        }
        self.status.connected.store(true, Ordering::Relaxed);
        self.status.reconnects.fetch_add(1, Ordering::Relaxed);
        self.kick();
        // The driver rescans its used rings too (a completion the old daemon published
        // without signalling it).
        for c in &self.calls {
            let _ = c.write(1);
        }
        let bases: Vec<String> = self
            .active
            .iter()
            .flat_map(|a| a.queues.iter())
            .map(|(i, q)| {
                let used = Self::resume_base(&self.mem, q);
                let avail = ring_idx(&self.mem, q.avail);
                format!("q{i} at {used} ({} pending)", avail.wrapping_sub(used))
            })
            .collect();
        let inflight = match &self.inflight {
            Some(r) => format!(
                "; inflight region ({:?}) handed over: the daemon resubmits what was in flight",
                InflightDesc(&r.desc)
            ),
            None => String::new(),
        };
        tracing::warn!(
            "vhost-user daemon at {} reconnected after {:.1?}: state replayed, rings resumed \
             at their used index: [{}]{inflight}",
            self.path.display(),
            down.since.elapsed(),
            bases.join(", ")
        );
    }

    /// Whether the daemon of `conn` can take the device's place; the reason if not.
    fn check(&self, conn: &mut Conn) -> Result<(), String> {
        let (required, whose) = match &self.active {
            Some(a) => (a.features, "the guest negotiated"),
            None => (self.offered, "the device offered the guest"),
        };
        let missing = required & !conn.virtio_features();
        if missing != 0 {
            return Err(format!(
                "it lacks feature(s) {whose}: {}",
                features::names(self.kind, missing)
            ));
        }
        let missing = self.protocol - conn.protocol();
        if !missing.is_empty() {
            return Err(format!(
                "it lacks vhost-user protocol feature(s) {missing:?}"
            ));
        }
        let n = conn.queue_num(self.queues).map_err(|e| e.to_string())?;
        if n < self.queues {
            return Err(format!(
                "it serves {n} queue(s), the device has {}",
                self.queues
            ));
        }
        Ok(())
    }

    fn replay_config(&mut self) -> Result<(), VirtioError> {
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        for (off, data) in &self.config_writes {
            c.set_config(*off, data)?;
        }
        Ok(())
    }
}

/// The `idx` field of the split ring (avail or used) at `ring`; 0 if unreadable (not for a
/// started ring: its addresses were checked at activation).
fn ring_idx(mem: &GuestMemory, ring: u64) -> u16 {
    let mut idx = [0u8; 2];
    match mem.read_slice(&mut idx, GuestAddress(ring.wrapping_add(2))) {
        Ok(()) => u16::from_le_bytes(idx),
        Err(_) => 0,
    }
}
