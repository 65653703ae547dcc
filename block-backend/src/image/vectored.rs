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

/// Runs `call(iovecs, count, offset)` until every byte of `bufs` is moved, retrying on EINTR
/// and continuing after short transfers. `on_nothing` decides what a zero return means.
fn transfer(
    bufs: &[GuestSlice<'_>],
    offset: u64,
    call: impl Fn(&[libc::iovec], i32, libc::off_t) -> isize,
    on_nothing: impl Fn(&[libc::iovec]) -> io::Result<()>,
) -> io::Result<()> {
    let mut iov = iovecs(bufs);
    let mut start = 0;
    let mut off = offset;
    while start < iov.len() {
        let cnt = (iov.len() - start).min(IOV_MAX) as i32;
        let n = call(&iov[start..], cnt, off as libc::off_t);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return on_nothing(&iov[start..]);
        }
        off += n as u64;
        start = advance(&mut iov, start, n as usize);
    }
    Ok(())
}

/// Reads `sum(bufs)` bytes at `offset` into guest memory; bytes past the end of the file read
/// as zeroes (a raw image truncated under us).
pub fn read_at(file: &File, bufs: &[GuestSlice<'_>], offset: u64) -> io::Result<()> {
    let fd = file.as_raw_fd();
    transfer(
        bufs,
        offset,
        // SAFETY: every iovec points into a `VolatileSlice` of guest memory that stays mapped
        // for the borrow of `bufs`; the kernel writes into it, no Rust reference aliases it.
        |iov, cnt, off| unsafe { libc::preadv(fd, iov.as_ptr(), cnt, off) },
        |rest| {
            for v in rest {
                // SAFETY: as above; `iov_len` bytes at `iov_base` are guest memory.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
            Ok(())
        },
    )
}

/// Writes `sum(bufs)` bytes of guest memory at `offset`.
pub fn write_at(file: &File, bufs: &[GuestSlice<'_>], offset: u64) -> io::Result<()> {
    let fd = file.as_raw_fd();
    transfer(
        bufs,
        offset,
        // SAFETY: every iovec points into mapped guest memory for the borrow of `bufs`; the
        // kernel only reads it.
        |iov, cnt, off| unsafe { libc::pwritev(fd, iov.as_ptr(), cnt, off) },
        |_| {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ))
        },
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

    use super::*;

    #[test]
    fn scattered_io_round_trips_and_eof_reads_zeroes() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 13) as u8).collect();
        mem.write_slice(&data, GuestAddress(0x1000)).unwrap();
        // Gather from three pieces, one of them empty.
        let out = [
            mem.get_slice(GuestAddress(0x1000), 1000).unwrap(),
            mem.get_slice(GuestAddress(0x13e8), 0).unwrap(),
            mem.get_slice(GuestAddress(0x13e8), 2000).unwrap(),
        ];
        write_at(&file, &out, 100).unwrap();
        let mut back = vec![0u8; 3000];
        file.read_exact_at(&mut back, 100).unwrap();
        assert_eq!(back, data);
        // Scatter back, reading 1000 bytes past the end of the file: they read as zeroes.
        mem.write_slice(&[0xffu8; 4000], GuestAddress(0x8000))
            .unwrap();
        let into = [
            mem.get_slice(GuestAddress(0x8000), 7).unwrap(),
            mem.get_slice(GuestAddress(0x8007), 3993).unwrap(),
        ];
        read_at(&file, &into, 100).unwrap();
        let mut got = vec![0u8; 4000];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(&got[..3000], &data[..]);
        assert!(got[3000..].iter().all(|&b| b == 0));
    }
}
