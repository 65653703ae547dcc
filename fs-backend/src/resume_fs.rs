//! [`ResumeFs`]: the filesystem the server dispatches to — [`ConfinedFs`] with, when a state
//! file is given, the [`Tracker`] of [`crate::resume`] on every request: node and handle ids
//! translated (`ESTALE` for what a restart could not find again), replies carrying entries
//! and handles recorded, `FORGET`s and releases accounted, renames followed.

use std::ffi::CStr;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid, ROOT_ID,
};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::transport::FsCacheReqHandler;

use crate::confined_fs::ConfinedFs;
use crate::resume::Tracker;
use crate::state::HandleKind;

/// [`ConfinedFs`] plus the resume bookkeeping (none without a state file).
pub struct ResumeFs {
    fs: Arc<ConfinedFs>,
    t: Option<Arc<Tracker>>,
}

impl ResumeFs {
    /// Wraps `fs`; `t` tracks nodes and handles in a state file.
    pub fn new(fs: Arc<ConfinedFs>, t: Option<Arc<Tracker>>) -> Self {
        ResumeFs { fs, t }
    }

    /// The wrapped filesystem.
    pub fn inner(&self) -> &Arc<ConfinedFs> {
        &self.fs
    }

    /// The passthrough's id for guest node `n`.
    #[inline]
    fn node(&self, n: u64) -> io::Result<u64> {
        match &self.t {
            Some(t) => t.inner_node(n),
            None => Ok(n),
        }
    }

    #[inline]
    fn handle(&self, h: u64) -> io::Result<u64> {
        match &self.t {
            Some(t) => t.to_inner(h),
            None => Ok(h),
        }
    }

    /// Records a reply's entry under guest `(parent, name)`; the guest's id goes back.
    fn record(&self, parent: u64, name: &CStr, e: io::Result<Entry>) -> io::Result<Entry> {
        let mut e = e?;
        if let Some(t) = &self.t {
            t.entry(parent, name.to_bytes(), &mut e);
        }
        Ok(e)
    }

    fn opened(&self, h: Option<u64>, node: u64, flags: u32, kind: HandleKind) -> Option<u64> {
        match (&self.t, h) {
            (Some(t), Some(h)) => Some(t.opened(h, node, flags, kind)),
            _ => h,
        }
    }

    /// After a RENAME: the node now at `(dir, name)` (if the guest holds it) is there
    /// (`dir`: the guest's id, `inner_dir`: the passthrough's).
    fn follow(&self, ctx: &Context, dir: u64, inner_dir: u64, name: &CStr) {
        let Some(t) = &self.t else { return };
        if let Ok(e) = self.fs.lookup(ctx, inner_dir, name) {
            t.moved(e.inode, dir, name.to_bytes());
            self.fs.forget(ctx, e.inode, 1);
        }
    }
}

impl FileSystem for ResumeFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        if let Some(t) = &self.t {
            t.clear(Some(capable.bits()));
        }
        self.fs.init(capable)
    }

    fn destroy(&self) {
        if let Some(t) = &self.t {
            t.clear(None);
        }
        self.fs.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let p = self.node(parent)?;
        self.record(parent, name, self.fs.lookup(ctx, p, name))
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        let fwd = match &self.t {
            Some(t) => t.forget(inode, count),
            None => Some((inode, count)),
        };
        if let Some((inode, count)) = fwd {
            self.fs.forget(ctx, inode, count)
        }
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        let requests = match &self.t {
            Some(t) => requests
                .into_iter()
                .filter_map(|(i, c)| t.forget(i, c))
                .collect(),
            None => requests,
        };
        self.fs.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let inode = self.node(inode)?;
        let handle = handle.map(|h| self.handle(h)).transpose()?;
        self.fs.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let inode = self.node(inode)?;
        let handle = handle.map(|h| self.handle(h)).transpose()?;
        self.fs.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        let inode = self.node(inode)?;
        self.fs.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        let p = self.node(parent)?;
        self.record(parent, name, self.fs.symlink(ctx, linkname, p, name))
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let p = self.node(inode)?;
        self.record(inode, name, self.fs.mknod(ctx, p, name, mode, rdev, umask))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let p = self.node(parent)?;
        self.record(parent, name, self.fs.mkdir(ctx, p, name, mode, umask))
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let parent = self.node(parent)?;
        self.fs.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let parent = self.node(parent)?;
        self.fs.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        let (od, nd) = (self.node(olddir)?, self.node(newdir)?);
        self.fs.rename(ctx, od, oldname, nd, newname, flags)?;
        self.follow(ctx, newdir, nd, newname);
        if flags & libc::RENAME_EXCHANGE != 0 {
            self.follow(ctx, olddir, od, oldname);
        }
        Ok(())
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        let (i, np) = (self.node(inode)?, self.node(newparent)?);
        self.record(newparent, newname, self.fs.link(ctx, i, np, newname))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let i = self.node(inode)?;
        let (h, o, p) = self.fs.open(ctx, i, flags, fuse_flags)?;
        Ok((self.opened(h, inode, flags, HandleKind::File), o, p))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let pi = self.node(parent)?;
        let (e, h, o, p) = self.fs.create(ctx, pi, name, args)?;
        let e = self.record(parent, name, Ok(e))?;
        let h = self.opened(h, e.inode, args.flags, HandleKind::File);
        Ok((e, h, o, p))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        let inode = self.node(inode)?;
        let handle = self.handle(handle)?;
        self.fs
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        let inode = self.node(inode)?;
        let handle = self.handle(handle)?;
        self.fs.write(
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

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        let inode = self.node(inode)?;
        let handle = self.handle(handle)?;
        self.fs.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        let inode = self.node(inode)?;
        let handle = self.handle(handle)?;
        self.fs.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        let inode = self.node(inode)?;
        let handle = self.handle(handle)?;
        self.fs.fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let (inode, inner) = (self.node(inode), self.handle(handle));
        if let Some(t) = &self.t {
            t.released(handle);
        }
        self.fs
            .release(ctx, inode?, flags, inner?, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let inode = self.node(inode)?;
        self.fs.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        let inode = self.node(inode)?;
        self.fs.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let inode = self.node(inode)?;
        self.fs.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        let inode = self.node(inode)?;
        self.fs.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        let inode = self.node(inode)?;
        self.fs.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let i = self.node(inode)?;
        let (h, o) = self.fs.opendir(ctx, i, flags)?;
        Ok((self.opened(h, inode, flags, HandleKind::Dir), o))
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry<'_>) -> io::Result<usize>,
    ) -> io::Result<()> {
        let inode = self.node(inode)?;
        let handle = self.handle(handle)?;
        self.fs.readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry<'_>, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let i = self.node(inode)?;
        let handle = self.handle(handle)?;
        let Some(t) = &self.t else {
            return self.fs.readdirplus(ctx, i, handle, size, offset, add_entry);
        };
        self.fs
            .readdirplus(ctx, i, handle, size, offset, &mut |d, mut e| {
                let recorded = e.inode != ROOT_ID && e.inode != 0;
                t.entry(inode, d.name, &mut e);
                let n = add_entry(d, e)?;
                // 0: the entry did not fit and the passthrough takes its lookup back.
                if n == 0 && recorded {
                    t.undo_entry(e.inode);
                }
                Ok(n)
            })
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        let inode = self.node(inode)?;
        let handle = self.handle(handle)?;
        self.fs.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        let (inode, inner) = (self.node(inode), self.handle(handle));
        if let Some(t) = &self.t {
            t.released(handle);
        }
        self.fs.releasedir(ctx, inode?, flags, inner?)
    }

    #[allow(clippy::too_many_arguments)]
    fn setupmapping(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.fs
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: u64,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.fs.removemapping(ctx, inode, requests, vu_req)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        let inode = self.node(inode)?;
        self.fs.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        let inode = self.node(inode)?;
        let handle = self.handle(handle)?;
        self.fs.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        let inode = self.node(inode)?;
        let handle = self.handle(handle)?;
        self.fs.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        let inode = self.node(inode)?;
        let handle = self.handle(handle)?;
        self.fs.setlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        let inode = self.node(inode)?;
        let handle = self.handle(handle)?;
        self.fs.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        flags: u32,
        cmd: u32,
        data: IoctlData<'_>,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.fs
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }

    fn bmap(&self, ctx: &Context, inode: u64, block: u64, blocksize: u32) -> io::Result<u64> {
        self.fs.bmap(ctx, inode, block, blocksize)
    }

    fn poll(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        khandle: u64,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.fs.poll(ctx, inode, handle, khandle, flags, events)
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.fs.notify_reply()
    }

    #[inline]
    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.fs.id_remap(ctx)
    }
}
