//! Adapter between `vhost-user-backend` and the transport-free [`FsServer`].
//!
//! Queue 0 is the hiprio queue (FORGET, INTERRUPT), queues 1..=N the request queues; one worker
//! thread per queue. A shutdown gate lets the signal thread wait for in-progress requests before
//! the process exits. A `SETLKW` that has to wait is answered later by its waiter thread
//! through [`VringCompleter`] (the worker goes on serving the queue).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use rqemu_daemon::vhost::{drain_queue_deferrable, QueueError};
use rqemu_fs_backend::{FsParams, FsServer, Outcome, UsedRing};
use rqemu_protocol::identity::{self, DeviceKind, Identity};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Completes deferred requests of one vring from a waiter thread.
#[derive(Clone)]
struct VringCompleter {
    vring: VringRwLock,
    index: usize,
}

impl UsedRing for VringCompleter {
    fn is_running(&self) -> bool {
        self.vring.get_ref().get_queue().ready()
    }

    fn complete(&self, head: u16, len: u32) {
        // One write lock for the check and the update: a queue the frontend stopped
        // (GET_VRING_BASE) in between is never written.
        let mut vring = self.vring.get_mut();
        if !vring.get_queue().ready() {
            return;
        }
        let r = vring
            .add_used(head, len)
            .map_err(QueueError::from)
            .and_then(|()| {
                if vring.needs_notification()? {
                    vring.signal_used_queue().map_err(QueueError::Signal)?;
                }
                Ok(())
            });
        if let Err(e) = r {
            tracing::warn!("queue {}: completing a deferred request: {e}", self.index);
        }
    }
}

/// The vhost-user face of a virtio-fs server.
#[derive(Debug)]
pub struct FsBackend {
    server: FsServer,
    params: FsParams,
    mem: RwLock<Mem>,
    event_idx: AtomicBool,
    /// `true` once the daemon is shutting down: no more requests are executed.
    stopped: RwLock<bool>,
    identity: Identity,
}

impl FsBackend {
    /// Wraps a server.
    pub fn new(server: FsServer, params: FsParams) -> Self {
        FsBackend {
            server,
            params,
            mem: RwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
            event_idx: AtomicBool::new(false),
            stopped: RwLock::new(false),
            identity: Identity {
                version: identity::VERSION,
                kind: DeviceKind::Fs,
                name: "rqemu-fs".to_string(),
            },
        }
    }

    /// Waits for in-progress requests and refuses new ones.
    pub fn shutdown(&self) {
        *self.stopped.write().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Called when a frontend goes away: drop its memory mapping and every inode and handle
    /// its guest held (the next guest mounts afresh).
    pub fn disconnected(&self) {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) =
            GuestMemoryAtomic::new(GuestMemoryMmap::new());
        self.server.reset();
    }

    fn process_queue(&self, index: usize, vring: &VringRwLock) -> Result<(), QueueError> {
        let stopped = self.stopped.read().unwrap_or_else(|e| e.into_inner());
        if *stopped {
            return Ok(());
        }
        let mem = self.mem.read().unwrap_or_else(|e| e.into_inner()).memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let ring = VringCompleter {
            vring: vring.clone(),
            index,
        };
        drain_queue_deferrable(vring, &mem, event_idx, |chain| {
            match self.server.process_chain(&mem, chain, &ring) {
                Ok(Outcome::Used(n)) => Some(n),
                Ok(Outcome::Deferred) => None,
                Err(e) => {
                    tracing::warn!("queue {index}: {e}");
                    Some(0)
                }
            }
        })
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.params.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.params.max_queue_size)
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
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
            None => self.params.read_config(offset, size),
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // The virtio-fs configuration space is read-only.
        tracing::debug!("ignoring config write of {} bytes at {offset}", buf.len());
        Ok(())
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue (hiprio included): queues run in parallel.
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
    use super::*;
    use rqemu_fs_backend::Tag;

    fn backend(tag: &str, queues: u16) -> FsBackend {
        let dir = tempfile::tempdir().unwrap();
        let params = FsParams {
            tag: Tag::new(tag).unwrap(),
            num_request_queues: queues,
            ..FsParams::default()
        };
        FsBackend::new(FsServer::new(&params, dir.path()).unwrap(), params)
    }

    #[test]
    fn answers_identity_and_config() {
        let b = backend("myfs", 2);
        let id = b.get_config(identity::IDENTITY_OFFSET, identity::IDENTITY_LEN);
        let id = Identity::decode(&id).unwrap();
        assert_eq!(id.kind, DeviceKind::Fs);
        assert_eq!(id.name, "rqemu-fs");
        let cfg = b.get_config(0, 40);
        assert_eq!(&cfg[..4], b"myfs");
        assert_eq!(&cfg[36..40], &[2, 0, 0, 0]);
        assert_eq!(b.num_queues(), 3);
        assert_eq!(b.queues_per_thread(), vec![1, 2, 4]);
        assert_ne!(b.features() & (1 << VIRTIO_F_VERSION_1), 0);
    }
}
