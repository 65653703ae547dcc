//! Names of virtio feature bits, for the log line refusing a restarted daemon.

use super::VhostUserKind;

/// Name of transport feature bit `bit` (virtio 1.x section 6), if it has one.
fn transport(bit: u32) -> Option<&'static str> {
    Some(match bit {
        27 => "ANY_LAYOUT",
        28 => "RING_INDIRECT_DESC",
        29 => "RING_EVENT_IDX",
        32 => "VERSION_1",
        33 => "ACCESS_PLATFORM",
        34 => "RING_PACKED",
        35 => "IN_ORDER",
        36 => "ORDER_PLATFORM",
        37 => "SR_IOV",
        38 => "NOTIFICATION_DATA",
        39 => "NOTIF_CONFIG_DATA",
        40 => "RING_RESET",
        _ => return None,
    })
}

/// Name of device feature bit `bit` of `kind`, if it has one.
fn device(kind: VhostUserKind, bit: u32) -> Option<&'static str> {
    Some(match (kind, bit) {
        (VhostUserKind::Blk, 1) => "BLK_SIZE_MAX",
        (VhostUserKind::Blk, 2) => "BLK_SEG_MAX",
        (VhostUserKind::Blk, 4) => "BLK_GEOMETRY",
        (VhostUserKind::Blk, 5) => "BLK_RO",
        (VhostUserKind::Blk, 6) => "BLK_BLK_SIZE",
        (VhostUserKind::Blk, 9) => "BLK_FLUSH",
        (VhostUserKind::Blk, 10) => "BLK_TOPOLOGY",
        (VhostUserKind::Blk, 11) => "BLK_CONFIG_WCE",
        (VhostUserKind::Blk, 12) => "BLK_MQ",
        (VhostUserKind::Blk, 13) => "BLK_DISCARD",
        (VhostUserKind::Blk, 14) => "BLK_WRITE_ZEROES",
        (VhostUserKind::Blk, 15) => "BLK_LIFETIME",
        (VhostUserKind::Blk, 16) => "BLK_SECURE_ERASE",
        (VhostUserKind::Net, 0) => "NET_CSUM",
        (VhostUserKind::Net, 1) => "NET_GUEST_CSUM",
        (VhostUserKind::Net, 5) => "NET_MAC",
        (VhostUserKind::Net, 7) => "NET_GUEST_TSO4",
        (VhostUserKind::Net, 8) => "NET_GUEST_TSO6",
        (VhostUserKind::Net, 10) => "NET_GUEST_UFO",
        (VhostUserKind::Net, 11) => "NET_HOST_TSO4",
        (VhostUserKind::Net, 12) => "NET_HOST_TSO6",
        (VhostUserKind::Net, 14) => "NET_HOST_UFO",
        (VhostUserKind::Net, 15) => "NET_MRG_RXBUF",
        (VhostUserKind::Net, 16) => "NET_STATUS",
        (VhostUserKind::Net, 17) => "NET_CTRL_VQ",
        (VhostUserKind::Net, 22) => "NET_MQ",
        (VhostUserKind::Fs, 0) => "FS_NOTIFICATION",
        (VhostUserKind::Vsock, 0) => "VSOCK_STREAM",
        (VhostUserKind::Vsock, 1) => "VSOCK_SEQPACKET",
        _ => return None,
    })
}

/// `"BLK_DISCARD (bit 13), bit 50"`: every set bit of `bits`, named when known.
pub(super) fn names(kind: VhostUserKind, bits: u64) -> String {
    (0..64u32)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| match device(kind, b).or_else(|| transport(b)) {
            Some(n) => format!("{n} (bit {b})"),
            None => format!("bit {b}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_named_per_device() {
        assert_eq!(
            names(VhostUserKind::Blk, 1 << 13 | 1 << 14 | 1 << 29 | 1 << 50),
            "BLK_DISCARD (bit 13), BLK_WRITE_ZEROES (bit 14), RING_EVENT_IDX (bit 29), bit 50"
        );
        assert_eq!(names(VhostUserKind::Net, 1 << 5), "NET_MAC (bit 5)");
        assert_eq!(names(VhostUserKind::Fs, 0), "");
        assert_eq!(
            names(VhostUserKind::Vsock, 1 << 1),
            "VSOCK_SEQPACKET (bit 1)"
        );
    }
}
