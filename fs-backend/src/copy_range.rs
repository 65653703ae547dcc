//! `FUSE_COPY_FILE_RANGE` (opcode 47), which fuse-backend-rs 0.14's server does not dispatch:
//! [`crate::FsServer::process_chain`] intercepts it and [`Handles::copy_file_range`] copies with
//! `copy_file_range(2)` on the host, so the data never passes through the guest (and the
//! host filesystem may share extents).
//!
//! The passthrough keeps its handles' fds private, so [`crate::confined_fs::ConfinedFs`]
//! records each handle it hands out (inode and open flags) here; the first copy through a
//! handle opens the inode again with the handle's access mode
//! ([`crate::inode_fd::reopen`]) and keeps that fd until `RELEASE`. Explicit offsets are used,
//! so a separate open file description behaves like the handle's own.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use fuse_backend_rs::abi::fuse_abi::CopyFileRangeIn;

use crate::inode_fd::reopen;
use crate::passthrough::Passthrough;

/// Largest length copied by one request: the reply's `size` is 32 bits (`u32::MAX` rounded
/// down to a page, like the Linux client's own clamp).
pub const MAX_COPY_LEN: u64 = 0xffff_f000;

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

#[derive(Debug)]
struct Entry {
    inode: u64,
    access: i32,
    file: Option<Arc<File>>,
}

/// The open handles of the guest session, for operations the passthrough does not offer.
pub struct Handles {
    fs: Arc<Passthrough>,
    map: Mutex<HashMap<u64, Entry>>,
}

impl std::fmt::Debug for Handles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handles")
            .field("open", &self.lock().len())
            .finish()
    }
}

impl Handles {
    /// An empty table over `fs`'s inodes.
    pub fn new(fs: Arc<Passthrough>) -> Self {
        Handles {
            fs,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `handle` of `inode`, opened with the guest's `flags`.
    pub fn insert(&self, handle: u64, inode: u64, flags: u32) {
        let access = (flags as i32) & libc::O_ACCMODE;
        self.lock().insert(
            handle,
            Entry {
                inode,
                access,
                file: None,
            },
        );
    }

    /// Forgets `handle` (`RELEASE`).
    pub fn remove(&self, handle: u64) {
        let e = self.lock().remove(&handle);
        drop(e);
    }

    /// Forgets every handle (a new guest session).
    pub fn clear(&self) {
        let m = std::mem::take(&mut *self.lock());
        drop(m);
    }

    /// Number of handles recorded.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no handle is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An fd of `handle`, which must belong to `inode` and allow reading (`write == false`)
    /// or writing; `EBADF` otherwise, like `copy_file_range(2)` on a wrong fd.
    fn file(&self, handle: u64, inode: u64, write: bool) -> io::Result<Arc<File>> {
        let access = {
            let map = self.lock();
            let e = map.get(&handle).ok_or_else(|| errno(libc::EBADF))?;
            if e.inode != inode {
                return Err(errno(libc::EBADF));
            }
            let ok = match e.access {
                libc::O_RDWR => true,
                libc::O_WRONLY => write,
                libc::O_RDONLY => !write,
                _ => false,
            };
            if !ok {
                return Err(errno(libc::EBADF));
            }
            if let Some(f) = &e.file {
                return Ok(f.clone());
            }
            e.access
        };
        let file = Arc::new(reopen(&self.fs, inode, access)?);
        let mut map = self.lock();
        match map.get_mut(&handle) {
            // Released meanwhile: the request still completes with this fd.
            None => Ok(file),
            Some(e) => Ok(e.file.get_or_insert(file).clone()),
        }
    }

    /// `COPY_FILE_RANGE` from (`nodeid_in`, `fh_in`) to (`nodeid_out`, `fh_out`): returns the
    /// number of bytes copied (at most [`MAX_COPY_LEN`]; may be short, 0 at end of file).
    /// `readonly` shares answer `EROFS`; non-zero `flags` or offsets beyond `i64::MAX`
    /// `EINVAL`; unknown handles `EBADF`; otherwise the host's `copy_file_range` errno.
    pub fn copy_file_range(
        &self,
        nodeid_in: u64,
        args: &CopyFileRangeIn,
        readonly: bool,
    ) -> io::Result<u32> {
        if readonly {
            return Err(errno(libc::EROFS));
        }
        if args.flags != 0 {
            return Err(errno(libc::EINVAL));
        }
        let mut off_in = i64::try_from(args.offset_in).map_err(|_| errno(libc::EINVAL))?;
        let mut off_out = i64::try_from(args.offset_out).map_err(|_| errno(libc::EINVAL))?;
        let fd_in = self.file(args.fh_in, nodeid_in, false)?;
        let fd_out = self.file(args.fh_out, args.nodeid_out, true)?;
        let len = usize::try_from(args.len.min(MAX_COPY_LEN)).unwrap_or(0);
        // SAFETY: both fds are open; the offsets are valid, writable loff_t values.
        let n = unsafe {
            libc::copy_file_range(
                fd_in.as_raw_fd(),
                &mut off_in,
                fd_out.as_raw_fd(),
                &mut off_out,
                len,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }
}
