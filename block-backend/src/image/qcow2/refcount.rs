//! Refcount table and refcount blocks: lookup, allocation of free clusters, frees, and growth
//! of the refcount structures (new refcount blocks, a bigger refcount table).
//!
//! Every change is written to the file immediately (write-through); the callers order the
//! writes (refcount before L2 entry, L2 entry before the decrement of a freed cluster).

use std::fs::File;

use super::super::raw::{datasync, read_upto, write_all};
use super::super::{ImageError, Result};
use super::cache::ClusterCache;
use super::header::{MAX_HOST_OFFSET, OFF_REFCOUNT_TABLE};
use super::overlap::{Kind, MetaMap};
use super::Geom;

/// Refcount table entry: bits 9..63 are the refcount block offset.
const REFT_OFFSET_MASK: u64 = !0x1ff;

/// The refcount structures of an image.
#[derive(Debug)]
pub(crate) struct Refcounts {
    geom: Geom,
    order: u32,
    /// log2 of the number of refcounts per block.
    rpb_bits: u32,
    table_offset: u64,
    table_clusters: u64,
    table: Vec<u64>,
    cache: ClusterCache,
    /// No free cluster below this index (allocation scans from here).
    free_hint: u64,
}

fn get_rc(buf: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            u64::from(buf[bit / 8] >> (bit % 8)) & ((1 << bits) - 1)
        }
        3 => u64::from(buf[i]),
        4 => u64::from(u16::from_be_bytes([buf[2 * i], buf[2 * i + 1]])),
        5 => {
            let mut b = [0u8; 4];
            b.copy_from_slice(&buf[4 * i..4 * i + 4]);
            u64::from(u32::from_be_bytes(b))
        }
        _ => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[8 * i..8 * i + 8]);
            u64::from_be_bytes(b)
        }
    }
}

fn set_rc(buf: &mut [u8], order: u32, i: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            buf[bit / 8] = (buf[bit / 8] & !mask) | (((v as u8) << (bit % 8)) & mask);
        }
        3 => buf[i] = v as u8,
        4 => buf[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => buf[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => buf[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

impl Refcounts {
    /// Loads the refcount table (its placement was checked against the file by the caller).
    pub(crate) fn load(
        file: &File,
        geom: Geom,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
    ) -> Result<Self> {
        let bytes = u64::from(table_clusters) << geom.cluster_bits;
        let mut raw = vec![0u8; bytes as usize];
        read_upto(file, &mut raw, table_offset)
            .map_err(|e| ImageError::io("reading the qcow2 refcount table", e))?;
        let table = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()) & REFT_OFFSET_MASK)
            .collect();
        let cs = geom.cluster_size as usize;
        Ok(Refcounts {
            geom,
            order,
            rpb_bits: geom.cluster_bits + 3 - order,
            table_offset,
            table_clusters: u64::from(table_clusters),
            table,
            cache: ClusterCache::new("refcount block", cs, (1 << 20) / cs + 4),
            free_hint: 0,
        })
    }

    /// Replaces the block cache by an empty one of `clusters` entries (tests).
    #[cfg(test)]
    pub(crate) fn set_cache_capacity(&mut self, clusters: usize) {
        self.cache = ClusterCache::new("refcount block", self.geom.cluster_size as usize, clusters);
    }

    /// `(index, offset)` of every refcount table entry (0: no block).
    pub(crate) fn block_offsets(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.table.iter().copied().enumerate()
    }

    fn block_offset(&self, block: u64) -> Result<Option<u64>> {
        let Some(&off) = self.table.get(block as usize) else {
            return Ok(None);
        };
        if off == 0 {
            return Ok(None);
        }
        if off & (self.geom.cluster_size - 1) != 0 || off >= MAX_HOST_OFFSET {
            return Err(ImageError::Corrupt(format!(
                "refcount block {block} at unaligned or out-of-range offset {off:#x}"
            )));
        }
        Ok(Some(off))
    }

    /// Refcount of host cluster `cluster`.
    pub(crate) fn get(&mut self, file: &File, cluster: u64) -> Result<u64> {
        let block = cluster >> self.rpb_bits;
        let Some(off) = self.block_offset(block)? else {
            return Ok(0);
        };
        let i = (cluster & ((1 << self.rpb_bits) - 1)) as usize;
        let order = self.order;
        Ok(get_rc(self.cache.get(file, off)?, order, i))
    }

    /// Sets the refcounts of clusters `[start, start+count)`, which lie in one existing block,
    /// to `value`, and writes the changed bytes.
    fn set_run(&mut self, file: &File, start: u64, count: u64, value: u64) -> Result<()> {
        let block = start >> self.rpb_bits;
        let off = self
            .block_offset(block)?
            .ok_or_else(|| ImageError::Corrupt(format!("no refcount block for cluster {start}")))?;
        let first = (start & ((1 << self.rpb_bits) - 1)) as usize;
        let order = self.order;
        let buf = self.cache.get(file, off)?;
        for i in first..first + count as usize {
            set_rc(buf, order, i, value);
        }
        let bits = 1usize << order;
        let b0 = first * bits / 8;
        let b1 = ((first + count as usize) * bits).div_ceil(8);
        write_all(file, &buf[b0..b1], off + b0 as u64)
            .map_err(|e| ImageError::io("writing a qcow2 refcount block", e))
    }

    /// Drops one reference to `cluster`; returns the new refcount.
    pub(crate) fn decrement(&mut self, file: &File, cluster: u64) -> Result<u64> {
        let rc = self.get(file, cluster)?;
        if rc == 0 {
            return Err(ImageError::Corrupt(format!(
                "freeing host cluster {cluster:#x} whose refcount is already 0"
            )));
        }
        self.set_run(file, cluster, 1, rc - 1)?;
        if rc == 1 {
            self.free_hint = self.free_hint.min(cluster);
        }
        Ok(rc - 1)
    }

    /// Releases clusters `[start, start+count)` that have refcount 1 and no reference (an
    /// unused allocation reserve).
    pub(crate) fn release_run(&mut self, file: &File, start: u64, count: u64) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        self.set_run(file, start, count, 0)?;
        self.free_hint = self.free_hint.min(start);
        Ok(())
    }

    /// Finds a run of up to `want` free clusters inside one refcount block, sets their refcount
    /// to 1 and makes that durable (`fdatasync`) before returning `(first, count)`: nothing
    /// may point to them before their refcount is on disk.
    /// New refcount structures are checked against and added to `map`.
    pub(crate) fn allocate_run(
        &mut self,
        file: &File,
        want: u64,
        map: &mut MetaMap,
    ) -> Result<(u64, u64)> {
        let (start, count) = self.find_free_run(file, want.max(1), map)?;
        self.set_run(file, start, count, 1)?;
        self.free_hint = start + count;
        datasync(file).map_err(|e| ImageError::io("fdatasync after refcount update", e))?;
        Ok((start, count))
    }

    fn find_free_run(&mut self, file: &File, want: u64, map: &mut MetaMap) -> Result<(u64, u64)> {
        let per_block = 1u64 << self.rpb_bits;
        let max_cluster = MAX_HOST_OFFSET >> self.geom.cluster_bits;
        let mut c = self.free_hint;
        loop {
            if c >= max_cluster {
                return Err(ImageError::NoSpace("qcow2 host offsets exhausted".into()));
            }
            let block = c >> self.rpb_bits;
            let Some(off) = self.block_offset(block)? else {
                self.create_block(file, block, map)?;
                continue;
            };
            let order = self.order;
            let buf = self.cache.get(file, off)?;
            let mut i = (c & (per_block - 1)) as usize;
            while i < per_block as usize && get_rc(buf, order, i) != 0 {
                i += 1;
            }
            if i == per_block as usize {
                c = (block + 1) * per_block;
                continue;
            }
            let start = i;
            while i < per_block as usize
                && ((i - start) as u64) < want
                && get_rc(buf, order, i) == 0
            {
                i += 1;
            }
            return Ok((block * per_block + start as u64, (i - start) as u64));
        }
    }

    /// Creates refcount block `block` (covering clusters that all have refcount 0), placing it
    /// in the first cluster it covers so that it describes itself; grows the table if needed.
    fn create_block(&mut self, file: &File, block: u64, map: &mut MetaMap) -> Result<()> {
        if block as usize >= self.table.len() {
            return self.grow_table(file, block, map);
        }
        let per_block = 1u64 << self.rpb_bits;
        let cluster = block * per_block;
        let off = cluster << self.geom.cluster_bits;
        if cluster == 0 {
            return Err(ImageError::Corrupt("refcount block 0 is missing".into()));
        }
        map.add(off, Kind::RefBlock)?;
        let order = self.order;
        let buf = self.cache.insert_zeroed(off);
        set_rc(buf, order, 0, 1);
        let io = |e| ImageError::io("writing a new qcow2 refcount block", e);
        write_all(file, buf, off).map_err(io)?;
        // The block must be on disk before the table points to it.
        datasync(file).map_err(io)?;
        write_all(file, &off.to_be_bytes(), self.table_offset + block * 8).map_err(io)?;
        self.table[block as usize] = off;
        Ok(())
    }

    /// Replaces the refcount table by a bigger one covering at least `need_block`. The new
    /// table and the refcount blocks describing it are placed in the clusters covered by the
    /// first entries past the end of the old table (all free by definition).
    fn grow_table(&mut self, file: &File, need_block: u64, map: &mut MetaMap) -> Result<()> {
        let cs = self.geom.cluster_size;
        let per_block = 1u64 << self.rpb_bits;
        let first_new = self.table.len() as u64;
        let target = (first_new + first_new / 2).max(need_block + 1);
        let (mut k, mut t, mut entries);
        k = 1u64;
        loop {
            entries = target.max(first_new + k);
            t = (entries * 8).div_ceil(cs);
            let k_needed = (k + t).div_ceil(per_block);
            if k_needed <= k {
                break;
            }
            k = k_needed;
        }
        entries = t * cs / 8;
        if t * cs > 8 << 20 {
            return Err(ImageError::NoSpace(
                "qcow2 refcount table would exceed 8 MiB".into(),
            ));
        }
        let c0 = first_new * per_block;
        if (c0 + k * per_block) << self.geom.cluster_bits >= MAX_HOST_OFFSET {
            return Err(ImageError::NoSpace("qcow2 host offsets exhausted".into()));
        }
        map.check(c0 * cs, (k + t) * cs, "new refcount table and blocks")?;
        let io = |e| ImageError::io("growing the qcow2 refcount table", e);
        // New refcount blocks: block j sits at cluster c0 + j and covers [c0 + j*pb, ..).
        let used_end = c0 + k + t;
        let mut buf = vec![0u8; cs as usize];
        for j in 0..k {
            buf.fill(0);
            let lo = c0 + j * per_block;
            let hi = (lo + per_block).min(used_end);
            for c in lo..hi {
                set_rc(&mut buf, self.order, (c - lo) as usize, 1);
            }
            write_all(file, &buf, (c0 + j) * cs).map_err(io)?;
        }
        // New table.
        let mut table = self.table.clone();
        table.resize(entries as usize, 0);
        for j in 0..k {
            table[(first_new + j) as usize] = (c0 + j) * cs;
        }
        let mut raw = Vec::with_capacity((t * cs) as usize);
        for e in &table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        let new_offset = (c0 + k) * cs;
        write_all(file, &raw, new_offset).map_err(io)?;
        datasync(file).map_err(io)?;
        // Switch the header to the new table (12 bytes: offset + clusters, one sector).
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_offset.to_be_bytes());
        hdr[8..].copy_from_slice(&(t as u32).to_be_bytes());
        write_all(file, &hdr, OFF_REFCOUNT_TABLE).map_err(io)?;
        datasync(file).map_err(io)?;
        let (old_offset, old_clusters) = (self.table_offset, self.table_clusters);
        self.table = table;
        self.table_offset = new_offset;
        self.table_clusters = t;
        for j in 0..k {
            map.add((c0 + j) * cs, Kind::RefBlock)?;
        }
        map.move_reftable(new_offset, t * cs);
        // The old table is unreferenced now: free it.
        for c in 0..old_clusters {
            self.decrement(file, (old_offset >> self.geom.cluster_bits) + c)?;
        }
        tracing::debug!(new_offset, clusters = t, "grew qcow2 refcount table");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths_roundtrip() {
        for order in 0..=6u32 {
            let mut buf = vec![0u8; 512];
            let n = (512 * 8) >> order;
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            for i in 0..n {
                set_rc(&mut buf, order, i, (i as u64 * 7919) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_rc(&buf, order, i),
                    (i as u64 * 7919) & max,
                    "order {order} i {i}"
                );
            }
        }
        // Sub-byte refcounts are stored least significant bit first (as QEMU does).
        let mut buf = [0u8; 1];
        set_rc(&mut buf, 0, 1, 1);
        assert_eq!(buf[0], 0b10);
    }
}
