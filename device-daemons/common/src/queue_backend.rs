//! The vhost-user face every queue-per-thread virtio daemon shares (`rqemu-blk`, `rqemu-fs`):
//! [`QueueBackend`] implements `VhostUserBackend` over a small [`QueueDevice`] seam — guest
//! memory of the current frontend, EVENT_IDX, the rqemu identity inside GET_CONFIG, one worker
//! thread per queue, fresh exit events per connection, and a shutdown gate that lets the signal
//! thread wait for batches in progress.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use rqemu_protocol::identity::{self, DeviceKind, Identity};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::vhost::{MemGuard, QueueError};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

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
    /// Serves the available chains of queue `index` (e.g. with
    /// [`drain_queue`](crate::vhost::drain_queue)).
    fn process_queue(
        &self,
        index: usize,
        vring: &VringRwLock,
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
}

impl<D: QueueDevice> QueueBackend<D> {
    /// Wraps `dev`, announcing itself as `name` of `kind` in the identity window.
    pub fn new(dev: D, kind: DeviceKind, name: &str) -> Self {
        QueueBackend {
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

    /// Called when a frontend goes away: drop its memory mapping, then
    /// [`QueueDevice::disconnected`].
    pub fn disconnected(&self) {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) =
            GuestMemoryAtomic::new(GuestMemoryMmap::new());
        self.dev.disconnected();
    }

    fn process_queue(&self, index: usize, vring: &VringRwLock) -> Result<(), QueueError> {
        let stopped = self.stopped.read().unwrap_or_else(|e| e.into_inner());
        if *stopped {
            return Ok(());
        }
        let mem = self.mem.read().unwrap_or_else(|e| e.into_inner()).memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        self.dev.process_queue(index, vring, &mem, event_idx)
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
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
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
        // One worker thread per queue: queues run in parallel.
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
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
        if evset != EventSet::IN {
            return Err(QueueError::UnexpectedEventSet(evset).into());
        }
        // `vrings` are this worker thread's own (one queue per thread), `device_event` the
        // position among them; the thread index is the queue index.
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or(QueueError::UnknownEvent(device_event))?;
        self.process_queue(thread_id, vring).map_err(|e| {
            tracing::warn!("queue {thread_id}: {e}");
            e.into()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use vhost_user_backend::VringT;

    use super::*;

    /// Counts the batches it is asked to serve, remembers disconnections.
    #[derive(Default)]
    struct Counter {
        batches: AtomicUsize,
        disconnects: AtomicUsize,
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
        fn process_queue(
            &self,
            _index: usize,
            _vring: &VringRwLock,
            _mem: &MemGuard,
            _event_idx: bool,
        ) -> Result<(), QueueError> {
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
    }

    #[test]
    fn events_reach_the_device_until_shutdown() {
        let b = QueueBackend::new(Counter::default(), DeviceKind::Blk, "t");
        let vring = VringRwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()), 128).unwrap();
        let vrings = [vring];
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
