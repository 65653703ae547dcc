//! The virtio-net header (`struct virtio_net_hdr_v1`, 12 bytes, little endian) and the pure
//! validation of a guest-transmitted packet (header + Ethernet frame).
//!
//! [`validate_tx_packet`] is a pure function over bytes: it is the fuzzing entry point of the
//! TX path (see `fuzz_tx_packet` in this module's tests for a seeded random driver).

use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
};

/// Size of the virtio 1.x net header (with `num_buffers`), also set on the tap.
pub const VNET_HDR_LEN: usize = 12;
/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// Room for one 802.1Q tag on top of the MTU.
pub const VLAN_HLEN: usize = 4;
/// Largest Ethernet frame accepted with a GSO header (64 KiB IP packet + link headers).
pub const MAX_GSO_FRAME: usize = 65535 + ETH_HLEN + VLAN_HLEN;
/// Largest packet (header + frame) the device ever handles; size of the bounce buffers.
pub const MAX_PACKET: usize = VNET_HDR_LEN + MAX_GSO_FRAME;

/// Why a guest packet was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than the 12-byte virtio-net header.
    #[error("truncated virtio-net header ({0} bytes)")]
    TruncatedHeader(usize),
    /// The frame cannot even hold an Ethernet header.
    #[error("runt frame ({0} bytes)")]
    Runt(usize),
    /// Larger than MTU + link headers (no GSO) or 64 KiB (GSO).
    #[error("oversized frame ({len} bytes, limit {limit})")]
    Oversize {
        /// Frame length.
        len: usize,
        /// Limit that applied.
        limit: usize,
    },
    /// Header flags outside NEEDS_CSUM/DATA_VALID.
    #[error("unknown header flags {0:#x}")]
    BadFlags(u8),
    /// Checksum offload requested but not negotiated, or its offsets are out of the frame.
    #[error("bad checksum offload (start {start}, offset {offset}, frame {len})")]
    BadCsum {
        /// csum_start.
        start: u16,
        /// csum_offset.
        offset: u16,
        /// Frame length.
        len: usize,
    },
    /// A GSO type that is unknown or was not negotiated, or a GSO frame without NEEDS_CSUM or
    /// with a zero segment size.
    #[error("bad or unnegotiated GSO (type {gso_type:#x}, size {gso_size})")]
    BadGso {
        /// gso_type.
        gso_type: u8,
        /// gso_size.
        gso_size: u16,
    },
}

/// `struct virtio_net_hdr_v1`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Segment size for GSO.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, relative to `csum_start`.
    pub csum_offset: u16,
    /// Number of merged RX buffers.
    pub num_buffers: u16,
}

fn le16(b: &[u8; VNET_HDR_LEN], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

impl VnetHdr {
    /// Decodes the 12 header bytes.
    pub fn from_bytes(b: &[u8; VNET_HDR_LEN]) -> Self {
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le16(b, 2),
            gso_size: le16(b, 4),
            csum_start: le16(b, 6),
            csum_offset: le16(b, 8),
            num_buffers: le16(b, 10),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }
}

/// What the guest may send, derived from the negotiated features and the MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxLimits {
    /// Link MTU (IP packet size without GSO).
    pub mtu: u16,
    /// `VIRTIO_NET_F_CSUM`: partial checksums allowed.
    pub csum: bool,
    /// `VIRTIO_NET_F_HOST_TSO4`.
    pub tso4: bool,
    /// `VIRTIO_NET_F_HOST_TSO6`.
    pub tso6: bool,
    /// `VIRTIO_NET_F_HOST_UFO`.
    pub ufo: bool,
}

impl Default for TxLimits {
    fn default() -> Self {
        TxLimits {
            mtu: 1500,
            csum: false,
            tso4: false,
            tso6: false,
            ufo: false,
        }
    }
}

/// Validates one guest packet (`virtio_net_hdr_v1` followed by an Ethernet frame) and returns
/// the header to hand to the tap (with `DATA_VALID` and `num_buffers` cleared).
///
/// Pure: no allocation, no panics on any input. This is the fuzz target of the TX path.
pub fn validate_tx_packet(packet: &[u8], limits: &TxLimits) -> Result<VnetHdr, FrameError> {
    let Some((hdr_bytes, frame)) = packet.split_first_chunk::<VNET_HDR_LEN>() else {
        return Err(FrameError::TruncatedHeader(packet.len()));
    };
    validate_tx_header(hdr_bytes, frame.len(), limits)
}

/// [`validate_tx_packet`] for a packet whose frame is not in one buffer: only the header bytes
/// and the frame length matter.
pub fn validate_tx_header(
    hdr_bytes: &[u8; VNET_HDR_LEN],
    len: usize,
    limits: &TxLimits,
) -> Result<VnetHdr, FrameError> {
    let mut hdr = VnetHdr::from_bytes(hdr_bytes);
    if len < ETH_HLEN {
        return Err(FrameError::Runt(len));
    }
    let known = (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) as u8;
    if hdr.flags & !known != 0 {
        return Err(FrameError::BadFlags(hdr.flags));
    }
    hdr.flags &= !(VIRTIO_NET_HDR_F_DATA_VALID as u8);
    hdr.num_buffers = 0;
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 {
        let end = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2;
        if !limits.csum || end > len || usize::from(hdr.csum_start) < ETH_HLEN {
            return Err(FrameError::BadCsum {
                start: hdr.csum_start,
                offset: hdr.csum_offset,
                len,
            });
        }
    }
    let bad_gso = FrameError::BadGso {
        gso_type: hdr.gso_type,
        gso_size: hdr.gso_size,
    };
    let gso = u32::from(hdr.gso_type) & !VIRTIO_NET_HDR_GSO_ECN;
    if u32::from(hdr.gso_type) & VIRTIO_NET_HDR_GSO_ECN != 0 {
        // HOST_ECN is never offered.
        return Err(bad_gso);
    }
    let allowed = match gso {
        VIRTIO_NET_HDR_GSO_NONE => {
            let limit = usize::from(limits.mtu) + ETH_HLEN + VLAN_HLEN;
            return if len > limit {
                Err(FrameError::Oversize { len, limit })
            } else {
                Ok(hdr)
            };
        }
        VIRTIO_NET_HDR_GSO_TCPV4 => limits.tso4,
        VIRTIO_NET_HDR_GSO_TCPV6 => limits.tso6,
        VIRTIO_NET_HDR_GSO_UDP => limits.ufo,
        _ => false,
    };
    // GSO needs a checksum offload to fill in each segment's checksum.
    if !allowed || hdr.gso_size == 0 || hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 == 0 {
        return Err(bad_gso);
    }
    if len > MAX_GSO_FRAME {
        return Err(FrameError::Oversize {
            len,
            limit: MAX_GSO_FRAME,
        });
    }
    Ok(hdr)
}

/// Fuzz entry point of the TX path (for a cargo-fuzz target: `fuzz_target!(|d: &[u8]|
/// fuzz_tx_packet(d))`). The first byte selects the limits (MTU and negotiated offloads), the
/// rest is the packet. Panics only if [`validate_tx_packet`] accepts a packet that breaks an
/// invariant the tap relies on — which is what a fuzzer looks for.
pub fn fuzz_tx_packet(data: &[u8]) {
    let Some((&sel, packet)) = data.split_first() else {
        return;
    };
    let limits = TxLimits {
        mtu: 576 + u16::from(sel) * 32,
        csum: sel & 1 != 0,
        tso4: sel & 2 != 0,
        tso6: sel & 4 != 0,
        ufo: sel & 8 != 0,
    };
    if let Ok(h) = validate_tx_packet(packet, &limits) {
        let frame = packet.len() - VNET_HDR_LEN;
        assert!((ETH_HLEN..=MAX_GSO_FRAME).contains(&frame));
        assert_eq!(h.num_buffers, 0);
        if h.flags & 1 != 0 {
            assert!(limits.csum);
            assert!(usize::from(h.csum_start) + usize::from(h.csum_offset) + 2 <= frame);
        }
        if h.gso_type == 0 {
            assert!(frame <= usize::from(limits.mtu) + ETH_HLEN + VLAN_HLEN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: TxLimits = TxLimits {
        mtu: 1500,
        csum: true,
        tso4: true,
        tso6: true,
        ufo: true,
    };

    fn packet(hdr: VnetHdr, frame_len: usize) -> Vec<u8> {
        let mut p = hdr.to_bytes().to_vec();
        p.extend((0..frame_len).map(|i| i as u8));
        p
    }

    #[test]
    fn header_round_trips() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 3,
            hdr_len: 0x1234,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 7,
        };
        assert_eq!(VnetHdr::from_bytes(&h.to_bytes()), h);
        assert_eq!(h.to_bytes()[2..4], [0x34, 0x12]);
    }

    #[test]
    fn plain_frames_within_mtu_pass_and_bigger_ones_fail() {
        let lim = TxLimits::default();
        assert!(validate_tx_packet(&packet(VnetHdr::default(), 60), &lim).is_ok());
        assert!(validate_tx_packet(&packet(VnetHdr::default(), 1518), &lim).is_ok());
        assert_eq!(
            validate_tx_packet(&packet(VnetHdr::default(), 1519), &lim),
            Err(FrameError::Oversize {
                len: 1519,
                limit: 1518
            })
        );
    }

    #[test]
    fn truncated_headers_and_runts_fail() {
        for n in 0..VNET_HDR_LEN {
            assert_eq!(
                validate_tx_packet(&vec![0u8; n], &ALL),
                Err(FrameError::TruncatedHeader(n))
            );
        }
        assert_eq!(
            validate_tx_packet(&[0u8; 20], &ALL),
            Err(FrameError::Runt(8))
        );
    }

    #[test]
    fn csum_offload_needs_the_feature_and_sane_offsets() {
        let h = VnetHdr {
            flags: 1,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        assert!(validate_tx_packet(&packet(h, 100), &ALL).is_ok());
        let no_csum = TxLimits { csum: false, ..ALL };
        assert!(matches!(
            validate_tx_packet(&packet(h, 100), &no_csum),
            Err(FrameError::BadCsum { .. })
        ));
        let far = VnetHdr {
            csum_start: 90,
            ..h
        };
        assert!(matches!(
            validate_tx_packet(&packet(far, 100), &ALL),
            Err(FrameError::BadCsum { .. })
        ));
        let flags = VnetHdr { flags: 0x80, ..h };
        assert_eq!(
            validate_tx_packet(&packet(flags, 100), &ALL),
            Err(FrameError::BadFlags(0x80))
        );
    }

    #[test]
    fn gso_needs_negotiation_csum_and_a_segment_size() {
        let h = VnetHdr {
            flags: 1,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            gso_size: 1448,
            hdr_len: 54,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let ok = validate_tx_packet(&packet(h, 60000), &ALL).unwrap();
        assert_eq!(ok.num_buffers, 0);
        let no_tso = TxLimits { tso4: false, ..ALL };
        assert!(matches!(
            validate_tx_packet(&packet(h, 6000), &no_tso),
            Err(FrameError::BadGso { .. })
        ));
        let zero = VnetHdr { gso_size: 0, ..h };
        assert!(matches!(
            validate_tx_packet(&packet(zero, 6000), &ALL),
            Err(FrameError::BadGso { .. })
        ));
        let no_csum = VnetHdr { flags: 0, ..h };
        assert!(matches!(
            validate_tx_packet(&packet(no_csum, 6000), &ALL),
            Err(FrameError::BadGso { .. })
        ));
        let ecn = VnetHdr {
            gso_type: h.gso_type | VIRTIO_NET_HDR_GSO_ECN as u8,
            ..h
        };
        assert!(matches!(
            validate_tx_packet(&packet(ecn, 6000), &ALL),
            Err(FrameError::BadGso { .. })
        ));
        assert!(matches!(
            validate_tx_packet(&packet(h, MAX_GSO_FRAME + 1), &ALL),
            Err(FrameError::Oversize { .. })
        ));
    }

    /// xorshift64*: deterministic pseudo-random bytes for the seeded fuzz run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn seeded_random_packets_never_panic() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut buf = vec![0u8; 70_000];
        let mut accepted = 0;
        for _ in 0..20_000 {
            let len = match rng.next() % 4 {
                0 => (rng.next() % 32) as usize,
                1 => (rng.next() % 1600) as usize,
                _ => (rng.next() % buf.len() as u64) as usize,
            };
            for b in buf.iter_mut().take(len.min(64)) {
                *b = rng.next() as u8;
            }
            // Bias the header towards plausible values so the deep paths are reached.
            if len > 13 && rng.next() % 2 == 0 {
                buf[1] = 1; // NEEDS_CSUM
                buf[2] = [0, 1, 3, 4][(rng.next() % 4) as usize];
                buf[7] = 14 + (rng.next() % 40) as u8; // csum_start
                buf[8] = 0;
                buf[9] = (rng.next() % 20) as u8; // csum_offset
                buf[10] = 0;
            }
            fuzz_tx_packet(&buf[..len]);
            let mut lim_sel = buf.to_vec();
            lim_sel.truncate(len);
            if validate_tx_packet(lim_sel.get(1..).unwrap_or_default(), &ALL).is_ok() {
                accepted += 1;
            }
        }
        // The generator must exercise the accepting path too, or the test proves nothing.
        assert!(accepted > 100, "only {accepted} packets accepted");
    }
}
