//! 4-level page-table walk with permission checks and A/D updates.

use crate::memory::GuestRam;
use crate::state::{cr0, cr4, efer};

/// Kind of a memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Data read.
    Read = 0,
    /// Data write.
    Write = 1,
    /// Instruction fetch.
    Exec = 2,
}

/// #PF error code bits.
pub mod pf {
    /// The fault was a protection violation (page present).
    pub const P: u32 = 1 << 0;
    /// Write access.
    pub const W: u32 = 1 << 1;
    /// User-mode access.
    pub const U: u32 = 1 << 2;
    /// Reserved bit set in a paging entry.
    pub const RSVD: u32 = 1 << 3;
    /// Instruction fetch.
    pub const I: u32 = 1 << 4;
}

/// Physical address width advertised in CPUID 0x80000008.
pub const PHYS_BITS: u32 = 40;

const PRESENT: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const GLOBAL: u64 = 1 << 8;
const NX: u64 = 1 << 63;
const ADDR_MASK: u64 = ((1u64 << PHYS_BITS) - 1) & !0xFFF;

/// Result of a successful walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address of the 4 KiB page containing the access.
    pub page: u64,
    /// The mapping is global (survives non-global flushes).
    pub global: bool,
    /// The access type may also write to this page without another walk (W allowed, D set).
    pub writable: bool,
}

/// Paging-control registers needed by a walk.
#[derive(Clone, Copy, Debug)]
pub struct PagingMode {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

/// Walks the 4-level page tables for `va`. `user` is true for CPL 3 accesses.
/// On failure returns the #PF error code.
pub fn walk(
    ram: &GuestRam,
    mode: &PagingMode,
    va: u64,
    acc: Access,
    user: bool,
) -> Result<Translation, u32> {
    let nxe = mode.efer & efer::NXE != 0;
    let mut err = 0u32;
    if acc == Access::Write {
        err |= pf::W;
    }
    if user {
        err |= pf::U;
    }
    if acc == Access::Exec && nxe {
        err |= pf::I;
    }
    if mode.cr0 & cr0::PG == 0 {
        return Ok(Translation {
            page: va & !0xFFF,
            global: false,
            writable: true,
        });
    }
    let rsvd_hi = !((1u64 << PHYS_BITS) - 1) & !NX & 0x000F_FFFF_FFFF_FFFF;
    let rsvd_nx = if nxe { 0 } else { NX };
    let mut table = mode.cr3 & ADDR_MASK;
    let mut entries = [0u64; 4];
    let mut addrs = [0u64; 4];
    let mut n = 0;
    let mut allow_w = true;
    let mut allow_u = true;
    let mut allow_x = true;
    let mut page_size_shift = 12;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let idx = (va >> shift) & 0x1FF;
        let ea = table + idx * 8;
        let e = ram.read_u64(ea).ok_or(err)?;
        if e & PRESENT == 0 {
            return Err(err);
        }
        let mut rsvd = e & (rsvd_hi | rsvd_nx);
        let leaf = level == 0 || e & PS != 0;
        if e & PS != 0 {
            match level {
                3 => rsvd |= PS,
                2 => rsvd |= e & 0x3FFF_E000,
                1 => rsvd |= e & 0x1F_E000,
                _ => {}
            }
        }
        if rsvd != 0 {
            return Err(err | pf::P | pf::RSVD);
        }
        allow_w &= e & RW != 0;
        allow_u &= e & US != 0;
        allow_x &= e & NX == 0 || !nxe;
        entries[n] = e;
        addrs[n] = ea;
        n += 1;
        if leaf {
            page_size_shift = shift;
            break;
        }
        table = e & ADDR_MASK;
    }
    let wp = mode.cr0 & cr0::WP != 0;
    let ok = match acc {
        Access::Read => !user || allow_u,
        Access::Write => (!user || allow_u) && (allow_w || (!user && !wp)),
        Access::Exec => (!user || allow_u) && allow_x,
    };
    if !ok {
        return Err(err | pf::P);
    }
    let leaf = entries[n - 1];
    // Accessed bits on every level, dirty on the leaf for writes.
    for i in 0..n {
        let mut e = entries[i];
        let mut upd = e | ACCESSED;
        if i == n - 1 && acc == Access::Write {
            upd |= DIRTY;
        }
        if upd != e {
            // A compare-exchange on the host mapping: another vCPU may change the entry
            // meanwhile (the kernel clears PTEs with XCHG); then the walk starts over.
            if !ram.cas_u64(addrs[i], e, upd) {
                return walk(ram, mode, va, acc, user);
            }
            e = upd;
            entries[i] = e;
        }
    }
    let frame_mask = ADDR_MASK & !((1u64 << page_size_shift) - 1);
    let offset_mask = ((1u64 << page_size_shift) - 1) & !0xFFF;
    let page = (leaf & frame_mask) | (va & offset_mask);
    let global = leaf & GLOBAL != 0 && mode.cr4 & cr4::PGE != 0;
    let writable = (allow_w || (!user && !wp)) && entries[n - 1] & DIRTY != 0;
    Ok(Translation {
        page,
        global,
        writable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RamRegion;

    struct Env {
        _buf: Vec<u8>,
        ram: GuestRam,
    }

    fn env() -> Env {
        let mut buf = vec![0u8; 0x40_0000];
        let r = RamRegion {
            gpa: 0,
            host: buf.as_mut_ptr(),
            len: buf.len() as u64,
        };
        // SAFETY: `buf` lives in the same struct and is never reallocated.
        let ram = unsafe { GuestRam::new(vec![r]) }.unwrap();
        Env { _buf: buf, ram }
    }

    fn mode(wp: bool) -> PagingMode {
        PagingMode {
            cr0: cr0::PG | cr0::PE | if wp { cr0::WP } else { 0 },
            cr3: 0x1000,
            cr4: cr4::PAE | cr4::PGE,
            efer: efer::LMA | efer::LME | efer::NXE,
        }
    }

    #[test]
    fn four_k_walk_with_ad_bits_and_errors() {
        let e = env();
        let ram = &e.ram;
        // va 0x40_1000 -> pa 0x30_0000; PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000.
        ram.write_u64(0x1000, 0x2000 | 7);
        ram.write_u64(0x2000, 0x3000 | 7);
        ram.write_u64(0x3000 + 2 * 8, 0x4000 | 7);
        ram.write_u64(0x4000 + 8, 0x30_0000 | 1 | 4); // present, user, read-only
        let m = mode(true);
        let t = walk(ram, &m, 0x40_1234, Access::Read, true).unwrap();
        assert_eq!(t.page, 0x30_0000);
        assert!(!t.writable);
        assert_eq!(ram.read_u64(0x4008).unwrap() & ACCESSED, ACCESSED);
        assert_eq!(ram.read_u64(0x4008).unwrap() & DIRTY, 0);
        assert_eq!(
            walk(ram, &m, 0x40_1234, Access::Write, true),
            Err(pf::P | pf::W | pf::U)
        );
        assert_eq!(
            walk(ram, &m, 0x40_1234, Access::Write, false),
            Err(pf::P | pf::W)
        );
        // CR0.WP=0: supervisor may write read-only pages; D gets set.
        let t = walk(ram, &mode(false), 0x40_1234, Access::Write, false).unwrap();
        assert!(t.writable);
        assert_eq!(ram.read_u64(0x4008).unwrap() & DIRTY, DIRTY);
        // Not present.
        assert_eq!(walk(ram, &m, 0x40_2000, Access::Read, false), Err(0));
        assert_eq!(
            walk(ram, &m, 0x40_2000, Access::Exec, true),
            Err(pf::U | pf::I)
        );
        // NX.
        ram.write_u64(0x4000 + 8, 0x30_0000 | 1 | 2 | 4 | NX);
        assert_eq!(
            walk(ram, &m, 0x40_1000, Access::Exec, false),
            Err(pf::P | pf::I),
            "NX page fetch"
        );
        // Reserved bit (above PHYS_BITS).
        ram.write_u64(0x4000 + 8, 0x30_0000 | 1 | (1 << 45));
        assert_eq!(
            walk(ram, &m, 0x40_1000, Access::Read, false),
            Err(pf::P | pf::RSVD)
        );
        // U/S cleared at an upper level blocks user access.
        ram.write_u64(0x4000 + 8, 0x30_0000 | 7);
        ram.write_u64(0x2000, 0x3000 | 3);
        assert_eq!(
            walk(ram, &m, 0x40_1000, Access::Read, true),
            Err(pf::P | pf::U)
        );
    }

    #[test]
    fn large_pages_and_global() {
        let e = env();
        let ram = &e.ram;
        ram.write_u64(0x1000, 0x2000 | 3);
        // 1 GiB page at PDPT[1] -> 0x8000_0000 (global).
        ram.write_u64(0x2008, 0x8000_0000 | 3 | PS | GLOBAL);
        // PDPT[0] -> PD with a 2 MiB page at PD[3] -> 0x20_0000.
        ram.write_u64(0x2000, 0x3000 | 3);
        ram.write_u64(0x3018, 0x20_0000 | 3 | PS | DIRTY);
        let m = mode(true);
        let t = walk(ram, &m, 0x4123_4567, Access::Read, false).unwrap();
        assert_eq!(t.page, 0x8123_4000);
        assert!(t.global);
        let t = walk(ram, &m, 0x67_8123, Access::Write, false).unwrap();
        assert_eq!(t.page, 0x27_8000);
        assert!(!t.global && t.writable);
        // 2 MiB page with reserved low bits.
        ram.write_u64(0x3018, 0x20_2000 | 3 | PS);
        assert_eq!(
            walk(ram, &m, 0x60_0000, Access::Read, false),
            Err(pf::P | pf::RSVD)
        );
        // PS in PML4E is reserved.
        ram.write_u64(0x1000, 0x2000 | 3 | PS);
        assert_eq!(
            walk(ram, &m, 0x60_0000, Access::Read, false),
            Err(pf::P | pf::RSVD)
        );
    }
}
