//! virtio-blk configuration space (virtio 1.2, 5.2.4) and feature bits.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Logical sector size of the virtio-blk protocol: sector numbers are always in 512-byte units.
pub const SECTOR_SHIFT: u32 = 9;
/// 512.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Size of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Size of the configuration space we expose (up to and including `write_zeroes_may_unmap` and
/// its padding).
pub const CONFIG_SPACE_SIZE: usize = 60;

/// Static parameters of a virtio-blk device, chosen by the daemon at start-up.
#[derive(Debug, Clone)]
pub struct BlkParams {
    /// Number of request queues.
    pub num_queues: u16,
    /// Largest queue size accepted.
    pub max_queue_size: u16,
    /// Refuse writes (advertises `VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// Answer of GET_ID (at most 20 bytes; padded with NULs).
    pub serial: Vec<u8>,
    /// Largest number of segments in one DISCARD/WRITE_ZEROES request.
    pub max_discard_seg: u32,
    /// Largest number of sectors in one DISCARD/WRITE_ZEROES segment.
    pub max_discard_sectors: u32,
    /// Alignment hint for discards, in sectors.
    pub discard_sector_alignment: u32,
    /// Largest number of data segments in one request (`seg_max`).
    pub seg_max: u32,
    /// Answer FLUSH without flushing (`--cache unsafe`).
    pub ignore_flush: bool,
}

impl Default for BlkParams {
    fn default() -> Self {
        BlkParams {
            num_queues: 1,
            max_queue_size: 1024,
            read_only: false,
            serial: Vec::new(),
            max_discard_seg: 32,
            max_discard_sectors: (1 << 22) - 1,
            discard_sector_alignment: 8,
            seg_max: 254,
            ignore_flush: false,
        }
    }
}

/// Feature bits offered by the device (transport-independent: vhost-user adds its own
/// `VHOST_USER_F_PROTOCOL_FEATURES`).
pub fn device_features(params: &BlkParams) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_TOPOLOGY)
        | (1 << VIRTIO_BLK_F_MQ);
    if params.read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

/// Serialises the configuration space (little-endian, virtio 1.x layout).
pub fn config_space(params: &BlkParams, disk_size: u64) -> [u8; CONFIG_SPACE_SIZE] {
    let mut c = [0u8; CONFIG_SPACE_SIZE];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &(disk_size >> SECTOR_SHIFT).to_le_bytes()); // capacity
    put(8, &0u32.to_le_bytes()); // size_max (no limit: not offered)
    put(12, &params.seg_max.to_le_bytes()); // seg_max
                                            // 16..20: geometry (not offered)
    put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    put(24, &[0]); // physical_block_exp
    put(25, &[0]); // alignment_offset
    put(26, &1u16.to_le_bytes()); // min_io_size (in logical blocks)
    put(28, &0u32.to_le_bytes()); // opt_io_size
    put(32, &[0]); // writeback (CONFIG_WCE not offered)
    put(34, &params.num_queues.to_le_bytes()); // num_queues
    if !params.read_only {
        put(36, &params.max_discard_sectors.to_le_bytes());
        put(40, &params.max_discard_seg.to_le_bytes());
        put(44, &params.discard_sector_alignment.to_le_bytes());
        put(48, &params.max_discard_sectors.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &params.max_discard_seg.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
    }
    c
}

/// Reads `size` bytes of the configuration space at `offset`; bytes past its end read as zero
/// (as the virtio-mmio transport presents them).
pub fn read_config(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = offset as usize;
    if start < space.len() {
        let n = (space.len() - start).min(out.len());
        out[..n].copy_from_slice(&space[start..start + n]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec() {
        let p = BlkParams {
            num_queues: 3,
            ..Default::default()
        };
        let c = config_space(&p, 10 * 1024 * 1024 + 300);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 20480);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 3);
        assert_eq!(c[56], 1);
        let ro = config_space(
            &BlkParams {
                read_only: true,
                ..Default::default()
            },
            4096,
        );
        assert_eq!(&ro[36..60], &[0u8; 24]);
    }

    #[test]
    fn features_follow_read_only() {
        let rw = device_features(&BlkParams::default());
        assert_ne!(rw & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        let ro = device_features(&BlkParams {
            read_only: true,
            ..Default::default()
        });
        assert_eq!(ro & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn config_reads_are_bounded() {
        let c = config_space(&BlkParams::default(), 4096);
        assert_eq!(read_config(&c, 0, 8), 8u64.to_le_bytes());
        assert_eq!(read_config(&c, 58, 4), vec![0, 0, 0, 0]);
        assert_eq!(read_config(&c, u32::MAX, 4), vec![0; 4]);
    }
}
