//! The io_uring engine of one queue: reads and writes that go straight between guest memory
//! and a raw image file ([`RawIo`]), many in flight at once; their completions are signalled
//! on an eventfd the queue's worker thread polls, and each goes on the used ring as it is
//! reaped.
//!
//! With O_DIRECT each request is handed to the kernel as soon as it is taken from the ring
//! (one `io_uring_enter` each, as fio does by default): the disk starts on the first while
//! the next ones are parsed, instead of waiting for the whole batch. Measured on a virtio
//! disk, 4k random reads QD32: 65k IOPS against 57k when the kick's requests went in one
//! batch, which let the disk go idle between rounds of 32. Through the page cache the reads
//! and writes complete inline in `io_uring_enter`: there, one system call per batch.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring};
use rqemu_block_backend::virtio::RawIo;
use rqemu_daemon::queue_backend::MemGuard;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A request in flight: what the kernel is working on, and the guest memory it points into
/// (kept mapped until the completion is reaped, even if the frontend goes away meanwhile).
struct Inflight {
    head: u16,
    io: RawIo,
    _mem: MemGuard,
}

/// One queue's ring, its completion eventfd and its requests in flight.
pub struct UringQueue {
    ring: IoUring,
    event: EventFd,
    fd: RawFd,
    slots: Vec<Option<Inflight>>,
    free: Vec<usize>,
    pending: usize,
    /// Submit each request when pushed (O_DIRECT) rather than in [`UringQueue::submit`].
    at_once: bool,
}

impl std::fmt::Debug for UringQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringQueue")
            .field("fd", &self.fd)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl UringQueue {
    /// A ring of `entries` submission slots for I/O on `fd`, completions signalled on a fresh
    /// eventfd; `at_once`: each request is submitted as soon as it is pushed (for a file
    /// opened with O_DIRECT, whose disk works while the next requests are prepared).
    pub fn new(fd: RawFd, entries: u32, at_once: bool) -> io::Result<UringQueue> {
        let ring = IoUring::new(entries)?;
        let event = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(UringQueue {
            ring,
            event,
            fd,
            slots: Vec::new(),
            free: Vec::new(),
            pending: 0,
            at_once,
        })
    }

    /// The completion eventfd (for the worker's epoll).
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Requests submitted (or queued for submission) and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues `io` (chain `head`) for submission: submitted at once with `at_once`, else by
    /// [`UringQueue::submit`].
    pub fn push(&mut self, head: u16, io: RawIo, mem: &MemGuard) -> io::Result<()> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let iovs = io.iov.as_ptr();
        let n = io.iov.len() as u32;
        let fd = types::Fd(self.fd);
        let entry = if io.write {
            opcode::Writev::new(fd, iovs, n).offset(io.offset).build()
        } else {
            opcode::Readv::new(fd, iovs, n).offset(io.offset).build()
        }
        .user_data(slot as u64);
        self.slots[slot] = Some(Inflight {
            head,
            io,
            _mem: mem.clone(),
        });
        loop {
            // SAFETY: the iovecs (boxed, at a stable address) and the guest buffers they
            // point to live in `self.slots[slot]` (with the memory mapping) until the
            // completion is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                break;
            }
            // Submission queue full: hand what is there to the kernel first.
            self.ring.submit()?;
            self.pending = 0;
        }
        self.pending += 1;
        if self.at_once {
            self.submit()?;
        }
        Ok(())
    }

    /// Submits everything queued (one system call).
    pub fn submit(&mut self) -> io::Result<()> {
        if self.pending > 0 {
            self.ring.submit()?;
            self.pending = 0;
        }
        Ok(())
    }

    /// Calls `done(head, used_len)` for every completed request (status written).
    pub fn reap(&mut self, mut done: impl FnMut(u16, u32)) {
        // Clear the eventfd first: a completion arriving after this re-arms it.
        let _ = self.event.read();
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            let slot = cqe.user_data() as usize;
            let Some(inflight) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            // SAFETY: `inflight` holds the guest memory mapping the request points into.
            let used = unsafe { inflight.io.complete(cqe.result()) };
            done(inflight.head, used);
        }
    }

    /// Waits until every request in flight completed, passing each to `done`.
    pub fn drain(&mut self, mut done: impl FnMut(u16, u32)) -> io::Result<()> {
        self.submit()?;
        while self.in_flight() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.reap(&mut done);
        }
        Ok(())
    }
}
