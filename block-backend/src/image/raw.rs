//! Raw images: the file's bytes are the disk's bytes.
//!
//! Also home of the small positioned-I/O helpers shared with the qcow2 format (`pread`/`pwrite`
//! loops that survive short transfers and `EINTR`, `fdatasync`, hole punching).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use super::{check_range, detect_bytes, DiskImage, Format, ImageError, Result, PROBE_LEN};

/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)` (not exported by the `libc` crate).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeroes.
/// Returns the number of bytes that came from the file.
pub(crate) fn read_upto(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(done)
}

/// Reads exactly `buf.len()` bytes at `offset`; hitting the end of the file is an error.
pub(crate) fn read_exact(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    // `FileExt::read_exact_at` retries on EINTR and short reads.
    file.read_exact_at(buf, offset)
}

/// Writes all of `buf` at `offset` (retrying short writes and EINTR).
pub(crate) fn write_all(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    file.write_all_at(buf, offset)
}

/// `fdatasync(2)`, retried on EINTR.
pub(crate) fn datasync(file: &File) -> io::Result<()> {
    loop {
        match file.sync_data() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// `fallocate(2)` with `mode`; `Ok(false)` when the file system does not support the mode.
pub(crate) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    loop {
        // SAFETY: fallocate on a valid, owned file descriptor; no memory is passed.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, l) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Punches a hole (the range reads as zeroes afterwards). `Ok(false)` if unsupported.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Writes `len` zero bytes at `offset` with plain writes.
pub(crate) fn write_zero_bytes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: usize = 64 * 1024;
    static ZEROES: [u8; CHUNK] = [0; CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        write_all(file, &ZEROES[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A raw image file (or block device).
#[derive(Debug)]
pub struct RawImage {
    file: File,
    size: u64,
    read_only: bool,
    block_device: bool,
    /// O_DIRECT alignment when the file was opened with O_DIRECT.
    direct: Option<usize>,
    /// Set when the format was probed: writes touching the first sector are checked (and
    /// serialised by this lock, so two partial writes cannot build a header together).
    probe_guard: Option<ProbeGuard>,
}

/// State of the probed-raw write check.
#[derive(Debug, Default)]
struct ProbeGuard {
    lock: Mutex<()>,
    /// Whether a refusal was already logged at warning level (later ones go to debug).
    warned: AtomicBool,
}

/// Contents of a write for [`RawImage::guarded`]: data, or zeroes.
#[derive(Clone, Copy)]
enum Payload<'a> {
    Data(&'a [u8]),
    Zeroes,
}

impl RawImage {
    /// Wraps an open file. The virtual size is the file length (`BLKGETSIZE64` for block
    /// devices).
    pub fn new(file: File, read_only: bool) -> Result<RawImage> {
        let meta = file
            .metadata()
            .map_err(|e| ImageError::io("stat of raw image", e))?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a
            // live local of that type.
            let r =
                unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
            if r != 0 {
                return Err(ImageError::io("BLKGETSIZE64", io::Error::last_os_error()));
            }
            size
        } else {
            meta.len()
        };
        Ok(RawImage {
            file,
            size,
            read_only,
            block_device,
            direct: None,
            probe_guard: None,
        })
    }

    /// Records that the file is open with O_DIRECT (`Some(alignment)`): buffers that do not
    /// meet the alignment then go through aligned bounce buffers.
    pub fn with_direct(mut self, direct: Option<usize>) -> RawImage {
        self.direct = direct;
        self
    }

    /// Whether guest I/O on `bufs` at `offset` must be bounced (O_DIRECT, misaligned).
    fn needs_bounce(&self, bufs: &[super::GuestSlice<'_>], offset: u64) -> bool {
        self.direct
            .is_some_and(|a| offset % a as u64 != 0 || !super::direct::guest_aligned(bufs, a))
    }

    /// [`read_upto`], through an aligned buffer under O_DIRECT.
    fn read_file(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.direct {
            Some(a) => super::direct::read_bounced(&self.file, a, buf, offset),
            None => read_upto(&self.file, buf, offset).map(|_| ()),
        }
    }

    /// Like [`RawImage::new`], for an image whose format was probed (not stated by the user):
    /// a write, write-zeroes or discard touching the first sector is refused with
    /// [`ImageError::Refused`] when the first sector would afterwards probe as another format
    /// (QEMU's rule for probed raw images, against CVE-2008-2004-style attacks).
    pub fn new_probed(file: File, read_only: bool) -> Result<RawImage> {
        let mut img = Self::new(file, read_only)?;
        img.probe_guard = Some(ProbeGuard::default());
        Ok(img)
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }

    /// Whether `[offset, offset+len)` needs the probe check.
    fn touches_probe_area(&self, offset: u64, len: u64) -> bool {
        self.probe_guard.is_some() && len > 0 && offset < PROBE_LEN as u64
    }

    /// Runs `op` (which writes `payload` at `offset`, `len` bytes) after checking that the
    /// first sector would still probe as raw; the check and the write happen under the
    /// guard's lock. Writes that do not touch the first sector run `op` directly.
    fn guarded(
        &self,
        offset: u64,
        len: u64,
        payload: Payload<'_>,
        op: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let guard = match &self.probe_guard {
            Some(g) if self.touches_probe_area(offset, len) => g,
            _ => return op(),
        };
        let _held = guard.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let mut head = [0u8; PROBE_LEN];
        let n = PROBE_LEN.min(self.size as usize);
        self.read_file(&mut head[..n], 0)
            .map_err(|e| ImageError::io("raw read of the first sector", e))?;
        // The first sector as it will be after the write (the file may be shorter).
        let start = offset as usize;
        let end = offset.saturating_add(len).min(PROBE_LEN as u64) as usize;
        match payload {
            Payload::Data(d) => head[start..end].copy_from_slice(&d[..end - start]),
            Payload::Zeroes => head[start..end].fill(0),
        }
        let after = n.max(end).min(self.size as usize);
        let probed = detect_bytes(&head[..after]);
        if probed != Format::Raw {
            let msg = format!(
                "guest write at {offset} (length {len}) would make this probed raw image look \
                 like {probed}; restart with `--format raw` if this disk really holds a {probed} \
                 image"
            );
            if !guard.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!("{msg}");
            } else {
                tracing::debug!("{msg}");
            }
            return Err(ImageError::Refused(msg));
        }
        op()
    }
}

impl DiskImage for RawImage {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        // A file truncated under us reads as zeroes rather than failing.
        self.read_file(buf, offset)
            .map_err(|e| ImageError::io(format!("raw read at {offset}"), e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        self.check_write(offset, len)?;
        self.guarded(offset, len, Payload::Data(buf), || {
            let aligned = self.direct.is_none_or(|a| buf.as_ptr() as usize % a == 0);
            if aligned {
                write_all(&self.file, buf, offset)
            } else {
                super::direct::write_bounced(&self.file, buf, offset)
            }
            .map_err(|e| ImageError::io(format!("raw write at {offset}"), e))
        })
    }

    fn flush(&self) -> Result<()> {
        datasync(&self.file).map_err(|e| ImageError::io("raw fdatasync", e))
    }

    fn read_to_guest(
        &self,
        bufs: &[super::GuestSlice<'_>],
        offset: u64,
        bounce: &mut Vec<u8>,
    ) -> Result<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, len, self.size)?;
        if self.needs_bounce(bufs, offset) {
            let mut off = offset;
            return super::for_each_chunk(bufs, bounce, |chunk, tmp| {
                self.read_at(tmp, off)?;
                chunk.copy_from(tmp);
                off += tmp.len() as u64;
                Ok(())
            });
        }
        super::vectored::read_at(&self.file, bufs, offset)
            .map_err(|e| ImageError::io(format!("raw read at {offset}"), e))
    }

    fn write_from_guest(
        &self,
        bufs: &[super::GuestSlice<'_>],
        offset: u64,
        bounce: &mut Vec<u8>,
    ) -> Result<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_write(offset, len)?;
        if self.touches_probe_area(offset, len) || self.needs_bounce(bufs, offset) {
            // Guest memory can change under us: copy it first, check and write the copy.
            let mut off = offset;
            return super::for_each_chunk(bufs, bounce, |chunk, tmp| {
                chunk.copy_to(tmp);
                self.write_at(tmp, off)?;
                off += tmp.len() as u64;
                Ok(())
            });
        }
        super::vectored::write_at(&self.file, bufs, offset)
            .map_err(|e| ImageError::io(format!("raw write at {offset}"), e))
    }

    fn passthrough_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        Some((self.file.as_raw_fd(), self.direct.unwrap_or(1)))
    }

    fn direct_io_ok(&self, offset: u64, len: u64) -> bool {
        !self.touches_probe_area(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        // Discard is advisory: an unsupported hole punch is not an error. A punched range
        // reads as zeroes: checked like a write of zeroes.
        self.guarded(offset, len, Payload::Zeroes, || {
            punch_hole(&self.file, offset, len)
                .map(|_| ())
                .map_err(|e| ImageError::io(format!("raw discard at {offset}"), e))
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_write(offset, len)?;
        self.guarded(offset, len, Payload::Zeroes, || {
            self.zero_range(offset, len, unmap)
        })
    }
}

impl RawImage {
    fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let ctx = |e| ImageError::io(format!("raw write-zeroes at {offset}"), e);
        if unmap && !self.block_device && punch_hole(&self.file, offset, len).map_err(ctx)? {
            return Ok(());
        }
        if fallocate(
            &self.file,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
        .map_err(ctx)?
        {
            return Ok(());
        }
        write_zero_bytes(&self.file, offset, len).map_err(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(len: usize, ro: bool) -> (tempfile::NamedTempFile, RawImage) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        f.write_all(&data).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!ro)
            .open(f.path())
            .unwrap();
        let img = RawImage::new(file, ro).unwrap();
        (f, img)
    }

    #[test]
    fn read_write_discard_zeroes() {
        let (_f, img) = image(1 << 20, false);
        assert_eq!(img.size(), 1 << 20);
        let mut model: Vec<u8> = (0..1usize << 20).map(|i| (i * 7 + 3) as u8).collect();
        let data: Vec<u8> = (0..10_000).map(|i| (i % 251) as u8).collect();
        img.write_at(&data, 12_345).unwrap();
        model[12_345..22_345].copy_from_slice(&data);
        img.write_zeroes(4096, 8192, true).unwrap();
        model[4096..4096 + 8192].fill(0);
        img.write_zeroes(100_001, 5000, false).unwrap();
        model[100_001..105_001].fill(0);
        img.flush().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf == model, "raw image content differs from the model");
        img.discard(0, 65536).unwrap();
        assert!(matches!(
            img.read_at(&mut buf[..10], (1 << 20) - 5),
            Err(ImageError::OutOfRange { .. })
        ));
        assert!(matches!(
            img.write_at(&buf[..10], u64::MAX - 2),
            Err(ImageError::OutOfRange { .. })
        ));
    }

    #[test]
    fn read_only_refuses_writes() {
        let (_f, img) = image(4096, true);
        assert!(matches!(img.write_at(&[1], 0), Err(ImageError::ReadOnly)));
        assert!(matches!(img.discard(0, 512), Err(ImageError::ReadOnly)));
        assert!(matches!(
            img.write_zeroes(0, 512, true),
            Err(ImageError::ReadOnly)
        ));
        let mut b = [0u8; 3];
        img.read_at(&mut b, 1).unwrap();
        assert_eq!(b, [10, 17, 24]);
    }
}
