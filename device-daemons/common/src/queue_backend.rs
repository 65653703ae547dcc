//! The vhost-user face every virtio daemon shares (`rqemu-blk`, `rqemu-net`, `rqemu-fs`):
//! [`QueueBackend`] implements `VhostUserBackend` over a small [`QueueDevice`] seam — guest
//! memory of the current frontend, EVENT_IDX, the rqemu identity inside GET_CONFIG, worker
//! threads (one per queue unless the device groups them), extra fds a worker polls (a tap
//! queue), ring enable states from the opt-in [`relay`](crate::relay), in-flight tracking
//! (opt-in: [`inflight`](crate::inflight), through [`Worker::tracker`]), fresh exit events per
//! connection, and a shutdown gate that lets the signal thread wait for batches in progress.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use rqemu_protocol::identity::{self, DeviceKind, Identity};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::inflight::{Inflight, Tracker};
use crate::relay::RingEnable;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Errors of a queue worker.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The event is not a queue kick of ours.
    #[error("unexpected event {0}")]
    UnknownEvent(u16),
    /// An event other than EPOLLIN.
    #[error("unexpected event set {0:?}")]
    UnexpectedEventSet(EventSet),
    /// Queue bookkeeping failed (used ring outside guest memory, ...).
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// Notifying the frontend failed.
    #[error("signalling the used queue: {0}")]
    Signal(std::io::Error),
}

impl From<QueueError> for std::io::Error {
    fn from(e: QueueError) -> Self {
        std::io::Error::other(e)
    }
}

/// The guest memory as the worker sees it for one batch.
pub type MemGuard = GuestMemoryLoadGuard<GuestMemoryMmap>;

/// What woke a worker thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The kick of this queue (device-wide index).
    Queue(usize),
    /// The worker's `i`-th extra fd ([`QueueDevice::worker_fds`]) is readable.
    Fd(usize),
}

/// The rings of one worker thread, as [`QueueDevice::process`] sees them.
pub struct Worker<'a> {
    thread: usize,
    /// The thread's vrings, in ascending queue order.
    vrings: &'a [VringRwLock],
    /// Bit q: the thread serves queue q.
    mask: u64,
    rings: &'a RingEnable,
    inflight: &'a Inflight,
}

impl std::fmt::Debug for Worker<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("thread", &self.thread)
            .field("mask", &format_args!("{:#x}", self.mask))
            .finish_non_exhaustive()
    }
}

impl Worker<'_> {
    /// The worker thread's index.
    pub fn thread(&self) -> usize {
        self.thread
    }

    /// The vring of queue `queue` (device-wide index), if this worker serves it.
    pub fn vring(&self, queue: usize) -> Result<&VringRwLock, QueueError> {
        let unknown = QueueError::UnknownEvent(u16::try_from(queue).unwrap_or(u16::MAX));
        if queue >= 64 || self.mask & (1u64 << queue) == 0 {
            return Err(unknown);
        }
        let position = (self.mask & ((1u64 << queue) - 1)).count_ones() as usize;
        self.vrings.get(position).ok_or(unknown)
    }

    /// Whether the frontend enabled ring `queue` (`SET_VRING_ENABLE`, as seen by the relay;
    /// always `false` for a device that does not opt into the relay).
    pub fn is_enabled(&self, queue: usize) -> bool {
        self.rings.is_enabled(queue)
    }

    /// A batch's [`Tracker`] of queue `queue`: pops and completes chains through the
    /// inflight region when the frontend negotiated `INFLIGHT_SHMFD` (after a daemon restart
    /// its first pops are the requests the dead daemon left in flight).
    pub fn tracker(&self, queue: usize, mem: &MemGuard) -> Result<Tracker, QueueError> {
        Tracker::new(self.inflight, queue, self.vring(queue)?, mem)
    }

    /// Device-wide index of the thread's `position`-th queue.
    fn queue_at(&self, position: usize) -> Option<usize> {
        let mut rest = self.mask;
        for _ in 0..position {
            rest &= rest.wrapping_sub(1); // drop the lowest queue
        }
        (rest != 0).then(|| rest.trailing_zeros() as usize)
    }
}

/// What a device tells [`QueueBackend`].
pub trait QueueDevice: Send + Sync + 'static {
    /// Number of virtqueues.
    fn num_queues(&self) -> usize;
    /// Largest queue size accepted.
    fn max_queue_size(&self) -> usize;
    /// Virtio feature bits offered (`VHOST_USER_F_PROTOCOL_FEATURES` is added).
    fn features(&self) -> u64;
    /// Device configuration space bytes (the rqemu identity window is answered before this).
    fn read_config(&self, offset: u32, size: u32) -> Vec<u8>;
    /// The virtio features the driver acked (e.g. offloads to set on a tap).
    fn acked_features(&self, _features: u64) {}
    /// The queues of each worker thread (bit q: queue q); one thread per queue by default.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues().min(64)).map(|q| 1u64 << q).collect()
    }
    /// Fds worker `thread` polls besides its kicks (edge-triggered, for reading), e.g. its tap
    /// queue; reported as [`Wake::Fd`] with the position in this list. They must stay open as
    /// long as the device lives.
    fn worker_fds(&self, _thread: usize) -> Vec<RawFd> {
        Vec::new()
    }
    /// Whether connections go through the [`relay`](crate::relay) (early `SET_VRING_ENABLE`
    /// held back until the features are acked, ring enables in [`Worker::is_enabled`]).
    fn relay_vring_enable(&self) -> bool {
        false
    }
    /// Whether the device tracks requests in flight (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`,
    /// answered by the [`relay`](crate::relay)): its workers then pop and complete every chain
    /// through [`Worker::tracker`].
    fn inflight_tracking(&self) -> bool {
        false
    }
    /// Serves a wake-up of a worker: for [`Wake::Queue`], the available chains of that queue
    /// (e.g. with [`drain_queue`](crate::vhost::drain_queue)). An error ends the worker
    /// thread for the rest of the connection.
    fn process(
        &self,
        wake: Wake,
        worker: &Worker<'_>,
        mem: &MemGuard,
        event_idx: bool,
    ) -> Result<(), QueueError>;
    /// The frontend went away (after its memory mapping was dropped): flush, forget its state.
    fn disconnected(&self) {}
}

/// A [`QueueDevice`] as a vhost-user backend.
#[derive(Debug)]
pub struct QueueBackend<D> {
    dev: D,
    mem: RwLock<Mem>,
    event_idx: AtomicBool,
    /// `true` once the daemon is shutting down: no more requests are executed.
    stopped: RwLock<bool>,
    identity: Identity,
    /// The queues of each worker thread.
    masks: Vec<u64>,
    /// Ring enable states, kept by the relay of the current connection.
    rings: Arc<RingEnable>,
    /// The inflight region of the current connection (set by the relay).
    inflight: Arc<Inflight>,
}

impl<D: QueueDevice> QueueBackend<D> {
    /// Wraps `dev`, announcing itself as `name` of `kind` in the identity window.
    pub fn new(dev: D, kind: DeviceKind, name: &str) -> Self {
        QueueBackend {
            masks: dev.queues_per_thread(),
            rings: Arc::default(),
            inflight: Arc::default(),
            dev,
            mem: RwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
            event_idx: AtomicBool::new(false),
            stopped: RwLock::new(false),
            identity: Identity {
                version: identity::VERSION,
                kind,
                name: name.to_string(),
            },
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// Waits for batches in progress, refuses new ones, then runs `then` (a final flush).
    pub fn shutdown<R>(&self, then: impl FnOnce(&D) -> R) -> R {
        let mut stopped = self.stopped.write().unwrap_or_else(|e| e.into_inner());
        *stopped = true;
        then(&self.dev)
    }

    /// Called when a frontend goes away: forget its ring states, drop its memory mapping,
    /// then [`QueueDevice::disconnected`].
    pub fn disconnected(&self) {
        self.rings.set_all(false);
        self.inflight.set(None);
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) =
            GuestMemoryAtomic::new(GuestMemoryMmap::new());
        self.dev.disconnected();
    }

    /// The ring enable states the relay keeps.
    pub fn rings(&self) -> Arc<RingEnable> {
        self.rings.clone()
    }

    /// The inflight region the relay sets (GET/SET_INFLIGHT_FD).
    pub fn inflight(&self) -> Arc<Inflight> {
        self.inflight.clone()
    }

    /// The epoll event id of extra fd `i` of a worker (above the ids `vhost-user-backend`
    /// reserves for the queues and the exit event).
    pub fn fd_event(&self, i: usize) -> u64 {
        (self.dev.num_queues() + 1 + i) as u64
    }

    fn process(&self, wake: Wake, worker: &Worker<'_>) -> Result<(), QueueError> {
        let stopped = self.stopped.read().unwrap_or_else(|e| e.into_inner());
        if *stopped {
            return Ok(());
        }
        let mem = self.mem.read().unwrap_or_else(|e| e.into_inner()).memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        self.dev.process(wake, worker, &mem, event_idx)
    }
}

impl<D: QueueDevice> VhostUserBackend for QueueBackend<D> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.dev.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        self.dev.max_queue_size()
    }

    fn features(&self) -> u64 {
        self.dev.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let p = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK;
        if self.dev.inflight_tracking() {
            p | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        } else {
            p
        }
    }

    fn acked_features(&self, features: u64) {
        self.dev.acked_features(features);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The rqemu identity window first (device-type discovery), then the virtio config.
        match self.identity.answer_config(offset, size) {
            Some(bytes) => bytes,
            None => self.dev.read_config(offset, size),
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // No writable configuration field is offered (virtio-blk: no CONFIG_WCE; virtio-fs:
        // read-only by the spec).
        tracing::debug!("ignoring config write of {} bytes at {offset}", buf.len());
        Ok(())
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.masks.clone()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // A fresh pair per connection: the daemon fires it when the frontend goes away, so
        // that connection's worker threads end.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // vhost-user-backend creates the worker threads: narrow them on their first event.
        crate::confine::confine_thread_once(crate::confine::ThreadKind::Queue);
        let worker = Worker {
            thread: thread_id,
            vrings,
            mask: self.masks.get(thread_id).copied().unwrap_or(0),
            rings: &self.rings,
            inflight: &self.inflight,
        };
        let fd_base = self.fd_event(0);
        let wake = if u64::from(device_event) >= fd_base {
            if !evset.contains(EventSet::IN) {
                // A hang-up or error on a device fd: nothing to read; the device notices on
                // its next operation.
                tracing::warn!("worker {thread_id}: event {device_event} with {evset:?}");
                return Ok(());
            }
            Wake::Fd((u64::from(device_event) - fd_base) as usize)
        } else {
            if evset != EventSet::IN {
                return Err(QueueError::UnexpectedEventSet(evset).into());
            }
            // `device_event` is the position among this thread's own vrings.
            let queue = worker
                .queue_at(usize::from(device_event))
                .filter(|_| usize::from(device_event) < vrings.len())
                .ok_or(QueueError::UnknownEvent(device_event))?;
            Wake::Queue(queue)
        };
        self.process(wake, &worker).map_err(|e| {
            tracing::warn!("worker {thread_id}: {e}");
            e.into()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use vhost_user_backend::VringT;

    use super::*;

    /// Counts the batches it is asked to serve, remembers disconnections and the last wake-up;
    /// `grouped` puts queues 0 and 2 on thread 0 (with an extra fd), queue 1 on thread 1.
    #[derive(Default)]
    struct Counter {
        batches: AtomicUsize,
        disconnects: AtomicUsize,
        grouped: bool,
        last: std::sync::Mutex<Option<(Wake, usize)>>,
        acked: std::sync::atomic::AtomicU64,
    }

    impl QueueDevice for Counter {
        fn num_queues(&self) -> usize {
            3
        }
        fn max_queue_size(&self) -> usize {
            128
        }
        fn features(&self) -> u64 {
            1 << 32
        }
        fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
            vec![offset as u8; size as usize]
        }
        fn acked_features(&self, features: u64) {
            self.acked.store(features, Ordering::Relaxed);
        }
        fn queues_per_thread(&self) -> Vec<u64> {
            if self.grouped {
                vec![0b101, 0b010]
            } else {
                vec![1, 2, 4]
            }
        }
        fn worker_fds(&self, thread: usize) -> Vec<RawFd> {
            if self.grouped && thread == 0 {
                vec![0]
            } else {
                Vec::new()
            }
        }
        fn process(
            &self,
            wake: Wake,
            worker: &Worker<'_>,
            _mem: &MemGuard,
            _event_idx: bool,
        ) -> Result<(), QueueError> {
            if let Wake::Queue(q) = wake {
                worker.vring(q)?;
            }
            *self.last.lock().unwrap() = Some((wake, worker.thread()));
            self.batches.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn disconnected(&self) {
            self.disconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn identity_config_features_and_threads() {
        let b = QueueBackend::new(Counter::default(), DeviceKind::Fs, "t");
        let id = b.get_config(identity::IDENTITY_OFFSET, identity::IDENTITY_LEN);
        let id = Identity::decode(&id).unwrap();
        assert_eq!((id.kind, id.name.as_str()), (DeviceKind::Fs, "t"));
        assert_eq!(b.get_config(4, 2), vec![4, 4], "the device's own config");
        assert_eq!(
            b.features(),
            (1 << 32) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        );
        assert_eq!(b.queues_per_thread(), vec![1, 2, 4]);
        assert_eq!(b.max_queue_size(), 128);
        assert!(b.exit_event(0).is_some());
        b.acked_features(0x1234);
        assert_eq!(b.device().acked.load(Ordering::Relaxed), 0x1234);
    }

    fn vrings(n: usize) -> Vec<VringRwLock> {
        (0..n)
            .map(|_| VringRwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()), 128).unwrap())
            .collect()
    }

    #[test]
    fn grouped_queues_and_extra_fds_reach_the_device_by_queue_index() {
        let dev = Counter {
            grouped: true,
            ..Counter::default()
        };
        let b = QueueBackend::new(dev, DeviceKind::Net, "t");
        assert_eq!(b.queues_per_thread(), vec![0b101, 0b010]);
        let last = || *b.device().last.lock().unwrap();
        let t0 = vrings(2);
        // Thread 0's second vring is queue 2.
        b.handle_event(1, EventSet::IN, &t0, 0).unwrap();
        assert_eq!(last(), Some((Wake::Queue(2), 0)));
        b.handle_event(0, EventSet::IN, &vrings(1), 1).unwrap();
        assert_eq!(last(), Some((Wake::Queue(1), 1)));
        // Event ids above the queues and the exit event are the worker's fds.
        assert_eq!(b.fd_event(0), 4);
        b.handle_event(4, EventSet::IN, &t0, 0).unwrap();
        assert_eq!(last(), Some((Wake::Fd(0), 0)));
        // A hang-up without data on a device fd is not an error, and not served.
        b.handle_event(4, EventSet::HANG_UP, &t0, 0).unwrap();
        assert_eq!(b.device().batches.load(Ordering::Relaxed), 3);
        // Queue positions the thread does not have, and the exit id, are refused.
        assert!(b.handle_event(2, EventSet::IN, &t0, 0).is_err());
        assert!(b.handle_event(3, EventSet::IN, &t0, 0).is_err());
        // Worker ring lookups follow the mask.
        let w = Worker {
            thread: 0,
            vrings: &t0,
            mask: 0b101,
            rings: &b.rings,
            inflight: &b.inflight,
        };
        assert!(w.vring(0).is_ok() && w.vring(2).is_ok());
        assert!(w.vring(1).is_err() && w.vring(64).is_err());
        assert!(!w.is_enabled(0));
        b.rings.set_all(true);
        assert!(w.is_enabled(0));
        b.disconnected();
        assert!(!w.is_enabled(0), "ring states are per connection");
    }

    #[test]
    fn events_reach_the_device_until_shutdown() {
        let b = QueueBackend::new(Counter::default(), DeviceKind::Blk, "t");
        let vrings = vrings(1);
        b.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
        assert_eq!(b.device().batches.load(Ordering::Relaxed), 1);
        assert!(
            b.handle_event(1, EventSet::IN, &vrings, 0).is_err(),
            "not our event"
        );
        assert!(b.handle_event(0, EventSet::OUT, &vrings, 0).is_err());
        b.disconnected();
        assert_eq!(b.device().disconnects.load(Ordering::Relaxed), 1);
        assert_eq!(b.shutdown(|d| d.batches.load(Ordering::Relaxed)), 1);
        b.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
        assert_eq!(
            b.device().batches.load(Ordering::Relaxed),
            1,
            "no batch after shutdown"
        );
    }
}
