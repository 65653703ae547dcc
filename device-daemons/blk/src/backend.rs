//! Adapter between `vhost-user-backend` and the transport-free [`BlockDevice`].
//!
//! One worker thread per queue (see [`VhostUserBackend::queues_per_thread`]), each with its own
//! bounce buffer. A shutdown gate lets the signal thread wait for in-progress batches, flush the
//! image and stop the device before the process exits: nothing acknowledged is lost.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use rqemu_block_backend::virtio::{BlockDevice, Scratch};
use rqemu_daemon::vhost::{drain_queue, QueueError};
use rqemu_protocol::identity::{self, DeviceKind, Identity};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// The vhost-user face of a block device.
#[derive(Debug)]
pub struct BlkBackend {
    dev: BlockDevice,
    mem: RwLock<Mem>,
    event_idx: AtomicBool,
    scratch: Vec<Mutex<Scratch>>,
    /// `true` once the daemon is shutting down: no more requests are executed.
    stopped: RwLock<bool>,
    identity: Identity,
}

impl BlkBackend {
    /// Wraps a device.
    pub fn new(dev: BlockDevice) -> Self {
        let queues = usize::from(dev.params().num_queues);
        BlkBackend {
            dev,
            mem: RwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
            event_idx: AtomicBool::new(false),
            scratch: (0..queues)
                .map(|_| Mutex::new(Scratch::default()))
                .collect(),
            stopped: RwLock::new(false),
            identity: Identity {
                version: identity::VERSION,
                kind: DeviceKind::Blk,
                name: "rqemu-blk".to_string(),
            },
        }
    }

    /// Waits for in-progress requests, refuses new ones and flushes the image.
    pub fn shutdown(&self) -> rqemu_block_backend::image::Result<()> {
        let mut stopped = self.stopped.write().unwrap_or_else(|e| e.into_inner());
        *stopped = true;
        self.dev.image().flush()
    }

    /// Called when a frontend goes away: drop its memory mapping and make its writes durable.
    pub fn disconnected(&self) {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) =
            GuestMemoryAtomic::new(GuestMemoryMmap::new());
        if let Err(e) = self.dev.image().flush() {
            tracing::error!("flush after disconnect failed: {e}");
        }
    }

    fn process_queue(&self, index: usize, vring: &VringRwLock) -> Result<(), QueueError> {
        let stopped = self.stopped.read().unwrap_or_else(|e| e.into_inner());
        if *stopped {
            return Ok(());
        }
        let mem = self.mem.read().unwrap_or_else(|e| e.into_inner()).memory();
        let mut scratch = match self.scratch.get(index) {
            Some(s) => s.lock().unwrap_or_else(|e| e.into_inner()),
            None => return Err(QueueError::UnknownEvent(index as u16)),
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        drain_queue(vring, &mem, event_idx, |chain| {
            self.dev.process_chain(&*mem, chain, &mut scratch).used_len
        })
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.dev.params().num_queues)
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
        // Nothing in our configuration space is writable (CONFIG_WCE is not offered).
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
