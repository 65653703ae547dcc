//! qcow2 (v2 and v3).
//!
//! Supported: L1/L2 tables (standard L2 entries) with a bounded L2 cache, refcount orders
//! 0..=6 with refcount-block creation and refcount-table growth, allocation on write with
//! copy-on-write from the backing file, v3 zero clusters, reading zlib-compressed clusters
//! (writes move them to fresh clusters), raw and qcow2 backing files (opened read-only at open
//! time), discard and write-zeroes.
//!
//! Refused with a clear error: encryption, external data files, extended L2 entries,
//! non-zlib compression, unknown incompatible feature bits; read-write opening of images that
//! are dirty (lazy refcounts, not closed cleanly: repair with `qemu-img check -r all`), marked
//! corrupt, or that have internal snapshots (those open read-only). Unknown autoclear bits are
//! cleared on read-write open, as the spec requires. Lazy refcounts are never used.
//!
//! Metadata overlap checks (`overlap`, like QEMU's): no guest data write, cluster allocation
//! or free may touch the header, L1, L2, refcount table or refcount blocks; one that would
//! is refused and the image is marked corrupt (no more writes; incompatible bit 1 on disk for
//! v3). A read-write image whose metadata structures overlap each other is refused at open.
//!
//! Locking: metadata lives behind a mutex; reads and writes of already allocated clusters do
//! their data I/O outside it. A read-write lock ("gate") keeps a cluster from being freed
//! while such I/O may still target it: data I/O holds it shared, applying deferred frees
//! holds it exclusively.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use super::raw::{read_exact, read_upto, write_all, RawImage};
use super::{check_range, detect, DiskImage, Format, ImageError, Result};

mod cache;
mod compressed;
mod header;
mod io;
mod meta;
mod overlap;
mod refcount;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_bench;
#[cfg(test)]
mod tests_crash;
#[cfg(test)]
mod tests_overlap;
#[cfg(test)]
mod tests_stress;

#[cfg(test)]
pub(crate) use header::test_header;
pub use header::{parse_header, FeatureName, Header};
pub use header::{
    INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2,
};

use meta::Meta;
use overlap::MetaMap;
use refcount::Refcounts;

/// qcow2 header magic: "QFI\xfb".
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Deepest backing chain we follow.
const MAX_BACKING_DEPTH: u32 = 16;

/// Cluster geometry of an image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    pub(crate) cluster_bits: u32,
    pub(crate) cluster_size: u64,
    /// log2 of the number of entries per L2 table.
    pub(crate) l2_bits: u32,
    pub(crate) version: u32,
}

impl Geom {
    pub(crate) fn new(cluster_bits: u32, version: u32) -> Self {
        Geom {
            cluster_bits,
            cluster_size: 1 << cluster_bits,
            l2_bits: cluster_bits - 3,
            version,
        }
    }
}

/// An open qcow2 image.
pub struct Qcow2Image {
    file: File,
    /// With `--cache none`/`directsync`: a second descriptor of the image opened O_DIRECT,
    /// and its alignment, for guest data clusters (metadata stays on `file`).
    data: Option<(File, usize)>,
    header: Header,
    geom: Geom,
    read_only: bool,
    backing: Option<Box<dyn DiskImage>>,
    gate: RwLock<()>,
    meta: Mutex<Meta>,
    /// Set when a write would have overwritten metadata: every later write is refused (and
    /// a v3 image gets its corrupt bit on disk).
    corrupt: AtomicBool,
    /// One cluster of zeroes (partial write-zeroes).
    zeroes: Box<[u8]>,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("version", &self.header.version)
            .field("size", &self.header.size)
            .field("cluster_size", &self.geom.cluster_size)
            .field("read_only", &self.read_only)
            .field("backing", &self.backing)
            .finish()
    }
}

impl Qcow2Image {
    /// Opens a qcow2 image. `base_dir` resolves a relative backing file name; the backing
    /// chain is opened read-only now (a sandboxed daemon opens nothing later).
    pub fn open(file: File, base_dir: PathBuf, read_only: bool) -> Result<Qcow2Image> {
        Self::open_depth(file, &base_dir, read_only, 0, false)
    }

    /// [`Qcow2Image::open`], taking QEMU-compatible read locks on every backing file with
    /// `lock_backing` (shared with readers, refused to writers: see [`super::lock`]).
    pub fn open_locked(
        file: File,
        base_dir: PathBuf,
        read_only: bool,
        lock_backing: bool,
    ) -> Result<Qcow2Image> {
        Self::open_depth(file, &base_dir, read_only, 0, lock_backing)
    }

    /// Moves guest data I/O to `data`, the same image opened again with O_DIRECT, whose
    /// alignment is `align` (metadata keeps going through the page cache and is made durable
    /// by flushes, as before).
    pub fn with_direct_data(mut self, data: File, align: usize) -> Qcow2Image {
        self.data = Some((data, align));
        self
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn open_depth(
        file: File,
        base_dir: &Path,
        read_only: bool,
        depth: u32,
        lock_backing: bool,
    ) -> Result<Qcow2Image> {
        let file_len = file
            .metadata()
            .map_err(|e| ImageError::io("stat of qcow2 image", e))?
            .len();
        let mut head = vec![0u8; file_len.min(4096) as usize];
        read_exact(&file, &mut head, 0)
            .map_err(|e| ImageError::io("reading the qcow2 header", e))?;
        if let Some(cb) = head
            .get(20..24)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        {
            let want = file_len.min(1 << cb.clamp(9, 21)) as usize;
            if want > head.len() {
                head.resize(want, 0);
                read_exact(&file, &mut head, 0)
                    .map_err(|e| ImageError::io("reading the qcow2 header", e))?;
            }
        }
        let header = parse_header(&head)?;
        let geom = Geom::new(header.cluster_bits, header.version);
        let cs = geom.cluster_size;
        let dirty = header.incompatible_features & INCOMPAT_DIRTY != 0;
        if dirty && !read_only {
            return Err(ImageError::Unsupported(
                "qcow2 image is dirty (lazy refcounts, not closed cleanly); repair it with \
                 `qemu-img check -r all` or open it read-only"
                    .into(),
            ));
        }
        if header.incompatible_features & INCOMPAT_CORRUPT != 0 && !read_only {
            return Err(ImageError::Corrupt(
                "qcow2 image is marked corrupt (incompatible bit 1); repair it with \
                 `qemu-img check -r all` or open it read-only"
                    .into(),
            ));
        }
        if header.nb_snapshots > 0 && !read_only {
            return Err(ImageError::Unsupported(format!(
                "qcow2 image has {} internal snapshot(s): only read-only access is supported",
                header.nb_snapshots
            )));
        }
        let l1_bytes = u64::from(header.l1_size) * 8;
        // `parse_header` checked that the tables end below 2^56: no overflow here.
        let l1_end = header.l1_table_offset.saturating_add(l1_bytes);
        if header.l1_size > 0 && l1_end > file_len {
            return Err(ImageError::Corrupt(format!(
                "qcow2 L1 table at {:#x} ({} entries) extends beyond the end of the file ({file_len} bytes)",
                header.l1_table_offset, header.l1_size
            )));
        }
        if header.refcount_table_offset >= file_len {
            return Err(ImageError::Corrupt(format!(
                "qcow2 refcount table at {:#x} lies beyond the end of the file ({file_len} bytes)",
                header.refcount_table_offset
            )));
        }
        let mut raw_l1 = vec![0u8; l1_bytes as usize];
        read_exact(&file, &mut raw_l1, header.l1_table_offset)
            .map_err(|e| ImageError::io("reading the qcow2 L1 table", e))?;
        let l1 = raw_l1
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let rc = Refcounts::load(
            &file,
            geom,
            header.refcount_order,
            header.refcount_table_offset,
            header.refcount_table_clusters,
        )?;
        let backing = open_backing(&header, base_dir, depth, lock_backing)?;
        if !read_only && header.autoclear_features != 0 {
            // We maintain no autoclear feature (e.g. persistent bitmaps): clear them all.
            write_all(&file, &0u64.to_be_bytes(), header::OFF_AUTOCLEAR)
                .and_then(|()| super::raw::datasync(&file))
                .map_err(|e| ImageError::io("clearing qcow2 autoclear features", e))?;
        }
        let map = MetaMap::new(
            geom.cluster_bits,
            (header.l1_table_offset, l1_bytes),
            (
                header.refcount_table_offset,
                u64::from(header.refcount_table_clusters) << geom.cluster_bits,
            ),
        );
        let meta = Meta::new(geom, header.l1_table_offset, l1, rc, map, !read_only)?;
        Ok(Qcow2Image {
            file,
            data: None,
            header,
            geom,
            read_only,
            backing,
            gate: RwLock::new(()),
            meta: Mutex::new(meta),
            corrupt: AtomicBool::new(false),
            zeroes: vec![0u8; cs as usize].into_boxed_slice(),
        })
    }

    fn lock_meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads from the backing file (zeroes past its end, or without one).
    fn read_backing(&self, dst: &mut [u8], offset: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            dst.fill(0);
            return Ok(());
        };
        let n = b.size().saturating_sub(offset).min(dst.len() as u64) as usize;
        if n > 0 {
            b.read_at(&mut dst[..n], offset)?;
        }
        dst[n..].fill(0);
        Ok(())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        if self.corrupt.load(Ordering::Acquire) {
            return Err(ImageError::Corrupt(
                "qcow2 image marked corrupt (a write would have overwritten its metadata); \
                 check it with `qemu-img check`"
                    .into(),
            ));
        }
        check_range(offset, len, self.header.size)
    }

    /// Passes `r` on; a metadata overlap first marks the image corrupt (as QEMU does): no
    /// more writes, and on disk incompatible bit 1 (v3), so it is refused read-write until
    /// repaired.
    fn signal_corruption<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(ImageError::MetadataOverlap(msg)) = &r {
            if !self.corrupt.swap(true, Ordering::AcqRel) {
                tracing::error!("qcow2: {msg}; marking the image corrupt, writes refused");
                if self.header.version >= 3 {
                    let bits = self.header.incompatible_features | INCOMPAT_CORRUPT;
                    let w = write_all(&self.file, &bits.to_be_bytes(), header::OFF_INCOMPAT)
                        .and_then(|()| super::raw::datasync(&self.file));
                    if let Err(e) = w {
                        tracing::error!("qcow2: cannot set the corrupt bit: {e}");
                    }
                }
            }
        }
        r
    }
}

fn open_backing(
    h: &Header,
    base_dir: &Path,
    depth: u32,
    lock_backing: bool,
) -> Result<Option<Box<dyn DiskImage>>> {
    let Some(name) = &h.backing_file else {
        return Ok(None);
    };
    if depth >= MAX_BACKING_DEPTH {
        return Err(ImageError::Unsupported(format!(
            "qcow2 backing chain deeper than {MAX_BACKING_DEPTH} (loop?) at {name}"
        )));
    }
    if name.starts_with("json:") || name.contains("://") {
        return Err(ImageError::Unsupported(format!(
            "qcow2 backing file {name:?} is not a plain path"
        )));
    }
    let path = if Path::new(name).is_absolute() {
        PathBuf::from(name)
    } else {
        base_dir.join(name)
    };
    let ctx = |e| ImageError::io(format!("opening backing file {}", path.display()), e);
    let file = File::open(&path).map_err(ctx)?;
    if lock_backing {
        let (perm, shared) = super::lock::guest_disk_perms(true);
        super::lock::lock(
            &file,
            &format!("backing file {}", path.display()),
            perm,
            shared,
        )?;
    }
    let format = match h.backing_format.as_deref() {
        Some("raw") => Format::Raw,
        Some("qcow2") => Format::Qcow2,
        Some(other) => {
            return Err(ImageError::Unsupported(format!(
                "backing file {} has format {other:?} (only raw and qcow2)",
                path.display()
            )))
        }
        None => detect(&file).map_err(ctx)?,
    };
    let img: Box<dyn DiskImage> = match format {
        Format::Raw => Box::new(RawImage::new(file, true)?),
        Format::Qcow2 => {
            let dir = path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            Box::new(
                Qcow2Image::open_depth(file, &dir, true, depth + 1, lock_backing).map_err(|e| {
                    ImageError::Unsupported(format!("backing file {}: {e}", path.display()))
                })?,
            )
        }
    };
    Ok(Some(img))
}

impl DiskImage for Qcow2Image {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn size(&self) -> u64 {
        self.header.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.header.size)?;
        self.read_impl(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        self.signal_corruption(self.write_impl(buf, offset))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if self.corrupt.load(Ordering::Acquire) {
            // No metadata updates on a corrupt image: only make what was written durable.
            return super::raw::datasync(&self.file)
                .map_err(|e| ImageError::io("qcow2 fdatasync", e));
        }
        self.signal_corruption(self.flush_impl())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        // Discarded ranges read as zeroes: whole clusters are deallocated (v3 with a backing
        // file: zero flag; v2 with a backing file: zeroes written), partial ones zeroed.
        self.signal_corruption(self.zero_impl(offset, len, io::ZeroKind::Zero { unmap: true }))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_write(offset, len)?;
        self.signal_corruption(self.zero_impl(offset, len, io::ZeroKind::Zero { unmap }))
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if self.read_only || self.corrupt.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.flush_impl() {
            tracing::warn!("closing qcow2 image: {e} (at worst some clusters leak)");
        }
    }
}

/// Reads `len` bytes of the file at `offset`, zeroes past its end (helper for `io`).
fn read_file(file: &File, dst: &mut [u8], offset: u64) -> Result<()> {
    read_upto(file, dst, offset)
        .map(|_| ())
        .map_err(|e| ImageError::io(format!("qcow2 data read at {offset:#x}"), e))
}
