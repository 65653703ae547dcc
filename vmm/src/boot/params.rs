//! Linux `boot_params` (zero page) and PVH `hvm_start_info`.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::layout::{
    CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::memory::GuestRam;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const CAN_USE_HEAP: u8 = 0x80;
const HEAP_END: u16 = 0xfe00;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Writes the zero page; returns its address.
pub(super) fn write_boot_params(
    ram: &GuestRam,
    hdr: Option<setup_header>,
    cmdline_len: u32,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<u64, BootError> {
    let mut p = boot_params {
        hdr: hdr.unwrap_or_else(|| setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            kernel_alignment: KERNEL_MIN_ALIGNMENT,
            ..Default::default()
        }),
        ..Default::default()
    };
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.loadflags |= CAN_USE_HEAP;
    p.hdr.heap_end_ptr = HEAP_END;
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = cmdline_len + 1;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
        p.ext_ramdisk_image = (addr >> 32) as u32;
        p.ext_ramdisk_size = (size >> 32) as u32;
    }
    p.acpi_rsdp_addr = rsdp;
    let e820 = ram.e820();
    for (slot, e) in p.e820_table.iter_mut().zip(e820.iter()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
        };
    }
    p.e820_entries = e820.len().min(p.e820_table.len()) as u8;
    ram.memory()
        .write_obj(p, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::GuestWrite("boot_params"))?;
    Ok(ZERO_PAGE_START)
}

/// Writes `hvm_start_info` with memmap, command line, RSDP and the initrd module; returns
/// its address.
pub(super) fn write_pvh_info(
    ram: &GuestRam,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<u64, BootError> {
    let mem = ram.memory();
    let e820 = ram.e820();
    for (i, e) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        };
        mem.write_obj(
            entry,
            GuestAddress(
                PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64,
            ),
        )
        .map_err(|_| BootError::GuestWrite("PVH memmap"))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let m = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(m, GuestAddress(PVH_MODLIST_START))
            .map_err(|_| BootError::GuestWrite("PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(|_| BootError::GuestWrite("hvm_start_info"))?;
    Ok(PVH_INFO_START)
}
