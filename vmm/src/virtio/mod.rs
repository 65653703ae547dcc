//! virtio devices whose backends live in other processes.
//!
//! * [`mmio`] — the virtio-mmio (version 2, "modern") transport: register file, feature
//!   negotiation, queue setup, device status/reset; a [`crate::bus::BusDevice`];
//! * [`empty`] — the transport of a window without a device (DeviceID 0), so every window
//!   the DSDT declares can be probed;
//! * [`vhost_user`] — a [`VirtioDevice`] that forwards everything to a vhost-user backend
//!   (rqemu's daemons, `qemu-storage-daemon`, `virtiofsd`, ...) from a control thread, and
//!   reconnects a daemon that died under the running guest.
//!
//! Data path: the guest's QueueNotify write hits an **ioeventfd** (KVM) or the bus ioevent
//! (TCG) and signals the queue's kick eventfd, which the daemon polls; the daemon signals
//! the queue's call eventfd, bound by **irqfd** to the window's GSI. The VMM itself is not
//! on the data path. Because an irqfd bypasses the transport, `InterruptStatus` always
//! reports "used buffer" (bit 0) once the device is live; Linux then scans its rings, which
//! is harmless when nothing is new.

pub mod empty;
pub mod mmio;
pub mod vhost_user;

use vmm_sys_util::eventfd::EventFd;

/// virtio device IDs used by rqemu.
pub mod device_id {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Socket device (virtio-vsock).
    pub const VSOCK: u32 = 19;
    /// virtio-fs.
    pub const FS: u32 = 26;
}

/// `VIRTIO_F_VERSION_1`: required by the modern transport.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Errors from virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The vhost-user backend failed or misbehaved.
    #[error("vhost-user backend {path}: {op}: {msg}")]
    Backend {
        /// Socket path.
        path: String,
        /// Operation.
        op: &'static str,
        /// Error text.
        msg: String,
    },
    /// The device cannot be set up as requested.
    #[error("{0}")]
    Config(String),
    /// Creating an eventfd failed.
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// Guest-programmed layout of one virtqueue, as handed to the device on activation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Negotiated size (number of descriptors).
    pub size: u16,
    /// Guest-physical address of the descriptor table.
    pub desc: u64,
    /// Guest-physical address of the driver (avail) ring.
    pub avail: u64,
    /// Guest-physical address of the device (used) ring.
    pub used: u64,
}

/// The device side of a virtio transport.
pub trait VirtioDevice: Send {
    /// virtio device ID.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (the number of queues is the length).
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn device_features(&self) -> u64;
    /// Hands the device the transport's kick and call eventfds (one each per queue), once,
    /// when the transport is made.
    fn set_notifiers(&mut self, _kicks: &[EventFd], _calls: &[EventFd]) -> Result<(), VirtioError> {
        Ok(())
    }
    /// Reads device config space at `offset`.
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    /// Writes device config space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the negotiated `features` and the ready queues
    /// (`(index, config, kick, call)`).
    fn activate(
        &mut self,
        features: u64,
        queues: &[(usize, QueueConfig, &EventFd, &EventFd)],
    ) -> Result<(), VirtioError>;
    /// Stops the device (driver wrote status 0).
    fn reset(&mut self);
}
