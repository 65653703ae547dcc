//! Adapter between `vhost-user-backend` and the transport-free [`NetDevice`].
//!
//! One worker thread per queue pair (RX `2i`, TX `2i + 1`; thread 0 also owns the control
//! queue `2N`). Each thread polls its tap queue (edge-triggered, registered by `main` as a
//! custom listener, see [`NetBackend::tap_event`]): a readable tap or an RX kick runs RX, a TX
//! kick runs TX (then RX). RX stops when the guest has no buffers and resumes on its next RX
//! kick. Only rings the frontend enabled are served (states from the relay, [`RingEnable`]);
//! the tap queue of a pair whose RX ring is not in use is detached so the kernel steers its
//! traffic to the others.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rqemu_net_backend::{NetDevice, RxState, StatsSnapshot, Tap, TapQueue, TxScratch};

use crate::proxy::RingEnable;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Thread-local vring indices (position in the thread's queue mask).
const LOCAL_RX: u16 = 0;
const LOCAL_TX: u16 = 1;
const LOCAL_CTRL: u16 = 2;

/// Errors of the queue workers.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// An event that is neither a queue of this thread nor its tap.
    #[error("unexpected event {event} on worker {thread}")]
    UnknownEvent {
        /// Event id.
        event: u16,
        /// Worker thread.
        thread: usize,
    },
    /// The device failed (used ring outside guest memory, tap read error).
    #[error(transparent)]
    Device(#[from] rqemu_net_backend::DeviceError),
    /// Queue bookkeeping failed.
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// Notifying the frontend failed.
    #[error("signalling the used queue: {0}")]
    Signal(io::Error),
}

impl From<BackendError> for io::Error {
    fn from(e: BackendError) -> Self {
        io::Error::other(e)
    }
}

/// Per queue pair state, only touched by that pair's worker thread.
#[derive(Debug)]
struct Pair {
    rx: RxState,
    tx: TxScratch,
    /// The tap queue is attached (the kernel steers traffic to it).
    attached: bool,
    /// Packets this pair delivered to the guest during this connection.
    rx_frames: u64,
    /// TX chains this pair completed during this connection.
    tx_chains: u64,
}

/// The vhost-user face of a virtio-net device.
#[derive(Debug)]
pub struct NetBackend {
    dev: NetDevice,
    taps: Vec<TapQueue>,
    mem: RwLock<Mem>,
    event_idx: AtomicBool,
    pairs: Vec<Mutex<Pair>>,
    rings: Arc<RingEnable>,
}

impl NetBackend {
    /// Wraps a device and its tap queues (one per queue pair).
    pub fn new(dev: NetDevice, taps: Vec<TapQueue>) -> Self {
        let pairs = (0..taps.len())
            .map(|_| {
                Mutex::new(Pair {
                    rx: RxState::default(),
                    tx: TxScratch::default(),
                    attached: true,
                    rx_frames: 0,
                    tx_chains: 0,
                })
            })
            .collect();
        NetBackend {
            dev,
            taps,
            mem: RwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
            event_idx: AtomicBool::new(false),
            pairs,
            rings: Arc::default(),
        }
    }

    /// Event id of the tap listener of every worker (above the reserved queue/exit ids).
    pub fn tap_event(&self) -> u64 {
        self.num_queues() as u64 + 1
    }

    /// The tap fd worker `i` polls.
    pub fn tap_fd(&self, i: usize) -> Option<RawFd> {
        self.taps.get(i).map(Tap::raw_fd)
    }

    /// The vring enable states, kept up to date by the connection's relay.
    pub fn rings(&self) -> Arc<RingEnable> {
        self.rings.clone()
    }

    /// The device counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.dev.stats().snapshot()
    }

    /// Called when a frontend goes away: forget its memory and per-session state.
    pub fn disconnected(&self) {
        self.rings.set_all(false);
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) =
            GuestMemoryAtomic::new(GuestMemoryMmap::new());
        for (i, p) in self.pairs.iter().enumerate() {
            let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
            tracing::info!(
                "queue pair {i}: rx {} packets, tx {} chains",
                p.rx_frames,
                p.tx_chains
            );
            p.rx.clear();
            p.rx_frames = 0;
            p.tx_chains = 0;
        }
        tracing::info!("stats: {:?}", self.stats());
    }

    fn signal(vring: &VringRwLock, used: bool) -> Result<(), BackendError> {
        if used && vring.needs_notification()? {
            vring.signal_used_queue().map_err(BackendError::Signal)?;
        }
        Ok(())
    }

    /// Runs RX for `pair` if its queue is in use; detaches the tap queue of an unused pair
    /// so the kernel steers its traffic to the others.
    fn rx(&self, pair: usize, p: &mut Pair, vring: &VringRwLock) -> Result<(), BackendError> {
        let Some(tap) = self.taps.get(pair) else {
            return Ok(());
        };
        let ready = vring.get_ref().get_queue().ready();
        let in_use = ready && self.rings.is_enabled(2 * pair);
        if in_use != p.attached && (pair > 0 || in_use) {
            match tap.set_queue_enabled(in_use) {
                Ok(()) => p.attached = in_use,
                Err(e) => tracing::warn!("tap queue {pair}: attach={in_use}: {e}"),
            }
        }
        if !in_use {
            return Ok(());
        }
        let mem = self.mem.read().unwrap_or_else(|e| e.into_inner()).memory();
        let out = {
            let mut guard = vring.get_mut();
            self.dev
                .process_rx(guard.get_queue_mut(), &*mem, tap, &mut p.rx)?
        };
        p.rx_frames += out.frames as u64;
        if out.stalled {
            tracing::trace!("rx {pair}: guest out of buffers");
        }
        Self::signal(vring, out.used)
    }

    fn tx(&self, pair: usize, p: &mut Pair, vring: &VringRwLock) -> Result<(), BackendError> {
        let Some(tap) = self.taps.get(pair) else {
            return Ok(());
        };
        let mem = self.mem.read().unwrap_or_else(|e| e.into_inner()).memory();
        let used = {
            let mut guard = vring.get_mut();
            self.dev
                .process_tx(guard.get_queue_mut(), &*mem, tap, &mut p.tx)?
        };
        p.tx_chains += used as u64;
        Self::signal(vring, used > 0)
    }

    fn ctrl(&self, vring: &VringRwLock) -> Result<(), BackendError> {
        let mem = self.mem.read().unwrap_or_else(|e| e.into_inner()).memory();
        let used = {
            let mut guard = vring.get_mut();
            self.dev.process_ctrl(guard.get_queue_mut(), &*mem)?
        };
        Self::signal(vring, used)
    }

    fn handle(
        &self,
        event: u16,
        vrings: &[VringRwLock],
        thread: usize,
    ) -> Result<(), BackendError> {
        let unknown = BackendError::UnknownEvent { event, thread };
        let mut p = self
            .pairs
            .get(thread)
            .ok_or(unknown)?
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (rx, tx) = match vrings {
            [rx, tx, ..] => (rx, tx),
            _ => return Err(BackendError::UnknownEvent { event, thread }),
        };
        match event {
            LOCAL_RX => self.rx(thread, &mut p, rx),
            LOCAL_TX => {
                self.tx(thread, &mut p, tx)?;
                // Also pick up tap traffic that arrived while the RX queue was not yet in
                // use (its tap queue detached, or the edge seen before the ring was ready).
                self.rx(thread, &mut p, rx)
            }
            LOCAL_CTRL if thread == 0 => {
                let ctrl = vrings
                    .get(usize::from(LOCAL_CTRL))
                    .ok_or(BackendError::UnknownEvent { event, thread })?;
                self.ctrl(ctrl)
            }
            e if u64::from(e) == self.tap_event() => self.rx(thread, &mut p, rx),
            _ => Err(BackendError::UnknownEvent { event, thread }),
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.dev.params().num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.dev.params().max_queue_size)
    }

    fn features(&self) -> u64 {
        self.dev.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn acked_features(&self, features: u64) {
        let n = self.dev.set_features(features);
        let offloads = n.tap_offloads();
        for (i, tap) in self.taps.iter().enumerate() {
            if let Err(e) = tap.set_offload(offloads) {
                tracing::error!("tap queue {i}: TUNSETOFFLOAD {offloads:#x}: {e}");
            }
        }
        tracing::info!(
            "features {features:#x} acked: mrg_rxbuf={}, tap offloads {offloads:#x}",
            n.mrg_rxbuf()
        );
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.dev.read_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // The virtio-net configuration space is read-only for the driver.
        tracing::debug!("ignoring config write of {} bytes at {offset}", buf.len());
        Ok(())
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let pairs = self.pairs.len();
        (0..pairs)
            .map(|i| {
                let mut mask = 0b11u64 << (2 * i);
                if i == 0 {
                    mask |= 1u64 << self.dev.params().ctrl_queue();
                }
                mask
            })
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // A fresh pair per connection: the daemon fires it when the frontend goes away.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            tracing::warn!("worker {thread_id}: event {device_event} with {evset:?}");
            return Ok(());
        }
        // Errors are logged, not returned: an error would end this worker thread and with it
        // the queue pair, for the rest of the connection.
        if let Err(e) = self.handle(device_event, vrings, thread_id) {
            tracing::warn!("worker {thread_id}: {e}");
        }
        Ok(())
    }
}
