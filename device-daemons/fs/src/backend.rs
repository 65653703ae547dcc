//! Adapter between `vhost-user-backend` and the transport-free [`FsServer`]: the shared
//! [`QueueBackend`] (one worker thread per queue, shutdown gate) over [`FsQueues`].
//!
//! Queue 0 is the hiprio queue (FORGET, INTERRUPT), queues 1..=N the request queues. A
//! `SETLKW` that has to wait is answered later by its waiter thread through
//! [`VringCompleter`] (the worker goes on serving the queue).

use rqemu_daemon::queue_backend::{MemGuard, QueueBackend, QueueDevice, QueueError, Wake, Worker};
use rqemu_daemon::vhost::drain_queue_deferrable;
use rqemu_fs_backend::{FsParams, FsServer, Outcome, UsedRing};
use rqemu_protocol::identity::DeviceKind;

use crate::sandbox::QueueFilter;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;

/// The vhost-user face of a virtio-fs server.
pub type FsBackend = QueueBackend<FsQueues>;

/// A FUSE server and its device parameters.
#[derive(Debug)]
pub struct FsQueues {
    server: FsServer,
    params: FsParams,
    filter: QueueFilter,
}

impl std::fmt::Debug for QueueFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueFilter").finish_non_exhaustive()
    }
}

/// Wraps a server; each queue worker narrows itself with `filter` on its first wake-up.
pub fn new(server: FsServer, params: FsParams, filter: QueueFilter) -> FsBackend {
    QueueBackend::new(
        FsQueues {
            server,
            params,
            filter,
        },
        DeviceKind::Fs,
        "rqemu-fs",
    )
}

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

impl QueueDevice for FsQueues {
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
    }

    fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.params.read_config(offset, size)
    }

    fn process(
        &self,
        wake: Wake,
        worker: &Worker<'_>,
        mem: &MemGuard,
        event_idx: bool,
    ) -> Result<(), QueueError> {
        self.filter.confine_once();
        let Wake::Queue(index) = wake else {
            return Ok(());
        };
        let vring = worker.vring(index)?;
        let ring = VringCompleter {
            vring: vring.clone(),
            index,
        };
        drain_queue_deferrable(vring, mem, event_idx, |chain| {
            match self.server.process_chain(mem, chain, &ring) {
                Ok(Outcome::Used(n)) => Some(n),
                Ok(Outcome::Deferred) => None,
                Err(e) => {
                    tracing::warn!("queue {index}: {e}");
                    Some(0)
                }
            }
        })
    }

    /// Forgets every inode and handle the departed guest held (the next guest mounts afresh).
    fn disconnected(&self) {
        self.server.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rqemu_fs_backend::Tag;
    use rqemu_protocol::identity::{self, Identity};
    use vhost_user_backend::VhostUserBackend;

    fn backend(tag: &str, queues: u16) -> FsBackend {
        let dir = tempfile::tempdir().unwrap();
        let params = FsParams {
            tag: Tag::new(tag).unwrap(),
            num_request_queues: queues,
            ..FsParams::default()
        };
        new(
            FsServer::new(&params, dir.path()).unwrap(),
            params,
            QueueFilter::default(),
        )
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
