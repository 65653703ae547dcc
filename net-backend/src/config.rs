//! Device parameters, offered features, the configuration space and what the negotiated
//! features mean for the tap (offloads) and for TX validation.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::header::TxLimits;
use crate::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO};

/// Largest number of queue pairs (queue indices must fit the 64-bit thread masks).
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Smallest MTU accepted (IPv6 minimum).
pub const MIN_MTU: u16 = 1280;

/// Errors in the device parameters.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Queue pair count out of range.
    #[error("queue pairs must be 1..={MAX_QUEUE_PAIRS}, got {0}")]
    QueuePairs(u16),
    /// MTU out of range.
    #[error("MTU must be {MIN_MTU}..=65535, got {0}")]
    Mtu(u16),
    /// Unparsable MAC address.
    #[error("bad MAC address {0:?} (want xx:xx:xx:xx:xx:xx, unicast)")]
    Mac(String),
}

/// Static parameters of one virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetParams {
    /// Guest MAC address.
    pub mac: [u8; 6],
    /// Number of RX/TX queue pairs.
    pub queue_pairs: u16,
    /// Link MTU.
    pub mtu: u16,
    /// Queue size offered to the frontend.
    pub max_queue_size: u16,
}

impl Default for NetParams {
    fn default() -> Self {
        NetParams {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            queue_pairs: 1,
            mtu: 1500,
            max_queue_size: 1024,
        }
    }
}

/// Parses `xx:xx:xx:xx:xx:xx` (a unicast address).
pub fn parse_mac(s: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::Mac(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac)
}

impl NetParams {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.queue_pairs == 0 || self.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(ConfigError::QueuePairs(self.queue_pairs));
        }
        if self.mtu < MIN_MTU {
            return Err(ConfigError::Mtu(self.mtu));
        }
        Ok(())
    }

    /// Number of virtqueues: two per pair plus the control queue.
    pub fn num_queues(&self) -> usize {
        2 * usize::from(self.queue_pairs) + 1
    }

    /// Index of the control queue.
    pub fn ctrl_queue(&self) -> usize {
        2 * usize::from(self.queue_pairs)
    }

    /// The features the device offers.
    pub fn features(&self) -> u64 {
        let bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_MQ,
        ];
        bits.iter().fold(0u64, |acc, &b| acc | (1u64 << b))
    }

    /// `struct virtio_net_config`: mac, status (link up), max_virtqueue_pairs, mtu.
    pub fn config_space(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&self.queue_pairs.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    /// Reads `size` bytes of the configuration space at `offset` (out of range: empty).
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let start = offset as usize;
        let end = start.saturating_add(size as usize);
        c.get(start..end).map(<[u8]>::to_vec).unwrap_or_default()
    }
}

/// What a set of negotiated features means for the data path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// The raw feature bits.
    pub features: u64,
}

impl Negotiated {
    fn has(&self, bit: u32) -> bool {
        self.features & (1u64 << bit) != 0
    }

    /// `VIRTIO_NET_F_MRG_RXBUF`.
    pub fn mrg_rxbuf(&self) -> bool {
        self.has(VIRTIO_NET_F_MRG_RXBUF)
    }

    /// The receive offloads to set on the tap (`TUNSETOFFLOAD`).
    pub fn tap_offloads(&self) -> u32 {
        if !self.has(VIRTIO_NET_F_GUEST_CSUM) {
            // Segmentation offloads need checksum offload.
            return 0;
        }
        let mut f = TUN_F_CSUM;
        if self.has(VIRTIO_NET_F_GUEST_TSO4) {
            f |= TUN_F_TSO4;
        }
        if self.has(VIRTIO_NET_F_GUEST_TSO6) {
            f |= TUN_F_TSO6;
        }
        if self.has(VIRTIO_NET_F_GUEST_UFO) {
            f |= TUN_F_UFO;
        }
        f
    }

    /// TX validation limits.
    pub fn tx_limits(&self, mtu: u16) -> TxLimits {
        let csum = self.has(VIRTIO_NET_F_CSUM);
        TxLimits {
            mtu,
            csum,
            tso4: csum && self.has(VIRTIO_NET_F_HOST_TSO4),
            tso6: csum && self.has(VIRTIO_NET_F_HOST_TSO6),
            ufo: csum && self.has(VIRTIO_NET_F_HOST_UFO),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:0f").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "01:00:00:00:00:00",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_space_layout() {
        let p = NetParams {
            queue_pairs: 2,
            mtu: 9000,
            ..Default::default()
        };
        let c = p.config_space();
        assert_eq!(&c[..6], &p.mac);
        assert_eq!(c[6..8], [1, 0]);
        assert_eq!(c[8..10], [2, 0]);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
        assert_eq!(p.read_config(8, 2), vec![2, 0]);
        assert!(p.read_config(11, 4).is_empty());
        assert!(p.read_config(u32::MAX, u32::MAX).is_empty());
        assert_eq!(p.num_queues(), 5);
        assert_eq!(p.ctrl_queue(), 4);
    }

    #[test]
    fn offloads_follow_guest_features() {
        let all = Negotiated {
            features: NetParams::default().features(),
        };
        assert_eq!(
            all.tap_offloads(),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO
        );
        assert!(all.mrg_rxbuf());
        let no_csum = Negotiated {
            features: all.features & !(1 << VIRTIO_NET_F_GUEST_CSUM),
        };
        assert_eq!(no_csum.tap_offloads(), 0);
        let lim = Negotiated {
            features: all.features & !(1 << VIRTIO_NET_F_CSUM),
        }
        .tx_limits(1500);
        assert!(!lim.csum && !lim.tso4 && !lim.tso6 && !lim.ufo);
        assert!(all.tx_limits(1500).tso4);
        assert_eq!(Negotiated::default().tap_offloads(), 0);
    }

    #[test]
    fn params_are_validated() {
        assert!(NetParams::default().validate().is_ok());
        assert!(NetParams {
            queue_pairs: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(NetParams {
            queue_pairs: 17,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(NetParams {
            mtu: 100,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
