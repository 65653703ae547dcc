//! Guest physical RAM as seen by the TCG: a list of host-mapped regions, and the bitmap of
//! guest-physical pages that hold cached code.
//!
//! # Safety contract
//!
//! The VMM owns the mappings (memfd-backed `mmap`s). The TCG only holds raw pointers:
//! - every region must stay mapped, readable and writable for as long as any [`GuestRam`]
//!   built from it (and any `Cpu` running with it) is alive;
//! - other threads and processes (device daemons doing DMA) may write the memory concurrently.
//!   The TCG therefore never creates Rust references (`&[u8]`/`&mut [u8]`) into guest memory; all
//!   accesses go through raw-pointer copies (`ptr::copy_nonoverlapping`, `read_unaligned`,
//!   `write_unaligned`). Concurrent writes may be observed torn, exactly as on real hardware
//!   for unaligned or non-atomic accesses.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// Errors building a [`GuestRam`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MemoryError {
    /// A region has length zero, is not page aligned, or wraps around.
    #[error(
        "invalid RAM region at gpa {gpa:#x} (len {len:#x}): must be page aligned and non-empty"
    )]
    BadRegion {
        /// Guest physical base.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Two regions overlap.
    #[error("RAM regions overlap at gpa {0:#x}")]
    Overlap(u64),
}

/// One contiguous host mapping of guest RAM.
#[derive(Clone, Copy, Debug)]
pub struct RamRegion {
    /// Guest physical base address (page aligned).
    pub gpa: u64,
    /// Host address of the first byte.
    pub host: *mut u8,
    /// Length in bytes (multiple of 4 KiB).
    pub len: u64,
}

/// Guest physical memory: RAM regions; everything else is MMIO handled by the `Platform`.
#[derive(Debug, Clone)]
pub struct GuestRam {
    regions: Vec<RamRegion>,
    end: u64,
}

// SAFETY: GuestRam only holds raw pointers to shared mappings that, per the constructor's
// contract, outlive it and tolerate concurrent access; it never hands out references.
unsafe impl Send for GuestRam {}
// SAFETY: see above; all accesses are raw-pointer copies.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Builds the RAM map.
    ///
    /// # Safety
    /// Each region's `host..host+len` must be a valid read/write mapping that outlives the
    /// returned value and every `Cpu::run` call using it (see the module documentation).
    pub unsafe fn new(mut regions: Vec<RamRegion>) -> Result<Self, MemoryError> {
        regions.sort_by_key(|r| r.gpa);
        let mut end = 0;
        for r in &regions {
            if r.len == 0
                || r.len & 0xFFF != 0
                || r.gpa & 0xFFF != 0
                || r.gpa.checked_add(r.len).is_none()
            {
                return Err(MemoryError::BadRegion {
                    gpa: r.gpa,
                    len: r.len,
                });
            }
            if r.gpa < end {
                return Err(MemoryError::Overlap(r.gpa));
            }
            end = r.gpa + r.len;
        }
        Ok(GuestRam { regions, end })
    }

    /// One past the highest RAM guest-physical address.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The regions, sorted by guest address.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Host pointer for `gpa` and the number of bytes remaining in its region, or `None`
    /// when `gpa` is not RAM.
    #[inline]
    pub fn host_ptr(&self, gpa: u64) -> Option<(*mut u8, u64)> {
        for r in &self.regions {
            if gpa >= r.gpa && gpa - r.gpa < r.len {
                let off = gpa - r.gpa;
                // `wrapping_add` keeps this safe code; the pointer is in bounds by the check.
                return Some((r.host.wrapping_add(off as usize), r.len - off));
            }
        }
        None
    }

    /// Copies guest RAM at `gpa` into `buf`. Returns false (and copies nothing) if any byte
    /// is not RAM.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        match self.host_ptr(gpa) {
            Some((p, rem)) if rem >= buf.len() as u64 => {
                // SAFETY: `p..p+buf.len()` is inside a live mapping (constructor contract);
                // `buf` is a distinct Rust buffer, so they cannot overlap.
                unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
                true
            }
            _ => false,
        }
    }

    /// Copies `buf` into guest RAM at `gpa`. Returns false (and writes nothing) if any byte
    /// is not RAM.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> bool {
        match self.host_ptr(gpa) {
            Some((p, rem)) if rem >= buf.len() as u64 => {
                // SAFETY: as in `read`.
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), p, buf.len()) };
                true
            }
            _ => false,
        }
    }

    /// Reads a little-endian u64 (for page-table walks). `None` if not RAM.
    #[inline]
    pub fn read_u64(&self, gpa: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b).then(|| u64::from_le_bytes(b))
    }

    /// Atomically replaces the u64 at `gpa` with `new` if it still holds `old` (a host
    /// compare-exchange). False if it did not, or `gpa..gpa+8` is not RAM.
    pub fn cas_u64(&self, gpa: u64, old: u64, new: u64) -> bool {
        match self.host_ptr(gpa) {
            // SAFETY: `p..p+8` is inside a live mapping (constructor contract).
            Some((p, rem)) if rem >= 8 => unsafe { crate::atomic::cas(p, 8, old, new) == old },
            _ => false,
        }
    }

    /// Writes a little-endian u64. Returns false if not RAM.
    #[inline]
    pub fn write_u64(&self, gpa: u64, v: u64) -> bool {
        self.write(gpa, &v.to_le_bytes())
    }
}

/// Which vCPUs of a machine hold cached code on each guest page (one bit per vCPU), and
/// per vCPU the pages other vCPUs wrote while it held code there.
///
/// A write by one vCPU to a page another has translated is posted to that vCPU's mailbox;
/// the other vCPU drops its blocks of the page at its next block boundary (before it runs
/// them again). Starting to cache code on a page bumps `added`: the others then drop their
/// write-TLB entries, so their later writes to the page take the checked path.
#[derive(Debug)]
pub struct SharedCode {
    pages: Box<[AtomicU8]>,
    mail: Box<[Mailbox]>,
    added: AtomicU64,
}

#[derive(Debug, Default)]
struct Mailbox {
    any: AtomicBool,
    pages: Mutex<Vec<u64>>,
}

impl SharedCode {
    /// Most vCPUs (bits per page).
    pub const MAX_CPUS: usize = 8;

    /// Code-page masks for guest RAM below `ram_end`, for `cpus` (≤ 8) vCPUs.
    pub fn new(ram_end: u64, cpus: usize) -> Self {
        let n = usize::try_from(ram_end.div_ceil(4096)).unwrap_or(0);
        SharedCode {
            pages: (0..n).map(|_| AtomicU8::new(0)).collect(),
            mail: (0..cpus.clamp(1, Self::MAX_CPUS))
                .map(|_| Mailbox::default())
                .collect(),
            added: AtomicU64::new(0),
        }
    }

    /// Bumped whenever a vCPU starts caching code on a page no vCPU had code on.
    pub fn added(&self) -> u64 {
        self.added.load(Ordering::Acquire)
    }
}

/// Bitmap of guest-physical pages that hold cached code (this CPU's; with a [`SharedCode`],
/// also the other CPUs').
#[derive(Debug, Default, Clone)]
pub struct CodeBitmap {
    bits: Vec<u64>,
    shared: Option<(Arc<SharedCode>, u8)>,
}

impl CodeBitmap {
    /// Whether the page containing `phys` holds cached code (of any CPU).
    #[inline(always)]
    pub fn is_code(&self, phys: u64) -> bool {
        let pn = (phys >> 12) as usize;
        let mine = match self.bits.get(pn / 64) {
            Some(w) => w & (1 << (pn % 64)) != 0,
            None => false,
        };
        mine || self.others(pn) != 0
    }

    /// The other CPUs holding code on page `pn`, as a bit mask.
    #[inline(always)]
    fn others(&self, pn: usize) -> u8 {
        match &self.shared {
            Some((sh, me)) => sh
                .pages
                .get(pn)
                .map_or(0, |m| m.load(Ordering::Acquire) & !(1 << me)),
            None => 0,
        }
    }

    /// Joins the machine's shared code-page masks as CPU `me` (< 8).
    pub(crate) fn share(&mut self, shared: Arc<SharedCode>, me: u8) {
        self.clear();
        self.shared = Some((shared, me % SharedCode::MAX_CPUS as u8));
    }

    /// The shared masks, if joined.
    pub(crate) fn shared(&self) -> Option<&Arc<SharedCode>> {
        self.shared.as_ref().map(|(s, _)| s)
    }

    /// Marks (or unmarks) the page containing `phys` as holding cached code.
    pub(crate) fn set(&mut self, phys: u64, on: bool) {
        let pn = (phys >> 12) as usize;
        if pn / 64 >= self.bits.len() {
            self.bits.resize(pn / 64 + 1, 0);
        }
        if on {
            self.bits[pn / 64] |= 1 << (pn % 64);
        } else {
            self.bits[pn / 64] &= !(1 << (pn % 64));
        }
        if let Some((sh, me)) = &self.shared {
            if let Some(m) = sh.pages.get(pn) {
                if on {
                    if m.fetch_or(1 << me, Ordering::AcqRel) == 0 {
                        sh.added.fetch_add(1, Ordering::AcqRel);
                    }
                } else {
                    m.fetch_and(!(1 << me), Ordering::AcqRel);
                }
            }
        }
    }

    /// Unmarks every page.
    pub(crate) fn clear(&mut self) {
        if let Some((sh, me)) = &self.shared {
            for (i, w) in self.bits.iter().enumerate() {
                let mut w = *w;
                while w != 0 {
                    let pn = i * 64 + w.trailing_zeros() as usize;
                    w &= w - 1;
                    if let Some(m) = sh.pages.get(pn) {
                        m.fetch_and(!(1 << me), Ordering::AcqRel);
                    }
                }
            }
        }
        self.bits.clear();
    }

    /// This CPU wrote the code page `phys_page`: tells the other CPUs holding code there.
    pub(crate) fn notify_write(&self, phys_page: u64) {
        let Some((sh, _)) = &self.shared else {
            return;
        };
        let mut others = self.others((phys_page >> 12) as usize);
        while others != 0 {
            let cpu = others.trailing_zeros() as usize;
            others &= others - 1;
            if let Some(mb) = sh.mail.get(cpu) {
                let mut p = mb.pages.lock().unwrap_or_else(|e| e.into_inner());
                if !p.contains(&phys_page) {
                    p.push(phys_page);
                }
                mb.any.store(true, Ordering::Release);
            }
        }
    }

    /// Takes the pages other CPUs wrote while this one held code there.
    pub(crate) fn take_mail(&self) -> Vec<u64> {
        let Some((sh, me)) = &self.shared else {
            return Vec::new();
        };
        match sh.mail.get(usize::from(*me)) {
            Some(mb) if mb.any.load(Ordering::Acquire) => {
                mb.any.store(false, Ordering::Release);
                std::mem::take(&mut *mb.pages.lock().unwrap_or_else(|e| e.into_inner()))
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_and_bounds() {
        let mut buf = vec![0u8; 0x2000];
        let r = RamRegion {
            gpa: 0x10000,
            host: buf.as_mut_ptr(),
            len: 0x2000,
        };
        // SAFETY: `buf` outlives `ram` in this test.
        let ram = unsafe { GuestRam::new(vec![r]) }.unwrap();
        assert!(ram.write_u64(0x10008, 0x1122_3344_5566_7788));
        assert_eq!(ram.read_u64(0x10008), Some(0x1122_3344_5566_7788));
        assert_eq!(ram.read_u64(0x11FFC), None, "crosses the end");
        assert_eq!(ram.read_u64(0xFFF8), None);
        let bad = RamRegion {
            gpa: 0x10800,
            host: buf.as_mut_ptr(),
            len: 0x1000,
        };
        // SAFETY: never accessed.
        assert!(unsafe { GuestRam::new(vec![r, bad]) }.is_err());
        drop(ram);
        assert_eq!(buf[8], 0x88);
    }
}
