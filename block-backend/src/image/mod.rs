//! Disk image formats.
//!
//! Every format implements [`DiskImage`]: a byte-addressed virtual disk of [`DiskImage::size`]
//! bytes. Methods take `&self` so one image can be shared (via `Arc`) by all queues of a
//! device; formats synchronise internally.
//!
//! Images are opened once, at start-up, with [`open`]: a sandboxed daemon never opens a path
//! afterwards (backing files included).

use std::fmt;
use std::path::{Path, PathBuf};

pub mod direct;
pub mod lock;
pub mod mem;
pub mod qcow2;
pub mod raw;
#[cfg(test)]
mod tests_probe;
mod vectored;

/// A validated piece of guest memory (from a descriptor), the target or source of I/O.
pub type GuestSlice<'a> = vm_memory::VolatileSlice<'a, ()>;

/// Largest piece moved through a bounce buffer at once by the default vectored methods.
const BOUNCE_CHUNK: usize = 256 * 1024;

/// Errors of the image layer.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O error from the host file system.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The image is damaged: the message names what is wrong and where.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// The image uses a feature this implementation does not support.
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// An access outside the virtual disk.
    #[error("access out of range: offset {offset} length {len} (disk size {size})")]
    OutOfRange {
        /// Byte offset of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// A write to an image opened read-only.
    #[error("image is read-only")]
    ReadOnly,
    /// The image is full (qcow2: no room for new metadata or clusters).
    #[error("no space: {0}")]
    NoSpace(String),
    /// A qcow2 write would have overwritten the image's own metadata (crafted or corrupt
    /// image): refused, and the image is marked corrupt.
    #[error("corrupt image: {0}")]
    MetadataOverlap(String),
    /// A write refused for safety: it would make a probed raw image look like another
    /// format on the next start (the message says what).
    #[error("write refused: {0}")]
    Refused(String),
    /// Another process uses the image in a conflicting way (QEMU-compatible image locks).
    #[error("image is locked: {0}")]
    Locked(String),
}

impl ImageError {
    /// Wraps an I/O error with a context message.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result type of the image layer.
pub type Result<T> = std::result::Result<T, ImageError>;

/// On-disk format of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Plain bytes, one to one with the virtual disk.
    Raw,
    /// QEMU copy-on-write v2 or v3.
    Qcow2,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

/// How the format is chosen when opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FormatHint {
    /// Detect from the header (qcow2 magic, otherwise raw). A writable image detected as raw
    /// is "probed raw": guest writes that would make sector 0 probe as another format are
    /// refused (as QEMU does), since the next start would otherwise trust a header the guest
    /// wrote (backing file = any host file). Pass `Exact(Format::Raw)` for raw images.
    #[default]
    Auto,
    /// Force a format; opening fails if the header contradicts it (raw is always accepted).
    Exact(Format),
}

/// Host cache mode, with QEMU's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Page cache, guest flushes honoured (QEMU's default).
    #[default]
    Writeback,
    /// O_DIRECT (page cache bypassed), guest flushes honoured.
    None,
    /// Page cache, guest flushes ignored (data may be lost on a host crash).
    Unsafe,
    /// O_DIRECT and O_DSYNC: every write is durable when it completes.
    Directsync,
}

impl CacheMode {
    /// Whether the image is opened with O_DIRECT.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }

    /// Whether guest flushes reach the host (`fdatasync`).
    pub fn flushes(self) -> bool {
        self != CacheMode::Unsafe
    }
}

/// Options for [`open`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Format selection.
    pub format: FormatHint,
    /// Open the image read-only: writes, discards and write-zeroes fail with
    /// [`ImageError::ReadOnly`].
    pub read_only: bool,
    /// Host cache mode (O_DIRECT for `None`/`Directsync`: the whole file for raw images, the
    /// guest data clusters for qcow2).
    pub cache: CacheMode,
    /// Skip QEMU-compatible image locking (QEMU's `force-share`): the caller takes the risk
    /// of another writer.
    pub force_share: bool,
}

/// A virtual disk.
pub trait DiskImage: Send + Sync + fmt::Debug {
    /// The on-disk format.
    fn format(&self) -> Format;

    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// Whether writes are refused.
    fn read_only(&self) -> bool;

    /// Reads `buf.len()` bytes at `offset`. Unallocated areas read as zeroes (or from the
    /// backing file). Fails with [`ImageError::OutOfRange`] past the end of the disk.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at `offset`, allocating as needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes every completed write durable (data and metadata): `fdatasync` semantics.
    fn flush(&self) -> Result<()>;

    /// Discards a range: afterwards it may read as zeroes or as its old contents, but the
    /// host may reclaim the space. Out-of-range requests fail.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes a range read as zeroes. With `unmap`, the space may be deallocated.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;

    /// The file and the O_DIRECT alignment (1 without O_DIRECT) when the disk's bytes are the
    /// file's bytes at the same offsets for reads and writes that [`DiskImage::direct_io_ok`]
    /// accepts: asynchronous engines then submit I/O on it themselves. `None` by default.
    fn passthrough_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        None
    }

    /// Whether a write of `len` bytes at `offset` may go straight to
    /// [`DiskImage::passthrough_fd`] (no format check needed). `true` by default.
    fn direct_io_ok(&self, _offset: u64, _len: u64) -> bool {
        true
    }

    /// Reads the bytes at `offset` into `bufs` (guest memory), in order. The default goes
    /// through `bounce` (at most 256 KiB at a time) and [`DiskImage::read_at`]; formats that
    /// can read straight into guest memory override it.
    fn read_to_guest(
        &self,
        bufs: &[GuestSlice<'_>],
        offset: u64,
        bounce: &mut Vec<u8>,
    ) -> Result<()> {
        let mut off = offset;
        for_each_chunk(bufs, bounce, |chunk, tmp| {
            self.read_at(tmp, off)?;
            chunk.copy_from(tmp);
            off += tmp.len() as u64;
            Ok(())
        })
    }

    /// Writes `bufs` (guest memory) at `offset`, in order. Default: through `bounce` and
    /// [`DiskImage::write_at`].
    fn write_from_guest(
        &self,
        bufs: &[GuestSlice<'_>],
        offset: u64,
        bounce: &mut Vec<u8>,
    ) -> Result<()> {
        let mut off = offset;
        for_each_chunk(bufs, bounce, |chunk, tmp| {
            chunk.copy_to(tmp);
            self.write_at(tmp, off)?;
            off += tmp.len() as u64;
            Ok(())
        })
    }
}

/// Calls `f` on consecutive pieces of `bufs` of at most [`BOUNCE_CHUNK`] bytes, each with a
/// bounce buffer of the same length.
fn for_each_chunk(
    bufs: &[GuestSlice<'_>],
    bounce: &mut Vec<u8>,
    mut f: impl FnMut(&GuestSlice<'_>, &mut [u8]) -> Result<()>,
) -> Result<()> {
    for s in bufs {
        let mut pos = 0;
        while pos < s.len() {
            let n = (s.len() - pos).min(BOUNCE_CHUNK);
            let chunk = s
                .subslice(pos, n)
                .map_err(|e| ImageError::Corrupt(format!("guest buffer: {e}")))?;
            if bounce.len() < n {
                bounce.resize(n, 0);
            }
            f(&chunk, &mut bounce[..n])?;
            pos += n;
        }
    }
    Ok(())
}

/// Checks that `[offset, offset+len)` lies inside a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ImageError::OutOfRange { offset, len, size }),
    }
}

/// Opens an image file, detecting or checking its format.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn DiskImage>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!opts.read_only)
        .custom_flags(if opts.cache == CacheMode::Directsync {
            libc::O_DSYNC
        } else {
            0
        })
        .open(path)
        .map_err(|e| ImageError::io(format!("opening {}", path.display()), e))?;
    if !opts.force_share {
        let (perm, shared) = lock::guest_disk_perms(opts.read_only);
        lock::lock(&file, &path.display().to_string(), perm, shared)?;
    }
    let detected =
        detect(&file).map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
    let format = match opts.format {
        FormatHint::Auto => detected,
        FormatHint::Exact(Format::Raw) => Format::Raw,
        FormatHint::Exact(Format::Qcow2) if detected == Format::Qcow2 => Format::Qcow2,
        FormatHint::Exact(Format::Qcow2) => {
            return Err(ImageError::Corrupt(format!(
                "{} has no qcow2 header (format forced to qcow2)",
                path.display()
            )))
        }
    };
    let direct = if opts.cache.direct() && format == Format::Raw {
        direct::set_direct(&file).map_err(|e| {
            ImageError::io(format!("O_DIRECT on {} (file system?)", path.display()), e)
        })?;
        Some(direct::probe_alignment(&file))
    } else {
        None
    };
    match format {
        Format::Raw if opts.format == FormatHint::Auto && !opts.read_only => {
            tracing::warn!(
                "{}: format probed as raw; guest writes that would make its first sector look \
                 like another format are refused. Pass `--format raw` to state the format \
                 (and lift that restriction)",
                path.display()
            );
            Ok(Box::new(
                raw::RawImage::new_probed(file, false)?.with_direct(direct),
            ))
        }
        Format::Raw => Ok(Box::new(
            raw::RawImage::new(file, opts.read_only)?.with_direct(direct),
        )),
        Format::Qcow2 => {
            let img = qcow2::Qcow2Image::open_locked(
                file,
                base_dir(path),
                opts.read_only,
                !opts.force_share,
            )?;
            if !opts.cache.direct() {
                return Ok(Box::new(img));
            }
            // Guest data through a second, O_DIRECT descriptor (same open flags otherwise).
            let data = std::fs::OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .custom_flags(
                    libc::O_DIRECT
                        | if opts.cache == CacheMode::Directsync {
                            libc::O_DSYNC
                        } else {
                            0
                        },
                )
                .open(path)
                .map_err(|e| {
                    ImageError::io(
                        format!("O_DIRECT open of {} (file system?)", path.display()),
                        e,
                    )
                })?;
            let align = direct::probe_alignment(&data);
            Ok(Box::new(img.with_direct_data(data, align)))
        }
    }
}

fn base_dir(path: &Path) -> PathBuf {
    path.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// How many leading bytes [`detect_bytes`] looks at (one sector).
pub const PROBE_LEN: usize = 512;

/// Detects the format of an open file from its first bytes.
pub fn detect(file: &std::fs::File) -> std::io::Result<Format> {
    let mut head = [0u8; PROBE_LEN];
    let n = raw::read_upto(file, &mut head, 0)?;
    Ok(detect_bytes(&head[..n]))
}

/// Detects a format from the first bytes of an image (at most [`PROBE_LEN`] are looked at;
/// fewer bytes are the whole file).
pub fn detect_bytes(head: &[u8]) -> Format {
    if head.len() >= 4 && head[..4] == qcow2::MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    }
}
