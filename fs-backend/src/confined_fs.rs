//! [`ConfinedFs`]: the passthrough as served, with extended attributes that work inside the
//! confinement.
//!
//! fuse-backend-rs's passthrough implements xattr requests on `/proc/self/fd/N` *paths*, which
//! do not exist once `rqemu_sandbox::namespaces::pivot_into_dir` has pivoted into the shared directory. This
//! wrapper delegates every request to the passthrough except the four xattr ones, which it
//! serves on the inode's path: read through the passthrough's `/proc/self/fd` *fd* (opened
//! before confinement), printed by the kernel relative to the confined root, used with the
//! `l*xattr` calls (a symlink's own attributes, never its target's). The path is resolved
//! inside the confined root only, so a concurrent rename can at worst name another file of
//! the shared directory.
//!
//! It also serves the lock requests (`GETLK`, `SETLK`; `SETLKW` is intercepted earlier by
//! [`crate::FsServer`] so it can wait without blocking a queue) through [`Locks`], releases
//! lock owners on `FLUSH`/`RELEASE`, offers `FUSE_POSIX_LOCKS | FUSE_FLOCK_LOCKS` at `INIT`,
//! and records open handles in [`Handles`] for `COPY_FILE_RANGE`.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::transport::FsCacheReqHandler;

use crate::config::{XattrConfig, XATTR_LIST_MAX, XATTR_SIZE_MAX};
use crate::copy_range::Handles;
use crate::locks::{LockRequest, Locks};
use crate::passthrough::Passthrough;

/// The filesystem the server dispatches to.
pub struct ConfinedFs {
    inner: Arc<Passthrough>,
    xattr: XattrConfig,
    locks: Arc<Locks>,
    handles: Arc<Handles>,
}

impl ConfinedFs {
    /// Wraps the passthrough; `xattr` enables the xattr requests (`ENOSYS` otherwise, so the
    /// guest stops asking) and says how names are mapped (`true`: the default, safe
    /// [`crate::XattrPolicy`]). Lock and handle tables of its own.
    pub fn new(inner: Arc<Passthrough>, xattr: impl Into<XattrConfig>) -> Self {
        let locks = Arc::new(Locks::new(inner.clone()));
        let handles = Arc::new(Handles::new(inner.clone()));
        Self::with_tables(inner, xattr, locks, handles)
    }

    /// Wraps the passthrough with lock and handle tables shared with the caller (the server
    /// uses them for the requests it intercepts).
    pub fn with_tables(
        inner: Arc<Passthrough>,
        xattr: impl Into<XattrConfig>,
        locks: Arc<Locks>,
        handles: Arc<Handles>,
    ) -> Self {
        ConfinedFs {
            inner,
            xattr: xattr.into(),
            locks,
            handles,
        }
    }

    fn forget_session(&self) {
        self.locks.reset();
        self.handles.clear();
    }

    fn lock_request(
        inode: u64,
        owner: u64,
        lock: &FileLock,
        flags: u32,
    ) -> io::Result<LockRequest> {
        LockRequest::new(inode, owner, lock.start, lock.end, lock.lock_type, flags)
    }

    /// The host name of guest attribute `name` under the xattr policy.
    fn xattr_name(&self, name: &CStr) -> io::Result<CString> {
        self.xattr
            .policy
            .to_host(name)
            .map_err(io::Error::from_raw_os_error)
    }

    fn xattr_path(&self, inode: u64) -> io::Result<CString> {
        if !self.xattr.enabled {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        let path = self
            .inner
            .readlinkat_proc_file(inode)?
            .into_os_string()
            .into_vec();
        // Only absolute paths below our root name a reachable file ("/x (deleted)" of an
        // unlinked file still starts with '/', and then fails ENOENT below).
        if path.first() != Some(&b'/') {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }
}

impl FileSystem for ConfinedFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // A (re)starting guest: nothing of an earlier session survives.
        self.forget_session();
        // The server answers with `capable & wanted`. BIG_WRITES + MAX_PAGES: requests up to
        // 1 MiB (256 pages) instead of one page per WRITE (the passthrough asks for neither).
        Ok(self.inner.init(capable)?
            | FsOptions::POSIX_LOCKS
            | FsOptions::FLOCK_LOCKS
            | FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES)
    }

    fn destroy(&self) {
        self.forget_session();
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        self.inner.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: Self::Inode, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Self::Inode, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Option<Self::Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        attr: stat64,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Self::Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.inner.symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.inner.mknod(ctx, inode, name, mode, rdev, umask)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.inner.mkdir(ctx, parent, name, mode, umask)
    }

    fn unlink(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Self::Inode,
        oldname: &CStr,
        newdir: Self::Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.inner.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions, Option<u32>)> {
        let r = self.inner.open(ctx, inode, flags, fuse_flags)?;
        if let Some(h) = r.0 {
            self.handles.insert(h, inode, flags);
        }
        Ok(r)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions, Option<u32>)> {
        let r = self.inner.create(ctx, parent, name, args)?;
        if let Some(h) = r.1 {
            self.handles.insert(h, r.0.inode, args.flags);
        }
        Ok(r)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        // close(): the guest process's POSIX locks on the file go.
        self.locks.release_owner(inode, lock_owner);
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        // `lock_owner` is set with FUSE_RELEASE_FLUSH (POSIX owner) or
        // FUSE_RELEASE_FLOCK_UNLOCK (the open file: its flock goes).
        if let Some(owner) = lock_owner {
            self.locks.release_owner(inode, owner);
        }
        self.handles.remove(handle);
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Self::Inode) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        _ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        let path = self.xattr_path(inode)?;
        let name = self.xattr_name(name)?;
        // SAFETY: valid NUL-terminated strings; `value` is valid for `value.len()` bytes.
        let r = unsafe {
            libc::lsetxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags as libc::c_int,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn getxattr(
        &self,
        _ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let path = self.xattr_path(inode)?;
        let name = self.xattr_name(name)?;
        // No value is larger than XATTR_SIZE_MAX: the guest's size is a limit, not a need.
        let mut buf = vec![0u8; (size as usize).min(XATTR_SIZE_MAX)];
        // SAFETY: valid NUL-terminated strings; `buf` is writable for `buf.len()` bytes.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        if size == 0 {
            Ok(GetxattrReply::Count(u32::try_from(n).unwrap_or(u32::MAX)))
        } else {
            buf.truncate(n);
            Ok(GetxattrReply::Value(buf))
        }
    }

    fn listxattr(
        &self,
        _ctx: &Context,
        inode: Self::Inode,
        size: u32,
    ) -> io::Result<ListxattrReply> {
        let path = self.xattr_path(inode)?;
        // The whole host list (never longer than XATTR_LIST_MAX), then the guest's view of it.
        let mut buf = vec![0u8; XATTR_LIST_MAX];
        // SAFETY: valid NUL-terminated string; `buf` is writable for `buf.len()` bytes.
        let n = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        buf.truncate(n);
        let names = self.xattr.policy.list_to_guest(&buf);
        if size == 0 {
            Ok(ListxattrReply::Count(
                u32::try_from(names.len()).unwrap_or(u32::MAX),
            ))
        } else if names.len() > size as usize {
            Err(io::Error::from_raw_os_error(libc::ERANGE))
        } else {
            Ok(ListxattrReply::Names(names))
        }
    }

    fn removexattr(&self, _ctx: &Context, inode: Self::Inode, name: &CStr) -> io::Result<()> {
        let path = self.xattr_path(inode)?;
        let name = self.xattr_name(name)?;
        // SAFETY: valid NUL-terminated strings.
        if unsafe { libc::lremovexattr(path.as_ptr(), name.as_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        self.inner.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry<'_>) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry<'_>, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    #[allow(clippy::too_many_arguments)]
    fn setupmapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner.removemapping(ctx, inode, requests, vu_req)
    }

    fn access(&self, ctx: &Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    /// `GETLK`: the first lock conflicting with `lock` (pid 0), or `F_UNLCK`.
    fn getlk(
        &self,
        _ctx: &Context,
        inode: Self::Inode,
        _handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        let st = self
            .locks
            .getlk(&Self::lock_request(inode, owner, &lock, flags)?)?;
        Ok(FileLock {
            start: st.start,
            end: st.end,
            lock_type: st.typ as u32,
            pid: 0,
        })
    }

    /// `SETLK`: takes or releases a POSIX or flock lock without waiting (`EAGAIN`).
    fn setlk(
        &self,
        _ctx: &Context,
        inode: Self::Inode,
        _handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        let req = Self::lock_request(inode, owner, &lock, flags)?;
        self.locks.setlk(&req, self.locks.generation())
    }

    /// Never reached through [`crate::FsServer`], which serves `SETLKW` itself (waiting off
    /// the queue thread); a direct call does not wait (`EAGAIN` on conflict).
    fn setlkw(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.setlk(ctx, inode, handle, owner, lock, flags)
    }

    /// send ioctl to the file
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        flags: u32,
        cmd: u32,
        data: IoctlData<'_>,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.inner
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }

    /// Query a file's block mapping info
    fn bmap(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        block: u64,
        blocksize: u32,
    ) -> io::Result<u64> {
        self.inner.bmap(ctx, inode, block, blocksize)
    }

    /// Poll a file's events
    fn poll(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        khandle: Self::Handle,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.inner.poll(ctx, inode, handle, khandle, flags, events)
    }

    /// Send notify reply.
    fn notify_reply(&self) -> io::Result<()> {
        self.inner.notify_reply()
    }

    #[inline]
    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.inner.id_remap(ctx)
    }
}

#[cfg(test)]
mod tests {
    use fuse_backend_rs::abi::fuse_abi::ROOT_ID;

    use super::*;
    use crate::{confine, FsParams, FsServer};

    fn host_getxattr(path: &std::path::Path, name: &CStr) -> Option<Vec<u8>> {
        let p = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let mut buf = vec![0u8; 256];
        // SAFETY: valid strings; `buf` writable for its length.
        let n = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        buf.truncate(usize::try_from(n).ok()?);
        Some(buf)
    }

    #[test]
    fn xattrs_work_inside_the_confinement() {
        assert!(confine::is_root(), "this test needs root (pivot_root)");
        let outside = tempfile::tempdir().unwrap();
        let shared = outside.path().join("shared");
        std::fs::create_dir_all(shared.join("d")).unwrap();
        std::fs::write(shared.join("d/f"), b"x").unwrap();
        let s = shared.clone();
        let (count, value, names, gone) = std::thread::spawn(move || {
            let params = FsParams {
                xattr: true,
                ..FsParams::default()
            };
            let srv = FsServer::new(&params, std::path::Path::new("/")).unwrap();
            confine::enter(&s, false).unwrap();
            let fs = ConfinedFs::new(srv.passthrough().clone(), true);
            fs.init(FsOptions::empty()).unwrap();
            let ctx = Context::new();
            let d = fs.lookup(&ctx, ROOT_ID, c"d").unwrap().inode;
            let f = fs.lookup(&ctx, d, c"f").unwrap().inode;
            fs.setxattr(&ctx, f, c"user.rqemu", b"value-1", 0).unwrap();
            fs.setxattr(&ctx, f, c"user.other", b"o", 0).unwrap();
            let count = fs.getxattr(&ctx, f, c"user.rqemu", 0).unwrap();
            let value = fs.getxattr(&ctx, f, c"user.rqemu", 64).unwrap();
            let names = fs.listxattr(&ctx, f, 256).unwrap();
            fs.removexattr(&ctx, f, c"user.other").unwrap();
            let gone = fs
                .getxattr(&ctx, f, c"user.other", 64)
                .err()
                .and_then(|e| e.raw_os_error());
            (count, value, names, gone)
        })
        .join()
        .unwrap();
        assert!(matches!(count, GetxattrReply::Count(7)));
        assert!(matches!(value, GetxattrReply::Value(v) if v == b"value-1"));
        let ListxattrReply::Names(names) = names else {
            panic!("expected names")
        };
        let mut names: Vec<&[u8]> = names.split(|&b| b == 0).filter(|n| !n.is_empty()).collect();
        names.sort();
        assert_eq!(names, [&b"user.other"[..], &b"user.rqemu"[..]]);
        assert_eq!(gone, Some(libc::ENODATA));
        // The host sees the attribute on the very file.
        assert_eq!(
            host_getxattr(&shared.join("d/f"), c"user.rqemu").unwrap(),
            b"value-1"
        );
        assert_eq!(host_getxattr(&shared.join("d/f"), c"user.other"), None);
    }

    /// Records the largest allocation of each thread (to catch guest-sized allocations).
    mod alloc_probe {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            static LARGEST: Cell<usize> = const { Cell::new(0) };
        }

        fn note(n: usize) {
            let _ = LARGEST.try_with(|c| c.set(c.get().max(n)));
        }

        /// The largest allocation of this thread since the last call.
        pub fn take_largest() -> usize {
            LARGEST.with(|c| c.replace(0))
        }

        pub struct Probe;

        // SAFETY: every method forwards to the system allocator with the caller's arguments.
        unsafe impl GlobalAlloc for Probe {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                note(layout.size());
                // SAFETY: same contract as ours.
                unsafe { System.alloc(layout) }
            }
            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                note(layout.size());
                // SAFETY: same contract as ours.
                unsafe { System.alloc_zeroed(layout) }
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                // SAFETY: same contract as ours.
                unsafe { System.dealloc(ptr, layout) }
            }
            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                note(new_size);
                // SAFETY: same contract as ours.
                unsafe { System.realloc(ptr, layout, new_size) }
            }
        }
    }

    #[global_allocator]
    static PROBE: alloc_probe::Probe = alloc_probe::Probe;

    fn host_setxattr(path: &std::path::Path, name: &CStr, value: &[u8]) {
        let p = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid strings; `value` readable for its length.
        let r = unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(r, 0, "host setxattr: {}", io::Error::last_os_error());
    }

    /// A served directory (not confined: the host path is used) with file `f`.
    fn served(policy: crate::XattrPolicy) -> (tempfile::TempDir, ConfinedFs, u64) {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), b"x").unwrap();
        let params = FsParams {
            xattr: true,
            xattr_policy: policy,
            ..FsParams::default()
        };
        let srv = FsServer::new(&params, t.path()).unwrap();
        let fs = ConfinedFs::new(srv.passthrough().clone(), params.xattr_config());
        fs.init(FsOptions::empty()).unwrap();
        let f = fs.lookup(&Context::new(), ROOT_ID, c"f").unwrap().inode;
        (t, fs, f)
    }

    fn guest_names(fs: &ConfinedFs, inode: u64) -> Vec<Vec<u8>> {
        let ListxattrReply::Names(names) = fs.listxattr(&Context::new(), inode, 4096).unwrap()
        else {
            panic!("expected names")
        };
        let mut v: Vec<Vec<u8>> = names
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn guest_sized_xattr_buffers_are_clamped() {
        let (t, fs, f) = served(crate::XattrPolicy::Mapped);
        host_setxattr(&t.path().join("f"), c"user.v", &[7; 100]);
        let ctx = Context::new();
        alloc_probe::take_largest();
        let v = fs.getxattr(&ctx, f, c"user.v", u32::MAX).unwrap();
        assert!(matches!(v, GetxattrReply::Value(ref v) if v == &[7; 100]));
        let got = alloc_probe::take_largest();
        assert!(got <= 1 << 20, "getxattr allocated {got} bytes");
        let l = fs.listxattr(&ctx, f, u32::MAX).unwrap();
        assert!(matches!(l, ListxattrReply::Names(ref n) if n == b"user.v\0"));
        let got = alloc_probe::take_largest();
        assert!(got <= 1 << 20, "listxattr allocated {got} bytes");
        // A guest buffer too small for the list: ERANGE, as from the kernel.
        let e = fs
            .listxattr(&ctx, f, 3)
            .err()
            .and_then(|e| e.raw_os_error());
        assert_eq!(e, Some(libc::ERANGE));
    }

    #[test]
    fn privileged_xattrs_are_mapped_not_set_on_host_files() {
        let (t, fs, f) = served(crate::XattrPolicy::Mapped);
        let host = t.path().join("f");
        host_setxattr(&host, c"trusted.host-only", b"h");
        let ctx = Context::new();
        fs.setxattr(&ctx, f, c"trusted.overlay.opaque", b"y", 0)
            .unwrap();
        // The host file has no privileged attribute from the guest...
        assert_eq!(host_getxattr(&host, c"trusted.overlay.opaque"), None);
        // (A file capability: the host kernel would even validate this value, EINVAL.)
        fs.setxattr(&ctx, f, c"security.capability", b"caps", 0)
            .unwrap();
        assert_eq!(host_getxattr(&host, c"security.capability"), None);
        fs.setxattr(&ctx, f, c"user.plain", b"p", 0).unwrap();
        assert_eq!(
            host_getxattr(&host, c"user.rqemu.trusted.overlay.opaque").unwrap(),
            b"y"
        );
        // ...while the guest sees its own names and values, not the host's privileged ones.
        let v = fs.getxattr(&ctx, f, c"trusted.overlay.opaque", 16).unwrap();
        assert!(matches!(v, GetxattrReply::Value(ref v) if v == b"y"));
        let e = fs.getxattr(&ctx, f, c"trusted.host-only", 16).err();
        assert_eq!(e.and_then(|e| e.raw_os_error()), Some(libc::ENODATA));
        assert_eq!(
            guest_names(&fs, f),
            [
                &b"security.capability"[..],
                b"trusted.overlay.opaque",
                b"user.plain"
            ]
        );
        // The mapped names cannot be reached directly.
        let e = fs.setxattr(&ctx, f, c"user.rqemu.trusted.x", b"z", 0).err();
        assert_eq!(e.and_then(|e| e.raw_os_error()), Some(libc::EPERM));
        fs.removexattr(&ctx, f, c"security.capability").unwrap();
        assert_eq!(
            host_getxattr(&host, c"user.rqemu.security.capability"),
            None
        );
        assert_eq!(host_getxattr(&host, c"trusted.host-only").unwrap(), b"h");
    }

    #[test]
    fn passthrough_policy_is_an_explicit_opt_in() {
        let (t, fs, f) = served(crate::XattrPolicy::Passthrough);
        fs.setxattr(&Context::new(), f, c"trusted.x", b"1", 0)
            .unwrap();
        assert_eq!(
            host_getxattr(&t.path().join("f"), c"trusted.x").unwrap(),
            b"1"
        );
    }

    #[test]
    fn xattrs_disabled_answer_enosys() {
        let t = tempfile::tempdir().unwrap();
        let srv = FsServer::new(&FsParams::default(), t.path()).unwrap();
        let fs = ConfinedFs::new(srv.passthrough().clone(), false);
        fs.init(FsOptions::empty()).unwrap();
        let err = fs.getxattr(&Context::new(), ROOT_ID, c"user.x", 0).err();
        assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::ENOSYS));
    }
}
