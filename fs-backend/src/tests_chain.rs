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

/// What one malformed request must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A reply with this error (0: success) and the request's `unique`.
    Reply(i32),
    /// No reply at all (FORGET, INTERRUPT, DESTROY): used length 0.
    NoReply,
    /// Refused by the decoder: `process_chain` fails (the chain is still returned to the
    /// driver by the daemon); some decoders write an EINVAL reply first.
    Refused(fn(&fuse_backend_rs::Error) -> bool, Option<i32>),
}

/// The outcome `send` gave, checked against `want` for request `unique`.
fn check_outcome(
    what: &str,
    r: Result<u32, crate::ServerError>,
    reply: &[u8],
    unique: u64,
    want: Expect,
) {
    let reply_unique = u64::from_le_bytes(reply[8..16].try_into().unwrap());
    let reply_len = u32::from_le_bytes(reply[0..4].try_into().unwrap());
    match (want, r) {
        (Expect::Reply(errno), Ok(n)) => {
            assert_eq!(reply_unique, unique, "{what}: unique echoed");
            assert_eq!(reply_error(reply), -errno, "{what}: error");
            assert_eq!(n, reply_len, "{what}: used length = reply length");
            if errno != 0 {
                assert_eq!(n, 16, "{what}: an error reply is a bare header");
            }
        }
        (Expect::NoReply, Ok(n)) => assert_eq!(n, 0, "{what}: no reply expected"),
        (Expect::Refused(kind, errno), Err(crate::ServerError::Request(e))) => {
            assert!(kind(&e), "{what}: refused for the wrong reason: {e:?}");
            match errno {
                Some(errno) => {
                    assert_eq!(reply_unique, unique, "{what}: unique echoed");
                    assert_eq!(reply_error(reply), -errno, "{what}: error");
                }
                None => assert_eq!(reply_len, 0, "{what}: no reply written"),
            }
        }
        (want, got) => panic!("{what}: expected {want:?}, got {got:?}"),
    }
}

fn bad_cstring(e: &fuse_backend_rs::Error) -> bool {
    matches!(e, fuse_backend_rs::Error::InvalidCString(_))
}

/// The expected outcome of opcode `op` with 200 bytes of the seeded garbage below after its
/// header, on the root inode of a fresh share (xattrs off).
fn garbage_expect(op: u32) -> Expect {
    use libc::{EBADF, EINVAL, ENOENT, ENOMEM, ENOSYS, ENOTTY};
    match op {
        // Not a FUSE opcode, or not implemented by the passthrough (BMAP, POLL, ...), or
        // LISTXATTR/REMOVEXATTR with xattrs off.
        0 | 7 | 19 | 23 | 24 | 37 | 40 | 41 | 50..=63 => Expect::Reply(ENOSYS),
        // LOOKUP, READLINK on a name / inode that is not there.
        1 | 5 => Expect::Reply(ENOENT),
        // FORGET, INTERRUPT, DESTROY.
        2 | 36 | 38 => Expect::NoReply,
        // A garbage file handle or inode number: GETATTR (with GETATTR_FH), SETATTR, RENAME,
        // LINK, READ, WRITE, RELEASE, FSYNC, FLUSH, RELEASEDIR, FSYNCDIR, FALLOCATE, LSEEK.
        3 | 4 | 12 | 13 | 15 | 16 | 18 | 20 | 25 | 29 | 30 | 43 | 46 => Expect::Reply(EBADF),
        // Well-formed enough to succeed on the root: SYMLINK (garbage names inside the
        // share), OPEN, STATFS, INIT, OPENDIR, ACCESS.
        6 | 14 | 17 | 26 | 27 | 34 => Expect::Reply(0),
        // MKNOD, MKDIR, RMDIR, GETXATTR: a name without its NUL.
        8 | 9 | 11 | 22 => Expect::Refused(bad_cstring, Some(EINVAL)),
        // UNLINK of a garbage name, GETLK/SETLK/SETLKW, CREATE, COPY_FILE_RANGE,
        // SETUPMAPPING/REMOVEMAPPING (no DAX window).
        10 | 31 | 32 | 33 | 35 | 47 | 48 | 49 => Expect::Reply(EINVAL),
        // SETXATTR: value shorter than its size field.
        21 => Expect::Refused(
            |e| matches!(e, fuse_backend_rs::Error::MissingParameter),
            None,
        ),
        // READDIR, READDIRPLUS with a garbage size.
        28 | 44 => Expect::Reply(ENOMEM),
        // IOCTL.
        39 => Expect::Reply(ENOTTY),
        // BATCH_FORGET with a count far beyond the message.
        42 => Expect::Refused(
            |e| matches!(e, fuse_backend_rs::Error::InvalidMessage(_)),
            None,
        ),
        // RENAME2 with garbage flags.
        45 => Expect::Refused(
            |e| matches!(e, fuse_backend_rs::Error::DecodeMessage(_)),
            None,
        ),
        _ => unreachable!("opcodes 0..64 only"),
    }
}

#[test]
fn malformed_requests_are_refused_without_panicking() {
    let (_dir, srv, mem) = setup();
    init(&srv, &mem);
    // Too short for a header.
    let (r, reply) = send(&srv, &mem, &[1, 2, 3]);
    check_outcome(
        "3-byte request",
        r,
        &reply,
        0,
        Expect::Refused(
            |e| matches!(e, fuse_backend_rs::Error::DecodeMessage(_)),
            None,
        ),
    );
    // Unknown opcode: ENOSYS.
    let (r, reply) = send(&srv, &mem, &header(0, 9999, 5, 1));
    check_outcome("opcode 9999", r, &reply, 5, Expect::Reply(libc::ENOSYS));
    // A header claiming far more than was sent: ENOMEM (beyond the server's buffer size).
    let mut lie = header(0, FUSE_LOOKUP, 6, 1);
    lie[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let (r, reply) = send(&srv, &mem, &lie);
    check_outcome("len = u32::MAX", r, &reply, 6, Expect::Reply(libc::ENOMEM));
    // A name without its NUL: refused, with EINVAL to the driver.
    let mut no_nul = header(5, FUSE_LOOKUP, 7, 1);
    no_nul.extend_from_slice(b"hello");
    let (r, reply) = send(&srv, &mem, &no_nul);
    check_outcome(
        "name without NUL",
        r,
        &reply,
        7,
        Expect::Refused(bad_cstring, Some(libc::EINVAL)),
    );
    // Pseudo-random garbage after a valid header for every opcode 0..64.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for opcode in 0..64u32 {
        let unique = 100 + u64::from(opcode);
        let mut req = header(200, opcode, unique, 1);
        for _ in 0..25 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            req.extend_from_slice(&x.to_le_bytes());
        }
        let (r, reply) = send(&srv, &mem, &req);
        let what = format!("opcode {opcode} with garbage");
        check_outcome(&what, r, &reply, unique, garbage_expect(opcode));
    }
    // Still serving.
    assert_eq!(lookup(&srv, &mem, b"hello").0, 0);
}
