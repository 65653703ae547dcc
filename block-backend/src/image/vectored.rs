//! `preadv`/`pwritev` straight between a file and guest memory.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::GuestSlice;

/// Most iovecs passed to one system call (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

fn iovecs(bufs: &[GuestSlice<'_>]) -> Vec<libc::iovec> {
    bufs.iter()
        .filter(|s| !s.is_empty())
        .map(|s| libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect()
}

/// Drops the first `n` bytes of `iov`, returning the index of the first iovec still to do.
fn advance(iov: &mut [libc::iovec], mut start: usize, mut n: usize) -> usize {
    while n > 0 && start < iov.len() {
        let len = iov[start].iov_len;
        if n >= len {
            n -= len;
            start += 1;
        } else {
            // SAFETY: `n < len`, so the new base stays inside the same guest buffer.
            iov[start].iov_base = unsafe { iov[start].iov_base.cast::<u8>().add(n).cast() };
            iov[start].iov_len = len - n;
            n = 0;
        }
    }
    start
}

/// Reads `sum(bufs)` bytes at `offset` into guest memory; bytes past the end of the file read
/// as zeroes (a raw image truncated under us).
pub fn read_at(file: &File, bufs: &[GuestSlice<'_>], offset: u64) -> io::Result<()> {
    let mut iov = iovecs(bufs);
    let mut start = 0;
    let mut off = offset;
    while start < iov.len() {
        let cnt = (iov.len() - start).min(IOV_MAX);
        // SAFETY: every iovec points into a `VolatileSlice` of guest memory that stays mapped
        // for the borrow of `bufs`; the kernel writes into it, no Rust reference aliases it.
        let n = unsafe {
            libc::preadv(
                file.as_raw_fd(),
                iov[start..].as_ptr(),
                cnt as i32,
                off as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            // End of file: the rest reads as zeroes.
            for v in &iov[start..] {
                // SAFETY: as above; `iov_len` bytes at `iov_base` are guest memory.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
            return Ok(());
        }
        off += n as u64;
        start = advance(&mut iov, start, n as usize);
    }
    Ok(())
}

/// Writes `sum(bufs)` bytes of guest memory at `offset`.
pub fn write_at(file: &File, bufs: &[GuestSlice<'_>], offset: u64) -> io::Result<()> {
    let mut iov = iovecs(bufs);
    let mut start = 0;
    let mut off = offset;
    while start < iov.len() {
        let cnt = (iov.len() - start).min(IOV_MAX);
        // SAFETY: every iovec points into mapped guest memory for the borrow of `bufs`; the
        // kernel only reads it.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov[start..].as_ptr(),
                cnt as i32,
                off as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        off += n as u64;
        start = advance(&mut iov, start, n as usize);
    }
    Ok(())
}
