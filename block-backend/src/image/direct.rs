//! O_DIRECT support: the alignment a file needs, aligned bounce buffers, and positioned I/O
//! that bounces only when the caller's memory is not aligned.

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::GuestSlice;

/// The largest alignment probed (and the one used for bounce buffers).
pub const MAX_ALIGN: usize = 4096;

/// A zeroed heap buffer aligned to [`MAX_ALIGN`].
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is owned memory like a `Vec<u8>`; no interior sharing.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least one byte is allocated).
    pub fn new(len: usize) -> AlignedBuf {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(1).next_multiple_of(MAX_ALIGN), MAX_ALIGN)
            .unwrap_or(Layout::new::<[u8; MAX_ALIGN]>())
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to at least `len` initialised (zeroed) bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Start address (for I/O submitted to the kernel).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

/// Whether a file opened with O_DIRECT accepts I/O aligned to `align` (memory, offset and
/// length): the smallest of 512 and 4096 that works (QEMU probes the same way).
pub fn probe_alignment(file: &File) -> usize {
    let mut buf = AlignedBuf::new(MAX_ALIGN);
    for align in [512, MAX_ALIGN] {
        match file.read_at(&mut buf.as_mut_slice()[..align], 0) {
            Ok(_) => return align,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(_) => return align,
        }
    }
    MAX_ALIGN
}

/// Turns O_DIRECT on for `file`.
pub fn set_direct(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an owned fd, no pointers.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_DIRECT) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether every guest buffer starts and ends on an `align` boundary.
pub fn guest_aligned(bufs: &[GuestSlice<'_>], align: usize) -> bool {
    bufs.iter()
        .all(|s| (s.ptr_guard().as_ptr() as usize) % align == 0 && s.len() % align == 0)
}

/// Reads `buf.len()` bytes at `offset` through an aligned buffer covering the aligned range
/// around them; bytes past the end of the file read as zeroes.
pub fn read_bounced(file: &File, align: usize, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let a = align as u64;
    let start = offset / a * a;
    let end = (offset + buf.len() as u64).next_multiple_of(a);
    let mut tmp = AlignedBuf::new((end - start) as usize);
    super::raw::read_upto(file, tmp.as_mut_slice(), start)?;
    let skip = (offset - start) as usize;
    buf.copy_from_slice(&tmp.as_slice()[skip..skip + buf.len()]);
    Ok(())
}

/// Writes `buf` at `offset` (which, with the length, must be `align`-aligned: O_DIRECT refuses
/// others with EINVAL) from an aligned copy.
pub fn write_bounced(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut tmp = AlignedBuf::new(buf.len());
    tmp.as_mut_slice().copy_from_slice(buf);
    file.write_all_at(tmp.as_slice(), offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        for len in [0, 1, 512, 4097] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.as_mut_ptr() as usize % MAX_ALIGN, 0);
            assert_eq!(b.as_slice().len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn bounced_io_on_an_o_direct_file() {
        use std::os::unix::fs::OpenOptionsExt;
        // /tmp must be a file system with O_DIRECT (not tmpfs): the open fails loudly if not.
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8192).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(f.path())
            .expect("O_DIRECT open of a file in the temp dir");
        let align = probe_alignment(&file);
        assert!(align == 512 || align == MAX_ALIGN);
        // An unaligned Vec goes through an aligned copy.
        let data: Vec<u8> = (0..align).map(|i| (i % 253) as u8).collect();
        write_bounced(&file, &data, align as u64).unwrap();
        let mut back = vec![0u8; 100];
        read_bounced(&file, align, &mut back, align as u64 + 7).unwrap();
        assert_eq!(back[..], data[7..107]);
    }
}
