//! Adapter between the shared vhost-user backend (`rqemu_daemon::queue_backend`) and the
//! transport-free [`Muxer`]: [`VsockQueues`] is a `QueueDevice`.
//!
//! One worker thread serves the three queues (RX 0, TX 1, event 2) and polls the muxer's
//! epoll fd (the host sockets). Every wake-up runs the whole cycle until nothing moves: guest
//! TX packets into the muxer, host socket events, then packets for the guest into RX buffers.
//! A guest that stops reading RX throttles itself: past a backlog of control packets its TX
//! ring is left alone until RX buffers come back (an RX kick).

use std::os::fd::RawFd;
use std::sync::Mutex;

use rqemu_daemon::queue_backend::{MemGuard, QueueBackend, QueueDevice, QueueError, Wake, Worker};
use rqemu_protocol::identity::DeviceKind;
use rqemu_vsock_backend::queue::{process_rx, process_tx, QueueIoError};
use rqemu_vsock_backend::{
    read_config, MuxError, MuxStats, Muxer, FEATURES, NUM_QUEUES, RX_QUEUE, TX_QUEUE,
};
use vhost_user_backend::{VringRwLock, VringT};

/// The vhost-user face of a virtio-vsock device.
pub type VsockBackend = QueueBackend<VsockQueues>;

/// Largest queue size accepted.
const MAX_QUEUE_SIZE: usize = 1024;

/// Wraps a muxer.
pub fn new(mux: Muxer) -> VsockBackend {
    QueueBackend::new(VsockQueues::new(mux), DeviceKind::Vsock, "rqemu-vsock")
}

/// Errors of the queue worker.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A ring that does not exist.
    #[error(transparent)]
    Worker(#[from] QueueError),
    /// Queue bookkeeping failed.
    #[error(transparent)]
    Queue(#[from] QueueIoError),
    /// The host sockets' epoll failed.
    #[error(transparent)]
    Mux(#[from] MuxError),
    /// Notifying the frontend failed.
    #[error("signalling the used queue: {0}")]
    Signal(std::io::Error),
}

/// A virtio-vsock device: the guest's CID and its connections.
#[derive(Debug)]
pub struct VsockQueues {
    guest_cid: u64,
    epoll_fd: RawFd,
    mux: Mutex<Muxer>,
}

impl VsockQueues {
    fn new(mux: Muxer) -> Self {
        VsockQueues {
            guest_cid: mux.guest_cid(),
            epoll_fd: mux.epoll_fd(),
            mux: Mutex::new(mux),
        }
    }

    /// The muxer's counters.
    pub fn stats(&self) -> MuxStats {
        self.mux.lock().unwrap_or_else(|e| e.into_inner()).stats()
    }

    fn signal(vring: &VringRwLock, used: usize) -> Result<(), BackendError> {
        if used > 0 && vring.needs_notification().map_err(QueueError::from)? {
            vring.signal_used_queue().map_err(BackendError::Signal)?;
        }
        Ok(())
    }

    fn cycle(&self, worker: &Worker<'_>, mem: &MemGuard) -> Result<(), BackendError> {
        let rx = worker.vring(RX_QUEUE)?;
        let tx = worker.vring(TX_QUEUE)?;
        let mut mux = self.mux.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let tx_used = {
                let mut g = tx.get_mut();
                process_tx(&mut mux, g.get_queue_mut(), &**mem)?
            };
            Self::signal(tx, tx_used)?;
            mux.host_events()?;
            let rx_used = {
                let mut g = rx.get_mut();
                process_rx(&mut mux, g.get_queue_mut(), &**mem)?
            };
            Self::signal(rx, rx_used)?;
            if tx_used == 0 && rx_used == 0 {
                return Ok(());
            }
        }
    }
}

impl QueueDevice for VsockQueues {
    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config(self.guest_cid, offset, size)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1 << NUM_QUEUES) - 1]
    }

    fn worker_fds(&self, thread: usize) -> Vec<RawFd> {
        if thread == 0 {
            vec![self.epoll_fd]
        } else {
            Vec::new()
        }
    }

    fn process(
        &self,
        _wake: Wake,
        worker: &Worker<'_>,
        mem: &MemGuard,
        _event_idx: bool,
    ) -> Result<(), QueueError> {
        // Whatever woke the worker (a kick of any queue, the host sockets), the whole cycle
        // runs. Errors are logged, not returned: an error would end the worker for the rest of
        // the connection.
        if let Err(e) = self.cycle(worker, mem) {
            tracing::warn!("vsock worker: {e}");
        }
        Ok(())
    }

    /// The guest's driver went with its frontend: every connection is reset.
    fn disconnected(&self) {
        let mut mux = self.mux.lock().unwrap_or_else(|e| e.into_inner());
        tracing::info!(
            "frontend gone: closing {} connection(s); stats {:?}",
            mux.connections(),
            mux.stats()
        );
        mux.reset();
    }
}

#[cfg(test)]
mod tests {
    use rqemu_protocol::identity::{self, Identity};
    use vhost_user_backend::VhostUserBackend;

    use super::*;

    #[test]
    fn announces_itself_as_virtio_vsock_with_the_guest_cid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mux = Muxer::new(42, path, l, Box::new(|_| true)).unwrap();
        let b = new(mux);
        let id = b.get_config(identity::IDENTITY_OFFSET, identity::IDENTITY_LEN);
        let id = Identity::decode(&id).unwrap();
        assert_eq!(
            (id.kind, id.name.as_str()),
            (DeviceKind::Vsock, "rqemu-vsock")
        );
        assert_eq!(id.kind.virtio_id(), rqemu_vsock_backend::VIRTIO_ID_VSOCK);
        assert_eq!(b.get_config(0, 8), 42u64.to_le_bytes().to_vec());
        assert_eq!(b.num_queues(), 3);
        assert_eq!(b.queues_per_thread(), vec![0b111]);
        assert_eq!(b.device().worker_fds(0).len(), 1);
        assert!(b.features() & FEATURES == FEATURES);
    }
}
