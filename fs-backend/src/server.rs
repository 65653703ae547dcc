//! The FUSE server over virtio descriptor chains: fuse-backend-rs's [`Server`] dispatching to
//! its [`PassthroughFs`] (wrapped in [`ConfinedFs`]), with rqemu's parameters.
//!
//! Two opcodes are served here before the dispatcher sees them:
//!
//! * `FUSE_SETLKW`: a lock that is free is taken at once; one that conflicts is handed to a
//!   waiter thread ([`Locks::wait_in_background`]) and the chain is answered later through
//!   the [`UsedRing`] — the worker goes on serving its queue, where the conflicting unlock may
//!   arrive. (fuse-backend-rs 0.14 would also route `SETLKW` to the non-blocking `setlk`.)
//! * `FUSE_COPY_FILE_RANGE`: not dispatched by fuse-backend-rs 0.14 at all
//!   ([`crate::copy_range`]).

use std::io;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    CopyFileRangeIn, InHeader, LkIn, Opcode, OutHeader, WriteOut,
};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::PassthroughFs;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};

use crate::config::FsParams;
use crate::confined_fs::ConfinedFs;
use crate::copy_range::Handles;
use crate::locks::{is_conflict, LockRequest, Locks};
use crate::passthrough::{self, Passthrough};
use crate::replay;
use crate::resume::{Resumed, Tracker};
use crate::resume_fs::ResumeFs;
use crate::state::StateFile;

/// Errors of the FUSE server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Creating the passthrough filesystem failed (`/proc/self/fd` not openable, ...).
    #[error("creating the passthrough filesystem")]
    Create(#[source] io::Error),
    /// The shared root could not be opened.
    #[error("opening the shared directory")]
    Import(#[source] io::Error),
    /// The root path is not UTF-8 (fuse-backend-rs takes a `String`).
    #[error("the shared directory path must be UTF-8")]
    NonUtf8Root,
    /// The descriptor chain does not describe guest memory.
    #[error("descriptor chain: {0}")]
    Chain(fuse_backend_rs::transport::Error),
    /// Decoding or answering the FUSE request failed.
    #[error("FUSE request: {0}")]
    Request(fuse_backend_rs::Error),
}

/// The virtqueue a chain came from, for requests answered after
/// [`FsServer::process_chain`] returned ([`Outcome::Deferred`]). Called from another thread.
pub trait UsedRing: Clone + Send + Sync + 'static {
    /// Whether the queue still runs (false once the frontend stopped it: a deferred request
    /// is then dropped, never answered into a re-initialised ring).
    fn is_running(&self) -> bool;
    /// Puts chain `head` on the used ring with `len` bytes written, and notifies the driver
    /// if it wants to be.
    fn complete(&self, head: u16, len: u32);
}

/// What became of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered: put it on the used ring with this many bytes written.
    Used(u32),
    /// Kept: it will be answered through the [`UsedRing`] (or dropped with its session).
    Deferred,
}

/// A virtio-fs server for one shared directory.
pub struct FsServer {
    fs: Arc<Passthrough>,
    server: Server<ResumeFs>,
    confined: Arc<ConfinedFs>,
    locks: Arc<Locks>,
    handles: Arc<Handles>,
    tracker: Option<Arc<Tracker>>,
    readonly: bool,
    /// Test hook ([`FsServer::exit_after_saved_reply`]): an opcode, 0 for none.
    exit_after: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for FsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsServer").finish_non_exhaustive()
    }
}

impl FsServer {
    /// Creates the server for `root` (`/` once `rqemu_sandbox::namespaces::pivot_into_dir` has made the shared
    /// directory the root). This opens `/proc/self/fd` and `/proc/self/mountinfo`, so it must
    /// run *before* confinement; `root` itself is opened at the guest's `FUSE_INIT`.
    pub fn new(params: &FsParams, root: &Path) -> Result<Self, ServerError> {
        Self::with_state(params, root, None)
    }

    /// [`FsServer::new`] keeping the guest's nodes and handles in `state` (`--state-file`),
    /// so that a restarted daemon can resume them ([`FsServer::resume`]).
    pub fn with_state(
        params: &FsParams,
        root: &Path,
        state: Option<StateFile>,
    ) -> Result<Self, ServerError> {
        let root = root.to_str().ok_or(ServerError::NonUtf8Root)?;
        let cfg = passthrough::config(params, root);
        let fs = Arc::new(PassthroughFs::new(cfg).map_err(ServerError::Create)?);
        let locks = Arc::new(Locks::new(fs.clone()));
        let handles = Arc::new(Handles::new(fs.clone()));
        let tracker = state.map(|s| Arc::new(Tracker::new(s)));
        let confined = Arc::new(ConfinedFs::with_tables(
            fs.clone(),
            params.xattr_config(),
            locks.clone(),
            handles.clone(),
        ));
        let server = Server::new(ResumeFs::new(confined.clone(), tracker.clone()));
        Ok(FsServer {
            server,
            confined,
            fs,
            locks,
            handles,
            tracker,
            readonly: params.readonly,
            exit_after: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// Whether the guest's state is kept in a state file.
    pub fn keeps_state(&self) -> bool {
        self.tracker.is_some()
    }

    /// Resumes the guest session a previous daemon left in the state file (after
    /// [`FsServer::import`], inside the confinement): `None` without a state file or when it
    /// held no session (logged either way).
    pub fn resume(&self) -> Option<Resumed> {
        let t = self.tracker.as_ref()?;
        match t.resume(&self.confined) {
            Some(r) => {
                tracing::info!(
                    "state file {}: resumed the guest session: {} node(s) found again, {} \
                     stale; {} handle(s) reopened, {} stale; {} reply record(s) kept",
                    t.state().path(),
                    r.nodes,
                    r.stale_nodes,
                    r.handles,
                    r.stale_handles,
                    r.replies
                );
                Some(r)
            }
            None => {
                tracing::info!(
                    "state file {}: no guest session to resume ({}); starting empty",
                    t.state().path(),
                    match t.state().found() {
                        crate::state::Found::Fresh(why) => why,
                        crate::state::Found::Resumable => "no INIT was saved",
                    }
                );
                None
            }
        }
    }

    /// Test hook (end-to-end tests of [`crate::replay`]): the process exits (`_exit`, like a
    /// kill) right after the first request of `opcode` was executed and its reply saved,
    /// before the reply is published to the used ring.
    pub fn exit_after_saved_reply(&self, opcode: u32) {
        self.exit_after
            .store(opcode, std::sync::atomic::Ordering::Relaxed);
    }

    /// Opens the root now (FUSE_INIT does it too): checks the shared directory is usable.
    pub fn import(&self) -> Result<(), ServerError> {
        self.fs.import().map_err(ServerError::Import)
    }

    /// The filesystem (tests drive it directly).
    pub fn passthrough(&self) -> &Arc<Passthrough> {
        &self.fs
    }

    /// The lock table (tests and diagnostics).
    pub fn locks(&self) -> &Arc<Locks> {
        &self.locks
    }

    /// Forgets every inode, handle and lock of a frontend that went away (as on
    /// `FUSE_DESTROY`; its waiting `SETLKW` requests end unanswered), so the next guest starts
    /// from a clean table.
    pub fn reset(&self) {
        self.locks.reset();
        self.handles.clear();
        if let Some(t) = &self.tracker {
            t.clear(None);
        }
        self.fs.destroy();
    }

    /// Serves one request chain. Usually answered at once ([`Outcome::Used`] with the number
    /// of bytes written to its device-writable part); a `SETLKW` that has to wait is
    /// [`Outcome::Deferred`] and answered later through `ring`. Guest-controlled: never
    /// panics on a malformed chain.
    pub fn process_chain<M, R>(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<M>,
        ring: &R,
    ) -> Result<Outcome, ServerError>
    where
        M: Deref<Target = GuestMemoryMmap> + Clone,
        R: UsedRing,
    {
        let reader =
            Reader::from_descriptor_chain::<M>(mem, chain.clone()).map_err(ServerError::Chain)?;
        let mut body = reader.clone();
        let header = body.read_obj::<InHeader>().ok();
        if let Some(h) = header {
            if h.opcode == Opcode::Setlkw as u32 || h.opcode == Opcode::CopyFileRange as u32 {
                let reply = ReplyTo::new(mem, &chain, h.unique);
                if h.opcode == Opcode::CopyFileRange as u32 {
                    let r = body
                        .read_obj::<CopyFileRangeIn>()
                        .map_err(|_| errno(libc::EINVAL))
                        .and_then(|a| self.translate(a))
                        .and_then(|a| {
                            let node = self.inner_node(h.nodeid)?;
                            self.handles.copy_file_range(node, &a, self.readonly)
                        });
                    tracing::debug!("COPY_FILE_RANGE from inode {}: {r:?}", h.nodeid);
                    return Ok(Outcome::Used(match r {
                        Ok(size) => reply.write(Ok(WriteOut { size, padding: 0 }.as_slice())),
                        Err(e) => reply.write(Err(e)),
                    }));
                }
                let lk = body.read_obj::<LkIn>();
                let node = match self.inner_node(h.nodeid) {
                    Ok(n) => n,
                    Err(e) => return Ok(Outcome::Used(reply.write(Err(e)))),
                };
                return Ok(self.setlkw(node, lk, reply, ring));
            }
        }
        // A non-idempotent request is answered once: from the previous daemon's saved reply
        // when it is popped again after a restart, else executed and its reply saved.
        let recorded = match (&self.tracker, header) {
            (Some(t), Some(h)) if replay::is_recorded(h.opcode) => Some((t, h)),
            _ => None,
        };
        let writable = recorded.map(|_| ReplyTo::new(mem, &chain, 0).writable);
        if let (Some((t, h)), Some(w)) = (recorded, &writable) {
            if let Some(saved) = t.saved_reply(h.unique, h.opcode) {
                tracing::info!(
                    "request {} (opcode {}) popped again after a restart: answered with the \
                     reply the previous daemon saved",
                    h.unique,
                    h.opcode
                );
                return Ok(Outcome::Used(replay::write_to(mem, w, &saved)));
            }
        }
        let writer = VirtioFsWriter::new::<M>(mem, chain).map_err(ServerError::Chain)?;
        let n = self
            .server
            .handle_message(reader, writer.into(), None, None)
            .map_err(ServerError::Request)?;
        if let (Some((t, h)), Some(w)) = (recorded, &writable) {
            if let Some(sent) = replay::read_from(mem, w, n) {
                t.save_reply(h.unique, h.opcode, &sent);
                if self.exit_after.load(std::sync::atomic::Ordering::Relaxed) == h.opcode {
                    tracing::warn!(
                        "request {} (opcode {}) done and its reply saved: exiting before \
                         publishing it (test hook)",
                        h.unique,
                        h.opcode
                    );
                    // SAFETY: ends the process at once, as a SIGKILL would (no destructors;
                    // the state file's stores are in the page cache already).
                    unsafe { libc::_exit(137) };
                }
            }
        }
        Ok(Outcome::Used(u32::try_from(n).unwrap_or(u32::MAX)))
    }

    /// COPY_FILE_RANGE's handles and output node as the passthrough knows them.
    fn translate(&self, mut a: CopyFileRangeIn) -> io::Result<CopyFileRangeIn> {
        if let Some(t) = &self.tracker {
            a.fh_in = t.to_inner(a.fh_in)?;
            a.fh_out = t.to_inner(a.fh_out)?;
            a.nodeid_out = t.inner_node(a.nodeid_out)?;
        }
        Ok(a)
    }

    /// The passthrough's id for a guest node id.
    fn inner_node(&self, node: u64) -> io::Result<u64> {
        match &self.tracker {
            Some(t) => t.inner_node(node),
            None => Ok(node),
        }
    }

    fn setlkw<R: UsedRing>(
        &self,
        inode: u64,
        lk: io::Result<LkIn>,
        reply: ReplyTo,
        ring: &R,
    ) -> Outcome {
        let req = lk.map_err(|_| errno(libc::EINVAL)).and_then(|lk| {
            LockRequest::new(
                inode,
                lk.owner,
                lk.lk.start,
                lk.lk.end,
                lk.lk.type_,
                lk.lk_flags,
            )
        });
        let req = match req {
            Ok(req) => req,
            Err(e) => return Outcome::Used(reply.write(Err(e))),
        };
        let generation = self.locks.generation();
        match self.locks.setlk(&req, generation) {
            Err(e) if is_conflict(&e) => {}
            r => return Outcome::Used(reply.write(r.map(|()| &[][..]))),
        }
        let (alive, done) = (ring.clone(), ring.clone());
        let head = reply.head;
        let refused = reply.clone();
        let parked = self.locks.wait_in_background(
            req,
            generation,
            move || alive.is_running(),
            move |r| {
                let n = reply.write(r.map(|()| &[][..]));
                done.complete(head, n);
            },
        );
        match parked {
            Ok(()) => {
                tracing::debug!("SETLKW inode {inode}: conflict, waiting off the queue");
                Outcome::Deferred
            }
            Err(e) => Outcome::Used(refused.write(Err(e))),
        }
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// Where a reply goes: the device-writable descriptors of a chain (kept by value, so a
/// deferred answer outlives the chain).
#[derive(Debug, Clone)]
struct ReplyTo {
    mem: GuestMemoryMmap,
    head: u16,
    unique: u64,
    writable: Vec<(GuestAddress, u32)>,
}

impl ReplyTo {
    fn new<M>(mem: &GuestMemoryMmap, chain: &DescriptorChain<M>, unique: u64) -> Self
    where
        M: Deref<Target = GuestMemoryMmap> + Clone,
    {
        ReplyTo {
            mem: mem.clone(),
            head: chain.head_index(),
            unique,
            writable: chain
                .clone()
                .writable()
                .map(|d| (d.addr(), d.len()))
                .collect(),
        }
    }

    /// Writes `fuse_out_header` + `body` (or the header with `-errno`); returns the bytes
    /// written (less than the reply if the guest gave too little room).
    fn write(&self, r: io::Result<&[u8]>) -> u32 {
        let (error, body) = match r {
            Ok(body) => (0, body),
            Err(e) => (-e.raw_os_error().unwrap_or(libc::EIO), &[][..]),
        };
        let len = std::mem::size_of::<OutHeader>() + body.len();
        let header = OutHeader {
            len: u32::try_from(len).unwrap_or(u32::MAX),
            error,
            unique: self.unique,
        };
        let mut bytes = header.as_slice().to_vec();
        bytes.extend_from_slice(body);
        replay::write_to(&self.mem, &self.writable, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use fuse_backend_rs::abi::fuse_abi::ROOT_ID;
    use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions};

    use super::*;
    use crate::confine;

    fn lookup_ino(fs: &Passthrough, parent: u64, name: &CStr) -> io::Result<(u64, u64)> {
        let e = fs.lookup(&Context::new(), parent, name)?;
        Ok((e.inode, e.attr.st_ino))
    }

    /// The rename race: the guest holds directory `d`, then `d` is moved out of the shared
    /// directory (host side) and the guest looks up `..` from it. Returns whether `secret`
    /// (next to the shared dir) was then found.
    fn rename_race(confined: bool) -> bool {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let shared = outside.path().join("shared");
        std::fs::create_dir_all(shared.join("d")).unwrap();
        let (looked_up, wait_lookup) = std::sync::mpsc::channel::<()>();
        let (moved, wait_move) = std::sync::mpsc::channel::<()>();
        let guest = std::thread::spawn(move || {
            let root = if confined {
                Path::new("/")
            } else {
                shared.as_path()
            };
            let srv = FsServer::new(&FsParams::default(), root).unwrap();
            if confined {
                confine::enter(&shared, false).unwrap();
            }
            let fs = srv.passthrough();
            fs.init(FsOptions::empty()).unwrap();
            // `..` at the root is the root itself.
            assert_eq!(lookup_ino(fs, ROOT_ID, c"..").unwrap().0, ROOT_ID);
            let (d, _) = lookup_ino(fs, ROOT_ID, c"d").unwrap();
            // The host moves `d` out (in its own view: the test thread, not confined).
            looked_up.send(()).unwrap();
            wait_move.recv().unwrap();
            let Ok((parent, _)) = lookup_ino(fs, d, c"..") else {
                return false;
            };
            lookup_ino(fs, parent, c"secret").is_ok()
        });
        wait_lookup.recv().unwrap();
        std::fs::rename(outside.path().join("shared/d"), outside.path().join("d")).unwrap();
        moved.send(()).unwrap();
        guest.join().unwrap()
    }

    /// Without confinement the rename race reaches outside files: the hole
    /// the pivot into the share closes (and why the daemon always confines).
    #[test]
    fn unconfined_rename_race_escapes() {
        assert!(
            rename_race(false),
            "expected the unconfined passthrough to escape"
        );
    }

    #[test]
    fn confined_rename_race_stays_inside() {
        assert!(confine::is_root(), "this test needs root (pivot_root)");
        assert!(
            !rename_race(true),
            "a file outside the shared directory was found"
        );
    }

    #[test]
    fn names_with_slashes_are_refused() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        let srv = FsServer::new(&FsParams::default(), t.path()).unwrap();
        srv.passthrough().init(FsOptions::empty()).unwrap();
        assert!(lookup_ino(srv.passthrough(), ROOT_ID, c"d/..").is_err());
        assert!(lookup_ino(srv.passthrough(), ROOT_ID, c"d").is_ok());
    }
}
