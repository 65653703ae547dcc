//! Resuming the guest's FUSE state in a restarted `rqemu-fs` (`--state-file`, issue #14).
//!
//! The guest keeps using the node ids and handle ids a killed daemon gave it (it does not
//! send `INIT` again), so the restarted daemon must answer for them:
//!
//! * **node ids** are ours: the guest sees ids the [`Tracker`] gives (never one given before in
//!   the session: the next id is saved too) mapped to the passthrough's, and records, per live
//!   id, a path `(parent node, name)`, the host `(dev, ino)` and the guest's lookup count in the
//!   [`StateFile`]. A restarted daemon walks each saved path from the root through the
//!   passthrough's `LOOKUP`, checks it finds the same host `(dev, ino)`, and maps the guest's
//!   id to the new passthrough id; the guest's lookup count beyond the one lookup made is a
//!   *debt* that later `FORGET`s pay before reaching the passthrough. (Deriving ids from host
//!   inode numbers instead, fuse-backend-rs's `use_host_ino`, was tried first: a file removed
//!   while the daemon is down frees its inode number, a new file gets it, and the guest's
//!   stale node silently became that new file.)
//! * **handle ids** are the passthrough's counter, which restarts at 1: the guest sees
//!   `passthrough handle + base`, where `base` is above every handle the guest held when the
//!   daemon restarted; those old handles are reopened (saved flags minus
//!   `O_CREAT|O_EXCL|O_TRUNC`) and mapped in a small table consulted only for ids ≤ `base`;
//! * a node that cannot be found again (unlinked, replaced or moved on the host while nobody
//!   told us) is **stale**: every request on it gets `ESTALE`, as does a handle that could not
//!   be reopened — that file only, the rest of the mount works.
//!
//! Without a state file nothing is tracked and ids pass through unchanged.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use fuse_backend_rs::abi::fuse_abi::{FsOptions, ROOT_ID};
use fuse_backend_rs::api::filesystem::{Context, Entry, FileSystem};

use crate::confined_fs::ConfinedFs;
use crate::replay::Replies;
use crate::state::{Found, HandleKind, StateFile, HANDLE_SLOTS, NODE_SLOTS};

/// A node the guest holds.
#[derive(Debug, Clone, Copy)]
struct Node {
    /// Its slot in the state file (`None`: the table was full).
    slot: Option<u32>,
    /// The guest's lookup count.
    nlookup: u64,
    /// Lookups the guest counts but the passthrough does not (restored nodes): paid first by
    /// `FORGET`s.
    debt: u64,
    /// The passthrough's id (`None`: stale, not found again after a restart).
    inner: Option<u64>,
}

#[derive(Debug, Default)]
struct Tables {
    /// Guest node id → node.
    nodes: HashMap<u64, Node>,
    /// Passthrough id → guest node id.
    by_inner: HashMap<u64, u64>,
    /// The next guest node id.
    next_id: u64,
    free_nodes: Vec<u32>,
    next_node: u32,
    /// Guest handle → slot.
    handles: HashMap<u64, Option<u32>>,
    free_handles: Vec<u32>,
    next_handle: u32,
}

impl Tables {
    fn fresh() -> Self {
        Tables {
            next_id: ROOT_ID + 1,
            ..Tables::default()
        }
    }

    fn node_slot(&mut self) -> Option<u32> {
        self.free_nodes.pop().or_else(|| {
            (self.next_node < NODE_SLOTS as u32).then(|| {
                self.next_node += 1;
                self.next_node - 1
            })
        })
    }

    fn handle_slot(&mut self) -> Option<u32> {
        self.free_handles.pop().or_else(|| {
            (self.next_handle < HANDLE_SLOTS as u32).then(|| {
                self.next_handle += 1;
                self.next_handle - 1
            })
        })
    }
}

/// What a restart resumed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    /// Nodes found again.
    pub nodes: usize,
    /// Nodes that could not be (their requests get `ESTALE`).
    pub stale_nodes: usize,
    /// Handles reopened.
    pub handles: usize,
    /// Handles that could not be.
    pub stale_handles: usize,
    /// Replies kept for requests the previous daemon may not have published
    /// ([`crate::replay`]).
    pub replies: usize,
}

/// The node and handle bookkeeping of a server with a state file.
#[derive(Debug)]
pub struct Tracker {
    state: StateFile,
    tables: Mutex<Tables>,
    /// Guest handle = passthrough handle + base.
    base: AtomicU64,
    /// Handles of the previous daemon: guest id → passthrough handle.
    restored: RwLock<HashMap<u64, u64>>,
    full_warned: AtomicBool,
    replies: Replies,
}

fn estale() -> io::Error {
    io::Error::from_raw_os_error(libc::ESTALE)
}

fn is_dot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

impl Tracker {
    /// A tracker over `state` (resumed later by [`Tracker::resume`] if it holds a table).
    pub fn new(state: StateFile) -> Self {
        Tracker {
            state,
            tables: Mutex::new(Tables::fresh()),
            base: AtomicU64::new(0),
            restored: RwLock::new(HashMap::new()),
            full_warned: AtomicBool::new(false),
            replies: Replies::default(),
        }
    }

    /// The state file.
    pub fn state(&self) -> &StateFile {
        &self.state
    }

    /// The request that got `reply` (`unique`, `opcode`: one [`crate::replay::is_recorded`])
    /// was done: keeps the reply for a daemon that pops the request again.
    pub fn save_reply(&self, unique: u64, opcode: u32, reply: &[u8]) {
        self.replies.save(&self.state, unique, opcode, reply)
    }

    /// The reply a previous daemon gave request `unique` of `opcode`, if it kept one.
    pub fn saved_reply(&self, unique: u64, opcode: u32) -> Option<Vec<u8>> {
        self.replies.saved(unique, opcode)
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn warn_full(&self, what: &str) {
        if !self.full_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "state file {}: the {what} table is full; further ones are served but not \
                 saved (stale after a restart)",
                self.state.path()
            );
        }
    }

    /// The passthrough's id for guest node `node` (`ESTALE`: not found again after a restart,
    /// or unknown).
    #[inline]
    pub fn inner_node(&self, node: u64) -> io::Result<u64> {
        if node == ROOT_ID {
            return Ok(ROOT_ID);
        }
        self.tables()
            .nodes
            .get(&node)
            .and_then(|n| n.inner)
            .ok_or_else(estale)
    }

    /// The guest's id for passthrough node `inner`, if the guest holds it.
    pub fn guest_node(&self, inner: u64) -> Option<u64> {
        if inner == ROOT_ID {
            return Some(ROOT_ID);
        }
        self.tables().by_inner.get(&inner).copied()
    }

    /// The passthrough's handle for guest handle `h` (`ESTALE`: an old handle not reopened).
    #[inline]
    pub fn to_inner(&self, h: u64) -> io::Result<u64> {
        let base = self.base.load(Ordering::Relaxed);
        if h == 0 || h > base {
            return Ok(h - base.min(h));
        }
        self.restored
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&h)
            .copied()
            .ok_or_else(estale)
    }

    fn to_guest(&self, h: u64) -> u64 {
        h + self.base.load(Ordering::Relaxed)
    }

    /// A reply names `entry` (the passthrough's) under guest `(parent, name)`: one more lookup
    /// of it by the guest; `entry.inode` becomes the guest's id.
    pub fn entry(&self, parent: u64, name: &[u8], entry: &mut Entry) {
        let inner = entry.inode;
        if inner == ROOT_ID || inner == 0 {
            return;
        }
        let mut t = self.tables();
        if let Some(&g) = t.by_inner.get(&inner) {
            if let Some(n) = t.nodes.get_mut(&g) {
                n.nlookup += 1;
                let n = *n;
                if let Some(slot) = n.slot {
                    self.state.set_nlookup(slot, n.nlookup);
                    if !is_dot(name) && !self.state.node_path_is(slot, parent, name) {
                        self.state.move_node(slot, parent, name);
                    }
                }
                entry.inode = g;
                return;
            }
        }
        let g = t.next_id;
        t.next_id += 1;
        self.state.set_next_node(t.next_id);
        let slot = t.node_slot();
        t.nodes.insert(
            g,
            Node {
                slot,
                nlookup: 1,
                debt: 0,
                inner: Some(inner),
            },
        );
        t.by_inner.insert(inner, g);
        match slot {
            Some(s) => {
                self.state
                    .put_node(s, g, parent, entry.attr.st_dev, entry.attr.st_ino, name, 1)
            }
            None => self.warn_full("node"),
        }
        entry.inode = g;
    }

    /// The guest forgets `count` lookups of `node`: the passthrough's id and how many lookups
    /// to forward to it (`None`: nothing to forward).
    pub fn forget(&self, node: u64, count: u64) -> Option<(u64, u64)> {
        if node == ROOT_ID {
            return None;
        }
        let mut t = self.tables();
        let n = t.nodes.get_mut(&node)?;
        let paid = count.min(n.debt);
        n.debt -= paid;
        n.nlookup = n.nlookup.saturating_sub(count);
        let n = *n;
        if n.nlookup == 0 {
            t.nodes.remove(&node);
            if let Some(i) = n.inner {
                if t.by_inner.get(&i) == Some(&node) {
                    t.by_inner.remove(&i);
                }
            }
            if let Some(s) = n.slot {
                t.free_nodes.push(s);
                self.state.free_node(s);
            }
        } else if let Some(s) = n.slot {
            self.state.set_nlookup(s, n.nlookup);
        }
        let i = n.inner?;
        (count > paid).then_some((i, count - paid))
    }

    /// Takes back an [`Tracker::entry`] the guest never saw (a READDIRPLUS entry that did not
    /// fit; the passthrough takes its own lookup back).
    pub fn undo_entry(&self, node: u64) {
        let mut t = self.tables();
        let Some(n) = t.nodes.get_mut(&node) else {
            return;
        };
        n.nlookup = n.nlookup.saturating_sub(1);
        let n = *n;
        if n.nlookup > 0 {
            if let Some(s) = n.slot {
                self.state.set_nlookup(s, n.nlookup);
            }
            return;
        }
        t.nodes.remove(&node);
        if let Some(i) = n.inner {
            if t.by_inner.get(&i) == Some(&node) {
                t.by_inner.remove(&i);
            }
        }
        if let Some(s) = n.slot {
            t.free_nodes.push(s);
            self.state.free_node(s);
        }
    }

    /// The passthrough opened handle `inner` on `node`: records it, returns the guest's id.
    pub fn opened(&self, inner: u64, node: u64, flags: u32, kind: HandleKind) -> u64 {
        let guest = self.to_guest(inner);
        let mut t = self.tables();
        let slot = t.handle_slot();
        t.handles.insert(guest, slot);
        match slot {
            Some(s) => self.state.put_handle(s, guest, node, flags, kind),
            None => self.warn_full("handle"),
        }
        guest
    }

    /// The guest released handle `guest`.
    pub fn released(&self, guest: u64) {
        let mut t = self.tables();
        if let Some(Some(s)) = t.handles.remove(&guest) {
            t.free_handles.push(s);
            self.state.free_handle(s);
        }
        drop(t);
        if guest <= self.base.load(Ordering::Relaxed) {
            self.restored
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&guest);
        }
    }

    /// Passthrough node `inner` (if the guest holds it) is now at guest `(parent, name)`
    /// (after a RENAME).
    pub fn moved(&self, inner: u64, parent: u64, name: &[u8]) {
        let t = self.tables();
        let slot = t
            .by_inner
            .get(&inner)
            .and_then(|g| t.nodes.get(g))
            .and_then(|n| n.slot);
        if let Some(s) = slot {
            if !self.state.node_path_is(s, parent, name) {
                self.state.move_node(s, parent, name);
            }
        }
    }

    /// Forgets every node and handle (a new guest session, or none: `init = None`).
    pub fn clear(&self, init: Option<u64>) {
        let mut t = self.tables();
        for n in t.nodes.values() {
            if let Some(s) = n.slot {
                self.state.free_node(s);
            }
        }
        for s in t.handles.values().flatten() {
            self.state.free_handle(*s);
        }
        *t = Tables::fresh();
        self.replies.clear(&self.state);
        self.state.set_next_node(t.next_id);
        self.state.set_init_flags(init);
        drop(t);
        self.restored
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Restores the table a previous daemon left (if [`Found::Resumable`]): the saved INIT,
    /// every node found again through `fs`, every handle reopened. `None`: nothing to resume
    /// (a fresh table).
    pub fn resume(&self, fs: &ConfinedFs) -> Option<Resumed> {
        if self.state.found() != Found::Resumable {
            return None;
        }
        let Some(flags) = self.state.init_flags() else {
            self.clear(None);
            return None;
        };
        if let Err(e) = fs.init(FsOptions::from_bits_truncate(flags)) {
            tracing::warn!("resuming: the saved INIT failed ({e}); starting empty");
            self.clear(None);
            return None;
        }
        let ctx = Context::new();
        let mut saved: HashMap<u64, crate::state::NodeRec> = HashMap::new();
        let mut t = Tables::fresh();
        let mut used = vec![false; NODE_SLOTS];
        for rec in self.state.live_nodes() {
            if rec.node == ROOT_ID || saved.contains_key(&rec.node) {
                self.state.free_node(rec.slot);
                continue;
            }
            used[rec.slot as usize] = true;
            saved.insert(rec.node, rec);
        }
        let mut found: HashMap<u64, Option<u64>> = HashMap::new();
        let ids: Vec<u64> = saved.keys().copied().collect();
        for id in ids {
            resolve(fs, &ctx, &saved, &mut found, id, 0);
        }
        let mut out = Resumed::default();
        for (id, rec) in &saved {
            let inner = found.get(id).copied().flatten();
            let nlookup = rec.nlookup.max(1);
            t.nodes.insert(
                *id,
                Node {
                    slot: Some(rec.slot),
                    nlookup,
                    // The passthrough holds one lookup of a found node, none of a stale one.
                    debt: if inner.is_some() {
                        nlookup - 1
                    } else {
                        nlookup
                    },
                    inner,
                },
            );
            match inner {
                Some(i) => {
                    t.by_inner.insert(i, *id);
                    out.nodes += 1;
                }
                None => out.stale_nodes += 1,
            }
        }
        let max_saved = saved.keys().copied().max().unwrap_or(ROOT_ID);
        t.next_id = self.state.next_node().max(max_saved + 1).max(ROOT_ID + 1);
        self.state.set_next_node(t.next_id);
        t.next_node = used.iter().rposition(|&u| u).map_or(0, |i| i as u32 + 1);
        t.free_nodes = (0..t.next_node).filter(|&s| !used[s as usize]).collect();
        // Handles: reopened with the passthrough's next ids; the guest's old ids stay.
        let handles = self.state.live_handles();
        let base = handles.iter().map(|h| h.handle).max().unwrap_or(0);
        let mut restored = HashMap::new();
        let mut hused = vec![false; HANDLE_SLOTS];
        for h in &handles {
            hused[h.slot as usize] = true;
            t.handles.insert(h.handle, Some(h.slot));
            let node = if h.node == ROOT_ID {
                Some(ROOT_ID)
            } else {
                found.get(&h.node).copied().flatten()
            };
            let flags = h.flags & !((libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC) as u32);
            let inner = match node {
                None => None,
                Some(n) if h.kind == HandleKind::Dir => {
                    fs.opendir(&ctx, n, flags).ok().and_then(|r| r.0)
                }
                Some(n) => fs.open(&ctx, n, flags, 0).ok().and_then(|r| r.0),
            };
            match inner {
                Some(i) => {
                    restored.insert(h.handle, i);
                    out.handles += 1;
                }
                None => out.stale_handles += 1,
            }
        }
        t.next_handle = hused.iter().rposition(|&u| u).map_or(0, |i| i as u32 + 1);
        t.free_handles = (0..t.next_handle).filter(|&s| !hused[s as usize]).collect();
        self.base.store(base, Ordering::Relaxed);
        *self.restored.write().unwrap_or_else(|p| p.into_inner()) = restored;
        *self.tables() = t;
        out.replies = self.replies.load(&self.state);
        Some(out)
    }
}

/// Finds saved node `id` again (its parent first): the passthrough's id for it if the walk
/// from the root reaches the same host `(dev, ino)`, else `None` (stale). Cycles and over-deep
/// paths are stale.
fn resolve(
    fs: &ConfinedFs,
    ctx: &Context,
    saved: &HashMap<u64, crate::state::NodeRec>,
    found: &mut HashMap<u64, Option<u64>>,
    id: u64,
    depth: usize,
) -> Option<u64> {
    if id == ROOT_ID {
        return Some(ROOT_ID);
    }
    if let Some(&r) = found.get(&id) {
        return r;
    }
    let rec = saved.get(&id)?;
    if depth > 4096 {
        return None;
    }
    // Marked while resolving: a cycle ends here as stale.
    found.insert(id, None);
    let parent = resolve(fs, ctx, saved, found, rec.parent, depth + 1)?;
    let mut name = rec.name.clone();
    name.push(0);
    let cname = CStr::from_bytes_with_nul(&name).ok()?;
    let r = match fs.lookup(ctx, parent, cname) {
        Ok(e) if e.attr.st_ino == rec.ino && e.attr.st_dev == rec.dev => Some(e.inode),
        Ok(e) => {
            fs.forget(ctx, e.inode, 1);
            None
        }
        Err(_) => None,
    };
    found.insert(id, r);
    r
}
