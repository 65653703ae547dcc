//! LOCKed read-modify-writes on guest memory: atomic against the other vCPUs.
//!
//! An access inside one page of RAM is a compare-exchange loop on the host address
//! ([`crate::atomic::cas`]). An access split across two pages, or to MMIO, cannot be one host
//! atomic: those take [`SPLIT_LOCK`], one global mutex around the read and the write, which
//! makes them atomic against each other but not against plain accesses of other vCPUs
//! (Linux never does split locked accesses to memory another CPU writes plainly; MMIO has no
//! atomics).

use super::walk::Access;
use crate::ctx::{Ctx, R};
use std::sync::Mutex;

/// Serializes the locked accesses that cannot be one host atomic.
static SPLIT_LOCK: Mutex<()> = Mutex::new(());

impl Ctx<'_> {
    /// Atomically replaces the `size` (1, 2, 4, 8) bytes at linear address `va` with
    /// `f(old)` and returns `old`. `f` may run several times (the compare-exchange retries
    /// while other vCPUs write the location) and must be pure. When `f` returns `None`
    /// nothing is written (the value was read atomically all the same).
    pub fn atomic_rmw(&mut self, va: u64, size: u8, f: impl Fn(u64) -> Option<u64>) -> R<u64> {
        let off = (va & 0xFFF) as usize;
        if off + size as usize <= 0x1000 {
            let h = self.xlate(va, Access::Write)?;
            if h.host != 0 {
                let p = (h.host + off) as *mut u8;
                // SAFETY: `p..p+size` lies inside one RAM page of a live mapping (the TLB and
                // the walk only hand out host pointers from `GuestRam`).
                let mut old = unsafe { crate::atomic::cas(p, size, 0, 0) };
                loop {
                    let new = f(old).unwrap_or(old);
                    // SAFETY: as above.
                    let cur = unsafe { crate::atomic::cas(p, size, old, new) };
                    if cur == old {
                        if new != old && self.code.is_code(h.phys) {
                            self.note_smc(h.phys);
                        }
                        return Ok(old);
                    }
                    old = cur;
                }
            }
        }
        let _g = SPLIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        self.check_write(va, size as usize)?;
        let old = self.read(va, size)?;
        if let Some(new) = f(old) {
            self.write(va, size, new)?;
        }
        Ok(old)
    }

    /// CMPXCHG16B on `va` (16-byte aligned, checked by the caller): atomically compares the
    /// 16 bytes with `old` and stores `new` when equal; returns the value found.
    pub fn atomic_cas16(&mut self, va: u64, old: (u64, u64), new: (u64, u64)) -> R<(u64, u64)> {
        let h = self.xlate(va, Access::Write)?;
        if h.host != 0 {
            let p = (h.host + (va & 0xFFF) as usize) as *mut u8;
            // SAFETY: `va` is 16-byte aligned, so the 16 bytes lie inside one RAM page of a
            // live mapping, and the host address is 16-byte aligned too (pages are).
            let cur = unsafe { crate::atomic::cas16(p, old, new) };
            if cur == old && new != old && self.code.is_code(h.phys) {
                self.note_smc(h.phys);
            }
            return Ok(cur);
        }
        let _g = SPLIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let lo = self.read(va, 8)?;
        let hi = self.read(va.wrapping_add(8), 8)?;
        if (lo, hi) == old {
            self.write(va, 8, new.0)?;
            self.write(va.wrapping_add(8), 8, new.1)?;
        }
        Ok((lo, hi))
    }
}
