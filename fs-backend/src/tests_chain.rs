//! [`FsServer::process_chain`] over real split-virtqueue descriptor chains in guest memory:
//! the whole transport path (virtiofs `Reader`/`Writer`, FUSE decoding, passthrough) without
//! a frontend, including malformed requests.

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{FsParams, FsServer, Outcome, UsedRing};

/// A [`UsedRing`] that reports deferred completions on a channel.
#[derive(Clone)]
pub(crate) struct TestRing {
    done: std::sync::mpsc::Sender<(u16, u32)>,
}

impl TestRing {
    pub(crate) fn new() -> (Self, std::sync::mpsc::Receiver<(u16, u32)>) {
        let (done, rx) = std::sync::mpsc::channel();
        (TestRing { done }, rx)
    }
}

impl UsedRing for TestRing {
    fn is_running(&self) -> bool {
        true
    }
    fn complete(&self, head: u16, len: u32) {
        let _ = self.done.send((head, len));
    }
}

pub(crate) const REQ: u64 = 0x4000;
pub(crate) const RESP: u64 = 0x8000;
pub(crate) const RESP_LEN: u32 = 0x1000;
const WRITE: u16 = 2; // VRING_DESC_F_WRITE

const FUSE_LOOKUP: u32 = 1;
const FUSE_INIT: u32 = 26;

pub(crate) fn header(len: usize, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(40);
    h.extend_from_slice(&(len as u32 + 40).to_le_bytes());
    h.extend_from_slice(&opcode.to_le_bytes());
    h.extend_from_slice(&unique.to_le_bytes());
    h.extend_from_slice(&nodeid.to_le_bytes());
    h.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
    h
}

/// Sends `req` as one readable descriptor plus one writable one at `resp`; returns the
/// outcome and the reply buffer as it is on return.
pub(crate) fn send_to(
    srv: &FsServer,
    mem: &GuestMemoryMmap,
    req: &[u8],
    resp: u64,
    ring: &TestRing,
) -> (Result<Outcome, crate::ServerError>, Vec<u8>) {
    mem.write_slice(req, GuestAddress(REQ)).unwrap();
    mem.write_slice(&[0u8; RESP_LEN as usize], GuestAddress(resp))
        .unwrap();
    let q = MockSplitQueue::new(mem, 16);
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(REQ, req.len() as u32, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(resp, RESP_LEN, WRITE, 0)),
    ];
    let chain = q.build_desc_chain(&descs).unwrap();
    let r = srv.process_chain(mem, chain, ring);
    (r, read_reply(mem, resp))
}

pub(crate) fn read_reply(mem: &GuestMemoryMmap, resp: u64) -> Vec<u8> {
    let mut reply = vec![0u8; RESP_LEN as usize];
    mem.read_slice(&mut reply, GuestAddress(resp)).unwrap();
    reply
}

/// [`send_to`] at the usual reply address, for requests answered at once.
pub(crate) fn send(
    srv: &FsServer,
    mem: &GuestMemoryMmap,
    req: &[u8],
) -> (Result<u32, crate::ServerError>, Vec<u8>) {
    let (ring, _) = TestRing::new();
    let (r, reply) = send_to(srv, mem, req, RESP, &ring);
    let r = r.map(|o| match o {
        Outcome::Used(n) => n,
        Outcome::Deferred => 0,
    });
    (r, reply)
}

pub(crate) fn reply_error(reply: &[u8]) -> i32 {
    i32::from_le_bytes(reply[4..8].try_into().unwrap())
}

pub(crate) fn init(srv: &FsServer, mem: &GuestMemoryMmap) {
    let mut req = header(16, FUSE_INIT, 1, 0);
    for v in [7u32, 31, 0x2_0000, 0] {
        req.extend_from_slice(&v.to_le_bytes());
    }
    let (r, reply) = send(srv, mem, &req);
    let n = r.unwrap();
    assert!(n > 16, "INIT reply of {n} bytes");
    assert_eq!(reply_error(&reply), 0);
    assert_eq!(
        u64::from_le_bytes(reply[8..16].try_into().unwrap()),
        1,
        "unique echoed"
    );
    assert_eq!(
        u32::from_le_bytes(reply[16..20].try_into().unwrap()),
        7,
        "major"
    );
}

pub(crate) fn lookup(srv: &FsServer, mem: &GuestMemoryMmap, name: &[u8]) -> (i32, u64) {
    let mut req = header(name.len() + 1, FUSE_LOOKUP, 2, 1);
    req.extend_from_slice(name);
    req.push(0);
    let (r, reply) = send(srv, mem, &req);
    r.unwrap();
    (
        reply_error(&reply),
        u64::from_le_bytes(reply[16..24].try_into().unwrap()),
    )
}

pub(crate) fn setup() -> (tempfile::TempDir, FsServer, GuestMemoryMmap) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello"), b"hi").unwrap();
    let srv = FsServer::new(&FsParams::default(), dir.path()).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    (dir, srv, mem)
}

#[test]
fn init_and_lookup_through_descriptor_chains() {
    let (_dir, srv, mem) = setup();
    init(&srv, &mem);
    let (err, node) = lookup(&srv, &mem, b"hello");
    assert_eq!(err, 0);
    assert!(node > 1, "a new inode for the file, got {node}");
    let (err, _) = lookup(&srv, &mem, b"missing");
    assert_eq!(err, -libc::ENOENT);
}

#[test]
fn malformed_requests_are_refused_without_panicking() {
    let (_dir, srv, mem) = setup();
    init(&srv, &mem);
    // Too short for a header.
    let (r, _) = send(&srv, &mem, &[1, 2, 3]);
    assert!(r.is_err());
    // Unknown opcode: ENOSYS.
    let (r, reply) = send(&srv, &mem, &header(0, 9999, 5, 1));
    r.unwrap();
    assert_eq!(reply_error(&reply), -libc::ENOSYS);
    // A header claiming far more than was sent, and a name without its NUL.
    let mut lie = header(0, FUSE_LOOKUP, 6, 1);
    lie[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let _ = send(&srv, &mem, &lie);
    let mut no_nul = header(5, FUSE_LOOKUP, 7, 1);
    no_nul.extend_from_slice(b"hello");
    let _ = send(&srv, &mem, &no_nul);
    // Pseudo-random garbage after a valid header for every opcode 0..64.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for opcode in 0..64u32 {
        let mut req = header(200, opcode, 100 + u64::from(opcode), 1);
        for _ in 0..25 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            req.extend_from_slice(&x.to_le_bytes());
        }
        let _ = send(&srv, &mem, &req);
    }
    // Still serving.
    assert_eq!(lookup(&srv, &mem, b"hello").0, 0);
}
