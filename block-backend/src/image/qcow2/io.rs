//! qcow2 data paths: read, write (allocation, copy-on-write), discard / write-zeroes, flush.

use super::super::direct;
use super::super::raw::{datasync, punch_hole, write_all};
use super::super::{ImageError, Result};
use super::meta::{Mapping, Meta, OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO};
use super::{read_file, Qcow2Image};

/// Deferred frees are applied (after a sync) once this many are queued.
const MAX_PENDING_FREES: usize = 4096;

/// What a zeroing request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroKind {
    /// Write zeroes; `unmap` lets whole clusters be deallocated. A discard is a write-zeroes
    /// with `unmap`: discarded ranges always read as zeroes afterwards.
    Zero { unmap: bool },
}

fn write_err(off: u64) -> impl Fn(std::io::Error) -> ImageError {
    move |e| ImageError::io(format!("qcow2 data write at {off:#x}"), e)
}

impl Qcow2Image {
    /// Reads guest data at host offset `off`: through the O_DIRECT data descriptor when there
    /// is one (an aligned bounce buffer around the range), else through the image's.
    fn read_data(&self, dst: &mut [u8], off: u64) -> Result<()> {
        match &self.data {
            Some((f, a)) => direct::read_bounced(f, *a, dst, off)
                .map_err(|e| ImageError::io(format!("qcow2 data read at {off:#x}"), e)),
            None => read_file(&self.file, dst, off),
        }
    }

    /// Writes guest data at host offset `off`: O_DIRECT (from an aligned copy) when the range
    /// meets the alignment, else through the buffered descriptor (the kernel keeps the two
    /// coherent: O_DIRECT I/O writes back and invalidates cached pages of its range).
    fn write_data(&self, src: &[u8], off: u64) -> std::io::Result<()> {
        match &self.data {
            Some((f, a)) if off % *a as u64 == 0 && src.len() % *a == 0 => {
                direct::write_bounced(f, src, off)
            }
            _ => write_all(&self.file, src, off),
        }
    }

    pub(super) fn read_impl(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cs = self.geom.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let in_off = off & (cs - 1);
            let gate = self
                .gate
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut meta = self.lock_meta();
            let (m, run) = meta.map_run(&self.file, off, (buf.len() - done) as u64, false)?;
            let dst = &mut buf[done..done + run as usize];
            match m {
                Mapping::Normal(h) => {
                    drop(meta);
                    self.read_data(dst, h + in_off)?;
                }
                Mapping::Zero | Mapping::ZeroAlloc(_) => dst.fill(0),
                Mapping::Unallocated => {
                    drop(meta);
                    drop(gate);
                    self.read_backing(dst, off)?;
                }
                Mapping::Compressed(loc) => {
                    let data = meta.dec.load(&self.file, loc)?;
                    let i = in_off as usize;
                    dst.copy_from_slice(&data[i..i + dst.len()]);
                }
            }
            done += run as usize;
        }
        Ok(())
    }

    pub(super) fn write_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        let cs = self.geom.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let in_off = off & (cs - 1);
            let _gate = self
                .gate
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut meta = self.lock_meta();
            let (m, run) = meta.map_run(&self.file, off, (buf.len() - done) as u64, true)?;
            if let Mapping::Normal(h) = m {
                // Allocated cluster(s): data I/O without the metadata lock.
                meta.check_data(h + in_off, run)?;
                drop(meta);
                let src = &buf[done..done + run as usize];
                self.write_data(src, h + in_off).map_err(write_err(off))?;
                done += run as usize;
            } else {
                let n = ((cs - in_off) as usize).min(buf.len() - done);
                self.write_cluster_slow(&mut meta, off, &buf[done..done + n])?;
                done += n;
            }
        }
        self.maybe_apply_frees()
    }

    /// Writes `data` (inside one cluster) to a cluster that needs a metadata change:
    /// unallocated, zero, or compressed (→ new cluster, copy-on-write), zero-preallocated.
    fn write_cluster_slow(&self, meta: &mut Meta, off: u64, data: &[u8]) -> Result<()> {
        let cs = self.geom.cluster_size;
        let cstart = off & !(cs - 1);
        let in_off = (off - cstart) as usize;
        // Bytes of this cluster inside the virtual disk.
        let valid = (self.header.size - cstart).min(cs) as usize;
        let full = in_off == 0 && data.len() >= valid;
        let m = meta.lookup(&self.file, off)?;
        let target = match m {
            Mapping::Normal(h) => {
                meta.check_data(h + in_off as u64, data.len() as u64)?;
                return self
                    .write_data(data, h + in_off as u64)
                    .map_err(write_err(off));
            }
            Mapping::ZeroAlloc(h) => h,
            _ => meta.alloc_cluster(&self.file)?,
        };
        meta.check_data(target, cs)?;
        if full && valid == cs as usize {
            self.write_data(data, target).map_err(write_err(off))?;
        } else {
            let mut scratch = std::mem::take(&mut meta.scratch);
            let r = (|| {
                match m {
                    Mapping::Unallocated if !full => {
                        self.read_backing(&mut scratch[..valid], cstart)?;
                        scratch[valid..].fill(0);
                    }
                    Mapping::Compressed(loc) if !full => {
                        scratch.copy_from_slice(meta.dec.load(&self.file, loc)?);
                    }
                    _ => scratch.fill(0),
                }
                scratch[in_off..in_off + data.len()].copy_from_slice(data);
                self.write_data(&scratch, target).map_err(write_err(off))
            })();
            meta.scratch = scratch;
            r?;
        }
        // Data first, then the L2 entry pointing to it (whose refcount is already durable).
        meta.set_l2(&self.file, off, target | OFLAG_COPIED)?;
        if !matches!(m, Mapping::ZeroAlloc(_)) {
            meta.defer_free(m);
        }
        Ok(())
    }

    pub(super) fn zero_impl(&self, offset: u64, len: u64, kind: ZeroKind) -> Result<()> {
        let cs = self.geom.cluster_size;
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let cstart = off & !(cs - 1);
            let cend = (cstart + cs).min(self.header.size);
            let n = cend.min(end) - off;
            if off == cstart && off + n == cend {
                self.zero_full_cluster(off, cend - cstart, kind)?;
            } else {
                self.zero_partial(off, n)?;
            }
            off += n;
        }
        self.maybe_apply_frees()
    }

    fn zero_partial(&self, off: u64, n: u64) -> Result<()> {
        let m = {
            let _gate = self
                .gate
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.lock_meta().lookup(&self.file, off)?
        };
        let reads_zero = m.is_zero() || (m == Mapping::Unallocated && self.backing.is_none());
        if reads_zero {
            return Ok(());
        }
        self.write_impl(&self.zeroes[..n as usize], off)
    }

    fn zero_full_cluster(&self, off: u64, valid: u64, kind: ZeroKind) -> Result<()> {
        enum Action {
            Nothing,
            Set(u64),
            WriteZeroes,
        }
        let has_backing = self.backing.is_some();
        let gate = self
            .gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut meta = self.lock_meta();
        let m = meta.lookup(&self.file, off)?;
        let unmapped = if has_backing { OFLAG_ZERO } else { 0 };
        let action = if self.geom.version >= 3 {
            match (kind, m) {
                (_, Mapping::Zero) => Action::Nothing,
                (_, Mapping::Unallocated) if !has_backing => Action::Nothing,
                (ZeroKind::Zero { unmap: false }, Mapping::Normal(h)) => {
                    Action::Set(h | OFLAG_COPIED | OFLAG_ZERO)
                }
                (ZeroKind::Zero { unmap: false }, Mapping::ZeroAlloc(_)) => Action::Nothing,
                _ => Action::Set(unmapped),
            }
        } else {
            match (kind, m) {
                (_, Mapping::Unallocated) if !has_backing => Action::Nothing,
                (ZeroKind::Zero { unmap }, Mapping::Normal(_)) if unmap && !has_backing => {
                    Action::Set(0)
                }
                (ZeroKind::Zero { .. }, Mapping::Compressed(_)) if !has_backing => Action::Set(0),
                _ => Action::WriteZeroes,
            }
        };
        match action {
            Action::Nothing => Ok(()),
            Action::Set(entry) => {
                if entry == 0 && !meta.has_l2(off)? {
                    return Ok(());
                }
                let kept = match m {
                    Mapping::Normal(h) | Mapping::ZeroAlloc(h) => {
                        let kept = entry & OFFSET_MASK == h;
                        if !kept {
                            // About to be freed: it must be a data cluster.
                            meta.check_data(h, self.geom.cluster_size)?;
                        }
                        kept
                    }
                    _ => false,
                };
                meta.set_l2(&self.file, off, entry)?;
                if !kept {
                    meta.defer_free(m);
                }
                Ok(())
            }
            Action::WriteZeroes => {
                drop(meta);
                drop(gate);
                self.write_impl(&self.zeroes[..valid as usize], off)
            }
        }
    }

    fn maybe_apply_frees(&self) -> Result<()> {
        if self.lock_meta().pending_frees() >= MAX_PENDING_FREES {
            self.apply_pending_frees()?;
        }
        Ok(())
    }

    /// Syncs (so the L2 entries that dropped the references are durable), then decrements the
    /// refcounts of the freed clusters and punches holes where they reached zero.
    pub(super) fn apply_pending_frees(&self) -> Result<()> {
        let list = {
            let mut meta = self.lock_meta();
            if meta.pending_frees() == 0 {
                return Ok(());
            }
            meta.take_frees()
        };
        datasync(&self.file).map_err(|e| ImageError::io("qcow2 fdatasync", e))?;
        // No data I/O outside the lock may still target a cluster we free.
        let _gate = self
            .gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut meta = self.lock_meta();
        let cs = self.geom.cluster_size;
        meta.apply_frees(&self.file, &list, |c| {
            // Space reclaim is best effort; the lock is held, so the cluster is not reused yet.
            let _ = punch_hole(&self.file, c * cs, cs);
        })?;
        // Give the reserve back too, so that the next allocations fill the freed holes first.
        meta.release_reserve(&self.file)
    }

    /// Makes everything durable and leaves the image clean on disk (no leaks), so that a
    /// process ending right after a flush (the daemon's SIGTERM path: no `Drop`) leaves an
    /// image that passes `qemu-img check`.
    pub(super) fn flush_impl(&self) -> Result<()> {
        self.apply_pending_frees()?;
        // The unused part of the pre-counted allocation reserve has refcount 1 on disk and
        // no reference: give it back before the sync (it is refilled, with a sync, on the
        // next allocation). Releasing needs no ordering: nothing points to those clusters.
        self.lock_meta().release_reserve(&self.file)?;
        datasync(&self.file).map_err(|e| ImageError::io("qcow2 fdatasync", e))
    }
}
