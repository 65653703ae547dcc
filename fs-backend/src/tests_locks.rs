//! Lock requests and `COPY_FILE_RANGE` through [`FsServer::process_chain`], as the guest kernel
//! sends them: conflicts between lock owners and with host processes, a `SETLKW` answered
//! later by its waiter while the caller goes on, release by `FLUSH`/`RELEASE`, copies
//! between handles including the error cases; and FALLOCATE/LSEEK of the passthrough.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::Duration;

use vm_memory::GuestMemoryMmap;

use crate::locks::OFFSET_MAX;
use crate::tests_chain::{
    header, init, lookup, read_reply, reply_error, send, send_to, setup, TestRing, RESP,
};
use crate::{FsParams, FsServer, Outcome};

const FUSE_OPEN: u32 = 14;
const FUSE_RELEASE: u32 = 18;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_GETLK: u32 = 31;
const FUSE_SETLK: u32 = 32;
const FUSE_SETLKW: u32 = 33;
const FUSE_COPY_FILE_RANGE: u32 = 47;
const LK_FLOCK: u32 = 1;
const RELEASE_FLOCK_UNLOCK: u32 = 2;
const RDLCK: u32 = libc::F_RDLCK as u32;
const WRLCK: u32 = libc::F_WRLCK as u32;
const UNLCK: u32 = libc::F_UNLCK as u32;
/// A second reply area, for a request answered later.
const RESP2: u64 = 0xC000;

fn msg(opcode: u32, nodeid: u64, unique: u64, body: &[&[u8]]) -> Vec<u8> {
    let body: Vec<u8> = body.concat();
    let mut m = header(body.len(), opcode, unique, nodeid);
    m.extend_from_slice(&body);
    m
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn open(srv: &FsServer, mem: &GuestMemoryMmap, node: u64, flags: i32) -> u64 {
    let m = msg(
        FUSE_OPEN,
        node,
        10,
        &[&(flags as u32).to_le_bytes(), &[0; 4]],
    );
    let (r, reply) = send(srv, mem, &m);
    r.unwrap();
    assert_eq!(reply_error(&reply), 0, "OPEN");
    u64_at(&reply, 16)
}

/// `fuse_lk_in`: fh, owner, {start, end, type, pid}, lk_flags, padding.
fn lk_in(fh: u64, owner: u64, typ: u32, start: u64, end: u64, flags: u32) -> Vec<u8> {
    [
        &fh.to_le_bytes()[..],
        &owner.to_le_bytes(),
        &start.to_le_bytes(),
        &end.to_le_bytes(),
        &typ.to_le_bytes(),
        &42u32.to_le_bytes(),
        &flags.to_le_bytes(),
        &[0; 4],
    ]
    .concat()
}

struct Lk<'a> {
    srv: &'a FsServer,
    mem: &'a GuestMemoryMmap,
    node: u64,
}

impl Lk<'_> {
    /// SETLK; returns the reply's error.
    fn set(&self, fh: u64, owner: u64, typ: u32, start: u64, end: u64, flags: u32) -> i32 {
        let m = msg(
            FUSE_SETLK,
            self.node,
            20,
            &[&lk_in(fh, owner, typ, start, end, flags)],
        );
        let (r, reply) = send(self.srv, self.mem, &m);
        r.unwrap();
        reply_error(&reply)
    }

    /// GETLK; returns (error, type, start, end, pid).
    fn get(
        &self,
        fh: u64,
        owner: u64,
        typ: u32,
        start: u64,
        end: u64,
    ) -> (i32, u32, u64, u64, u32) {
        let m = msg(
            FUSE_GETLK,
            self.node,
            21,
            &[&lk_in(fh, owner, typ, start, end, 0)],
        );
        let (r, reply) = send(self.srv, self.mem, &m);
        r.unwrap();
        (
            reply_error(&reply),
            u32_at(&reply, 32),
            u64_at(&reply, 16),
            u64_at(&reply, 24),
            u32_at(&reply, 36),
        )
    }

    fn flush(&self, fh: u64, owner: u64) {
        let body = [&fh.to_le_bytes()[..], &[0; 8], &owner.to_le_bytes()].concat();
        let (r, reply) = send(
            self.srv,
            self.mem,
            &msg(FUSE_FLUSH, self.node, 22, &[&body]),
        );
        r.unwrap();
        assert_eq!(reply_error(&reply), 0, "FLUSH");
    }

    fn release(&self, fh: u64, release_flags: u32, owner: u64) {
        let body = [
            &fh.to_le_bytes()[..],
            &0u32.to_le_bytes(),
            &release_flags.to_le_bytes(),
            &owner.to_le_bytes(),
        ]
        .concat();
        let (r, reply) = send(
            self.srv,
            self.mem,
            &msg(FUSE_RELEASE, self.node, 23, &[&body]),
        );
        r.unwrap();
        assert_eq!(reply_error(&reply), 0, "RELEASE");
    }
}

fn host_flock(file: &File, op: i32) -> i32 {
    // SAFETY: plain syscall on an open fd.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

#[test]
fn init_offers_posix_and_flock_locks() {
    let (_dir, srv, mem) = setup();
    let capable: u32 = 0x2 | 0x400; // FUSE_POSIX_LOCKS | FUSE_FLOCK_LOCKS
    let body = [7u32, 31, 0x2_0000, capable]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>();
    let (r, reply) = send(&srv, &mem, &msg(FUSE_INIT, 0, 1, &[&body]));
    r.unwrap();
    assert_eq!(reply_error(&reply), 0);
    assert_eq!(u32_at(&reply, 28) & capable, capable, "INIT flags");
}

#[test]
fn init_offers_big_writes_of_a_mebibyte() {
    let (_dir, srv, mem) = setup();
    let capable: u32 = (1 << 5) | (1 << 22); // FUSE_BIG_WRITES | FUSE_MAX_PAGES
    let body = [7u32, 31, 0x2_0000, capable]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>();
    let (r, reply) = send(&srv, &mem, &msg(FUSE_INIT, 0, 1, &[&body]));
    r.unwrap();
    assert_eq!(reply_error(&reply), 0);
    assert_eq!(u32_at(&reply, 28) & capable, capable, "INIT flags");
    assert_eq!(u32_at(&reply, 36), 1 << 20, "max_write");
    assert_eq!(u16::from_le_bytes([reply[44], reply[45]]), 256, "max_pages");
}

#[test]
fn posix_locks_conflict_between_owners_and_unlock() {
    let (_dir, srv, mem) = setup();
    init(&srv, &mem);
    let node = lookup(&srv, &mem, b"hello").1;
    let fh = open(&srv, &mem, node, libc::O_RDWR);
    let lk = Lk {
        srv: &srv,
        mem: &mem,
        node,
    };
    let (a, b) = (0xA, 0xB);
    assert_eq!(lk.set(fh, a, WRLCK, 0, 99, 0), 0);
    // Owner A's own lock does not conflict with A.
    assert_eq!(lk.get(fh, a, WRLCK, 0, 99).1, UNLCK);
    assert_eq!(lk.get(fh, b, RDLCK, 50, 60), (0, WRLCK, 0, 99, 0));
    assert_eq!(lk.set(fh, b, WRLCK, 50, 60, 0), -libc::EAGAIN);
    assert_eq!(lk.set(fh, b, RDLCK, 100, OFFSET_MAX, 0), 0);
    assert_eq!(
        lk.get(fh, a, WRLCK, 200, 300),
        (0, RDLCK, 100, OFFSET_MAX, 0)
    );
    // Partial unlock by A frees 50..=60 only.
    assert_eq!(lk.set(fh, a, UNLCK, 40, 99, 0), 0);
    assert_eq!(lk.set(fh, b, WRLCK, 50, 60, 0), 0);
    assert_eq!(lk.get(fh, b, WRLCK, 0, 10), (0, WRLCK, 0, 39, 0));
    // Invalid requests.
    assert_eq!(lk.set(fh, a, WRLCK, 10, 5, 0), -libc::EINVAL);
    assert_eq!(lk.set(fh, a, 9, 0, 5, 0), -libc::EINVAL);
    // A short body is refused, not dispatched.
    let (r, reply) = send(&srv, &mem, &msg(FUSE_SETLKW, node, 24, &[&[1, 2, 3]]));
    assert_eq!(r.unwrap(), 16);
    assert_eq!(reply_error(&reply), -libc::EINVAL);
}

#[test]
fn setlkw_waits_off_the_caller_thread_and_completes_on_flush() {
    let (dir, srv, mem) = setup();
    init(&srv, &mem);
    let node = lookup(&srv, &mem, b"hello").1;
    let fh = open(&srv, &mem, node, libc::O_RDWR);
    let lk = Lk {
        srv: &srv,
        mem: &mem,
        node,
    };
    let (a, b) = (0xA, 0xB);
    assert_eq!(lk.set(fh, a, WRLCK, 0, 0, 0), 0);
    // A free range is granted at once, even through SETLKW.
    let (ring, done) = TestRing::new();
    let m = msg(FUSE_SETLKW, node, 77, &[&lk_in(fh, b, WRLCK, 10, 10, 0)]);
    let (r, reply) = send_to(&srv, &mem, &m, RESP2, &ring);
    assert_eq!(r.unwrap(), Outcome::Used(16));
    assert_eq!(reply_error(&reply), 0);
    // A held one: the call returns at once, the request waits.
    let m = msg(FUSE_SETLKW, node, 78, &[&lk_in(fh, b, WRLCK, 0, 0, 0)]);
    let (r, _) = send_to(&srv, &mem, &m, RESP2, &ring);
    assert_eq!(r.unwrap(), Outcome::Deferred);
    assert_eq!(srv.locks().waiter_count(), 1);
    // While A holds the lock nobody answers, and the queue keeps being served.
    assert_eq!(lk.get(fh, b, WRLCK, 0, 0).1, WRLCK);
    assert!(done.try_recv().is_err(), "answered while the lock was held");
    assert_eq!(reply_error(&read_reply(&mem, RESP2)), 0);
    assert_eq!(
        u64_at(&read_reply(&mem, RESP2), 8),
        0,
        "nothing written yet"
    );
    // close() in A's process: FLUSH releases A's locks, the waiter gets the lock.
    lk.flush(fh, a);
    let (_, len) = done
        .recv_timeout(Duration::from_secs(30))
        .expect("the waiting SETLKW was never answered");
    assert_eq!(len, 16);
    let reply = read_reply(&mem, RESP2);
    assert_eq!((reply_error(&reply), u64_at(&reply, 8)), (0, 78));
    assert_eq!(lk.get(fh, a, RDLCK, 0, 0), (0, WRLCK, 0, 0, 0));
    // The host sees B's lock too.
    let host = File::open(dir.path().join("hello")).unwrap();
    let mut fl = libc::flock {
        l_type: libc::F_RDLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: valid struct flock on an open fd.
    let r = unsafe { libc::fcntl(host.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(r, 0);
    assert_eq!(i32::from(fl.l_type), libc::F_WRLCK);
}

#[test]
fn flock_conflicts_with_other_opens_and_host_and_release_unlocks() {
    let (dir, srv, mem) = setup();
    init(&srv, &mem);
    let node = lookup(&srv, &mem, b"hello").1;
    let (fh1, fh2) = (
        open(&srv, &mem, node, libc::O_RDONLY),
        open(&srv, &mem, node, libc::O_RDONLY),
    );
    let lk = Lk {
        srv: &srv,
        mem: &mem,
        node,
    };
    // flock owners are the guest's open files.
    let (f1, f2) = (0xF1, 0xF2);
    assert_eq!(lk.set(fh1, f1, WRLCK, 0, 0, LK_FLOCK), 0);
    assert_eq!(lk.set(fh2, f2, RDLCK, 0, 0, LK_FLOCK), -libc::EAGAIN);
    let host = File::open(dir.path().join("hello")).unwrap();
    assert_eq!(
        host_flock(&host, libc::LOCK_SH | libc::LOCK_NB),
        libc::EWOULDBLOCK
    );
    // flock and POSIX locks do not interact.
    assert_eq!(lk.set(fh2, 0xB, RDLCK, 0, OFFSET_MAX, 0), 0);
    // The last close of open file 1: RELEASE with FUSE_RELEASE_FLOCK_UNLOCK.
    lk.release(fh1, RELEASE_FLOCK_UNLOCK, f1);
    assert_eq!(lk.set(fh2, f2, RDLCK, 0, 0, LK_FLOCK), 0);
    assert_eq!(host_flock(&host, libc::LOCK_SH | libc::LOCK_NB), 0);
    assert_eq!(host_flock(&host, libc::LOCK_UN), 0);
    // Upgrade within the same open file, then LOCK_UN.
    assert_eq!(lk.set(fh2, f2, WRLCK, 0, 0, LK_FLOCK), 0);
    assert_eq!(
        host_flock(&host, libc::LOCK_SH | libc::LOCK_NB),
        libc::EWOULDBLOCK
    );
    assert_eq!(lk.set(fh2, f2, UNLCK, 0, 0, LK_FLOCK), 0);
    assert_eq!(host_flock(&host, libc::LOCK_EX | libc::LOCK_NB), 0);
    // Held by the host: a blocking guest flock waits until the host lets go.
    let (ring, done) = TestRing::new();
    let m = msg(
        FUSE_SETLKW,
        node,
        90,
        &[&lk_in(fh2, f2, WRLCK, 0, 0, LK_FLOCK)],
    );
    let (r, _) = send_to(&srv, &mem, &m, RESP2, &ring);
    assert_eq!(r.unwrap(), Outcome::Deferred);
    drop(host);
    done.recv_timeout(Duration::from_secs(30))
        .expect("the waiting flock was never answered");
    let reply = read_reply(&mem, RESP2);
    assert_eq!((reply_error(&reply), u64_at(&reply, 8)), (0, 90));
    // A new session (FUSE_INIT) drops every lock.
    init(&srv, &mem);
    let host = File::open(dir.path().join("hello")).unwrap();
    assert_eq!(host_flock(&host, libc::LOCK_EX | libc::LOCK_NB), 0);
    assert_eq!(srv.locks().owner_count(), 0);
}

/// `fuse_copy_file_range_in`.
fn cfr_in(fh_in: u64, off_in: u64, node_out: u64, fh_out: u64, off_out: u64, len: u64) -> Vec<u8> {
    [fh_in, off_in, node_out, fh_out, off_out, len, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// Sends COPY_FILE_RANGE; returns (error, size).
fn copy(srv: &FsServer, mem: &GuestMemoryMmap, node_in: u64, body: &[u8]) -> (i32, u32) {
    let (r, reply) = send(srv, mem, &msg(FUSE_COPY_FILE_RANGE, node_in, 30, &[body]));
    let n = r.unwrap();
    let err = reply_error(&reply);
    assert_eq!(n, if err == 0 { 24 } else { 16 }, "reply length");
    assert_eq!(u64_at(&reply, 8), 30, "unique");
    (err, u32_at(&reply, 16))
}

#[test]
fn copy_file_range_copies_between_handles() {
    let (dir, srv, mem) = setup();
    let src: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.path().join("src"), &src).unwrap();
    std::fs::write(dir.path().join("dst"), b"").unwrap();
    init(&srv, &mem);
    let n_in = lookup(&srv, &mem, b"src").1;
    let n_out = lookup(&srv, &mem, b"dst").1;
    let fh_in = open(&srv, &mem, n_in, libc::O_RDONLY);
    let fh_out = open(&srv, &mem, n_out, libc::O_WRONLY);
    assert_eq!(
        copy(
            &srv,
            &mem,
            n_in,
            &cfr_in(fh_in, 1000, n_out, fh_out, 5000, 3000)
        ),
        (0, 3000)
    );
    let mut want = vec![0u8; 5000];
    want.extend_from_slice(&src[1000..4000]);
    assert_eq!(std::fs::read(dir.path().join("dst")).unwrap(), want);
    // A huge length copies what there is.
    assert_eq!(
        copy(
            &srv,
            &mem,
            n_in,
            &cfr_in(fh_in, 9000, n_out, fh_out, 0, u64::MAX)
        ),
        (0, 1000)
    );
    assert_eq!(
        std::fs::read(dir.path().join("dst")).unwrap()[..1000],
        src[9000..]
    );
    // At end of file: nothing.
    assert_eq!(
        copy(
            &srv,
            &mem,
            n_in,
            &cfr_in(fh_in, 20_000, n_out, fh_out, 0, 10)
        ),
        (0, 0)
    );
    // Wrong handles: unknown, of another inode, or not open for reading / writing.
    let ebadf = (-libc::EBADF, 0);
    assert_eq!(
        copy(&srv, &mem, n_in, &cfr_in(999, 0, n_out, fh_out, 0, 10)),
        ebadf
    );
    assert_eq!(
        copy(&srv, &mem, n_in, &cfr_in(fh_in, 0, n_out, 999, 0, 10)),
        ebadf
    );
    assert_eq!(
        copy(&srv, &mem, n_in, &cfr_in(fh_in, 0, n_in, fh_out, 0, 10)),
        ebadf
    );
    assert_eq!(
        copy(&srv, &mem, n_in, &cfr_in(fh_in, 0, n_in, fh_in, 0, 10)),
        ebadf
    );
    assert_eq!(
        copy(&srv, &mem, n_out, &cfr_in(fh_out, 0, n_out, fh_out, 0, 10)),
        ebadf
    );
    // Bad offsets, flags and a short body.
    let einval = (-libc::EINVAL, 0);
    assert_eq!(
        copy(
            &srv,
            &mem,
            n_in,
            &cfr_in(fh_in, 1 << 63, n_out, fh_out, 0, 1)
        ),
        einval
    );
    let mut flags = cfr_in(fh_in, 0, n_out, fh_out, 0, 1);
    flags[48] = 1;
    assert_eq!(copy(&srv, &mem, n_in, &flags), einval);
    assert_eq!(
        copy(
            &srv,
            &mem,
            n_in,
            &cfr_in(fh_in, 0, n_out, fh_out, 0, 1)[..40]
        ),
        einval
    );
    // Released handles are gone, and so is everything after a new INIT.
    let lk = Lk {
        srv: &srv,
        mem: &mem,
        node: n_out,
    };
    lk.release(fh_out, 0, 0);
    assert_eq!(
        copy(&srv, &mem, n_in, &cfr_in(fh_in, 0, n_out, fh_out, 0, 10)),
        ebadf
    );
    let fh_out = open(&srv, &mem, n_out, libc::O_RDWR);
    assert_eq!(
        copy(&srv, &mem, n_in, &cfr_in(fh_in, 0, n_out, fh_out, 0, 10)),
        (0, 10)
    );
    init(&srv, &mem);
    assert_eq!(
        copy(&srv, &mem, n_in, &cfr_in(fh_in, 0, n_out, fh_out, 0, 10)),
        ebadf
    );
}

#[test]
fn copy_file_range_on_a_readonly_share_is_erofs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("src"), b"data").unwrap();
    let params = FsParams {
        readonly: true,
        ..FsParams::default()
    };
    let srv = FsServer::new(&params, dir.path()).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x10_0000)]).unwrap();
    init(&srv, &mem);
    let n = lookup(&srv, &mem, b"src").1;
    let fh = open(&srv, &mem, n, libc::O_RDWR);
    assert_eq!(
        copy(&srv, &mem, n, &cfr_in(fh, 0, n, fh, 2, 2)),
        (-libc::EROFS, 0)
    );
    assert_eq!(std::fs::read(dir.path().join("src")).unwrap(), b"data");
    let _ = RESP;
}

/// FALLOCATE and LSEEK come from fuse-backend-rs's passthrough: checked end to end here.
#[test]
fn fallocate_and_lseek_through_chains() {
    const FUSE_FALLOCATE: u32 = 43;
    const FUSE_LSEEK: u32 = 46;
    let (dir, srv, mem) = setup();
    init(&srv, &mem);
    let node = lookup(&srv, &mem, b"hello").1;
    let fh = open(&srv, &mem, node, libc::O_RDWR);
    // fuse_fallocate_in: fh, offset, length, mode, padding.
    let body = [
        &fh.to_le_bytes()[..],
        &65_536u64.to_le_bytes(),
        &4096u64.to_le_bytes(),
        &0u32.to_le_bytes(),
        &[0; 4],
    ]
    .concat();
    let (r, reply) = send(&srv, &mem, &msg(FUSE_FALLOCATE, node, 40, &[&body]));
    r.unwrap();
    assert_eq!(reply_error(&reply), 0, "FALLOCATE");
    let len = std::fs::metadata(dir.path().join("hello")).unwrap().len();
    assert_eq!(len, 65_536 + 4096);
    // fuse_lseek_in: fh, offset, whence, padding → fuse_lseek_out { offset }.
    let seek = |offset: u64, whence: i32| {
        let body = [
            &fh.to_le_bytes()[..],
            &offset.to_le_bytes(),
            &(whence as u32).to_le_bytes(),
            &[0; 4],
        ]
        .concat();
        let (r, reply) = send(&srv, &mem, &msg(FUSE_LSEEK, node, 41, &[&body]));
        r.unwrap();
        (reply_error(&reply), u64_at(&reply, 16))
    };
    // "hi" then a hole up to the allocated (unwritten, reads as zeros) tail.
    assert_eq!(seek(0, libc::SEEK_DATA), (0, 0));
    let hole = seek(0, libc::SEEK_HOLE);
    assert_eq!(hole.0, 0);
    assert!(hole.1 >= 2 && hole.1 <= 65_536, "first hole at {}", hole.1);
    assert_eq!(seek(1 << 20, libc::SEEK_DATA).0, -libc::ENXIO);
}
