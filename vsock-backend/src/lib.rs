//! Transport-free virtio-vsock device logic (virtio spec 5.10) for `rqemu-vsock`:
//!
//! * [`packet`]: the 44-byte header, its validation (the fuzz entry of guest bytes);
//! * [`conn`]: one connection's state and credit-based flow control;
//! * [`host`]: the host side in Firecracker's hybrid-vsock convention (`PATH` +
//!   `CONNECT <port>\n` for host-initiated connections, `PATH_<port>` for guest-initiated);
//! * [`muxer`]: the connection table between guest packets and host sockets;
//! * [`queue`]: RX/TX virtqueue chains in and out of the muxer;
//! * [`fuzz`]: the fuzz entry point (a guest session against a real muxer).
//!
//! The event queue (queue 2) carries only `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, sent after a
//! migration; its buffers are left alone.

pub mod conn;
pub mod fuzz;
pub mod host;
pub mod muxer;
pub mod packet;
pub mod queue;

pub use muxer::{MuxError, MuxStats, Muxer};

/// The virtio device ID of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// RX queue index.
pub const RX_QUEUE: usize = 0;
/// TX queue index.
pub const TX_QUEUE: usize = 1;
/// Event queue index.
pub const EVENT_QUEUE: usize = 2;
/// Number of queues.
pub const NUM_QUEUES: usize = 3;
/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// The feature bits offered (stream sockets only: no `VIRTIO_VSOCK_F_SEQPACKET`).
pub const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC;

/// Errors of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// CIDs 0-2 are reserved, `u32::MAX` is `VMADDR_CID_ANY`, and Linux's CIDs are 32-bit.
    #[error("guest CID {0} is reserved or out of range (3..=4294967294)")]
    Cid(u64),
}

/// Checks a guest CID.
pub fn check_cid(cid: u64) -> Result<u64, ConfigError> {
    if (3..u64::from(u32::MAX)).contains(&cid) {
        Ok(cid)
    } else {
        Err(ConfigError::Cid(cid))
    }
}

/// The virtio-vsock configuration space (`le64 guest_cid`), bytes `offset..offset + size`
/// (zeros beyond it).
pub fn read_config(guest_cid: u64, offset: u32, size: u32) -> Vec<u8> {
    let cfg = guest_cid.to_le_bytes();
    (0..u64::from(size))
        .map(|i| {
            usize::try_from(u64::from(offset) + i)
                .ok()
                .and_then(|at| cfg.get(at))
                .copied()
                .unwrap_or(0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_and_config_space() {
        assert!(check_cid(2).is_err());
        assert!(check_cid(u64::from(u32::MAX)).is_err());
        assert_eq!(check_cid(3), Ok(3));
        assert_eq!(read_config(0x1_0203, 0, 8), vec![3, 2, 1, 0, 0, 0, 0, 0]);
        assert_eq!(read_config(0x1_0203, 1, 2), vec![2, 1]);
        assert_eq!(read_config(7, 6, 4), vec![0, 0, 0, 0]);
        assert_eq!(read_config(7, u32::MAX, 2), vec![0, 0]);
    }
}
