//! Adapter between `vhost-user-backend` and the transport-free [`BlockDevice`]: the shared
//! [`QueueBackend`] (one worker thread per queue, shutdown gate) over [`BlkQueues`], which
//! gives each queue its own bounce buffer. On shutdown the signal thread waits for batches in
//! progress and flushes the image: nothing acknowledged is lost.

use std::sync::Mutex;

use rqemu_block_backend::virtio::{BlockDevice, Scratch};
use rqemu_daemon::queue_backend::{MemGuard, QueueBackend, QueueDevice, QueueError, Wake, Worker};
use rqemu_daemon::vhost::drain_queue;
use rqemu_protocol::identity::DeviceKind;

/// The vhost-user face of a block device.
pub type BlkBackend = QueueBackend<BlkQueues>;

/// A block device and a bounce buffer per queue.
#[derive(Debug)]
pub struct BlkQueues {
    dev: BlockDevice,
    scratch: Vec<Mutex<Scratch>>,
}

/// Wraps a device.
pub fn new(dev: BlockDevice) -> BlkBackend {
    let queues = usize::from(dev.params().num_queues);
    let scratch = (0..queues)
        .map(|_| Mutex::new(Scratch::default()))
        .collect();
    QueueBackend::new(BlkQueues { dev, scratch }, DeviceKind::Blk, "rqemu-blk")
}

/// Waits for in-progress requests, refuses new ones and flushes the image.
pub fn shutdown(b: &BlkBackend) -> rqemu_block_backend::image::Result<()> {
    b.shutdown(|q| q.dev.image().flush())
}

impl QueueDevice for BlkQueues {
    fn num_queues(&self) -> usize {
        usize::from(self.dev.params().num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.dev.params().max_queue_size)
    }

    fn features(&self) -> u64 {
        self.dev.features()
    }

    fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.dev.read_config(offset, size)
    }

    fn process(
        &self,
        wake: Wake,
        worker: &Worker<'_>,
        mem: &MemGuard,
        event_idx: bool,
    ) -> Result<(), QueueError> {
        let Wake::Queue(index) = wake else {
            return Ok(());
        };
        let vring = worker.vring(index)?;
        let mut scratch = match self.scratch.get(index) {
            Some(s) => s.lock().unwrap_or_else(|e| e.into_inner()),
            None => return Err(QueueError::UnknownEvent(index as u16)),
        };
        drain_queue(vring, mem, event_idx, |chain| {
            self.dev.process_chain(&**mem, chain, &mut scratch).used_len
        })
    }

    /// Makes the writes of the frontend that went away durable.
    fn disconnected(&self) {
        if let Err(e) = self.dev.image().flush() {
            tracing::error!("flush after disconnect failed: {e}");
        }
    }
}
