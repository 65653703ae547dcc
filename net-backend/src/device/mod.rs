//! The virtio-net device proper, independent of the transport: it works on
//! [`virtio_queue::Queue`]s in some guest memory and on [`Tap`] queues.
//!
//! Queue layout: pair `i` is RX `2i` and TX `2i + 1`; the control queue is `2N`. The caller
//! (vhost-user adapter, VMM) decides when to run [`NetDevice::process_tx`],
//! [`NetDevice::process_rx`] (TX kick / RX kick or tap readable) and
//! [`NetDevice::process_ctrl`], and signals the guest when they report used buffers.

mod ctrl;
mod rx;
mod tx;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};

use crate::config::{ConfigError, Negotiated, NetParams};
use crate::header::MAX_PACKET;
use crate::stats::NetStats;
use crate::tap::Tap;

pub use rx::{RxOutcome, RxState};
pub use tx::TxScratch;

/// Errors of the queue processing (guest mistakes are counted, not errors).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Used-ring or notification bookkeeping failed (rings outside guest memory, ...).
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// Reading the tap failed with something other than "no packet".
    #[error("reading the tap: {0}")]
    TapRead(#[source] std::io::Error),
}

/// A virtio-net device.
#[derive(Debug)]
pub struct NetDevice {
    params: NetParams,
    features: AtomicU64,
    active_pairs: AtomicU16,
    stats: NetStats,
}

impl NetDevice {
    /// A device with these parameters.
    pub fn new(params: NetParams) -> Result<Self, ConfigError> {
        params.validate()?;
        Ok(NetDevice {
            params,
            features: AtomicU64::new(0),
            active_pairs: AtomicU16::new(1),
            stats: NetStats::default(),
        })
    }

    /// The parameters.
    pub fn params(&self) -> &NetParams {
        &self.params
    }

    /// The counters.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// Offered features.
    pub fn features(&self) -> u64 {
        self.params.features()
    }

    /// Records the features the driver acknowledged (only offered ones are kept) and returns
    /// what they mean; apply [`Negotiated::tap_offloads`] to every tap queue.
    pub fn set_features(&self, acked: u64) -> Negotiated {
        let features = acked & self.params.features();
        self.features.store(features, Ordering::Relaxed);
        self.active_pairs.store(1, Ordering::Relaxed);
        Negotiated { features }
    }

    /// The negotiated features.
    pub fn negotiated(&self) -> Negotiated {
        Negotiated {
            features: self.features.load(Ordering::Relaxed),
        }
    }

    /// Queue pairs the driver enabled with `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` (1 until then).
    pub fn active_pairs(&self) -> u16 {
        self.active_pairs.load(Ordering::Relaxed)
    }

    /// Configuration space read.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.params.read_config(offset, size)
    }

    /// Applies the negotiated receive offloads to a tap queue.
    pub fn apply_offloads(&self, tap: &dyn Tap) -> std::io::Result<()> {
        tap.set_offload(self.negotiated().tap_offloads())
    }
}

/// A bounce buffer large enough for any packet.
fn packet_buffer() -> Vec<u8> {
    vec![0u8; MAX_PACKET]
}
