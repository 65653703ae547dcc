//! Metadata overlap checks (QEMU's `overlap-check`, mode "all" for the active structures):
//! where the image's metadata lives on the host, so that no data write, allocation or free can
//! land on it whatever a crafted image says.
//!
//! Covered: the header cluster, the L1 table, the refcount table (contiguous ranges) and every
//! L2 table and refcount block (single clusters). Images with internal snapshots (snapshot
//! table, inactive L1/L2 tables) are only opened read-only, so they are never written.
//! Structures created later (L2 tables, refcount blocks, a moved refcount table) are
//! registered as they are created; at open, a read-write image whose structures overlap each
//! other is refused.
//!
//! Limit: a write to an already allocated cluster is checked under the metadata lock and
//! done after it. Only an image whose refcounts wrongly say that cluster is free (corrupt)
//! could let a concurrent allocation turn it into an L2 table or refcount block in between;
//! every later write to it is then refused.

use std::collections::BTreeMap;

use super::super::{ImageError, Result};

/// What a metadata cluster is (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Header,
    L1,
    RefTable,
    L2,
    RefBlock,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Header => "the image header",
            Kind::L1 => "the L1 table",
            Kind::RefTable => "the refcount table",
            Kind::L2 => "an L2 table",
            Kind::RefBlock => "a refcount block",
        }
    }
}

/// Host clusters holding metadata.
#[derive(Debug)]
pub(crate) struct MetaMap {
    cluster_bits: u32,
    /// Contiguous structures as cluster ranges `[first, end)`: header, L1, refcount table.
    ranges: [(u64, u64, Kind); 3],
    /// Single clusters: L2 tables and refcount blocks, by cluster index.
    clusters: BTreeMap<u64, Kind>,
}

impl MetaMap {
    /// The map of an image with these tables (`l1_bytes`, `reftable_bytes` in bytes).
    pub(crate) fn new(cluster_bits: u32, l1: (u64, u64), reftable: (u64, u64)) -> MetaMap {
        let cs = 1u64 << cluster_bits;
        let span = |off: u64, len: u64| {
            let end = off.saturating_add(len).saturating_add(cs - 1);
            (off >> cluster_bits, end >> cluster_bits)
        };
        let (l1a, l1b) = if l1.1 == 0 { (0, 0) } else { span(l1.0, l1.1) };
        let (ra, rb) = span(reftable.0, reftable.1);
        MetaMap {
            cluster_bits,
            ranges: [
                (0, 1, Kind::Header),
                (l1a, l1b, Kind::L1),
                (ra, rb, Kind::RefTable),
            ],
            clusters: BTreeMap::new(),
        }
    }

    /// What metadata the host bytes `[off, off+len)` touch, if any (its start and kind).
    pub(crate) fn find(&self, off: u64, len: u64) -> Option<(u64, Kind)> {
        if len == 0 {
            return None;
        }
        let first = off >> self.cluster_bits;
        let last = off.saturating_add(len - 1) >> self.cluster_bits;
        for &(a, b, kind) in &self.ranges {
            if first < b && a <= last {
                return Some((a << self.cluster_bits, kind));
            }
        }
        self.clusters
            .range(first..=last)
            .next()
            .map(|(&c, &k)| (c << self.cluster_bits, k))
    }

    /// Fails with [`ImageError::MetadataOverlap`] if `[off, off+len)` touches metadata;
    /// `what` names the write ("guest data write", "new L2 table", ...).
    pub(crate) fn check(&self, off: u64, len: u64, what: &str) -> Result<()> {
        match self.find(off, len) {
            None => Ok(()),
            Some((at, kind)) => Err(ImageError::MetadataOverlap(format!(
                "{what} at host offset {off:#x} ({len} bytes) would overwrite {} at {at:#x}",
                kind.name()
            ))),
        }
    }

    /// Registers a new single-cluster structure at host offset `off`, which must overlap
    /// nothing registered.
    pub(crate) fn add(&mut self, off: u64, kind: Kind) -> Result<()> {
        self.check(off, 1 << self.cluster_bits, kind.name())?;
        self.clusters.insert(off >> self.cluster_bits, kind);
        Ok(())
    }

    /// Moves the refcount table to `[off, off+len)` (the old one is being freed).
    pub(crate) fn move_reftable(&mut self, off: u64, len: u64) {
        let cb = self.cluster_bits;
        let end = off.saturating_add(len).saturating_add((1 << cb) - 1) >> cb;
        self.ranges[2] = (off >> cb, end, Kind::RefTable);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_clusters_are_found() {
        // 4 KiB clusters: L1 at cluster 3 (100 entries), refcount table at clusters 1..3.
        let mut m = MetaMap::new(12, (3 << 12, 800), (1 << 12, 2 << 12));
        assert_eq!(m.find(0, 1), Some((0, Kind::Header)));
        assert_eq!(m.find(4095, 2), Some((0, Kind::Header)));
        assert_eq!(m.find(2 << 12, 1), Some((1 << 12, Kind::RefTable)));
        assert_eq!(m.find((3 << 12) + 4000, 10), Some((3 << 12, Kind::L1)));
        assert_eq!(m.find(4 << 12, 4096), None);
        m.add(5 << 12, Kind::L2).unwrap();
        assert_eq!(m.find(4 << 12, 4097), Some((5 << 12, Kind::L2)));
        assert!(m.add((5 << 12) + 512, Kind::RefBlock).is_err());
        assert!(m.check(6 << 12, 1 << 20, "x").is_ok());
        assert!(m.check(u64::MAX - 10, 100, "x").is_ok());
        m.move_reftable(10 << 12, 4096);
        assert_eq!(m.find(1 << 12, 4096), None);
        assert_eq!(m.find(10 << 12, 1), Some((10 << 12, Kind::RefTable)));
    }
}
