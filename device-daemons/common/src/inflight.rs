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
        // A mapping past the end of the file would fault (SIGBUS) when touched.
        let file_len =
            std::fs::File::from(fd.try_clone().map_err(|e| InflightError::Sys("dup", e))?)
                .metadata()
                .map_err(|e| InflightError::Sys("fstat", e))?
                .len();
        if offset.checked_add(size).is_none_or(|end| end > file_len) {
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
        self.batch_head(q, d, head);
        vring.add_used(head, len)?;
        let used = vring.get_ref().get_queue().next_used();
        self.batch_done(q, d, used);
        Ok(())
    }

    /// Before publishing `head` (at `d`): it heads the last batch.
    fn batch_head(&self, q: usize, d: usize, head: u16) {
        let last = self.u16_at(q, 12);
        self.u16_at(q, d + 6)
            .store(last.load(Ordering::Relaxed), Ordering::Relaxed);
        last.store(head, Ordering::Release);
        fence(Ordering::SeqCst);
    }

    /// After publishing the batch headed by `d`: cleared, and the used index recorded.
    fn batch_done(&self, q: usize, d: usize, used: u16) {
        fence(Ordering::SeqCst);
        self.u8_at(q, d).store(0, Ordering::Release);
        self.u16_at(q, 14).store(used, Ordering::Release);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_resume_in_counter_order_and_a_published_batch_is_cleared() {
        let r = Region::create(2, 16).unwrap();
        assert_eq!(r.len(), 2 * queue_bytes(16));
        assert_eq!(queue_bytes(16) % 64, 0);
        for h in [5, 2, 9, 7] {
            r.popped(1, h);
        }
        // Head 7 completed normally (used index 1).
        let d7 = r.desc(7).unwrap();
        r.batch_head(1, d7, 7);
        r.batch_done(1, d7, 1);
        // Head 2 published (used index 2) but the daemon died before clearing it.
        r.batch_head(1, r.desc(2).unwrap(), 2);
        // Out-of-range heads and queues are ignored.
        r.popped(1, 16);
        r.popped(9, 0);
        // The frontend hands the same memfd to the next daemon.
        let next = Region::map(r.fd().try_clone().unwrap(), r.len() as u64, 0, 2, 16).unwrap();
        drop(r);
        assert!(next.recover.iter().all(|f| f.load(Ordering::Relaxed)));
        assert_eq!(next.recover(0, 0), Vec::<u16>::new(), "queue 0: nothing");
        assert_eq!(next.recover(1, 2), vec![5, 9], "in counter order, 2 done");
        // The recorded used index now matches; the counter goes on after the last one.
        assert_eq!(next.recover(1, 2), vec![5, 9]);
        next.popped(1, 3);
        let d3 = next.desc(3).unwrap();
        assert_eq!(next.u64_at(1, d3 + 8).load(Ordering::Relaxed), 4);
        assert_eq!(next.recover(1, 2), vec![5, 9, 3]);
    }

    #[test]
    fn a_region_that_does_not_fit_is_refused() {
        let r = Region::create(1, 16).unwrap();
        let fd = || r.fd().try_clone().unwrap();
        assert!(Region::map(fd(), r.len() as u64, 0, 2, 16).is_err());
        assert!(Region::map(fd(), r.len() as u64, 0, 0, 16).is_err());
        assert!(Region::map(fd(), r.len() as u64, 0, 1, 0).is_err());
        assert!(
            Region::map(fd(), r.len() as u64, 64, 1, 16).is_err(),
            "past the end"
        );
        assert!(Region::map(fd(), r.len() as u64, 0, 1, 16).is_ok());
    }

    /// A ring of 16 at 0x1000 (desc), 0x2000 (avail), 0x3000 (used) in 64 KiB of memory.
    fn ring() -> (GuestMemoryAtomic<GuestMemoryMmap>, VringRwLock) {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(m);
        let v = VringRwLock::new(atomic.clone(), 16).unwrap();
        v.set_queue_size(16);
        v.set_queue_info(0x1000, 0x2000, 0x3000).unwrap();
        v.set_queue_ready(true);
        (atomic, v)
    }

    #[test]
    fn a_handed_over_region_resubmits_its_heads_before_new_requests() {
        use vm_memory::Bytes;
        let (atomic, vring) = ring();
        let mem = atomic.memory();
        // Descriptors 0..4: one-descriptor chains at 0x8000 + 0x100·i.
        for i in 0..4u64 {
            let base = GuestAddress(0x1000 + 16 * i);
            mem.write_obj(0x8000 + 0x100 * i, base).unwrap();
            mem.write_obj(0x10u32, base.unchecked_add(8)).unwrap();
            mem.write_obj(0u16, base.unchecked_add(12)).unwrap();
        }
        // The driver made heads 2, 1, 0, 3 available; the dead daemon popped 2, 1, 0,
        // completed 1 out of order (used idx 1) and left 2 and 0 in flight; head 3 was never
        // popped. (Resuming at the used index alone would take 1 again and lose 2.)
        for (slot, h) in [2u16, 1, 0, 3].iter().enumerate() {
            mem.write_obj(*h, GuestAddress(0x2004 + 2 * slot as u64))
                .unwrap();
        }
        mem.write_obj(4u16, GuestAddress(0x2002)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x3002)).unwrap();
        let old = Region::create(1, 16).unwrap();
        for h in [2, 1, 0] {
            old.popped(0, h);
        }
        let d1 = old.desc(1).unwrap();
        old.batch_head(0, d1, 1);
        old.batch_done(0, d1, 1);
        let inflight = Inflight::default();
        inflight.set(Some(
            Region::map(old.fd().try_clone().unwrap(), old.len() as u64, 0, 1, 16).unwrap(),
        ));
        vring.set_queue_next_avail(1); // what the frontend says: the used index
        vring.set_queue_next_used(1);
        let mut t = Tracker::new(&inflight, 0, &vring, &mem).unwrap();
        let mut got = Vec::new();
        while let Some(c) = t.pop(&vring, &mem) {
            let addr = c.clone().next().map(|d| d.addr().0);
            got.push((c.head_index(), addr));
            t.add_used(&vring, c.head_index(), 0).unwrap();
        }
        assert_eq!(
            got,
            vec![(2, Some(0x8200)), (0, Some(0x8000)), (3, Some(0x8300))],
            "2 and 0 resubmitted in counter order, then 3 from the avail ring"
        );
        let used: u16 = mem.read_obj(GuestAddress(0x3002)).unwrap();
        assert_eq!(used, 4, "each head once");
        let r = inflight.get().unwrap();
        assert!(r.recover(0, 4).is_empty(), "every mark cleared");
        // A second tracker does not recover again.
        let mut t = Tracker::new(&inflight, 0, &vring, &mem).unwrap();
        assert!(t.pop(&vring, &mem).is_none());
    }
}
