//! A synchronous FUSE session over a virtio-fs [`Device`]: one request at a time, on a chosen
//! request queue (FORGET on the hiprio queue).

use std::path::Path;
use std::time::{Duration, Instant};

use vm_memory::ByteValued;

use super::abi::{self, init_flags as f, opcode as op};
use super::{complete, name_arg, post, FsConfig, FsError, FsOptions, Request, Slot};
use crate::{Device, QueueError};

/// One directory entry of READDIR / READDIRPLUS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The name.
    pub name: String,
    /// Inode number (host's).
    pub ino: u64,
    /// Offset of the next entry.
    pub off: u64,
    /// `DT_*` type.
    pub typ: u32,
    /// READDIRPLUS only: the entry (node id 0 means no lookup count was taken).
    pub entry: Option<abi::EntryOut>,
}

/// A synchronous FUSE client.
#[derive(Debug)]
pub struct FuseClient {
    /// The device (queue 0 hiprio, 1.. request queues).
    pub dev: Device,
    /// The configuration space, if the backend exposes it.
    pub config: Option<FsConfig>,
    /// The server's `FUSE_INIT` answer once initialised.
    pub init: Option<abi::InitOut>,
    /// Request queue used for synchronous calls (1 by default).
    pub queue: usize,
    /// How long to wait for a reply.
    pub timeout: Duration,
    slot: Slot,
    max_payload: usize,
    unique: u64,
}

/// `FUSE_INIT` flags the driver asks for: what a Linux guest asks for minus caching modes that
/// change semantics (writeback cache) and locks.
pub const INIT_FLAGS: u32 = f::ASYNC_READ
    | f::ATOMIC_O_TRUNC
    | f::BIG_WRITES
    | f::DO_READDIRPLUS
    | f::READDIRPLUS_AUTO
    | f::ASYNC_DIO
    | f::PARALLEL_DIROPS
    | f::MAX_PAGES;

impl FuseClient {
    /// Connects, reads (and checks) the configuration space; no `FUSE_INIT` yet.
    pub fn connect(path: &Path, opts: &FsOptions) -> Result<Self, FsError> {
        let (mut dev, config) = super::connect_device(path, opts)?;
        let slot = super::Slots::new(&mut dev.mem, 1, opts.max_payload)?.get(0);
        Ok(FuseClient {
            dev,
            config,
            init: None,
            queue: 1,
            timeout: Duration::from_secs(10),
            slot,
            max_payload: opts.max_payload,
            unique: 1,
        })
    }

    /// Connects and sends `FUSE_INIT`.
    pub fn connect_init(path: &Path, opts: &FsOptions) -> Result<Self, FsError> {
        let mut c = Self::connect(path, opts)?;
        c.fuse_init()?;
        Ok(c)
    }

    /// The synchronous slot (conformance checks build raw chains in it).
    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// A fresh request id.
    pub fn next_unique(&mut self) -> u64 {
        self.unique += 1;
        self.unique
    }

    /// Largest READ/WRITE the client's slot holds, bounded by the server's `max_write`.
    pub fn max_io(&self) -> usize {
        let mw = self.init.map_or(4096, |i| i.max_write as usize);
        self.max_payload.min(mw.max(4096))
    }

    /// Waits until queue `q` returns `head`; returns the used length.
    pub fn wait(&mut self, q: usize, head: u16, what: &'static str) -> Result<u32, FsError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let Device { mem, queues, .. } = &mut self.dev;
            if let Some((id, len)) = queues[q].pop_used(mem)? {
                if id != head {
                    return Err(QueueError::BadUsedId(u32::from(id)).into());
                }
                return Ok(len);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FsError::Timeout {
                    op: what,
                    timeout: self.timeout,
                });
            }
            queues[q].wait_call(left.min(Duration::from_millis(100)))?;
        }
    }

    /// Sends one request and returns the reply body.
    pub fn call(
        &mut self,
        opcode: u32,
        nodeid: u64,
        args: &[&[u8]],
        reply_len: u32,
    ) -> Result<Vec<u8>, FsError> {
        let unique = self.next_unique();
        let req = Request {
            opcode,
            nodeid,
            unique,
            args,
            reply_len: Some(reply_len),
        };
        let q = self.queue;
        let head = {
            let Device { mem, queues, .. } = &mut self.dev;
            let h = post(mem, &mut queues[q], self.slot, &req)?;
            queues[q].kick()?;
            h
        };
        let used = self.wait(q, head, op::name(opcode))?;
        let n = complete(&self.dev.mem, self.slot, opcode, unique, used)?;
        if n > reply_len {
            return Err(FsError::BadReply {
                op: op::name(opcode),
                what: format!("{n}-byte reply for {reply_len} bytes of room"),
            });
        }
        let mut body = vec![0u8; n as usize];
        self.dev.mem.read(self.slot.reply + 16, &mut body)?;
        Ok(body)
    }

    fn call_obj<T: ByteValued + Default>(
        &mut self,
        opcode: u32,
        nodeid: u64,
        args: &[&[u8]],
    ) -> Result<T, FsError> {
        let n = std::mem::size_of::<T>() as u32;
        let body = self.call(opcode, nodeid, args, n)?;
        abi::decode(&body).ok_or_else(|| FsError::BadReply {
            op: op::name(opcode),
            what: format!("{}-byte reply, expected {n}", body.len()),
        })
    }

    /// `FUSE_INIT` (7.38 offered, 7.31 or later required).
    pub fn fuse_init(&mut self) -> Result<abi::InitOut, FsError> {
        let i = abi::InitIn {
            major: abi::FUSE_KERNEL_VERSION,
            minor: abi::FUSE_KERNEL_MINOR_VERSION,
            max_readahead: 128 << 10,
            flags: INIT_FLAGS,
            ..Default::default()
        };
        let out: abi::InitOut = self.call_obj(op::INIT, 0, &[i.as_slice()])?;
        let bad = |what: String| FsError::BadReply { op: "INIT", what };
        if out.major != abi::FUSE_KERNEL_VERSION {
            return Err(bad(format!("major version {}", out.major)));
        }
        if out.minor < abi::FUSE_MIN_MINOR_VERSION {
            return Err(bad(format!(
                "minor version {} (7.{} or later needed)",
                out.minor,
                abi::FUSE_MIN_MINOR_VERSION
            )));
        }
        self.init = Some(out);
        Ok(out)
    }

    /// `FUSE_LOOKUP`.
    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<abi::EntryOut, FsError> {
        self.call_obj(op::LOOKUP, parent, &[&name_arg(name)])
    }

    /// `FUSE_GETATTR`.
    pub fn getattr(&mut self, nodeid: u64) -> Result<abi::AttrOut, FsError> {
        let a = abi::GetattrIn::default();
        self.call_obj(op::GETATTR, nodeid, &[a.as_slice()])
    }

    /// `FUSE_MKDIR`.
    pub fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<abi::EntryOut, FsError> {
        let a = abi::MkdirIn { mode, umask: 0o022 };
        self.call_obj(op::MKDIR, parent, &[a.as_slice(), &name_arg(name)])
    }

    /// `FUSE_CREATE` (O_CREAT | O_EXCL added to `flags`).
    pub fn create(
        &mut self,
        parent: u64,
        name: &str,
        flags: u32,
        mode: u32,
    ) -> Result<(abi::EntryOut, abi::OpenOut), FsError> {
        let a = abi::CreateIn {
            flags: flags | (libc::O_CREAT | libc::O_EXCL) as u32,
            mode: libc::S_IFREG | mode,
            umask: 0o022,
            open_flags: 0,
        };
        let body = self.call(op::CREATE, parent, &[a.as_slice(), &name_arg(name)], 144)?;
        match (abi::decode(&body), body.get(128..).and_then(abi::decode)) {
            (Some(e), Some(o)) => Ok((e, o)),
            _ => Err(FsError::BadReply {
                op: "CREATE",
                what: format!("{}-byte reply, expected 144", body.len()),
            }),
        }
    }

    /// `FUSE_OPEN`.
    pub fn open(&mut self, nodeid: u64, flags: u32) -> Result<abi::OpenOut, FsError> {
        let a = abi::OpenIn {
            flags,
            open_flags: 0,
        };
        self.call_obj(op::OPEN, nodeid, &[a.as_slice()])
    }

    /// `FUSE_READ`.
    pub fn read(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError> {
        let a = abi::ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        self.call(op::READ, nodeid, &[a.as_slice()], size)
    }

    /// `FUSE_WRITE`; returns the bytes written.
    pub fn write(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<u32, FsError> {
        let a = abi::WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            ..Default::default()
        };
        let w: abi::WriteOut = self.call_obj(op::WRITE, nodeid, &[a.as_slice(), data])?;
        Ok(w.size)
    }

    /// Writes all of `data` at `offset` in chunks of [`Self::max_io`].
    pub fn write_all(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), FsError> {
        let chunk = self.max_io();
        let mut done = 0;
        while done < data.len() {
            let end = (done + chunk).min(data.len());
            let n = self.write(nodeid, fh, offset + done as u64, &data[done..end])?;
            if n == 0 {
                return Err(FsError::BadReply {
                    op: "WRITE",
                    what: "0 bytes written".into(),
                });
            }
            done += n as usize;
        }
        Ok(())
    }

    /// `FUSE_FLUSH`.
    pub fn flush(&mut self, nodeid: u64, fh: u64) -> Result<(), FsError> {
        let a = abi::FlushIn {
            fh,
            ..Default::default()
        };
        self.call(op::FLUSH, nodeid, &[a.as_slice()], 0).map(drop)
    }

    /// `FUSE_FSYNC`.
    pub fn fsync(&mut self, nodeid: u64, fh: u64) -> Result<(), FsError> {
        let a = abi::FsyncIn {
            fh,
            ..Default::default()
        };
        self.call(op::FSYNC, nodeid, &[a.as_slice()], 0).map(drop)
    }

    /// `FUSE_RELEASE` (or `FUSE_RELEASEDIR` with `dir`).
    pub fn release(&mut self, nodeid: u64, fh: u64, dir: bool) -> Result<(), FsError> {
        let a = abi::ReleaseIn {
            fh,
            ..Default::default()
        };
        let opc = if dir { op::RELEASEDIR } else { op::RELEASE };
        self.call(opc, nodeid, &[a.as_slice()], 0).map(drop)
    }

    /// `FUSE_UNLINK`.
    pub fn unlink(&mut self, parent: u64, name: &str) -> Result<(), FsError> {
        self.call(op::UNLINK, parent, &[&name_arg(name)], 0)
            .map(drop)
    }

    /// `FUSE_RMDIR`.
    pub fn rmdir(&mut self, parent: u64, name: &str) -> Result<(), FsError> {
        self.call(op::RMDIR, parent, &[&name_arg(name)], 0)
            .map(drop)
    }

    /// `FUSE_SYMLINK`: `name` in `parent`, pointing to `target` (any bytes but NUL).
    pub fn symlink(
        &mut self,
        parent: u64,
        name: &str,
        target: &str,
    ) -> Result<abi::EntryOut, FsError> {
        self.call_obj(op::SYMLINK, parent, &[&name_arg(name), &name_arg(target)])
    }

    /// `FUSE_READLINK`: the link's target.
    pub fn readlink(&mut self, nodeid: u64) -> Result<Vec<u8>, FsError> {
        self.call(op::READLINK, nodeid, &[], 4096)
    }

    /// `FUSE_RENAME` (`flags == 0`) or `FUSE_RENAME2` (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
    pub fn rename(
        &mut self,
        parent: u64,
        name: &str,
        newdir: u64,
        newname: &str,
        flags: u32,
    ) -> Result<(), FsError> {
        let (old, new) = (name_arg(name), name_arg(newname));
        if flags == 0 {
            let a = newdir.to_le_bytes();
            self.call(op::RENAME, parent, &[&a, &old, &new], 0)
                .map(drop)
        } else {
            let mut a = newdir.to_le_bytes().to_vec();
            a.extend_from_slice(&flags.to_le_bytes());
            a.extend_from_slice(&0u32.to_le_bytes());
            self.call(op::RENAME2, parent, &[&a, &old, &new], 0)
                .map(drop)
        }
    }

    /// `FUSE_LINK`: a hard link `newname` in `newparent` to inode `oldnodeid`.
    pub fn link(
        &mut self,
        oldnodeid: u64,
        newparent: u64,
        newname: &str,
    ) -> Result<abi::EntryOut, FsError> {
        let a = oldnodeid.to_le_bytes();
        self.call_obj(op::LINK, newparent, &[&a, &name_arg(newname)])
    }

    /// `FUSE_STATFS`.
    pub fn statfs(&mut self, nodeid: u64) -> Result<abi::StatfsOut, FsError> {
        self.call_obj(op::STATFS, nodeid, &[])
    }

    /// `FUSE_OPENDIR`.
    pub fn opendir(&mut self, nodeid: u64) -> Result<abi::OpenOut, FsError> {
        let a = abi::OpenIn::default();
        self.call_obj(op::OPENDIR, nodeid, &[a.as_slice()])
    }

    /// `FUSE_READDIR` or `FUSE_READDIRPLUS` (`plus`) of up to `size` bytes from `offset`.
    pub fn readdir(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    ) -> Result<Vec<DirEntry>, FsError> {
        let a = abi::ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        let opc = if plus { op::READDIRPLUS } else { op::READDIR };
        let body = self.call(opc, nodeid, &[a.as_slice()], size)?;
        parse_dirents(&body, plus).map_err(|what| FsError::BadReply {
            op: op::name(opc),
            what,
        })
    }

    /// Lists a whole directory (OPENDIR, READDIR(PLUS) until empty, RELEASEDIR). With `plus`,
    /// every returned entry with a node id holds a lookup count the caller must FORGET.
    pub fn list_dir(&mut self, nodeid: u64, plus: bool) -> Result<Vec<DirEntry>, FsError> {
        let fh = self.opendir(nodeid)?.fh;
        let mut all = Vec::new();
        let mut off = 0;
        let r = loop {
            match self.readdir(nodeid, fh, off, 8192, plus) {
                Ok(v) if v.is_empty() => break Ok(()),
                Ok(v) => {
                    off = v.last().map_or(off, |e| e.off);
                    all.extend(v);
                }
                Err(e) => break Err(e),
            }
            if all.len() > 1_000_000 {
                break Err(FsError::BadReply {
                    op: "READDIR",
                    what: "directory listing does not end".into(),
                });
            }
        };
        let rel = self.release(nodeid, fh, true);
        r.and(rel)?;
        Ok(all)
    }

    /// `FUSE_FORGET` on the hiprio queue (no reply; waits for the chain to be returned).
    pub fn forget(&mut self, nodeid: u64, nlookup: u64) -> Result<(), FsError> {
        let unique = self.next_unique();
        let a = abi::ForgetIn { nlookup };
        let req = Request {
            opcode: op::FORGET,
            nodeid,
            unique,
            args: &[a.as_slice()],
            reply_len: None,
        };
        let head = {
            let Device { mem, queues, .. } = &mut self.dev;
            let h = post(mem, &mut queues[0], self.slot, &req)?;
            queues[0].kick()?;
            h
        };
        self.wait(0, head, "FORGET").map(drop)
    }
}

/// Parses a READDIR / READDIRPLUS reply body.
pub fn parse_dirents(mut b: &[u8], plus: bool) -> Result<Vec<DirEntry>, String> {
    let mut v = Vec::new();
    while !b.is_empty() {
        let (entry, rest) = if plus {
            let e: abi::EntryOut =
                abi::decode(b).ok_or_else(|| format!("truncated entry ({} bytes)", b.len()))?;
            (Some(e), &b[128..])
        } else {
            (None, b)
        };
        let d: abi::Dirent =
            abi::decode(rest).ok_or_else(|| format!("truncated dirent ({} bytes)", rest.len()))?;
        let name_end = 24 + d.namelen as usize;
        let name = rest
            .get(24..name_end)
            .ok_or_else(|| format!("name of {} bytes overruns the reply", d.namelen))?;
        let rec = name_end.next_multiple_of(8);
        v.push(DirEntry {
            name: String::from_utf8_lossy(name).into_owned(),
            ino: d.ino,
            off: d.off,
            typ: d.typ,
            entry,
        });
        let consumed = rec + if plus { 128 } else { 0 };
        b = b.get(consumed..).unwrap_or(&[]);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirents() {
        let mut b = Vec::new();
        for (i, name) in ["a", "long-name"].iter().enumerate() {
            let d = abi::Dirent {
                ino: 10 + i as u64,
                off: i as u64 + 1,
                namelen: name.len() as u32,
                typ: 8,
            };
            b.extend_from_slice(d.as_slice());
            b.extend_from_slice(name.as_bytes());
            b.resize(b.len().next_multiple_of(8), 0);
        }
        let v = parse_dirents(&b, false).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[1].name.as_str(), v[1].ino, v[1].off),
            ("long-name", 11, 2)
        );
        assert!(parse_dirents(&b[..40], false).is_err());
        assert!(parse_dirents(&b[..20], false).is_err());
        let mut p = abi::EntryOut {
            nodeid: 5,
            ..Default::default()
        }
        .as_slice()
        .to_vec();
        p.extend_from_slice(&b[..32]);
        let v = parse_dirents(&p, true).unwrap();
        assert_eq!(v[0].entry.map(|e| e.nodeid), Some(5));
        assert_eq!(v[0].name, "a");
    }
}
