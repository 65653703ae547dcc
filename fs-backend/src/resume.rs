//! Resuming the guest's FUSE state in a restarted `rqemu-fs` (`--state-file`, issue #14).
//!
//! The guest keeps using the node ids and handle ids a killed daemon gave it (it does not
//! send `INIT` again), so the restarted daemon must answer for them:
//!
//! * **node ids** need no translation: with a state file the passthrough runs with
//!   `use_host_ino`, so a node id is a function of the host file (`dev` index << 47 | `ino`).
//!   The [`Tracker`] records, per live node id, a path `(parent node, name)`, the host
//!   `(dev, ino)` and the guest's lookup count in the [`StateFile`]. A restarted daemon walks
//!   each saved path from the root through the passthrough's `LOOKUP` and checks it finds the
//!   very node id (the same host file) again; the guest's lookup count beyond the one lookup
//!   made is kept as a *debt* that later `FORGET`s pay before reaching the passthrough;
//! * **handle ids** are the passthrough's counter, which restarts at 1: the guest sees
//!   `passthrough handle + base`, where `base` is above every handle the guest held when the
//!   daemon restarted; those old handles are reopened (saved flags minus
//!   `O_CREAT|O_EXCL|O_TRUNC`) and mapped in a small table consulted only for ids ≤ `base`;
//! * a node that cannot be found again (unlinked, replaced or moved on the host while nobody
//!   told us) is **stale**: every request on it gets `ESTALE`, as does a handle that could not
//!   be reopened — that file only, the rest of the mount works.
//!
//! Without a state file nothing is tracked and ids pass through unchanged.

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use fuse_backend_rs::abi::fuse_abi::{FsOptions, ROOT_ID};
use fuse_backend_rs::api::filesystem::{Context, Entry, FileSystem};

use crate::confined_fs::ConfinedFs;
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
}

#[derive(Debug, Default)]
struct Tables {
    nodes: HashMap<u64, Node>,
    free_nodes: Vec<u32>,
    next_node: u32,
    /// Guest handle → slot.
    handles: HashMap<u64, Option<u32>>,
    free_handles: Vec<u32>,
    next_handle: u32,
}

impl Tables {
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
    stale: RwLock<HashSet<u64>>,
    any_stale: AtomicBool,
    full_warned: AtomicBool,
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
            tables: Mutex::new(Tables::default()),
            base: AtomicU64::new(0),
            restored: RwLock::new(HashMap::new()),
            stale: RwLock::new(HashSet::new()),
            any_stale: AtomicBool::new(false),
            full_warned: AtomicBool::new(false),
        }
    }

    /// The state file.
    pub fn state(&self) -> &StateFile {
        &self.state
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

    /// `ESTALE` for a node the restart could not find again.
    #[inline]
    pub fn check(&self, node: u64) -> io::Result<()> {
        if self.any_stale.load(Ordering::Relaxed)
            && self
                .stale
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&node)
        {
            return Err(estale());
        }
        Ok(())
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

    /// A reply names `entry` under `(parent, name)`: one more lookup of it by the guest.
    pub fn entry(&self, parent: u64, name: &[u8], entry: &Entry) {
        let id = entry.inode;
        if id == ROOT_ID || id == 0 {
            return;
        }
        let mut t = self.tables();
        if let Some(n) = t.nodes.get_mut(&id) {
            n.nlookup += 1;
            let n = *n;
            if let Some(slot) = n.slot {
                self.state.set_nlookup(slot, n.nlookup);
                if !is_dot(name) && !self.state.node_path_is(slot, parent, name) {
                    self.state.move_node(slot, parent, name);
                }
            }
        } else {
            let slot = t.node_slot();
            t.nodes.insert(
                id,
                Node {
                    slot,
                    nlookup: 1,
                    debt: 0,
                },
            );
            match slot {
                Some(s) => self.state.put_node(
                    s,
                    id,
                    parent,
                    entry.attr.st_dev,
                    entry.attr.st_ino,
                    name,
                    1,
                ),
                None => self.warn_full("node"),
            }
        }
        drop(t);
        if self.any_stale.load(Ordering::Relaxed) {
            // The passthrough answers for this id again: it is the same host file.
            self.stale
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
    }

    /// The guest forgets `count` lookups of `node`: how many to forward to the passthrough.
    pub fn forget(&self, node: u64, count: u64) -> u64 {
        let mut t = self.tables();
        let Some(n) = t.nodes.get_mut(&node) else {
            return count;
        };
        let paid = count.min(n.debt);
        n.debt -= paid;
        n.nlookup = n.nlookup.saturating_sub(count);
        let n = *n;
        if n.nlookup == 0 {
            t.nodes.remove(&node);
            if let Some(s) = n.slot {
                t.free_nodes.push(s);
                self.state.free_node(s);
            }
            drop(t);
            if self.any_stale.load(Ordering::Relaxed) {
                self.stale
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&node);
            }
        } else if let Some(s) = n.slot {
            self.state.set_nlookup(s, n.nlookup);
        }
        count - paid
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

    /// Node `node` (if held) is now at `(parent, name)` (after a RENAME).
    pub fn moved(&self, node: u64, parent: u64, name: &[u8]) {
        let t = self.tables();
        if let Some(s) = t.nodes.get(&node).and_then(|n| n.slot) {
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
        *t = Tables::default();
        self.state.set_init_flags(init);
        drop(t);
        self.restored
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.stale
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.any_stale.store(false, Ordering::Relaxed);
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
        let mut t = Tables::default();
        let mut used = vec![false; NODE_SLOTS];
        for rec in self.state.live_nodes() {
            if rec.node == ROOT_ID || saved.contains_key(&rec.node) {
                self.state.free_node(rec.slot);
                continue;
            }
            used[rec.slot as usize] = true;
            saved.insert(rec.node, rec);
        }
        let mut found: HashMap<u64, bool> = HashMap::new();
        let ids: Vec<u64> = saved.keys().copied().collect();
        for id in ids {
            resolve(fs, &ctx, &saved, &mut found, id, 0);
        }
        let mut out = Resumed::default();
        let mut stale = HashSet::new();
        for (id, rec) in &saved {
            let ok = found.get(id).copied().unwrap_or(false);
            let nlookup = rec.nlookup.max(1);
            t.nodes.insert(
                *id,
                Node {
                    slot: Some(rec.slot),
                    nlookup,
                    // The passthrough holds one lookup of a found node, none of a stale one.
                    debt: if ok { nlookup - 1 } else { nlookup },
                },
            );
            if ok {
                out.nodes += 1;
            } else {
                out.stale_nodes += 1;
                stale.insert(*id);
            }
        }
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
            let node_ok = h.node == ROOT_ID || found.get(&h.node).copied().unwrap_or(false);
            let flags = h.flags & !((libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC) as u32);
            let inner = if !node_ok {
                None
            } else if h.kind == HandleKind::Dir {
                fs.opendir(&ctx, h.node, flags).ok().and_then(|r| r.0)
            } else {
                fs.open(&ctx, h.node, flags, 0).ok().and_then(|r| r.0)
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
        self.any_stale.store(!stale.is_empty(), Ordering::Relaxed);
        *self.stale.write().unwrap_or_else(|p| p.into_inner()) = stale;
        *self.tables() = t;
        Some(out)
    }
}

/// Finds saved node `id` again (its parent first); `found[id]` says whether it is the same
/// host file. Cycles and over-deep paths are stale.
fn resolve(
    fs: &ConfinedFs,
    ctx: &Context,
    saved: &HashMap<u64, crate::state::NodeRec>,
    found: &mut HashMap<u64, bool>,
    id: u64,
    depth: usize,
) -> bool {
    if id == ROOT_ID {
        return true;
    }
    if let Some(&ok) = found.get(&id) {
        return ok;
    }
    let Some(rec) = saved.get(&id) else {
        return false;
    };
    if depth > 4096 {
        return false;
    }
    // Mark while resolving: a cycle ends here as stale.
    found.insert(id, false);
    if !resolve(fs, ctx, saved, found, rec.parent, depth + 1) {
        return false;
    }
    let mut name = rec.name.clone();
    name.push(0);
    let Ok(cname) = CStr::from_bytes_with_nul(&name) else {
        return false;
    };
    let ok = match fs.lookup(ctx, rec.parent, cname) {
        Ok(e) if e.inode == id && e.attr.st_ino == rec.ino && e.attr.st_dev == rec.dev => true,
        Ok(e) => {
            fs.forget(ctx, e.inode, 1);
            false
        }
        Err(_) => false,
    };
    found.insert(id, ok);
    ok
}
