//! Device counters (lock-free, shared by all queue workers).

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters.
#[derive(Debug, Default)]
pub struct NetStats {
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
    tx_errors: AtomicU64,
    tx_gso_frames: AtomicU64,
    rx_frames: AtomicU64,
    rx_gso_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    bad_chains: AtomicU64,
    ctrl_commands: AtomicU64,
}

/// A copy of the counters at one point in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Frames written to the tap.
    pub tx_frames: u64,
    /// Bytes (frames without the vnet header) written to the tap.
    pub tx_bytes: u64,
    /// Guest frames dropped as invalid (truncated header, oversize, bad offload, bad chain).
    pub tx_dropped: u64,
    /// Frames the tap refused to take.
    pub tx_errors: u64,
    /// Of `tx_frames`, segmentation-offload (GSO) frames from the guest.
    pub tx_gso_frames: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered (frames without the vnet header).
    pub rx_bytes: u64,
    /// Of `rx_frames`, GSO frames delivered to the guest (receive offload).
    pub rx_gso_frames: u64,
    /// Tap frames dropped (too small, or too big for the guest's buffers).
    pub rx_dropped: u64,
    /// Descriptor chains rejected (wrong direction, outside guest memory).
    pub bad_chains: u64,
    /// Control queue commands handled.
    pub ctrl_commands: u64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl NetStats {
    pub(crate) fn tx_frame(&self, bytes: usize, gso: bool) {
        add(&self.tx_frames, 1);
        add(&self.tx_bytes, bytes as u64);
        if gso {
            add(&self.tx_gso_frames, 1);
        }
    }
    pub(crate) fn tx_dropped(&self) {
        add(&self.tx_dropped, 1);
    }
    pub(crate) fn tx_error(&self) {
        add(&self.tx_errors, 1);
    }
    pub(crate) fn rx_frame(&self, bytes: usize, gso: bool) {
        add(&self.rx_frames, 1);
        add(&self.rx_bytes, bytes as u64);
        if gso {
            add(&self.rx_gso_frames, 1);
        }
    }
    pub(crate) fn rx_dropped(&self) {
        add(&self.rx_dropped, 1);
    }
    pub(crate) fn bad_chain(&self) {
        add(&self.bad_chains, 1);
    }
    pub(crate) fn ctrl_command(&self) {
        add(&self.ctrl_commands, 1);
    }

    /// Reads all counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            tx_dropped: l(&self.tx_dropped),
            tx_errors: l(&self.tx_errors),
            tx_gso_frames: l(&self.tx_gso_frames),
            rx_frames: l(&self.rx_frames),
            rx_bytes: l(&self.rx_bytes),
            rx_gso_frames: l(&self.rx_gso_frames),
            rx_dropped: l(&self.rx_dropped),
            bad_chains: l(&self.bad_chains),
            ctrl_commands: l(&self.ctrl_commands),
        }
    }
}
