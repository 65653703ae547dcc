//! x86 boot structures the VMM writes into guest RAM (GDT, identity-mapped page tables) and
//! the matching architectural [`BootState`] for the 64-bit Linux entry and the PVH entry.

use vm_memory::{Bytes, GuestAddress};

use crate::accel::{BootState, DescriptorTable, Segment};
use crate::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PML4_START};
use crate::memory::GuestMemory;

use super::BootError;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Selector of the boot code segment (`__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Selector of the boot data segment (`__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// Selector of the boot TSS.
pub const BOOT_TR: u16 = 0x20;

/// Packs a GDT descriptor from access/flags (`0xF0FF` mask: flags nibble + access byte).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0xffff)
}

/// Decodes a GDT descriptor into the hidden segment state loaded for `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> Segment {
    let base = (((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000)) as u32;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = (entry >> 55) & 1 == 1;
    Segment {
        base: u64::from(base),
        limit: if g {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: (entry >> 47) & 1 == 1,
        dpl: ((entry >> 45) & 3) as u8,
        db: (entry >> 54) & 1 == 1,
        s: (entry >> 44) & 1 == 1,
        l: (entry >> 53) & 1 == 1,
        g,
    }
}

/// Which kernel entry convention to set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = boot_params.
    Long64,
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh32,
}

fn gdt_for(mode: EntryMode) -> [u64; 5] {
    let code = match mode {
        EntryMode::Long64 => gdt_entry(0xa09b, 0, 0xfffff),
        EntryMode::Pvh32 => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        0,
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Writes a 4-level identity map of the first 4 GiB (2 MiB pages) at [`PML4_START`]
/// (PML4, PDPT, 4 PDs: six pages). Returns CR3.
pub fn write_page_tables(mem: &GuestMemory) -> Result<u64, BootError> {
    let pml4 = PML4_START;
    let pdpt = pml4 + 0x1000;
    let pd = pdpt + 0x1000;
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|_| BootError::GuestWrite("page tables"))
    };
    w(pdpt | 0x3, pml4)?;
    for i in 0..4u64 {
        w((pd + i * 0x1000) | 0x3, pdpt + i * 8)?;
        for j in 0..512u64 {
            let addr = (i << 30) | (j << 21);
            w(addr | 0x83, pd + i * 0x1000 + j * 8)?;
        }
    }
    Ok(pml4)
}

/// Writes the boot GDT/IDT (and for [`EntryMode::Long64`] the page tables) and returns the
/// entry state for `rip` with `param` in RSI (Long64) or RBX (PVH).
pub fn setup_entry(
    mem: &GuestMemory,
    mode: EntryMode,
    rip: u64,
    param: u64,
) -> Result<BootState, BootError> {
    let gdt = gdt_for(mode);
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(|_| BootError::GuestWrite("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| BootError::GuestWrite("IDT"))?;
    let mut st = BootState {
        rip,
        rsp: BOOT_STACK_POINTER,
        rflags: 2,
        cs: segment_from_gdt(gdt[2], BOOT_CS),
        data: segment_from_gdt(gdt[3], BOOT_DS),
        tr: segment_from_gdt(gdt[4], BOOT_TR),
        gdt: DescriptorTable {
            base: BOOT_GDT_START,
            limit: (gdt.len() * 8 - 1) as u16,
        },
        idt: DescriptorTable {
            base: BOOT_IDT_START,
            limit: 7,
        },
        ..Default::default()
    };
    match mode {
        EntryMode::Long64 => {
            st.cr3 = write_page_tables(mem)?;
            st.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
            st.cr4 = CR4_PAE;
            st.efer = EFER_LME | EFER_LMA;
            st.rsi = param;
        }
        EntryMode::Pvh32 => {
            st.cr0 = CR0_PE | CR0_ET;
            st.rbx = param;
        }
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    #[test]
    fn gdt_entries_decode() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), BOOT_CS);
        assert!(code.l && code.present && code.s && code.g && !code.db);
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        let tss = segment_from_gdt(gdt_entry(0x808b, 0, 0xfffff), BOOT_TR);
        assert!(!tss.s && tss.present);
        assert_eq!(tss.type_, 0xb);
        let c32 = segment_from_gdt(gdt_entry(0xc09b, 0x1234_5678, 0xfffff), BOOT_CS);
        assert!(c32.db && !c32.l);
        assert_eq!(c32.base, 0x1234_5678);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mem = ram.memory();
        let st = setup_entry(mem, EntryMode::Long64, 0x100200, 0x7000).unwrap();
        assert_eq!(st.cr3, PML4_START);
        assert_eq!(st.rsi, 0x7000);
        let walk = |va: u64| -> u64 {
            let pml4e: u64 = mem
                .read_obj(GuestAddress(st.cr3 + ((va >> 39) & 511) * 8))
                .unwrap();
            let pdpte: u64 = mem
                .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 511) * 8))
                .unwrap();
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & 0x81, 0x81, "present 2 MiB page");
            (pde & !0x1f_ffff & 0x000f_ffff_ffff_f000) | (va & 0x1f_ffff)
        };
        for va in [
            0u64,
            0x7000,
            0x10_0000,
            0xc000_0000,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(walk(va), va);
        }
    }
}
