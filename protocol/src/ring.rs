//! The per-vCPU shared-memory ring of the hot path.
//!
//! Each vCPU owns one [`RING_BYTES`] region of the shared memfd:
//!
//! | offset | field | writer |
//! |---|---|---|
//! | 0 | `head: u64`, requests published | VMM |
//! | 64 | `device_sleeping: u32` | daemon |
//! | 128 | `tail: u64`, requests completed | daemon |
//! | 192 | `vmm_sleeping: u32` | VMM |
//! | 256 | `slots[64]`, 64 bytes each | both |
//!
//! A slot: `seq u64 @0` (VMM, release-stored last), `op u8 @8`, `space u8 @9`, `len u8 @10`,
//! `addr u64 @16`, `data u64 @24` (VMM); `resp_seq u64 @32` (daemon, release-stored last),
//! `status u8 @40`, `resp_data u64 @48` (daemon). Request number `n` (1-based) lives in slot
//! `(n - 1) % 64` with `seq = n`.
//!
//! Every field is accessed through atomics, so a hostile peer can only produce wrong *values*,
//! which both sides validate; all indices come from each side's private copy of its own counter.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::handshake::Space;
use crate::messages::{Access, OP_POSTED_WRITE, OP_READ, OP_WRITE};

/// Bytes per vCPU ring.
pub const RING_BYTES: usize = 8192;
/// Slots per ring.
pub const SLOTS: u64 = 64;
const SLOT_BASE: usize = 256;
const SLOT_SIZE: usize = 64;
const HEAD: usize = 0;
const DEVICE_SLEEPING: usize = 64;
const TAIL: usize = 128;
const VMM_SLEEPING: usize = 192;

/// A view of one ring inside a mapping. Only offsets below [`RING_BYTES`] are ever touched.
#[derive(Debug, Clone, Copy)]
pub struct RingView {
    base: *mut u8,
}

// SAFETY: the view only performs atomic accesses inside a shared mapping that outlives it.
unsafe impl Send for RingView {}
// SAFETY: as above.
unsafe impl Sync for RingView {}

/// Completion of a ring request as seen by the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll {
    /// Not answered yet.
    Pending,
    /// Answered: `(status, data)`.
    Done(u8, u64),
    /// The daemon wrote a sequence number that was never issued for this slot.
    Mismatch(u64),
}

impl RingView {
    /// A view of ring `index` in `mem`, or `None` if it does not fit.
    pub fn new(mem: &crate::sys::SharedMem, index: usize) -> Option<Self> {
        let end = index.checked_add(1)?.checked_mul(RING_BYTES)?;
        if end > mem.len() {
            return None;
        }
        // SAFETY: index * RING_BYTES + RING_BYTES <= len: the offset stays inside the mapping.
        let base = unsafe { mem.ptr().add(index * RING_BYTES) };
        Some(RingView { base })
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off + 8 <= RING_BYTES && off % 8 == 0);
        // SAFETY: every caller passes a constant-derived, 8-aligned offset below RING_BYTES; the
        // mapping is page-aligned and lives as long as the SharedMem that produced this view.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    fn u8_at(&self, off: usize) -> &AtomicU8 {
        debug_assert!(off < RING_BYTES);
        // SAFETY: as in u64_at, for a single byte.
        unsafe { &*(self.base.add(off) as *const AtomicU8) }
    }

    fn slot(n: u64) -> usize {
        SLOT_BASE + ((n.wrapping_sub(1) % SLOTS) as usize) * SLOT_SIZE
    }

    // ---- VMM side ----

    /// Requests the daemon has completed (untrusted value).
    pub fn tail(&self) -> u64 {
        self.u64_at(TAIL).load(Ordering::Acquire)
    }

    /// Publishes request number `a.seq` (must be `head + 1`) and returns whether the daemon
    /// asked to be woken.
    pub fn publish(&self, a: &Access) -> bool {
        let s = Self::slot(a.seq);
        self.u8_at(s + 8).store(a.op, Ordering::Relaxed);
        self.u8_at(s + 9).store(a.space.to_u8(), Ordering::Relaxed);
        self.u8_at(s + 10).store(a.len, Ordering::Relaxed);
        self.u64_at(s + 16).store(a.addr, Ordering::Relaxed);
        self.u64_at(s + 24).store(a.data, Ordering::Relaxed);
        self.u64_at(s).store(a.seq, Ordering::Release);
        self.u64_at(HEAD).store(a.seq, Ordering::SeqCst);
        self.u8_at(DEVICE_SLEEPING).load(Ordering::SeqCst) != 0
    }

    /// Checks whether request `seq` is answered.
    pub fn poll(&self, seq: u64) -> Poll {
        let s = Self::slot(seq);
        let r = self.u64_at(s + 32).load(Ordering::Acquire);
        if r == seq {
            let status = self.u8_at(s + 40).load(Ordering::Relaxed);
            let data = self.u64_at(s + 48).load(Ordering::Relaxed);
            return Poll::Done(status, data);
        }
        // Legitimate stale values: never used (0) or an earlier request in this slot.
        if r == 0 || (r < seq && (seq - r) % SLOTS == 0) {
            Poll::Pending
        } else {
            Poll::Mismatch(r)
        }
    }

    /// VMM announces it is about to sleep (`true`) or awake.
    pub fn set_vmm_sleeping(&self, v: bool) {
        self.u8_at(VMM_SLEEPING).store(v.into(), Ordering::SeqCst);
    }

    // ---- daemon side ----

    /// Requests published by the VMM (untrusted value).
    pub fn head(&self) -> u64 {
        self.u64_at(HEAD).load(Ordering::SeqCst)
    }

    /// Reads request number `n`; `None` when its slot does not carry `seq == n` or a field is
    /// invalid (the daemon then answers [`crate::messages::STATUS_BAD_REQUEST`]).
    pub fn take(&self, n: u64) -> Option<Access> {
        let s = Self::slot(n);
        if self.u64_at(s).load(Ordering::Acquire) != n {
            return None;
        }
        let op = self.u8_at(s + 8).load(Ordering::Relaxed);
        let len = self.u8_at(s + 10).load(Ordering::Relaxed);
        if !matches!(op, OP_READ | OP_WRITE | OP_POSTED_WRITE)
            || !crate::messages::valid_len(len.into())
        {
            return None;
        }
        Some(Access {
            seq: n,
            op,
            space: Space::from_u8(self.u8_at(s + 9).load(Ordering::Relaxed)).ok()?,
            len,
            addr: self.u64_at(s + 16).load(Ordering::Relaxed),
            data: self.u64_at(s + 24).load(Ordering::Relaxed),
        })
    }

    /// Completes request `n` and advances the tail; returns whether the VMM is asleep.
    pub fn complete(&self, n: u64, status: u8, data: u64) -> bool {
        let s = Self::slot(n);
        self.u8_at(s + 40).store(status, Ordering::Relaxed);
        self.u64_at(s + 48).store(data, Ordering::Relaxed);
        self.u64_at(s + 32).store(n, Ordering::Release);
        self.u64_at(TAIL).store(n, Ordering::SeqCst);
        self.u8_at(VMM_SLEEPING).load(Ordering::SeqCst) != 0
    }

    /// Daemon announces it is about to sleep (`true`) or awake.
    pub fn set_device_sleeping(&self, v: bool) {
        self.u8_at(DEVICE_SLEEPING)
            .store(v.into(), Ordering::SeqCst);
    }

    /// Test hook: writes a raw response sequence number into the slot of request `n`.
    #[cfg(test)]
    pub(crate) fn forge_resp_seq(&self, n: u64, value: u64) {
        self.u64_at(Self::slot(n) + 32)
            .store(value, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{OP_READ, STATUS_OK};
    use crate::sys::SharedMem;

    #[test]
    fn publish_take_complete() {
        let m = SharedMem::create("ring", 2 * RING_BYTES).unwrap();
        assert!(RingView::new(&m, 2).is_none());
        let vmm = RingView::new(&m, 1).unwrap();
        let dev = RingView::new(&m, 1).unwrap();
        for n in 1..=3 * SLOTS {
            let a = Access {
                seq: n,
                op: OP_READ,
                space: Space::Pio,
                len: 1,
                addr: 0x70 + n,
                data: 0,
            };
            assert!(!vmm.publish(&a));
            assert_eq!(vmm.poll(n), Poll::Pending);
            assert_eq!(dev.head(), n);
            assert_eq!(dev.take(n), Some(a));
            assert!(dev.take(n + 1).is_none());
            assert!(!dev.complete(n, STATUS_OK, n * 3));
            assert_eq!(vmm.tail(), n);
            assert_eq!(vmm.poll(n), Poll::Done(STATUS_OK, n * 3));
        }
        dev.set_device_sleeping(true);
        let a = Access {
            seq: 3 * SLOTS + 1,
            op: OP_READ,
            space: Space::Mmio,
            len: 8,
            addr: 0,
            data: 0,
        };
        assert!(vmm.publish(&a));
        vmm.forge_resp_seq(a.seq, a.seq + 5);
        assert_eq!(vmm.poll(a.seq), Poll::Mismatch(a.seq + 5));
    }
}
