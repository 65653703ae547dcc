//! Adapter between the shared vhost-user backend (`rqemu_daemon::queue_backend`) and the
//! transport-free [`NetDevice`]: [`NetQueues`] is a `QueueDevice`.
//!
//! One worker thread per queue pair (RX `2i`, TX `2i + 1`; thread 0 also owns the control
//! queue `2N`). Each thread also polls its tap queue (edge-triggered, a worker fd): a readable
//! tap or an RX kick runs RX, a TX kick runs TX (then RX). RX stops when the guest has no
//! buffers and resumes on its next RX kick. Connections go through the relay (QEMU's early
//! `SET_VRING_ENABLE`), and only rings the frontend enabled are served; the tap queue of a pair
//! whose RX ring is not in use is detached so the kernel steers its traffic to the others.

use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;

use rqemu_daemon::queue_backend::{MemGuard, QueueBackend, QueueDevice, QueueError, Wake, Worker};
use rqemu_net_backend::{NetDevice, RxState, StatsSnapshot, Tap, TapQueue, TxScratch};
use rqemu_protocol::identity::DeviceKind;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;

/// The vhost-user face of a virtio-net device.
pub type NetBackend = QueueBackend<NetQueues>;

/// Wraps a device and its tap queues (one per queue pair).
pub fn new(dev: NetDevice, taps: Vec<TapQueue>) -> NetBackend {
    QueueBackend::new(NetQueues::new(dev, taps), DeviceKind::Net, "rqemu-net")
}

/// Errors of the queue workers.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A ring or worker that does not exist.
    #[error(transparent)]
    Worker(#[from] QueueError),
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

/// A virtio-net device, its tap queues and the per-pair state of the current connection.
#[derive(Debug)]
pub struct NetQueues {
    dev: NetDevice,
    taps: Vec<TapQueue>,
    pairs: Vec<Mutex<Pair>>,
}

impl NetQueues {
    fn new(dev: NetDevice, taps: Vec<TapQueue>) -> Self {
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
        NetQueues { dev, taps, pairs }
    }

    /// The device counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.dev.stats().snapshot()
    }

    fn signal(vring: &VringRwLock, used: bool) -> Result<(), BackendError> {
        if used && vring.needs_notification()? {
            vring.signal_used_queue().map_err(BackendError::Signal)?;
        }
        Ok(())
    }

    /// Runs RX for `pair` if its queue is in use; detaches the tap queue of an unused pair
    /// so the kernel steers its traffic to the others.
    fn rx(
        &self,
        pair: usize,
        p: &mut Pair,
        worker: &Worker<'_>,
        mem: &MemGuard,
    ) -> Result<(), BackendError> {
        let Some(tap) = self.taps.get(pair) else {
            return Ok(());
        };
        let vring = worker.vring(2 * pair)?;
        let ready = vring.get_ref().get_queue().ready();
        let in_use = ready && worker.is_enabled(2 * pair);
        if in_use != p.attached && (pair > 0 || in_use) {
            match tap.set_queue_enabled(in_use) {
                Ok(()) => p.attached = in_use,
                Err(e) => tracing::warn!("tap queue {pair}: attach={in_use}: {e}"),
            }
        }
        if !in_use {
            return Ok(());
        }
        let out = {
            let mut guard = vring.get_mut();
            self.dev
                .process_rx(guard.get_queue_mut(), &**mem, tap, &mut p.rx)?
        };
        p.rx_frames += out.frames as u64;
        if out.stalled {
            tracing::trace!("rx {pair}: guest out of buffers");
        }
        Self::signal(vring, out.used)
    }

    fn tx(
        &self,
        pair: usize,
        p: &mut Pair,
        worker: &Worker<'_>,
        mem: &MemGuard,
    ) -> Result<(), BackendError> {
        let Some(tap) = self.taps.get(pair) else {
            return Ok(());
        };
        let vring = worker.vring(2 * pair + 1)?;
        let used = {
            let mut guard = vring.get_mut();
            self.dev
                .process_tx(guard.get_queue_mut(), &**mem, tap, &mut p.tx)?
        };
        p.tx_chains += used as u64;
        Self::signal(vring, used > 0)
    }

    fn ctrl(&self, vring: &VringRwLock, mem: &MemGuard) -> Result<(), BackendError> {
        let used = {
            let mut guard = vring.get_mut();
            self.dev.process_ctrl(guard.get_queue_mut(), &**mem)?
        };
        Self::signal(vring, used)
    }

    fn handle(&self, wake: Wake, worker: &Worker<'_>, mem: &MemGuard) -> Result<(), BackendError> {
        let pair = worker.thread();
        let mut p = self
            .pairs
            .get(pair)
            .ok_or(QueueError::UnknownEvent(pair as u16))?
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let ctrl = self.dev.params().ctrl_queue();
        match wake {
            Wake::Queue(q) if q == ctrl => self.ctrl(worker.vring(q)?, mem),
            Wake::Queue(q) if q == 2 * pair => self.rx(pair, &mut p, worker, mem),
            Wake::Queue(q) if q == 2 * pair + 1 => {
                self.tx(pair, &mut p, worker, mem)?;
                // Also pick up tap traffic that arrived while the RX queue was not yet in
                // use (its tap queue detached, or the edge seen before the ring was ready).
                self.rx(pair, &mut p, worker, mem)
            }
            Wake::Fd(0) => self.rx(pair, &mut p, worker, mem),
            Wake::Queue(q) => Err(QueueError::UnknownEvent(q as u16).into()),
            Wake::Fd(i) => Err(QueueError::UnknownEvent(i as u16).into()),
        }
    }
}

impl QueueDevice for NetQueues {
    fn num_queues(&self) -> usize {
        self.dev.params().num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.dev.params().max_queue_size)
    }

    fn features(&self) -> u64 {
        self.dev.features()
    }

    fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The virtio-net configuration space is read-only for the driver (writes ignored).
        self.dev.read_config(offset, size)
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

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.pairs.len())
            .map(|i| {
                let mut mask = 0b11u64 << (2 * i);
                if i == 0 {
                    mask |= 1u64 << self.dev.params().ctrl_queue();
                }
                mask
            })
            .collect()
    }

    fn worker_fds(&self, thread: usize) -> Vec<RawFd> {
        self.taps.get(thread).map(Tap::raw_fd).into_iter().collect()
    }

    fn relay_vring_enable(&self) -> bool {
        // QEMU's virtio-net enables its rings before SET_FEATURES, and RX must know which
        // rings are in use.
        true
    }

    fn process(
        &self,
        wake: Wake,
        worker: &Worker<'_>,
        mem: &MemGuard,
        _event_idx: bool,
    ) -> Result<(), QueueError> {
        // Errors are logged, not returned: an error would end this worker thread and with it
        // the queue pair, for the rest of the connection.
        if let Err(e) = self.handle(wake, worker, mem) {
            tracing::warn!("worker {}: {e}", worker.thread());
        }
        Ok(())
    }

    /// Forgets the departed frontend's per-pair state, logging its counters.
    fn disconnected(&self) {
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
}

#[cfg(test)]
mod tests {
    use rqemu_net_backend::NetParams;
    use rqemu_protocol::identity::{self, Identity};
    use vhost_user_backend::VhostUserBackend;

    use super::*;

    #[test]
    fn announces_itself_as_virtio_net_and_groups_queue_pairs() {
        let params = NetParams {
            queue_pairs: 2,
            ..NetParams::default()
        };
        let dev = NetDevice::new(params).unwrap();
        let config = dev.read_config(0, 6);
        let b = new(dev, Vec::new());
        // The identity block a bare `--device-socket PATH` is discovered by.
        let id = b.get_config(identity::IDENTITY_OFFSET, identity::IDENTITY_LEN);
        let id = Identity::decode(&id).unwrap();
        assert_eq!((id.kind, id.name.as_str()), (DeviceKind::Net, "rqemu-net"));
        // Below it, the virtio-net config (the MAC first).
        assert_eq!(b.get_config(0, 6), config);
        assert_eq!(b.num_queues(), 5, "two pairs and the control queue");
        assert!(b.device().relay_vring_enable());
        assert!(b.device().worker_fds(0).is_empty(), "no tap given");
    }
}
