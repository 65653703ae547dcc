//! Tests of the resume table ([`crate::state`]) and of a daemon "restart" resuming a guest
//! session through it ([`crate::resume`], [`crate::resume_fs`]): the first server is dropped
//! (its mapping and lock go, as at a SIGKILL) and a second one over the same file answers for
//! the first one's node and handle ids.

use std::ffi::CStr;
use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{FsOptions, ROOT_ID};
use fuse_backend_rs::api::filesystem::{Context, FileSystem};
use fuse_backend_rs::passthrough::PassthroughFs;

use crate::confined_fs::ConfinedFs;
use crate::resume::{Resumed, Tracker};
use crate::resume_fs::ResumeFs;
use crate::state::{Found, HandleKind, StateError, StateFile};
use crate::{passthrough, FsParams};

struct Served {
    fs: ResumeFs,
    confined: Arc<ConfinedFs>,
    tracker: Arc<Tracker>,
}

/// A server with a state file over `root` (not confined: the host path is served).
fn served(root: &Path, state: &Path) -> Served {
    let st = StateFile::open(state, root).unwrap();
    let cfg = passthrough::config(&FsParams::default(), root.to_str().unwrap());
    let pt = Arc::new(PassthroughFs::new(cfg).unwrap());
    let tracker = Arc::new(Tracker::new(st));
    let confined = Arc::new(ConfinedFs::new(pt, false));
    Served {
        fs: ResumeFs::new(confined.clone(), Some(tracker.clone())),
        confined,
        tracker,
    }
}

impl Served {
    fn resume(&self) -> Option<Resumed> {
        self.tracker.resume(&self.confined)
    }

    fn lookup(&self, parent: u64, name: &CStr) -> u64 {
        self.fs.lookup(&Context::new(), parent, name).unwrap().inode
    }

    fn open(&self, node: u64, flags: i32) -> u64 {
        let (h, _, _) = self
            .fs
            .open(&Context::new(), node, flags as u32, 0)
            .unwrap();
        h.unwrap()
    }

    /// The file size through handle `h` (`lseek(SEEK_END)` on the handle's own fd).
    fn size_via(&self, node: u64, h: u64) -> std::io::Result<u64> {
        self.fs
            .lseek(&Context::new(), node, h, 0, libc::SEEK_END as u32)
    }

    fn errno_of_getattr(&self, node: u64) -> Option<i32> {
        self.fs
            .getattr(&Context::new(), node, None)
            .err()
            .and_then(|e| e.raw_os_error())
    }
}

fn tree() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("share");
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::write(root.join("d/f"), b"0123456789").unwrap();
    std::fs::write(root.join("d/g"), b"gg").unwrap();
    std::fs::write(root.join("d/h"), b"hhh").unwrap();
    let state = t.path().join("fs.state");
    (t, root, state)
}

#[test]
fn table_round_trip_and_lock() {
    let (_t, root, state) = tree();
    let s = StateFile::open(&state, &root).unwrap();
    assert_eq!(s.found(), Found::Fresh("a new state file"));
    // A second daemon on the same file is refused while the first holds it.
    assert!(matches!(
        StateFile::open(&state, &root),
        Err(StateError::Locked(_))
    ));
    s.set_init_flags(Some(0x1234));
    s.put_node(3, 77, ROOT_ID, 5, 6, b"name", 2);
    s.put_handle(9, 40, 77, libc::O_RDWR as u32, HandleKind::File);
    s.put_handle(10, 41, 77, 0, HandleKind::Dir);
    s.free_handle(10);
    drop(s);
    let s = StateFile::open(&state, &root).unwrap();
    assert_eq!(s.found(), Found::Resumable);
    assert_eq!(s.init_flags(), Some(0x1234));
    let nodes = s.live_nodes();
    assert_eq!(nodes.len(), 1);
    let n = &nodes[0];
    assert_eq!(
        (
            n.slot,
            n.node,
            n.parent,
            n.dev,
            n.ino,
            &n.name[..],
            n.nlookup
        ),
        (3, 77, ROOT_ID, 5, 6, &b"name"[..], 2)
    );
    let hs = s.live_handles();
    assert_eq!(hs.len(), 1);
    assert_eq!(
        (hs[0].handle, hs[0].node, hs[0].flags, hs[0].kind),
        (40, 77, libc::O_RDWR as u32, HandleKind::File)
    );
    drop(s);
    // The same file for another shared directory starts empty.
    let other = tempfile::tempdir().unwrap();
    let s = StateFile::open(&state, other.path()).unwrap();
    assert_eq!(
        s.found(),
        Found::Fresh("a state file of another shared directory")
    );
    assert!(s.live_nodes().is_empty());
    assert_eq!(s.init_flags(), None);
}

#[test]
fn torn_slot_updates_leave_the_old_or_the_new_path() {
    let (_t, root, state) = tree();
    let s = StateFile::open(&state, &root).unwrap();
    s.put_node(0, 10, ROOT_ID, 1, 2, b"old", 1);
    // A crash in the middle of a move: the half-written body is not the current one.
    s.torn_move(0, 99, b"a-much-longer-new-name");
    assert_eq!(s.read_node(0).unwrap().name, b"old");
    assert_eq!(s.read_node(0).unwrap().parent, ROOT_ID);
    // A complete move (twice: both bodies are used in turn).
    s.move_node(0, 11, b"new");
    assert_eq!(
        (s.read_node(0).unwrap().parent, s.read_node(0).unwrap().name),
        (11, b"new".to_vec())
    );
    s.move_node(0, 12, b"newer");
    let r = s.read_node(0).unwrap();
    assert_eq!((r.node, r.parent, r.dev, r.ino), (10, 12, 1, 2));
    assert_eq!(r.name, b"newer");
    // A garbage state word is not a live slot; nor is a slot whose body was never finished.
    s.set_node_state(0, 7);
    assert!(s.read_node(0).is_none());
    assert!(s.read_node(1).is_none());
}

#[test]
fn a_restarted_server_resumes_nodes_and_handles() {
    let (_t, root, state) = tree();
    let ctx = Context::new();
    let a = served(&root, &state);
    a.fs.init(FsOptions::empty()).unwrap();
    let d = a.lookup(ROOT_ID, c"d");
    let f = a.lookup(d, c"f");
    assert_eq!(a.lookup(d, c"f"), f);
    let h = a.open(f, libc::O_RDWR);
    let (dh, _) = a.fs.opendir(&ctx, d, 0).unwrap();
    let dh = dh.unwrap();
    assert_eq!(a.size_via(f, h).unwrap(), 10);
    // The guest's ids stay valid past the restart: no new lookup, no new open.
    drop(a);
    let b = served(&root, &state);
    assert_eq!(
        b.resume(),
        Some(Resumed {
            nodes: 2,
            stale_nodes: 0,
            handles: 2,
            stale_handles: 0,
            replies: 0
        })
    );
    assert_eq!(b.size_via(f, h).unwrap(), 10);
    assert!(b.fs.getattr(&ctx, d, Some(dh)).is_ok());
    // New handles do not collide with the resumed ones.
    let h2 = b.open(f, libc::O_RDONLY);
    assert!(h2 > h.max(dh), "{h2} after {h} and {dh}");
    b.fs.release(&ctx, f, 0, h2, false, false, None).unwrap();
    assert_eq!(b.size_via(f, h).unwrap(), 10);
    // f was looked up twice: the first FORGET keeps it, the second drops it.
    b.fs.forget(&ctx, f, 1);
    assert!(b.errno_of_getattr(f).is_none());
    b.fs.release(&ctx, f, 0, h, false, false, None).unwrap();
    b.fs.forget(&ctx, f, 1);
    assert_eq!(b.errno_of_getattr(f), Some(libc::ESTALE));
    // A second restart resumes what is left (d and its directory handle).
    drop(b);
    let c = served(&root, &state);
    let r = c.resume().unwrap();
    assert_eq!((r.nodes, r.handles), (1, 1));
    assert!(c.fs.getattr(&ctx, d, Some(dh)).is_ok());
    // A new INIT (guest rebooted) forgets the session.
    c.fs.init(FsOptions::empty()).unwrap();
    drop(c);
    let e = served(&root, &state);
    assert_eq!(e.resume(), Some(Resumed::default()));
}

#[test]
fn renames_are_followed_and_vanished_files_are_stale() {
    let (_t, root, state) = tree();
    let ctx = Context::new();
    let a = served(&root, &state);
    a.fs.init(FsOptions::empty()).unwrap();
    let d = a.lookup(ROOT_ID, c"d");
    let g = a.lookup(d, c"g");
    let f = a.lookup(d, c"f");
    let hf = a.lookup(d, c"h");
    let gh = a.open(g, libc::O_RDONLY);
    let hh = a.open(hf, libc::O_RDONLY);
    // The guest renames g out of d, and f over... nothing: f and h stay.
    a.fs.rename(&ctx, d, c"g", ROOT_ID, c"g2", 0).unwrap();
    drop(a);
    // While the daemon is down the host removes h.
    std::fs::remove_file(root.join("d/h")).unwrap();
    let b = served(&root, &state);
    assert_eq!(
        b.resume(),
        Some(Resumed {
            nodes: 3,
            stale_nodes: 1,
            handles: 1,
            stale_handles: 1,
            replies: 0
        })
    );
    // g is found at its new name, with its handle.
    assert_eq!(b.size_via(g, gh).unwrap(), 2);
    // h's requests fail cleanly, the others work.
    assert_eq!(b.errno_of_getattr(hf), Some(libc::ESTALE));
    let e = b.size_via(hf, hh).err().and_then(|e| e.raw_os_error());
    assert_eq!(e, Some(libc::ESTALE));
    assert!(b.errno_of_getattr(f).is_none());
    // New files (one may well get h's freed inode number) are new nodes; h stays stale.
    let mut fresh = Vec::new();
    for i in 0..8 {
        let name = std::ffi::CString::new(format!("n{i}")).unwrap();
        let (e, h, _, _) =
            b.fs.create(
                &ctx,
                d,
                &name,
                fuse_backend_rs::abi::fuse_abi::CreateIn {
                    flags: libc::O_RDWR as u32,
                    mode: 0o644,
                    umask: 0,
                    fuse_flags: 0,
                },
            )
            .unwrap();
        assert_ne!(e.inode, hf);
        assert!(![hh, gh].contains(&h.unwrap()));
        fresh.push(e.inode);
    }
    assert_eq!(b.errno_of_getattr(hf), Some(libc::ESTALE));
    // The guest lets go of the stale node; a file made again at that name is a new node.
    b.fs.release(&ctx, hf, 0, hh, false, false, None).ok();
    b.fs.forget(&ctx, hf, 1);
    std::fs::write(root.join("d/h"), b"new").unwrap();
    let again = b.lookup(d, c"h");
    assert!(b.errno_of_getattr(again).is_none());
    assert!(!fresh.contains(&again) && again != hf);
}

#[test]
fn a_host_replaced_file_is_stale() {
    let (_t, root, state) = tree();
    let a = served(&root, &state);
    a.fs.init(FsOptions::empty()).unwrap();
    let d = a.lookup(ROOT_ID, c"d");
    let f = a.lookup(d, c"f");
    // Keep the old inode alive so the new file cannot reuse its number.
    let _old = std::fs::File::open(root.join("d/f")).unwrap();
    drop(a);
    std::fs::remove_file(root.join("d/f")).unwrap();
    std::fs::write(root.join("d/f"), b"other").unwrap();
    let b = served(&root, &state);
    let r = b.resume().unwrap();
    assert_eq!((r.nodes, r.stale_nodes), (1, 1));
    assert_eq!(b.errno_of_getattr(f), Some(libc::ESTALE));
    assert!(b.errno_of_getattr(d).is_none());
}
