//! Fuzzes the vhost-user message path into the daemons' backend: frontend messages over a real
//! UNIX socket into `vhost-user-backend`'s request handler serving `rqemu_daemon`'s
//! `QueueBackend` (what `rqemu-blk`, `rqemu-net` and `rqemu-fs` run) with a stand-in device
//! that drains its queues.
//!
//! Input: a sequence of vhost-user messages as the wire carries them (12-byte header: request
//! u32, flags u32, payload size u32; then the payload, its size clamped to what is left).
//! Requests that carry fds get them: a 1 MiB memfd for SET_MEM_TABLE / ADD_MEM_REG /
//! SET_LOG_BASE / SET_INFLIGHT_FD, an eventfd for SET_VRING_KICK / CALL / ERR. After the last
//! message the queues set up are kicked, the connection is closed and the daemon must end
//! cleanly.
//!
//! Known bug, kept out of the smoke run: a memory region (or log region) reaching past the end
//! of its fd is mapped anyway (vm-memory 0.17.1 declares `MappingPastEof` but never checks it;
//! vhost-user-backend maps what the frontend says) and the daemon dies of SIGBUS when a worker
//! touches the ring there. Such messages are not sent ([`past_eof`]) until the backend refuses
//! them; without the filter this target finds it in seconds.
//!
//! Known leak, worked around: vhost-user-backend 0.21 registers each worker's exit-event
//! consumer with `into_raw_fd()` and never closes it, so every connection leaks one eventfd
//! per worker thread (`QueueBackend::exit_event` hands out a fresh pair per connection). The
//! target closes the eventfds an iteration left open once the daemon is dropped
//! ([`close_leaked_eventfds`]), or it would run out of fds within seconds.
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use rqemu_daemon::queue_backend::{MemGuard, QueueBackend, QueueDevice, QueueError, Wake, Worker};
use rqemu_daemon::vhost::drain_queue;
use rqemu_protocol::identity::DeviceKind;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Two queues, EVENT_IDX and VERSION_1 offered, an 8-byte config space.
struct Dummy;

impl QueueDevice for Dummy {
    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        (1 << 32) | (1 << 29)
    }
    fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let start = (offset as usize).min(cfg.len());
        let end = start.saturating_add(size as usize).min(cfg.len());
        cfg[start..end].to_vec()
    }
    fn process(
        &self,
        wake: Wake,
        worker: &Worker<'_>,
        mem: &MemGuard,
        event_idx: bool,
    ) -> Result<(), QueueError> {
        if let Wake::Queue(q) = wake {
            drain_queue(worker.vring(q)?, mem, event_idx, |_chain| 0)?;
        }
        Ok(())
    }
}

const SET_LOG_BASE: u32 = 6;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const SET_INFLIGHT_FD: u32 = 32;
const ADD_MEM_REG: u32 = 37;

/// Size of the memfd sent with memory messages.
const MEMFD_SIZE: u64 = 1 << 20;

/// Whether a memory message maps past the end of the memfd sent with it (see the module docs).
fn past_eof(req: u32, payload: &[u8]) -> bool {
    let u64_at = |o: usize| {
        payload
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    // (offset of the size field, offset of the mmap offset field) of each region.
    let regions: Vec<(usize, usize)> = match req {
        SET_MEM_TABLE => {
            let n = payload
                .get(0..4)
                .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
            (0..n.min(8)).map(|i| (8 + i * 32 + 8, 8 + i * 32 + 24)).collect()
        }
        ADD_MEM_REG => vec![(8 + 8, 8 + 24)],
        SET_LOG_BASE => vec![(0, 8)],
        _ => return false,
    };
    regions.iter().any(|&(size, offset)| match (u64_at(size), u64_at(offset)) {
        (Some(size), Some(offset)) => offset.checked_add(size).is_none_or(|end| end > MEMFD_SIZE),
        _ => false,
    })
}

fn memfd() -> OwnedFd {
    // SAFETY: valid name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on the fd just created.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), MEMFD_SIZE as i64) }, 0);
    fd
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd with valid flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: a fresh fd nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Open eventfds of this process.
fn eventfds() -> Vec<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let fd: RawFd = e.file_name().to_str()?.parse().ok()?;
        let target = std::fs::read_link(e.path()).ok()?;
        (target.as_os_str() == "anon_inode:[eventfd]").then_some(fd)
    })
    .collect()
}

/// Closes the eventfds opened since `before` (nothing owns them once the daemon is dropped).
fn close_leaked_eventfds(before: &[RawFd]) {
    for fd in eventfds() {
        if !before.contains(&fd) {
            // SAFETY: an fd no object of this process owns any more (see the module docs).
            unsafe { libc::close(fd) };
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let before = eventfds();
    // As in the daemons (Rust binaries): a write to a socket the peer closed is an EPIPE error,
    // not a SIGPIPE death (libFuzzer's C `main` leaves the default action).
    // SAFETY: setting a signal disposition to SIG_IGN.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vu.sock");
    let mut listener = Listener::new(&path, true).expect("listening");
    let backend = Arc::new(QueueBackend::new(Dummy, DeviceKind::Blk, "fuzz"));
    let mut daemon = VhostUserDaemon::new(
        "fuzz".to_string(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .expect("daemon");
    let front = UnixStream::connect(&path).expect("connecting");
    daemon.start(&mut listener).expect("accepting");

    let mut kicks = Vec::new();
    let mut rest = data;
    while rest.len() >= 12 {
        let (hdr, tail) = rest.split_at(12);
        let req = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        let take = size.min(tail.len());
        let (payload, next) = tail.split_at(take);
        rest = next;
        if past_eof(req, payload) {
            continue;
        }
        let fd = match req {
            SET_MEM_TABLE | ADD_MEM_REG | SET_LOG_BASE | SET_INFLIGHT_FD => Some(memfd()),
            SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => Some(eventfd()),
            _ => None,
        };
        let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
        if front
            .send_with_fds(&[hdr, payload], &fds)
            .is_err()
        {
            break; // the daemon hung up on a message it refused
        }
        if req == SET_VRING_KICK {
            kicks.extend(fd);
        }
    }
    // Kick every queue the frontend set up, then hang up: the daemon must end cleanly.
    for k in &kicks {
        // SAFETY: writing 8 bytes from a local to an eventfd we own.
        unsafe { libc::write(k.as_raw_fd(), (&1u64 as *const u64).cast(), 8) };
    }
    drop(front);
    let _ = daemon.wait();
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    backend.disconnected();
    drop((daemon, backend, kicks));
    close_leaked_eventfds(&before);
});
