//! [`crate::replay`]: a non-idempotent request executed by a daemon that dies before
//! publishing its reply, popped again (same `unique`) by a daemon resumed from the same state
//! file, over real descriptor chains ([`FsServer::process_chain`]). Each case also runs with
//! the reply records wiped from the file, and must then fail as before (`EEXIST`/`ENOENT`).

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::state::StateFile;
use crate::tests_chain::{header, init, reply_error, send};
use crate::{FsParams, FsServer};

const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_MKDIR: u32 = 9;
const FUSE_UNLINK: u32 = 10;
const FUSE_RENAME: u32 = 12;
const FUSE_WRITE: u32 = 16;
const FUSE_CREATE: u32 = 35;

struct Guest {
    _t: tempfile::TempDir,
    root: std::path::PathBuf,
    state: std::path::PathBuf,
    mem: GuestMemoryMmap,
}

fn guest() -> Guest {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("share");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("u"), b"unlink me").unwrap();
    std::fs::write(root.join("r"), b"rename me").unwrap();
    let state = t.path().join("fs.state");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    Guest {
        _t: t,
        root,
        state,
        mem,
    }
}

impl Guest {
    fn daemon(&self) -> FsServer {
        let st = StateFile::open(&self.state, &self.root).unwrap();
        FsServer::with_state(&FsParams::default(), &self.root, Some(st)).unwrap()
    }

    /// The first daemon: INIT, then `req` executed; returns it (not yet "published").
    fn first(&self, req: &[u8]) -> (FsServer, Vec<u8>) {
        let a = self.daemon();
        init(&a, &self.mem);
        let (n, reply) = send(&a, &self.mem, req);
        let n = n.unwrap() as usize;
        assert_eq!(reply_error(&reply), 0, "first execution");
        (a, reply[..n].to_vec())
    }

    /// `a` is killed before publishing; the next daemon resumes and pops `req` again.
    /// `wipe`: the reply records are removed from the file first (the pre-replay behaviour).
    fn replay(&self, a: FsServer, req: &[u8], wipe: bool) -> (FsServer, Vec<u8>) {
        drop(a);
        if wipe {
            StateFile::open(&self.state, &self.root)
                .unwrap()
                .clear_replies();
        }
        let b = self.daemon();
        let r = b.resume().unwrap();
        assert_eq!(r.replies > 0, !wipe, "{r:?}");
        let (n, reply) = send(&b, &self.mem, req);
        let n = n.unwrap() as usize;
        (b, reply[..n].to_vec())
    }
}

fn named(opcode: u32, unique: u64, parent: u64, args: &[u8], names: &[&[u8]]) -> Vec<u8> {
    let mut body = args.to_vec();
    for n in names {
        body.extend_from_slice(n);
        body.push(0);
    }
    let mut req = header(body.len(), opcode, unique, parent);
    req.extend_from_slice(&body);
    req
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn getattr_errno(srv: &FsServer, mem: &GuestMemoryMmap, node: u64) -> i32 {
    let req = named(FUSE_GETATTR, 900, node, &[0u8; 16], &[]);
    reply_error(&send(srv, mem, &req).1)
}

/// The guest's one FORGET of `node`: afterwards the node must be gone (its lookup count was
/// exactly one).
fn forget_once_drops(srv: &FsServer, mem: &GuestMemoryMmap, node: u64) -> bool {
    assert_eq!(
        getattr_errno(srv, mem, node),
        0,
        "node {node} before FORGET"
    );
    let req = named(FUSE_FORGET, 901, node, &1u64.to_le_bytes(), &[]);
    send(srv, mem, &req).0.unwrap();
    getattr_errno(srv, mem, node) == -libc::ESTALE
}

fn mkdir_case(wipe: bool) -> i32 {
    let g = guest();
    let mut args = 0o755u32.to_le_bytes().to_vec();
    args.extend_from_slice(&0u32.to_le_bytes());
    let req = named(FUSE_MKDIR, 10, 1, &args, &[b"d"]);
    let (a, first) = g.first(&req);
    let (b, again) = g.replay(a, &req, wipe);
    if wipe {
        return reply_error(&again);
    }
    assert_eq!(again, first, "the saved reply, byte for byte");
    assert!(g.root.join("d").is_dir());
    let node = u64_at(&first, 16);
    assert!(forget_once_drops(&b, &g.mem, node), "lookup count not 1");
    // A new INIT (a new session) drops the records: the same unique is executed again.
    init(&b, &g.mem);
    reply_error(&send(&b, &g.mem, &req).1)
}

#[test]
fn a_replayed_mkdir_gets_the_saved_reply() {
    // After the new INIT the request is a new one: EEXIST, as the host says.
    assert_eq!(mkdir_case(false), -libc::EEXIST);
    assert_eq!(mkdir_case(true), -libc::EEXIST, "without the records");
}

fn create_case(wipe: bool) -> i32 {
    let g = guest();
    let mut args = Vec::new();
    for v in [
        (libc::O_RDWR | libc::O_CREAT | libc::O_EXCL) as u32,
        0o644,
        0,
        0,
    ] {
        args.extend_from_slice(&v.to_le_bytes());
    }
    let req = named(FUSE_CREATE, 11, 1, &args, &[b"f"]);
    let (a, first) = g.first(&req);
    let (b, again) = g.replay(a, &req, wipe);
    if wipe {
        return reply_error(&again);
    }
    assert_eq!(again, first, "the saved reply, byte for byte");
    let (node, fh) = (u64_at(&first, 16), u64_at(&first, 16 + 128));
    // The saved handle id is the resumed handle: a WRITE through it reaches the file.
    let mut w = Vec::new();
    w.extend_from_slice(&fh.to_le_bytes());
    w.extend_from_slice(&0u64.to_le_bytes()); // offset
    w.extend_from_slice(&3u32.to_le_bytes()); // size
    w.extend_from_slice(&[0u8; 4 + 8 + 4 + 4]); // write_flags, lock_owner, flags, padding
    w.extend_from_slice(b"abc");
    let req = named(FUSE_WRITE, 12, node, &w, &[]);
    let (_, reply) = send(&b, &g.mem, &req);
    assert_eq!(reply_error(&reply), 0, "WRITE through the saved handle");
    assert_eq!(std::fs::read(g.root.join("f")).unwrap(), b"abc");
    assert!(forget_once_drops(&b, &g.mem, node), "lookup count not 1");
    0
}

#[test]
fn a_replayed_exclusive_create_gets_the_saved_reply_and_handle() {
    assert_eq!(create_case(false), 0);
    assert_eq!(create_case(true), -libc::EEXIST, "without the records");
}

fn gone_case(req: &[u8], gone: &str, there: Option<&str>, wipe: bool) -> i32 {
    let g = guest();
    let (a, first) = g.first(req);
    let (_b, again) = g.replay(a, req, wipe);
    if wipe {
        return reply_error(&again);
    }
    assert_eq!(again, first, "the saved reply, byte for byte");
    assert!(!g.root.join(gone).exists());
    if let Some(t) = there {
        assert_eq!(std::fs::read(g.root.join(t)).unwrap(), b"rename me");
    }
    reply_error(&again)
}

#[test]
fn a_replayed_unlink_gets_the_saved_reply() {
    let req = named(FUSE_UNLINK, 13, 1, &[], &[b"u"]);
    assert_eq!(gone_case(&req, "u", None, false), 0);
    assert_eq!(gone_case(&req, "u", None, true), -libc::ENOENT);
}

#[test]
fn a_replayed_rename_gets_the_saved_reply() {
    let req = named(FUSE_RENAME, 14, 1, &1u64.to_le_bytes(), &[b"r", b"r2"]);
    assert_eq!(gone_case(&req, "r", Some("r2"), false), 0);
    assert_eq!(gone_case(&req, "r", Some("r2"), true), -libc::ENOENT);
}

#[test]
fn a_record_answers_only_its_own_unique_and_opcode() {
    let g = guest();
    let req = named(FUSE_UNLINK, 15, 1, &[], &[b"u"]);
    let (a, _) = g.first(&req);
    let (b, _) = g.replay(a, &req, false);
    // Another request (another unique) on the same name is executed: ENOENT.
    let other = named(FUSE_UNLINK, 16, 1, &[], &[b"u"]);
    assert_eq!(reply_error(&send(&b, &g.mem, &other).1), -libc::ENOENT);
    // The same unique with another opcode is not answered from the UNLINK's record.
    let rmdir = named(11, 15, 1, &[], &[b"u"]);
    assert_ne!(reply_error(&send(&b, &g.mem, &rmdir).1), 0);
    // A third daemon still has the record (the second one kept the ring going).
    drop(b);
    let c = g.daemon();
    assert!(c.resume().unwrap().replies >= 2);
    assert_eq!(reply_error(&send(&c, &g.mem, &req).1), 0);
}

fn append_case(wipe: bool) -> Vec<u8> {
    let g = guest();
    let a = g.daemon();
    init(&a, &g.mem);
    let mut args = Vec::new();
    for v in [
        (libc::O_RDWR | libc::O_CREAT | libc::O_APPEND) as u32,
        0o644,
        0,
        0,
    ] {
        args.extend_from_slice(&v.to_le_bytes());
    }
    let (_, created) = send(&a, &g.mem, &named(FUSE_CREATE, 20, 1, &args, &[b"log"]));
    assert_eq!(reply_error(&created), 0);
    let (node, fh) = (u64_at(&created, 16), u64_at(&created, 16 + 128));
    let mut w = Vec::new();
    w.extend_from_slice(&fh.to_le_bytes());
    w.extend_from_slice(&0u64.to_le_bytes());
    w.extend_from_slice(&4u32.to_le_bytes());
    w.extend_from_slice(&[0u8; 4 + 8]); // write_flags, lock_owner
                                        // The file's flags, as the guest sends them (the passthrough sets O_APPEND on its fd
                                        // to match).
    w.extend_from_slice(&((libc::O_RDWR | libc::O_APPEND) as u32).to_le_bytes());
    w.extend_from_slice(&[0u8; 4]);
    w.extend_from_slice(b"line");
    let req = named(FUSE_WRITE, 21, node, &w, &[]);
    let (n, first) = send(&a, &g.mem, &req);
    assert_eq!((n.unwrap(), reply_error(&first)), (24, 0));
    let (_b, again) = g.replay(a, &req, wipe);
    assert_eq!(reply_error(&again), 0);
    assert_eq!(u32::from_le_bytes(again[16..20].try_into().unwrap()), 4);
    std::fs::read(g.root.join("log")).unwrap()
}

#[test]
fn a_replayed_append_is_written_once() {
    assert_eq!(append_case(false), b"line");
    assert_eq!(append_case(true), b"lineline", "without the records");
}
