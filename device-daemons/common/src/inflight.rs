//! In-flight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`), which `vhost-user-backend`
//! 0.21 answers with "not supported": the [`relay`](crate::relay) answers GET_INFLIGHT_FD
//! (a fresh zeroed memfd, [`Region::create`]) and SET_INFLIGHT_FD (the frontend hands a
//! restarted daemon the region the dead one wrote, [`Region::map`]) itself, and the queue
//! workers go through a [`Tracker`].
//!
//! Layout, per queue (the vhost-user specification's split-ring layout, each queue's part
//! aligned to 64 bytes): `features: u64, version: u16, desc_num: u16, last_batch_head: u16,
//! used_idx: u16`, then `desc_num` × `DescStateSplit { inflight: u8, padding: [u8; 5],
//! next: u16, counter: u64 }`.
//!
//! A worker marks a head when it pops it (`counter` from a per-queue global counter, then
//! `inflight = 1`) and, when it completes it, writes `next = last_batch_head`,
//! `last_batch_head = head`, puts the element on the used ring (advancing its `idx`), clears
//! `inflight` and records the used ring's `idx` in `used_idx` (batches of one). After
//! SET_INFLIGHT_FD the first batch of each queue recovers: if `used_idx` differs from the used
//! ring's `idx` (the daemon died between publishing and clearing) the last batch's heads are
//! cleared; the heads still in flight are resubmitted in `counter` order before anything new,
//! and the avail ring resumes at `used idx + in-flight count` (every chain popped is either on
//! the used ring or still marked: one popped but not yet marked is popped again).
//!
//! Resubmitting needs a descriptor chain for a given head, which `virtio-queue` builds only
//! from an avail ring: the heads are listed in a private avail ring, outside guest memory, of
//! a private queue over the same descriptor table and guest regions.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{
    Address, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap,
    GuestRegionMmap,
};

use crate::queue_backend::{MemGuard, QueueError};

/// Bytes of a queue's header.
const HEADER: usize = 16;
/// Bytes of one `DescStateSplit`.
const DESC: usize = 16;
/// Layout version written in each queue's header.
const VERSION: u16 = 1;

/// Errors of the inflight region.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// A system call failed.
    #[error("{0}: {1}")]
    Sys(&'static str, #[source] std::io::Error),
    /// The frontend described a region that does not fit.
    #[error("inflight region of {size} bytes cannot hold {queues} queue(s) of {queue_size}")]
    Size {
        /// Bytes given.
        size: u64,
        /// Queues.
        queues: u16,
        /// Queue size.
        queue_size: u16,
    },
}

/// Bytes of one queue's part of the region.
pub fn queue_bytes(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).next_multiple_of(64)
}

/// A mapped inflight region (shared memory with the frontend, which keeps it across daemons).
#[derive(Debug)]
pub struct Region {
    ptr: *mut u8,
    len: usize,
    queues: u16,
    queue_size: u16,
    fd: OwnedFd,
    /// Per queue: the next `counter` value.
    counters: Vec<AtomicU64>,
    /// Per queue: to recover before its next batch (a region handed over by SET_INFLIGHT_FD).
    recover: Vec<AtomicBool>,
}

// SAFETY: the mapping lives as long as the Region; every access goes through atomics, and
// each queue's part is written by that queue's worker only.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our own mapping of `len` bytes.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl Region {
    /// A fresh zeroed region for `queues` queues of `queue_size` (GET_INFLIGHT_FD).
    pub fn create(queues: u16, queue_size: u16) -> Result<Region, InflightError> {
        let sys = |what| InflightError::Sys(what, std::io::Error::last_os_error());
        // SAFETY: a static NUL-terminated name; the fd is owned below.
        let fd = unsafe { libc::memfd_create(c"vhost-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(sys("memfd_create"));
        }
        // SAFETY: a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = queue_bytes(queue_size) * usize::from(queues);
        // SAFETY: ftruncate on our fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(sys("ftruncate"));
        }
        let r = Self::map(fd, len as u64, 0, queues, queue_size)?;
        r.recover
            .iter()
            .for_each(|f| f.store(false, Ordering::Relaxed));
        for q in 0..usize::from(queues) {
            r.header_init(q);
        }
        Ok(r)
    }

    /// Maps the region `fd` (SET_INFLIGHT_FD); every queue recovers before its next batch.
    pub fn map(
        fd: OwnedFd,
        size: u64,
        offset: u64,
        queues: u16,
        queue_size: u16,
    ) -> Result<Region, InflightError> {
        let need = queue_bytes(queue_size) * usize::from(queues);
        if queues == 0 || queue_size == 0 || (size as usize) < need || size > 1 << 30 {
            return Err(InflightError::Size {
                size,
                queues,
                queue_size,
            });
        }
        let len = size as usize;
        // SAFETY: a new shared mapping of the fd; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(InflightError::Sys("mmap", std::io::Error::last_os_error()));
        }
        Ok(Region {
            ptr: ptr.cast(),
            len,
            queues,
            queue_size,
            fd,
            counters: (0..queues).map(|_| AtomicU64::new(1)).collect(),
            recover: (0..queues).map(|_| AtomicBool::new(true)).collect(),
        })
    }

    /// The memfd (answered to GET_INFLIGHT_FD).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never: [`Region::map`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// (queues, queue size).
    pub fn shape(&self) -> (u16, u16) {
        (self.queues, self.queue_size)
    }

    fn at(&self, q: usize, off: usize) -> *mut u8 {
        // SAFETY (of the callers' dereferences): `q < queues` and `off` inside the queue's
        // part are checked by the callers (`desc` bounds the head by `queue_size`).
        self.ptr
            .wrapping_add(q * queue_bytes(self.queue_size) + off)
    }

    fn u16_at(&self, q: usize, off: usize) -> &AtomicU16 {
        // SAFETY: inside the mapping (see `at`), 2-aligned (the mapping is page-aligned and
        // every u16 field sits at an even offset); atomics tolerate the other process.
        unsafe { &*self.at(q, off).cast::<AtomicU16>() }
    }

    fn u64_at(&self, q: usize, off: usize) -> &AtomicU64 {
        // SAFETY: as for `u16_at`, 8-aligned offsets.
        unsafe { &*self.at(q, off).cast::<AtomicU64>() }
    }

    fn u8_at(&self, q: usize, off: usize) -> &AtomicU8 {
        // SAFETY: as for `u16_at`.
        unsafe { &*self.at(q, off).cast::<AtomicU8>() }
    }

    fn header_init(&self, q: usize) {
        self.u64_at(q, 0).store(0, Ordering::Relaxed);
        self.u16_at(q, 8).store(VERSION, Ordering::Relaxed);
        self.u16_at(q, 10).store(self.queue_size, Ordering::Relaxed);
    }

    /// Offset of head `h`'s DescStateSplit, if it is one of the queue's.
    fn desc(&self, h: u16) -> Option<usize> {
        (h < self.queue_size).then(|| HEADER + DESC * usize::from(h))
    }

    /// Marks `head` of queue `q` in flight (it was just popped).
    pub fn popped(&self, q: usize, head: u16) {
        let (Some(d), Some(c)) = (self.desc(head), self.counters.get(q)) else {
            return;
        };
        let n = c.fetch_add(1, Ordering::Relaxed);
        self.u64_at(q, d + 8).store(n, Ordering::Relaxed);
        self.u8_at(q, d).store(1, Ordering::Release);
    }

    /// Puts `head` of queue `q` on the used ring of `vring` (a batch of one, in the spec's
    /// order).
    pub fn complete(
        &self,
        q: usize,
        vring: &VringRwLock,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        let Some(d) = self.desc(head).filter(|_| q < usize::from(self.queues)) else {
            return Ok(vring.add_used(head, len)?);
        };
        let last = self.u16_at(q, 12);
        self.u16_at(q, d + 6)
            .store(last.load(Ordering::Relaxed), Ordering::Relaxed);
        last.store(head, Ordering::Release);
        fence(Ordering::SeqCst);
        vring.add_used(head, len)?;
        fence(Ordering::SeqCst);
        self.u8_at(q, d).store(0, Ordering::Release);
        let used = vring.get_ref().get_queue().next_used();
        self.u16_at(q, 14).store(used, Ordering::Release);
        Ok(())
    }

    /// Recovery of queue `q` against the used ring index `used`: fixes the last batch,
    /// returns the heads in flight in counter order and re-seeds the counter.
    pub fn recover(&self, q: usize, used: u16) -> Vec<u16> {
        if q >= usize::from(self.queues) {
            return Vec::new();
        }
        if self.u16_at(q, 8).load(Ordering::Acquire) == 0 {
            // Never written (a region the frontend made itself): start it.
            self.header_init(q);
        }
        let recorded = self.u16_at(q, 14).load(Ordering::Acquire);
        if recorded != used {
            // Published but not cleared: the last batch (of one here) is done.
            let batch = used.wrapping_sub(recorded);
            let mut h = self.u16_at(q, 12).load(Ordering::Acquire);
            for _ in 0..batch.min(self.queue_size) {
                let Some(d) = self.desc(h) else { break };
                self.u8_at(q, d).store(0, Ordering::Release);
                h = self.u16_at(q, d + 6).load(Ordering::Relaxed);
            }
            self.u16_at(q, 14).store(used, Ordering::Release);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.queue_size)
            .filter_map(|h| {
                let d = self.desc(h)?;
                (self.u8_at(q, d).load(Ordering::Acquire) != 0)
                    .then(|| (self.u64_at(q, d + 8).load(Ordering::Relaxed), h))
            })
            .collect();
        heads.sort_unstable();
        let next = heads.last().map_or(1, |(c, _)| c + 1);
        if let Some(c) = self.counters.get(q) {
            c.store(next, Ordering::Relaxed);
        }
        heads.into_iter().map(|(_, h)| h).collect()
    }
}

/// The inflight region of the current connection, shared by the relay and the workers.
#[derive(Debug, Default)]
pub struct Inflight(RwLock<Option<Arc<Region>>>);

impl Inflight {
    /// Installs `region` (or none at disconnection).
    pub fn set(&self, region: Option<Region>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = region.map(Arc::new);
    }

    /// The current region.
    pub fn get(&self) -> Option<Arc<Region>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One batch of a worker on queue `q`: pops (resubmitted chains first) and completes chains,
/// recording them in the inflight region when there is one.
#[derive(Debug)]
pub struct Tracker {
    region: Option<Arc<Region>>,
    queue: usize,
    resubmit: VecDeque<DescriptorChain<MemGuard>>,
}

impl Tracker {
    /// The tracker of queue `q` for a batch; recovers the queue first if its region was
    /// handed over (SET_INFLIGHT_FD).
    pub fn new(
        inflight: &Inflight,
        q: usize,
        vring: &VringRwLock,
        mem: &MemGuard,
    ) -> Result<Tracker, QueueError> {
        let region = inflight.get();
        let mut t = Tracker {
            region,
            queue: q,
            resubmit: VecDeque::new(),
        };
        let Some(r) = t.region.clone() else {
            return Ok(t);
        };
        if !r
            .recover
            .get(q)
            .is_some_and(|f| f.swap(false, Ordering::AcqRel))
        {
            return Ok(t);
        }
        let used = vring
            .get_ref()
            .get_queue()
            .used_idx(&**mem, Ordering::Acquire)?
            .0;
        let heads = r.recover(q, used);
        let resume = used.wrapping_add(heads.len() as u16);
        vring.set_queue_next_avail(resume);
        vring.set_queue_next_used(used);
        if !heads.is_empty() {
            tracing::info!(
                "queue {q}: resubmitting {} request(s) in flight when the previous daemon \
                 stopped (heads {heads:?}); the avail ring resumes at {resume}",
                heads.len()
            );
            t.resubmit = chains_for(&heads, vring, mem)?.into();
        }
        Ok(t)
    }

    /// The next chain to serve: a resubmitted one, else the next available (marked in
    /// flight).
    pub fn pop(
        &mut self,
        vring: &VringRwLock,
        mem: &MemGuard,
    ) -> Option<DescriptorChain<MemGuard>> {
        if let Some(c) = self.resubmit.pop_front() {
            return Some(c);
        }
        let chain = vring
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(mem.clone())?;
        if let Some(r) = &self.region {
            r.popped(self.queue, chain.head_index());
        }
        Some(chain)
    }

    /// Puts `head` on the used ring (and clears it in the region).
    pub fn add_used(&self, vring: &VringRwLock, head: u16, len: u32) -> Result<(), QueueError> {
        self.completer().add_used(vring, head, len)
    }

    /// What completes chains, apart from the tracker (for closures that run while it pops).
    pub fn completer(&self) -> Completer {
        Completer {
            region: self.region.clone(),
            queue: self.queue,
        }
    }

    /// A tracker that records nothing (a device without inflight tracking).
    pub fn untracked(queue: usize) -> Tracker {
        Tracker {
            region: None,
            queue,
            resubmit: VecDeque::new(),
        }
    }
}

/// Completes chains of one queue ([`Tracker::completer`]).
#[derive(Debug, Clone)]
pub struct Completer {
    region: Option<Arc<Region>>,
    queue: usize,
}

impl Completer {
    /// Puts `head` on the used ring (and clears it in the region).
    pub fn add_used(&self, vring: &VringRwLock, head: u16, len: u32) -> Result<(), QueueError> {
        match &self.region {
            Some(r) => r.complete(self.queue, vring, head, len),
            None => Ok(vring.add_used(head, len)?),
        }
    }
}

/// Descriptor chains of `heads` in the ring of `vring`: a private queue over the same
/// descriptor table whose avail ring (in a private region above guest memory) lists them.
fn chains_for(
    heads: &[u16],
    vring: &VringRwLock,
    mem: &MemGuard,
) -> Result<Vec<DescriptorChain<MemGuard>>, QueueError> {
    let (desc, size) = {
        let st = vring.get_ref();
        (st.get_queue().desc_table(), st.get_queue().size())
    };
    let n = usize::from(size);
    let base = mem
        .last_addr()
        .checked_add(1)
        .map(|a| GuestAddress(a.0.next_multiple_of(4096)))
        .unwrap_or(GuestAddress(0));
    let avail_len = (6 + 2 * n).next_multiple_of(4);
    let used_len = 6 + 8 * n;
    let bytes = (avail_len + used_len).next_multiple_of(4096);
    let invalid = |e: &dyn std::fmt::Display| {
        tracing::warn!("resubmitting requests in flight: {e}");
        QueueError::Queue(virtio_queue::Error::InvalidSize)
    };
    let region = GuestRegionMmap::<()>::from_range(base, bytes, None).map_err(|e| invalid(&e))?;
    let private: GuestMemoryMmap = mem
        .insert_region(Arc::new(region))
        .map_err(|e| invalid(&e))?;
    let mut ring = Vec::with_capacity(4 + 2 * heads.len());
    ring.extend(0u16.to_le_bytes());
    ring.extend((heads.len() as u16).to_le_bytes());
    for h in heads {
        ring.extend(h.to_le_bytes());
    }
    vm_memory::Bytes::write_slice(&private, &ring, base)
        .map_err(|_| QueueError::Queue(virtio_queue::Error::InvalidSize))?;
    let private = GuestMemoryAtomic::new(private).memory();
    let mut q = Queue::new(size)?;
    q.set_size(size);
    q.try_set_desc_table_address(GuestAddress(desc))?;
    q.try_set_avail_ring_address(base)?;
    q.try_set_used_ring_address(base.unchecked_add(avail_len as u64))?;
    q.set_ready(true);
    let mut chains = Vec::with_capacity(heads.len());
    while let Some(c) = q.pop_descriptor_chain(private.clone()) {
        chains.push(c);
    }
    Ok(chains)
}
