//! Direct-mapped software TLB: guest-virtual page → host pointer (RAM) or guest-physical page
//! (MMIO), one array per access kind. Entries are tagged with the privilege (user/supervisor)
//! they were checked for.

use super::walk::Access;

/// Number of entries per access kind.
pub const TLB_SIZE: usize = 512;

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    /// `page | VALID | (USER if filled for CPL 3) | (NO_HOST for MMIO)`; 0 = invalid.
    tag: u64,
    /// Host address of the page minus its guest-virtual address (wrapping: host address of
    /// a byte = `va + addend`); 0 for MMIO.
    addend: u64,
    /// Guest-physical page.
    phys: u64,
    global: bool,
}

/// Tag bit: the entry is valid.
pub(crate) const VALID: u64 = 1;
/// Tag bit: the entry was filled for a user-mode (CPL 3) access.
pub(crate) const USER: u64 = 2;
/// Tag bit: the page is not RAM (MMIO). Translated code compares the whole tag with
/// `page | VALID | USER?`, so such an entry never matches its inline lookup, which then
/// needs no separate check for it; the interpreter's lookup ignores the bit.
pub(crate) const NO_HOST: u64 = 4;

/// Byte layout of the TLB, for the inline lookup of translated code.
#[cfg_attr(not(feature = "jit"), allow(dead_code))]
pub(crate) mod layout {
    use super::{Entry, Tlb, TLB_SIZE};
    use std::mem::{offset_of, size_of};
    /// Size of one entry.
    pub const ENTRY: usize = size_of::<Entry>();
    /// Offset of the entry array of access kind 0 in [`Tlb`].
    pub const BASE: usize = offset_of!(Tlb, e);
    /// Distance between the arrays of two access kinds.
    pub const KIND: usize = ENTRY * TLB_SIZE;
    /// Offset of the tag in an entry.
    pub const TAG: usize = offset_of!(Entry, tag);
    /// Offset of the addend (host address minus guest-virtual address) in an entry.
    pub const ADDEND: usize = offset_of!(Entry, addend);
    const _: () = assert!(ENTRY.is_power_of_two() && ENTRY <= 4096);
}

/// A hit: where the page lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    /// Host address of the page start, 0 if MMIO.
    pub host: usize,
    /// Guest-physical page address.
    pub phys: u64,
}

/// The software TLB.
#[derive(Clone, Debug)]
pub struct Tlb {
    e: [[Entry; TLB_SIZE]; 3],
    /// Flush generations for what translated code caches about code mappings (the JIT's
    /// chain slots): `gen` moves on at every flush that may drop a code mapping, `gen_global`
    /// only at those that may drop a global one (CR3 writes keep global pages). Both take
    /// the value of one counter (`flushes`), so equal values mean the same flush.
    gen: u64,
    gen_global: u64,
    flushes: u64,
}

impl Default for Tlb {
    fn default() -> Self {
        Tlb {
            e: [[Entry::default(); TLB_SIZE]; 3],
            gen: 0,
            gen_global: 0,
            flushes: 0,
        }
    }
}

#[inline]
fn tag(va: u64, user: bool) -> u64 {
    (va & !0xFFF) | VALID | if user { USER } else { 0 }
}

impl Entry {
    /// Whether the entry maps `va`'s page for privilege `user` (RAM or MMIO).
    #[inline]
    fn holds(&self, va: u64, user: bool) -> bool {
        self.tag & !NO_HOST == tag(va, user)
    }
}

#[inline]
fn slot(va: u64) -> usize {
    ((va >> 12) as usize) & (TLB_SIZE - 1)
}

impl Tlb {
    /// Looks up `va` for `acc` at privilege `user`.
    #[inline(always)]
    pub fn lookup(&self, va: u64, acc: Access, user: bool) -> Option<Hit> {
        let e = &self.e[acc as usize][slot(va)];
        if e.holds(va, user) {
            let host = if e.tag & NO_HOST != 0 {
                0
            } else {
                e.addend.wrapping_add(va & !0xFFF) as usize
            };
            Some(Hit { host, phys: e.phys })
        } else {
            None
        }
    }

    /// Inserts a translation.
    pub fn insert(&mut self, va: u64, acc: Access, user: bool, hit: Hit, global: bool) {
        let (no_host, addend) = match hit.host {
            0 => (NO_HOST, 0),
            h => (0, (h as u64).wrapping_sub(va & !0xFFF)),
        };
        self.e[acc as usize][slot(va)] = Entry {
            tag: tag(va, user) | no_host,
            addend,
            phys: hit.phys,
            global,
        };
    }

    /// The flush generations of code mappings: (any, global ones). See the fields.
    #[inline]
    pub fn generations(&self) -> (u64, u64) {
        (self.gen, self.gen_global)
    }

    /// Whether the code mapping of `va` at privilege `user` is global (`None`: not cached).
    pub fn exec_global(&self, va: u64, user: bool) -> Option<bool> {
        let e = &self.e[Access::Exec as usize][slot(va)];
        e.holds(va, user).then_some(e.global)
    }

    fn moved(&mut self, global: bool) {
        self.flushes += 1;
        self.gen = self.flushes;
        if global {
            self.gen_global = self.flushes;
        }
    }

    /// Flushes everything (CR4 change, global flush).
    pub fn flush_all(&mut self) {
        self.moved(true);
        for arr in &mut self.e {
            arr.fill(Entry::default());
        }
    }

    /// Flushes non-global entries (CR3 write).
    pub fn flush_non_global(&mut self) {
        self.moved(false);
        for arr in &mut self.e {
            for e in arr.iter_mut() {
                if !e.global {
                    *e = Entry::default();
                }
            }
        }
    }

    /// Flushes one virtual page (INVLPG), global or not.
    pub fn flush_page(&mut self, va: u64) {
        let s = slot(va);
        let code = &self.e[Access::Exec as usize][s];
        if code.tag & !0xFFF == va & !0xFFF && code.tag != 0 {
            let global = code.global;
            self.moved(global);
        }
        for arr in &mut self.e {
            if arr[s].tag & !0xFFF == va & !0xFFF {
                arr[s] = Entry::default();
            }
        }
    }

    /// Drops every write entry (another CPU started caching code on some page: writes to it
    /// must take the slow path that detects self-modifying code). Code mappings are kept.
    pub fn flush_writes(&mut self) {
        self.e[Access::Write as usize].fill(Entry::default());
    }

    /// Drops write entries mapping guest-physical `phys_page` (the page now holds code, so
    /// writes to it must take the slow path that detects self-modifying code).
    pub fn flush_phys_writes(&mut self, phys_page: u64) {
        for e in self.e[Access::Write as usize].iter_mut() {
            if e.tag != 0 && e.phys == phys_page {
                *e = Entry::default();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_lookup_flush() {
        let mut t = Tlb::default();
        let h = Hit {
            host: 0x1000,
            phys: 0x5000,
        };
        t.insert(0x7000_1000, Access::Read, false, h, false);
        t.insert(0x7000_2000, Access::Read, false, h, true);
        assert_eq!(t.lookup(0x7000_1FFF, Access::Read, false), Some(h));
        assert_eq!(
            t.lookup(0x7000_1000, Access::Read, true),
            None,
            "privilege tagged"
        );
        assert_eq!(t.lookup(0x7000_1000, Access::Write, false), None);
        t.flush_non_global();
        assert_eq!(t.lookup(0x7000_1000, Access::Read, false), None);
        assert_eq!(t.lookup(0x7000_2000, Access::Read, false), Some(h));
        t.flush_page(0x7000_2000);
        assert_eq!(t.lookup(0x7000_2000, Access::Read, false), None);
        t.insert(0x9000, Access::Write, false, h, false);
        t.flush_phys_writes(0x5000);
        assert_eq!(t.lookup(0x9000, Access::Write, false), None);
        // MMIO: found by the interpreter's lookup, never by translated code's tag compare.
        let m = Hit {
            host: 0,
            phys: 0xFEE0_0000,
        };
        t.insert(0xFFFF_8000_FEE0_0000, Access::Read, false, m, false);
        assert_eq!(
            t.lookup(0xFFFF_8000_FEE0_0030, Access::Read, false),
            Some(m)
        );
        let e = t.e[Access::Read as usize][slot(0xFFFF_8000_FEE0_0000)];
        assert_ne!(e.tag, 0xFFFF_8000_FEE0_0000 | VALID, "MMIO tagged");
        assert_eq!(t.exec_global(0xFFFF_8000_FEE0_0000, false), None);
    }

    /// The code-mapping generations the JIT's chain slots depend on: a CR3 write moves the
    /// non-global one only, INVLPG of a page without a code mapping moves nothing, of a global
    /// code page both, a full flush both.
    #[test]
    fn flush_generations() {
        let mut t = Tlb::default();
        let h = Hit {
            host: 0x1000,
            phys: 0x5000,
        };
        t.insert(0x40_0000, Access::Exec, true, h, false);
        t.insert(0xFFFF_FFFF_8100_0000, Access::Exec, false, h, true);
        t.insert(0x60_0000, Access::Read, true, h, false);
        let g0 = t.generations();
        t.flush_page(0x60_0000);
        assert_eq!(t.generations(), g0, "INVLPG of a data page");
        t.flush_non_global();
        let g1 = t.generations();
        assert!(g1.0 > g0.0 && g1.1 == g0.1, "CR3 write: {g0:?} -> {g1:?}");
        assert_eq!(t.exec_global(0xFFFF_FFFF_8100_0000, false), Some(true));
        t.flush_page(0xFFFF_FFFF_8100_0000);
        let g2 = t.generations();
        assert!(g2.0 > g1.0 && g2.1 > g1.1, "INVLPG of a global code page");
        t.flush_all();
        let g3 = t.generations();
        assert!(g3.0 > g2.0 && g3.1 > g2.1 && g3.0 == g3.1, "full flush");
    }
}
