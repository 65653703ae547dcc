//! Adapter between `vhost-user-backend` and the transport-free [`BlockDevice`]: the shared
//! [`QueueBackend`] (one worker thread per queue, shutdown gate) over [`BlkQueues`], which
//! gives each queue its own bounce buffer and, with `--aio io-uring` on a raw image, its own
//! io_uring ([`UringQueue`]): reads and writes are submitted as they are taken (O_DIRECT) or
//! in batches (page cache) and go on the used ring as they complete; every other request (flush, discard, GET_ID, qcow2, misaligned
//! O_DIRECT buffers) waits for the queue's I/O in flight, then runs synchronously, so a flush
//! covers every write before it. On shutdown the signal thread waits for batches in progress
//! and I/O in flight and flushes the image: nothing acknowledged is lost.

use std::os::fd::RawFd;
use std::sync::Mutex;

use clap::ValueEnum;
use rqemu_block_backend::image::DiskImage;
use rqemu_block_backend::virtio::{BlockDevice, Prepared, Scratch};
use rqemu_daemon::inflight::Tracker;
use rqemu_daemon::queue_backend::{MemGuard, QueueBackend, QueueDevice, QueueError, Wake, Worker};
use rqemu_daemon::vhost::drain_tracked;
use rqemu_protocol::identity::DeviceKind;
use vhost_user_backend::{VringRwLock, VringT};

use crate::uring::UringQueue;

/// The vhost-user face of a block device.
pub type BlkBackend = QueueBackend<BlkQueues>;

/// I/O engine of the queue threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Aio {
    /// io_uring: many requests in flight per queue (raw images).
    IoUring,
    /// Synchronous `preadv`/`pwritev` in each queue's worker thread (QEMU's `threads` uses
    /// a pool; here the pool is the queue threads).
    Threads,
    /// Synchronous, one request at a time per queue thread.
    Sync,
}

impl Aio {
    /// The engine actually used for `img`: io_uring needs a raw image (qcow2 stays
    /// synchronous: its metadata updates must be ordered after the data they describe).
    pub fn resolve(asked: Aio, img: &dyn DiskImage) -> Aio {
        if asked == Aio::IoUring && img.passthrough_fd().is_none() {
            tracing::info!(
                "{} image: synchronous I/O (io_uring serves raw images)",
                img.format()
            );
            return Aio::Sync;
        }
        asked
    }
}

/// One queue's state, used by its worker thread (and by the signal thread at shutdown).
#[derive(Debug, Default)]
struct QueueState {
    scratch: Scratch,
    uring: Option<UringQueue>,
}

/// A block device and per-queue state.
#[derive(Debug)]
pub struct BlkQueues {
    dev: BlockDevice,
    queues: Vec<Mutex<QueueState>>,
    /// The completion eventfd of each queue's ring (one queue per worker thread).
    event_fds: Vec<Option<RawFd>>,
}

/// Errors setting the backend up.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// io_uring could not be set up (and it was asked for).
    #[error("io_uring set-up: {0}")]
    Uring(std::io::Error),
}

/// Wraps a device, with the engine `aio` (see [`Aio::resolve`]); io_uring falls back to
/// synchronous I/O (logged) when the kernel refuses it.
pub fn new(dev: BlockDevice, aio: Aio) -> Result<BlkBackend, BackendError> {
    let n = usize::from(dev.params().num_queues);
    let entries = u32::from(dev.params().max_queue_size);
    let mut queues = Vec::with_capacity(n);
    let mut event_fds = Vec::with_capacity(n);
    let passthrough = dev.image().passthrough_fd();
    let fd = passthrough.map(|(fd, _)| fd);
    // An alignment above 1: the file is opened with O_DIRECT.
    let at_once = passthrough.is_some_and(|(_, align)| align > 1);
    let mut use_uring = aio == Aio::IoUring && fd.is_some();
    for _ in 0..n {
        let uring = match (use_uring, fd) {
            (true, Some(fd)) => match UringQueue::new(fd, entries, at_once) {
                Ok(u) => Some(u),
                Err(e) if queues.is_empty() => {
                    tracing::warn!("io_uring unavailable ({e}): falling back to synchronous I/O");
                    use_uring = false;
                    None
                }
                Err(e) => return Err(BackendError::Uring(e)),
            },
            _ => None,
        };
        event_fds.push(uring.as_ref().map(UringQueue::event_fd));
        queues.push(Mutex::new(QueueState {
            scratch: Scratch::default(),
            uring,
        }));
    }
    Ok(QueueBackend::new(
        BlkQueues {
            dev,
            queues,
            event_fds,
        },
        DeviceKind::Blk,
        "rqemu-blk",
    ))
}

/// Waits for in-progress requests, refuses new ones and flushes the image.
pub fn shutdown(b: &BlkBackend) -> rqemu_block_backend::image::Result<()> {
    b.shutdown(|q| {
        q.drain_all();
        q.dev.image().flush()
    })
}

impl BlkQueues {
    /// Waits for every queue's I/O in flight (its completions are not published: the
    /// frontend is gone or the daemon is stopping).
    fn drain_all(&self) {
        for q in &self.queues {
            let mut st = q.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(u) = st.uring.as_mut() {
                if let Err(e) = u.drain(|_, _| {}) {
                    tracing::error!("waiting for I/O in flight: {e}");
                }
            }
        }
    }

    /// Serves the kicks of a queue with an io_uring.
    fn serve_uring(
        &self,
        vring: &VringRwLock,
        mem: &MemGuard,
        event_idx: bool,
        st: &mut QueueState,
        t: &mut Tracker,
    ) -> Result<(), QueueError> {
        let QueueState { scratch, uring } = st;
        let Some(u) = uring.as_mut() else {
            return Ok(());
        };
        let mut used_any = false;
        let done = t.completer();
        let publish = |head: u16, used: u32, used_any: &mut bool| -> Result<(), QueueError> {
            done.add_used(vring, head, used)?;
            if event_idx && vring.needs_notification()? {
                vring.signal_used_queue().map_err(QueueError::Signal)?;
            }
            *used_any = true;
            Ok(())
        };
        let mut err = None;
        // As in `rqemu_daemon::vhost::drain_tracked`: two passes in a row that pop nothing
        // while the avail index says there is more is a ring that cannot give it; stop.
        let mut fruitless = 0;
        loop {
            if event_idx {
                vring.disable_notification()?;
            }
            let mut popped = false;
            while let Some(chain) = t.pop(vring, mem) {
                popped = true;
                let head = chain.head_index();
                match self.dev.prepare_chain(&**mem, chain, true) {
                    Prepared::Io(io) => {
                        u.push(head, io, mem).map_err(QueueError::Signal)?;
                    }
                    Prepared::Dropped(c) => publish(head, c.used_len, &mut used_any)?,
                    Prepared::Sync(p) => {
                        // Ordered after every read and write before it.
                        u.drain(|h, n| {
                            if let Err(e) = publish(h, n, &mut used_any) {
                                err = Some(e);
                            }
                        })
                        .map_err(QueueError::Signal)?;
                        let c = self.dev.run_parsed(p, scratch);
                        publish(head, c.used_len, &mut used_any)?;
                    }
                }
            }
            u.submit().map_err(QueueError::Signal)?;
            u.reap(|h, n| {
                used_any = true;
                if let Err(e) = done.add_used(vring, h, n) {
                    err = Some(e);
                }
            });
            if !event_idx || !vring.enable_notification()? {
                break;
            }
            fruitless = if popped { 0 } else { fruitless + 1 };
            if fruitless >= 2 {
                tracing::warn!("queue: the avail index promises chains the ring does not give");
                break;
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        if used_any && vring.needs_notification()? {
            vring.signal_used_queue().map_err(QueueError::Signal)?;
        }
        Ok(())
    }
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

    fn inflight_tracking(&self) -> bool {
        true
    }

    fn worker_fds(&self, thread: usize) -> Vec<RawFd> {
        // One queue per worker thread: thread t serves queue t.
        self.event_fds
            .get(thread)
            .copied()
            .flatten()
            .into_iter()
            .collect()
    }

    fn process(
        &self,
        wake: Wake,
        worker: &Worker<'_>,
        mem: &MemGuard,
        event_idx: bool,
    ) -> Result<(), QueueError> {
        let index = match wake {
            Wake::Queue(q) => q,
            Wake::Fd(_) => worker.thread(),
        };
        let vring = worker.vring(index)?;
        let mut st = match self.queues.get(index) {
            Some(s) => s.lock().unwrap_or_else(|e| e.into_inner()),
            None => return Err(QueueError::UnknownEvent(index as u16)),
        };
        match (wake, st.uring.is_some()) {
            // Completions, or a kick: either way, reap what completed and take what the
            // driver made available meanwhile (fewer wake-ups than serving each alone).
            (_, true) => {
                let mut t = worker.tracker(index, mem)?;
                self.serve_uring(vring, mem, event_idx, &mut st, &mut t)
            }
            (Wake::Fd(_), false) => Ok(()),
            (Wake::Queue(_), false) => {
                let mut t = worker.tracker(index, mem)?;
                drain_tracked(vring, mem, event_idx, &mut t, |chain| {
                    Some(
                        self.dev
                            .process_chain(&**mem, chain, &mut st.scratch)
                            .used_len,
                    )
                })
            }
        }
    }

    /// Waits for I/O in flight, then makes the writes of the frontend that went away durable.
    fn disconnected(&self) {
        self.drain_all();
        if let Err(e) = self.dev.image().flush() {
            tracing::error!("flush after disconnect failed: {e}");
        }
    }
}
