//! The persistent resume table of `rqemu-fs --state-file`: which node ids and handle ids the
//! guest holds, kept in a file mapped `MAP_SHARED` so that every store lands in the page cache
//! at once and survives a SIGKILL of the daemon (no syscall per update).
//!
//! Layout (native endian, fixed; the file is sized once, sparse, when opened):
//!
//! * header (4 KiB): magic, version, the share's root `(dev, ino)`, the guest's INIT
//!   capabilities (valid flag + bits), the slot counts, the next guest node id;
//! * [`NODE_SLOTS`] node slots of [`NODE_SLOT`] bytes: `state` (0 free, 1 or 2: which of the
//!   two bodies is current), `nlookup`, then two bodies `{node, parent, dev, ino, name_len,
//!   name[256]}`. A new slot's body is written before its `state`; a path change writes the
//!   *other* body and then flips `state`, so a crash mid-update leaves the old or the new
//!   path, never a torn one. `nlookup` is one aligned 8-byte store;
//! * [`HANDLE_SLOTS`] handle slots `{state, guest handle, node, open flags, kind}`, `state`
//!   stored last;
//! * [`REPLY_SLOTS`] reply records of [`REPLY_SLOT`] bytes, written in ring order
//!   ([`crate::replay`]): `state` (0 free, else the record's sequence number + 1), the
//!   request's `unique`, `opcode | len << 32`, then the reply's bytes (at most [`REPLY_MAX`]).
//!   `state` is zeroed before the body is rewritten and stored last.
//!
//! A full table is not an error for the guest: the node or handle is served but not recorded
//! (it becomes stale after a restart), and a warning is logged once.
//!
//! All writers hold the [`crate::resume`] tracker's lock; the reader is the next daemon.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const MAGIC: u64 = u64::from_le_bytes(*b"RQFSRES1");
const VERSION: u64 = 3;
const HEADER: usize = 4096;
/// Node slots in the table.
pub const NODE_SLOTS: usize = 65536;
/// Handle slots in the table.
pub const HANDLE_SLOTS: usize = 16384;
/// Bytes per node slot.
pub const NODE_SLOT: usize = 640;
const BODY: usize = 304;
const HANDLE_SLOT: usize = 32;
/// Reply records (a ring; at a kill, at most one done-but-unpublished request per queue).
pub const REPLY_SLOTS: usize = 8192;
/// Bytes per reply record.
pub const REPLY_SLOT: usize = 256;
/// Longest reply kept (`fuse_out_header` + `entry_out` + `open_out` is 160 bytes).
pub const REPLY_MAX: usize = REPLY_SLOT - 32;
/// Longest name kept (a Linux file name is at most 255 bytes).
pub const NAME_MAX: usize = 255;
/// How long [`StateFile::open`] waits for another holder of the lock to go.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const LEN: usize =
    HEADER + NODE_SLOTS * NODE_SLOT + HANDLE_SLOTS * HANDLE_SLOT + REPLY_SLOTS * REPLY_SLOT;

// Header offsets.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_ROOT_DEV: usize = 16;
const H_ROOT_INO: usize = 24;
const H_INIT_VALID: usize = 32;
const H_INIT_FLAGS: usize = 40;
const H_NODES: usize = 48;
const H_HANDLES: usize = 56;
const H_NEXT_NODE: usize = 64;
const H_REPLIES: usize = 72;

/// Errors of the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Opening, sizing or mapping the file failed.
    #[error("state file {path}: {what}")]
    Io {
        path: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// Another daemon holds the file's lock.
    #[error("state file {0} is in use by another rqemu-fs (flock)")]
    Locked(String),
}

/// A node as saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRec {
    /// Slot index.
    pub slot: u32,
    /// The guest's node id.
    pub node: u64,
    /// The parent node id of the name below.
    pub parent: u64,
    /// Host device and inode number.
    pub dev: u64,
    /// Host inode number.
    pub ino: u64,
    /// The name in `parent`.
    pub name: Vec<u8>,
    /// The guest's lookup count.
    pub nlookup: u64,
}

/// What a handle is open on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleKind {
    /// OPEN / CREATE.
    File = 1,
    /// OPENDIR.
    Dir = 2,
}

/// A handle as saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandleRec {
    /// Slot index.
    pub slot: u32,
    /// The guest's handle id.
    pub handle: u64,
    /// The node it is open on.
    pub node: u64,
    /// The open flags the guest gave.
    pub flags: u32,
    /// File or directory.
    pub kind: HandleKind,
}

/// A reply record as saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyRec {
    /// Its sequence number (ring order).
    pub seq: u64,
    /// The request's `unique`.
    pub unique: u64,
    /// The request's opcode.
    pub opcode: u32,
    /// The reply as sent: `fuse_out_header` and body.
    pub reply: Vec<u8>,
}

/// What [`StateFile::open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A table of this share: the caller resumes it.
    Resumable,
    /// No file, an empty one, or one of another share/version/layout: started empty.
    Fresh(&'static str),
}

/// The mapped state file.
pub struct StateFile {
    file: File,
    base: *mut u8,
    path: String,
    found: Found,
}

// SAFETY: the mapping is plain shared memory; all mutation goes through `&self` methods whose
// callers serialise writers (the resume tracker's mutex), and readers tolerate concurrent
// stores (atomics for the `state` words).
unsafe impl Send for StateFile {}
// SAFETY: as above.
unsafe impl Sync for StateFile {}

impl std::fmt::Debug for StateFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateFile")
            .field("path", &self.path)
            .field("found", &self.found)
            .finish_non_exhaustive()
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        // SAFETY: `base` is the mapping of `LEN` bytes made in `open`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), LEN) };
    }
}

impl StateFile {
    /// Opens (creating it) and locks the state file for the share `root` (must run before
    /// confinement: the path is out of reach afterwards). A table of another share, version
    /// or layout, or a new file, is cleared ([`Found::Fresh`]).
    pub fn open(path: &Path, root: &Path) -> Result<Self, StateError> {
        let p = path.display().to_string();
        let io = |what: &'static str| {
            let p = path.display().to_string();
            move |source| StateError::Io {
                path: p,
                what,
                source,
            }
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(io("opening"))?;
        // A SIGKILLed predecessor's sandboxed child may hold the lock a moment longer (it
        // dies with its parent): wait for it a little, then refuse.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io("locking")(e));
            }
            if std::time::Instant::now() >= deadline {
                return Err(StateError::Locked(p));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let root_meta = std::fs::metadata(root).map_err(io("stat of the shared directory"))?;
        let size = file.metadata().map_err(io("stat"))?.len();
        let mut found = Found::Fresh("a new state file");
        if size == LEN as u64 {
            found = Found::Resumable;
        } else if size != 0 {
            found = Found::Fresh("a state file of another layout");
        }
        if found == Found::Fresh("a state file of another layout") {
            file.set_len(0).map_err(io("clearing"))?;
        }
        file.set_len(LEN as u64).map_err(io("sizing"))?;
        // SAFETY: a new shared mapping of the whole (just sized) file; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io("mapping")(io::Error::last_os_error()));
        }
        let mut s = StateFile {
            file,
            base: base.cast(),
            path: p,
            found,
        };
        if s.found == Found::Resumable {
            let (magic, version) = (s.word(H_MAGIC).load(Ordering::Acquire), s.get(H_VERSION));
            if magic != MAGIC || version != VERSION {
                s.found = Found::Fresh("a state file of another version");
            } else if (s.get(H_ROOT_DEV), s.get(H_ROOT_INO)) != (root_meta.dev(), root_meta.ino()) {
                s.found = Found::Fresh("a state file of another shared directory");
            } else if s.get(H_NODES) != NODE_SLOTS as u64
                || s.get(H_HANDLES) != HANDLE_SLOTS as u64
                || s.get(H_REPLIES) != REPLY_SLOTS as u64
            {
                s.found = Found::Fresh("a state file of another layout");
            }
        }
        if s.found != Found::Resumable {
            s.file.set_len(0).map_err(io("clearing"))?;
            s.file.set_len(LEN as u64).map_err(io("sizing"))?;
            s.set(H_VERSION, VERSION);
            s.set(H_ROOT_DEV, root_meta.dev());
            s.set(H_ROOT_INO, root_meta.ino());
            s.set(H_NODES, NODE_SLOTS as u64);
            s.set(H_HANDLES, HANDLE_SLOTS as u64);
            s.set(H_REPLIES, REPLY_SLOTS as u64);
            s.word(H_MAGIC).store(MAGIC, Ordering::Release);
        }
        Ok(s)
    }

    /// Whether a table was found to resume.
    pub fn found(&self) -> Found {
        self.found
    }

    /// The file's path (for logs).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The open file (kept open through confinement).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off + 8 <= LEN);
        // SAFETY: `off` is 8-aligned and inside the mapping (all callers use constant or
        // slot-derived offsets below `LEN`); the mapping lives as long as `self`.
        unsafe { &*self.base.add(off).cast::<AtomicU64>() }
    }

    fn get(&self, off: usize) -> u64 {
        self.word(off).load(Ordering::Relaxed)
    }

    fn set(&self, off: usize, v: u64) {
        self.word(off).store(v, Ordering::Relaxed)
    }

    /// The guest's INIT capabilities, if a session was negotiated.
    pub fn init_flags(&self) -> Option<u64> {
        (self.word(H_INIT_VALID).load(Ordering::Acquire) == 1).then(|| self.get(H_INIT_FLAGS))
    }

    /// Records the guest's INIT capabilities (`None`: no session).
    pub fn set_init_flags(&self, flags: Option<u64>) {
        self.word(H_INIT_VALID).store(0, Ordering::Release);
        if let Some(f) = flags {
            self.set(H_INIT_FLAGS, f);
            self.word(H_INIT_VALID).store(1, Ordering::Release);
        }
    }

    /// The next guest node id to give (never one given before in this session).
    pub fn next_node(&self) -> u64 {
        self.word(H_NEXT_NODE).load(Ordering::Acquire)
    }

    /// Records the next guest node id to give.
    pub fn set_next_node(&self, n: u64) {
        self.word(H_NEXT_NODE).store(n, Ordering::Release)
    }

    fn node_off(slot: u32) -> usize {
        HEADER + slot as usize * NODE_SLOT
    }

    fn body_off(slot: u32, which: u64) -> usize {
        Self::node_off(slot) + 16 + if which == 2 { BODY } else { 0 }
    }

    fn write_body(&self, off: usize, node: u64, parent: u64, dev: u64, ino: u64, name: &[u8]) {
        let name = &name[..name.len().min(NAME_MAX)];
        self.set(off, node);
        self.set(off + 8, parent);
        self.set(off + 16, dev);
        self.set(off + 24, ino);
        self.set(off + 32, name.len() as u64);
        // SAFETY: the name area (256 bytes at off + 40) is inside the body and the mapping;
        // `name` is at most 255 bytes and does not overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(name.as_ptr(), self.base.add(off + 40), name.len())
        };
    }

    /// Fills free slot `slot` with a node and makes it live (body first, `state` last).
    #[allow(clippy::too_many_arguments)]
    pub fn put_node(
        &self,
        slot: u32,
        node: u64,
        parent: u64,
        dev: u64,
        ino: u64,
        name: &[u8],
        nlookup: u64,
    ) {
        if slot as usize >= NODE_SLOTS {
            return;
        }
        self.write_body(Self::body_off(slot, 1), node, parent, dev, ino, name);
        self.set(Self::node_off(slot) + 8, nlookup);
        self.word(Self::node_off(slot)).store(1, Ordering::Release);
    }

    /// Whether live slot `slot` already names `(parent, name)`.
    pub fn node_path_is(&self, slot: u32, parent: u64, name: &[u8]) -> bool {
        let Some(rec) = self.read_node(slot) else {
            return false;
        };
        rec.parent == parent && rec.name == name
    }

    /// Moves live slot `slot` to `(parent, name)`: the other body, then the `state` flip.
    pub fn move_node(&self, slot: u32, parent: u64, name: &[u8]) {
        let Some(rec) = self.read_node(slot) else {
            return;
        };
        let cur = self.word(Self::node_off(slot)).load(Ordering::Acquire);
        let next = if cur == 1 { 2 } else { 1 };
        self.write_body(
            Self::body_off(slot, next),
            rec.node,
            parent,
            rec.dev,
            rec.ino,
            name,
        );
        self.word(Self::node_off(slot))
            .store(next, Ordering::Release);
    }

    /// Stores a live node's lookup count.
    pub fn set_nlookup(&self, slot: u32, n: u64) {
        if (slot as usize) < NODE_SLOTS {
            self.word(Self::node_off(slot) + 8)
                .store(n, Ordering::Release);
        }
    }

    /// Frees a node slot.
    pub fn free_node(&self, slot: u32) {
        if (slot as usize) < NODE_SLOTS {
            self.word(Self::node_off(slot)).store(0, Ordering::Release);
        }
    }

    /// The live node in `slot`, if any (a `state` other than 1 or 2 is not live).
    pub fn read_node(&self, slot: u32) -> Option<NodeRec> {
        if slot as usize >= NODE_SLOTS {
            return None;
        }
        let which = self.word(Self::node_off(slot)).load(Ordering::Acquire);
        if which != 1 && which != 2 {
            return None;
        }
        let off = Self::body_off(slot, which);
        let len = usize::try_from(self.get(off + 32)).ok()?;
        if len == 0 || len > NAME_MAX {
            return None;
        }
        let mut name = vec![0u8; len];
        // SAFETY: `len` ≤ 255 bytes of the name area inside the mapping, into our buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(off + 40), name.as_mut_ptr(), len) };
        Some(NodeRec {
            slot,
            node: self.get(off),
            parent: self.get(off + 8),
            dev: self.get(off + 16),
            ino: self.get(off + 24),
            name,
            nlookup: self.get(Self::node_off(slot) + 8),
        })
    }

    /// Every live node.
    pub fn live_nodes(&self) -> Vec<NodeRec> {
        (0..NODE_SLOTS as u32)
            .filter_map(|s| self.read_node(s))
            .collect()
    }

    fn handle_off(slot: u32) -> usize {
        HEADER + NODE_SLOTS * NODE_SLOT + slot as usize * HANDLE_SLOT
    }

    /// Fills free handle slot `slot` and makes it live (`state` last).
    pub fn put_handle(&self, slot: u32, handle: u64, node: u64, flags: u32, kind: HandleKind) {
        if slot as usize >= HANDLE_SLOTS {
            return;
        }
        let off = Self::handle_off(slot);
        self.set(off + 8, handle);
        self.set(off + 16, node);
        self.set(off + 24, u64::from(flags) | (kind as u64) << 32);
        self.word(off).store(1, Ordering::Release);
    }

    /// Frees a handle slot.
    pub fn free_handle(&self, slot: u32) {
        if (slot as usize) < HANDLE_SLOTS {
            self.word(Self::handle_off(slot))
                .store(0, Ordering::Release);
        }
    }

    /// Every live handle.
    pub fn live_handles(&self) -> Vec<HandleRec> {
        (0..HANDLE_SLOTS as u32)
            .filter_map(|slot| {
                let off = Self::handle_off(slot);
                if self.word(off).load(Ordering::Acquire) != 1 {
                    return None;
                }
                let fk = self.get(off + 24);
                let kind = match fk >> 32 {
                    1 => HandleKind::File,
                    2 => HandleKind::Dir,
                    _ => return None,
                };
                Some(HandleRec {
                    slot,
                    handle: self.get(off + 8),
                    node: self.get(off + 16),
                    flags: fk as u32,
                    kind,
                })
            })
            .collect()
    }

    fn reply_off(slot: usize) -> usize {
        HEADER + NODE_SLOTS * NODE_SLOT + HANDLE_SLOTS * HANDLE_SLOT + slot * REPLY_SLOT
    }

    /// Writes reply record `seq` (slot `seq % REPLY_SLOTS`): `state` zeroed, the body, then
    /// `state` = `seq + 1`. A reply longer than [`REPLY_MAX`] is not kept (false).
    pub fn put_reply(&self, seq: u64, unique: u64, opcode: u32, reply: &[u8]) -> bool {
        if reply.len() > REPLY_MAX {
            return false;
        }
        let off = Self::reply_off((seq % REPLY_SLOTS as u64) as usize);
        self.word(off).store(0, Ordering::Release);
        self.set(off + 8, unique);
        self.set(off + 16, u64::from(opcode) | (reply.len() as u64) << 32);
        // SAFETY: at most REPLY_MAX bytes into the record's data area (off + 32) inside the
        // mapping; `reply` does not overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(reply.as_ptr(), self.base.add(off + 32), reply.len())
        };
        self.word(off).store(seq + 1, Ordering::Release);
        true
    }

    /// Every live reply record.
    pub fn live_replies(&self) -> Vec<ReplyRec> {
        (0..REPLY_SLOTS)
            .filter_map(|slot| {
                let off = Self::reply_off(slot);
                let st = self.word(off).load(Ordering::Acquire);
                if st == 0 || (st - 1) % REPLY_SLOTS as u64 != slot as u64 {
                    return None;
                }
                let ol = self.get(off + 16);
                let len = usize::try_from(ol >> 32).ok().filter(|&l| l <= REPLY_MAX)?;
                let mut reply = vec![0u8; len];
                // SAFETY: `len` ≤ REPLY_MAX bytes of the record's data area, into our buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(self.base.add(off + 32), reply.as_mut_ptr(), len)
                };
                Some(ReplyRec {
                    seq: st - 1,
                    unique: self.get(off + 8),
                    opcode: ol as u32,
                    reply,
                })
            })
            .collect()
    }

    /// Frees every reply record (only the live ones are written: the rest stays sparse).
    pub fn clear_replies(&self) {
        for slot in 0..REPLY_SLOTS {
            let w = self.word(Self::reply_off(slot));
            if w.load(Ordering::Relaxed) != 0 {
                w.store(0, Ordering::Release);
            }
        }
    }

    /// Test hook: a crash in the middle of [`StateFile::move_node`] (the other body half
    /// written, `state` not yet flipped).
    #[cfg(test)]
    pub(crate) fn torn_move(&self, slot: u32, parent: u64, name: &[u8]) {
        let cur = self.word(Self::node_off(slot)).load(Ordering::Acquire);
        let next = if cur == 1 { 2 } else { 1 };
        let off = Self::body_off(slot, next);
        self.set(off + 8, parent);
        self.set(off + 32, name.len() as u64);
    }

    /// Test hook: raw `state` word of a node slot.
    #[cfg(test)]
    pub(crate) fn set_node_state(&self, slot: u32, v: u64) {
        self.word(Self::node_off(slot)).store(v, Ordering::Release);
    }
}
