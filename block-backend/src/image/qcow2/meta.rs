//! Metadata state behind the image's mutex: L1 table, L2 table cache, refcounts, cluster
//! allocation (with a small pre-counted reserve) and deferred frees.
//!
//! Write ordering (every change is written through at once):
//! * a cluster's refcount is made durable (`fdatasync`) before anything points to it — the
//!   reserve is refcounted and synced in batches before any of its clusters is handed out;
//! * a new L2 table is written and synced before the L1 entry points to it;
//! * guest data is written before the L2 entry that points to it;
//! * a freed cluster's L2 entry is rewritten first; the refcount decrement happens only after
//!   the next `fdatasync` (deferred frees), so a crash can leak a cluster but never leave a
//!   reference to a free one.

use std::fs::File;

use super::super::raw::{datasync, write_all};
use super::super::{ImageError, Result};
use super::cache::ClusterCache;
use super::compressed::{CompressedLoc, Decompressor};
use super::overlap::{Kind, MetaMap};
use super::refcount::Refcounts;
use super::Geom;

/// L1/L2 entry flag: the cluster's refcount is exactly 1.
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry flag: compressed cluster.
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (v3): the cluster reads as zeroes.
pub(crate) const OFLAG_ZERO: u64 = 1;
/// Host offset bits of L1 and standard L2 entries.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Where a guest cluster's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Not allocated: backing file or zeroes.
    Unallocated,
    /// Reads as zeroes, no host cluster.
    Zero,
    /// Reads as zeroes, host cluster preallocated at this offset.
    ZeroAlloc(u64),
    /// Data at this host offset.
    Normal(u64),
    /// Compressed data.
    Compressed(CompressedLoc),
}

impl Mapping {
    /// Whether the cluster reads as zeroes regardless of any backing file.
    pub(crate) fn is_zero(&self) -> bool {
        matches!(self, Mapping::Zero | Mapping::ZeroAlloc(_))
    }
}

/// The mutable metadata of an open image.
pub(crate) struct Meta {
    pub(crate) geom: Geom,
    l1_offset: u64,
    l1: Vec<u64>,
    l2: ClusterCache,
    rc: Refcounts,
    /// Where the metadata lives: checked before every data write, allocation and free.
    map: MetaMap,
    /// Clusters `[reserve.0, reserve.1)` have refcount 1 on disk and no reference yet; every
    /// flush gives them back ([`Meta::release_reserve`]), so a flushed image has no leaks.
    reserve: (u64, u64),
    reserve_want: u64,
    /// Host clusters whose last reference is gone; decremented after the next sync.
    pending_free: Vec<u64>,
    /// Decompression state and cache.
    pub(crate) dec: Decompressor,
    /// One cluster of scratch space for copy-on-write.
    pub(crate) scratch: Vec<u8>,
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta")
            .field("l1_entries", &self.l1.len())
            .field("l2", &self.l2)
            .field("reserve", &self.reserve)
            .field("pending_free", &self.pending_free.len())
            .finish()
    }
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> ImageError {
    move |e| ImageError::io(what, e)
}

fn decode(geom: &Geom, entry: u64) -> Result<Mapping> {
    if entry & OFLAG_COMPRESSED != 0 {
        return Ok(Mapping::Compressed(CompressedLoc::from_entry(entry, geom)));
    }
    let off = entry & OFFSET_MASK;
    if off & (geom.cluster_size - 1) != 0 {
        return Err(ImageError::Corrupt(format!(
            "L2 entry {entry:#x}: unaligned host offset"
        )));
    }
    if entry & OFLAG_ZERO != 0 {
        if geom.version < 3 {
            return Err(ImageError::Corrupt(format!(
                "L2 entry {entry:#x}: zero flag in a v2 image"
            )));
        }
        return Ok(if off == 0 {
            Mapping::Zero
        } else {
            Mapping::ZeroAlloc(off)
        });
    }
    Ok(if off == 0 {
        Mapping::Unallocated
    } else {
        Mapping::Normal(off)
    })
}

fn entry_at(t: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&t[i * 8..i * 8 + 8]);
    u64::from_be_bytes(b)
}

impl Meta {
    /// The metadata state; `map` already describes the header, L1 and refcount tables. The
    /// L2 tables and refcount blocks are added to it here: with `strict` (read-write opening),
    /// structures overlapping each other make the image corrupt.
    pub(crate) fn new(
        geom: Geom,
        l1_offset: u64,
        l1: Vec<u64>,
        rc: Refcounts,
        mut map: MetaMap,
        strict: bool,
    ) -> Result<Self> {
        let cs = geom.cluster_size as usize;
        let l2s = l1
            .iter()
            .enumerate()
            .map(|(i, e)| (i, e & OFFSET_MASK, Kind::L2));
        let blocks = rc.block_offsets().map(|(i, off)| (i, off, Kind::RefBlock));
        for (i, off, kind) in l2s.chain(blocks) {
            if off == 0 {
                continue;
            }
            if let Err(e) = map.add(off, kind) {
                if strict {
                    let which = if kind == Kind::L2 {
                        "L1"
                    } else {
                        "refcount table"
                    };
                    return Err(ImageError::Corrupt(format!(
                        "qcow2 metadata overlap: {which} entry {i}: {e}"
                    )));
                }
            }
        }
        Ok(Meta {
            geom,
            l1_offset,
            l1,
            // 4 MiB of L2 tables maps 32 GiB with 64 KiB clusters.
            l2: ClusterCache::new("L2 table", cs, ((4 << 20) / cs).clamp(16, 1024)),
            rc,
            map,
            reserve: (0, 0),
            reserve_want: ((1u64 << 20) >> geom.cluster_bits).clamp(4, 256),
            pending_free: Vec::new(),
            dec: Decompressor::new(&geom),
            scratch: vec![0u8; cs],
        })
    }

    /// Fails with [`ImageError::MetadataOverlap`] if guest data written at host
    /// `[off, off+len)` would overwrite metadata.
    pub(crate) fn check_data(&self, off: u64, len: u64) -> Result<()> {
        self.map.check(off, len, "guest data write")
    }

    fn l2_index(&self, guest: u64) -> (usize, usize) {
        let g = &self.geom;
        let l1i = (guest >> (g.cluster_bits + g.l2_bits)) as usize;
        let l2i = ((guest >> g.cluster_bits) & ((1 << g.l2_bits) - 1)) as usize;
        (l1i, l2i)
    }

    /// The L2 table offset for `guest`, if allocated.
    fn l2_table(&self, guest: u64) -> Result<Option<u64>> {
        let (l1i, _) = self.l2_index(guest);
        let e = *self.l1.get(l1i).ok_or_else(|| {
            ImageError::Corrupt(format!("guest offset {guest:#x} beyond the L1 table"))
        })?;
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if off & (self.geom.cluster_size - 1) != 0 {
            return Err(ImageError::Corrupt(format!(
                "L1 entry {l1i} has unaligned L2 offset {off:#x}"
            )));
        }
        Ok(Some(off))
    }

    /// The mapping of `guest`'s cluster.
    pub(crate) fn lookup(&mut self, file: &File, guest: u64) -> Result<Mapping> {
        Ok(self.map_run(file, guest, 1, true)?.0)
    }

    /// Maps `[guest, guest+max_len)` as far as it continues like its first cluster: the
    /// mapping of the first cluster and the byte length of the run (at least one byte, at
    /// most to the end of the first cluster for compressed clusters). With `write`, only
    /// contiguous normal clusters are merged.
    pub(crate) fn map_run(
        &mut self,
        file: &File,
        guest: u64,
        max_len: u64,
        write: bool,
    ) -> Result<(Mapping, u64)> {
        let cs = self.geom.cluster_size;
        let first = (cs - (guest & (cs - 1))).min(max_len);
        let span = cs << self.geom.l2_bits;
        let Some(l2_off) = self.l2_table(guest)? else {
            let to_end = span - (guest & (span - 1));
            let len = if write { first } else { to_end.min(max_len) };
            return Ok((Mapping::Unallocated, len));
        };
        let (_, l2i) = self.l2_index(guest);
        let entries = 1usize << self.geom.l2_bits;
        let geom = self.geom;
        let table = self.l2.get(file, l2_off)?;
        let m0 = decode(&geom, entry_at(table, l2i))?;
        let mut len = first;
        let mut i = l2i + 1;
        while len < max_len && i < entries {
            let m = decode(&geom, entry_at(table, i))?;
            let k = (i - l2i) as u64;
            let same = match (m0, m) {
                (Mapping::Normal(h0), Mapping::Normal(h)) => h == h0 + k * cs,
                (Mapping::Unallocated, Mapping::Unallocated) => !write,
                (a, b) if a.is_zero() && b.is_zero() => !write,
                _ => false,
            };
            if !same {
                break;
            }
            len += cs.min(max_len - len);
            i += 1;
        }
        Ok((m0, len))
    }

    /// Shrinks the caches (tests: forces evictions).
    #[cfg(test)]
    pub(crate) fn set_cache_capacity(&mut self, clusters: usize) {
        let cs = self.geom.cluster_size as usize;
        self.l2 = ClusterCache::new("L2 table", cs, clusters);
        self.rc.set_cache_capacity(clusters);
    }

    /// Takes one cluster from the reserve (refilling it, with a sync, when empty).
    pub(crate) fn alloc_cluster(&mut self, file: &File) -> Result<u64> {
        if self.reserve.0 == self.reserve.1 {
            let (start, n) = self
                .rc
                .allocate_run(file, self.reserve_want, &mut self.map)?;
            self.reserve = (start, start + n);
            // Sustained allocation gets bigger batches (fewer syncs); a crash leaks at most
            // one batch, which `qemu-img check -r leaks` reclaims.
            let max = ((16u64 << 20) >> self.geom.cluster_bits).clamp(4, 8192);
            self.reserve_want = (self.reserve_want * 2).min(max);
        }
        let c = self.reserve.0;
        self.reserve.0 += 1;
        let off = c << self.geom.cluster_bits;
        // A refcount of 0 on a metadata cluster (crafted image) must not hand it out.
        self.map
            .check(off, self.geom.cluster_size, "new cluster allocation")?;
        Ok(off)
    }

    /// Returns the L2 table covering `guest`, allocating an empty one if needed.
    fn ensure_l2(&mut self, file: &File, guest: u64) -> Result<u64> {
        if let Some(off) = self.l2_table(guest)? {
            return Ok(off);
        }
        let (l1i, _) = self.l2_index(guest);
        let off = self.alloc_cluster(file)?;
        self.map.add(off, Kind::L2)?;
        let table = self.l2.insert_zeroed(off);
        write_all(file, table, off).map_err(io_err("writing a new L2 table"))?;
        // The table must be durable before the L1 entry points to it.
        datasync(file).map_err(io_err("fdatasync after new L2 table"))?;
        let e = off | OFLAG_COPIED;
        write_all(file, &e.to_be_bytes(), self.l1_offset + l1i as u64 * 8)
            .map_err(io_err("writing an L1 entry"))?;
        self.l1[l1i] = e;
        Ok(off)
    }

    /// Writes the L2 entry of `guest` (allocating the L2 table if needed).
    pub(crate) fn set_l2(&mut self, file: &File, guest: u64, entry: u64) -> Result<()> {
        let l2_off = self.ensure_l2(file, guest)?;
        let (_, l2i) = self.l2_index(guest);
        let table = self.l2.get(file, l2_off)?;
        table[l2i * 8..l2i * 8 + 8].copy_from_slice(&entry.to_be_bytes());
        write_all(file, &entry.to_be_bytes(), l2_off + l2i as u64 * 8)
            .map_err(io_err("writing an L2 entry"))
    }

    /// Whether the L2 table for `guest` exists (setting an entry to 0 needs none).
    pub(crate) fn has_l2(&self, guest: u64) -> Result<bool> {
        Ok(self.l2_table(guest)?.is_some())
    }

    /// Queues the host clusters of a mapping whose L2 entry was just replaced.
    pub(crate) fn defer_free(&mut self, m: Mapping) {
        let cb = self.geom.cluster_bits;
        match m {
            Mapping::Normal(h) | Mapping::ZeroAlloc(h) => self.pending_free.push(h >> cb),
            Mapping::Compressed(loc) => {
                let (a, b) = loc.clusters(&self.geom);
                self.pending_free.extend(a..=b);
                self.dec.invalidate();
            }
            Mapping::Unallocated | Mapping::Zero => {}
        }
    }

    /// Number of queued frees.
    pub(crate) fn pending_frees(&self) -> usize {
        self.pending_free.len()
    }

    /// Takes the queued frees; apply them with [`Meta::apply_frees`] after a sync.
    pub(crate) fn take_frees(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.pending_free)
    }

    /// Decrements the refcounts of `clusters` (their references are gone and durable).
    /// `on_free` is called for each cluster whose refcount reaches zero.
    pub(crate) fn apply_frees(
        &mut self,
        file: &File,
        clusters: &[u64],
        mut on_free: impl FnMut(u64),
    ) -> Result<()> {
        let cs = self.geom.cluster_size;
        for &c in clusters {
            // A data mapping that pointed into metadata (crafted image) frees nothing.
            self.map
                .check(c.saturating_mul(cs), cs, "freeing a data cluster")?;
            if self.rc.decrement(file, c)? == 0 {
                on_free(c);
            }
        }
        Ok(())
    }

    /// Gives the unused reserve back (refcount 1 → 0; nothing points to it).
    pub(crate) fn release_reserve(&mut self, file: &File) -> Result<()> {
        let (a, b) = self.reserve;
        self.reserve = (0, 0);
        self.rc.release_run(file, a, b - a)
    }
}
