//! The x86-64 machine's guest-physical memory map, shared by KVM and TCG.
//!
//! ```text
//! 0x0000_0000 .. 0x0009_fc00  RAM (low)       boot structures at fixed addresses below
//! 0x0009_fc00 .. 0x0010_0000  reserved        EBDA, VGA hole, BIOS area incl. ACPI tables
//!                                             (RSDP at 0xe0000, found by the BIOS-area scan)
//! 0x0010_0000 .. min(RAM, 3G) RAM             kernel at 1 MiB, initrd high below the top
//! 0xc000_0000 .. 0x1_0000_0000 MMIO hole      ACPI PM device, virtio-mmio windows, TSS and
//!                                             identity-map pages for KVM, IOAPIC, LAPIC
//! 0x1_0000_0000 .. 4G + rest  RAM (high)      only when RAM > 3 GiB
//! ```

/// Boot GDT (null, null, code64 at 0x10, data at 0x18, TSS at 0x20).
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the identity map written by the VMM; PDPT and 4 PDs follow (6 pages).
pub const PML4_START: u64 = 0x9000;
/// End (exclusive) of the page-table area.
pub const PAGE_TABLES_END: u64 = 0xf000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Maximum command-line size (including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// Start of the EBDA / reserved area below 1 MiB.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables live in the BIOS area: RSDP first, 16-byte aligned.
pub const ACPI_START: u64 = 0xe_0000;
/// End (exclusive) of the ACPI table area.
pub const ACPI_END: u64 = 0x10_0000;
/// High memory (kernel load address).
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole; RAM above it is relocated to 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// ACPI power-management device (sleep control/status + reset register), MMIO.
pub const ACPI_PM_START: u64 = 0xc000_0000;
/// Size of the ACPI PM device window.
pub const ACPI_PM_SIZE: u64 = 0x1000;
/// ACPI Generic Event Device's event register (MMIO, read-to-clear), see `acpi::ged`.
pub const GED_START: u64 = 0xc000_1000;
/// Size of the GED window.
pub const GED_SIZE: u64 = 0x1000;
/// GSI of the GED (edge, active high): an ISA line no platform or forwarded device uses.
pub const GED_GSI: u32 = 12;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Number of virtio-mmio windows (and GSIs) the machine offers.
pub const VIRTIO_MMIO_COUNT: u32 = 8;
/// GSI of the first virtio-mmio window (edge, active high); window `i` uses `+ i`.
pub const VIRTIO_MMIO_GSI_BASE: u32 = 16;
/// KVM identity-map page (one page, inside the hole, unused by devices).
pub const KVM_IDENTITY_MAP_START: u64 = 0xfeff_c000;
/// KVM TSS (three pages, right after the identity map page).
pub const KVM_TSS_START: u64 = 0xfeff_d000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;

/// GSI of COM1.
pub const SERIAL_GSI: u32 = 4;
/// GSI of the ACPI SCI (not used by a hardware-reduced platform, declared for completeness).
pub const SCI_GSI: u32 = 9;
/// COM1 I/O base.
pub const SERIAL_PORT: u16 = 0x3f8;
/// CMOS RTC index/data ports.
pub const RTC_PORT: u16 = 0x70;
/// i8042 data port (status/command is at +4).
pub const I8042_PORT: u16 = 0x60;
/// Platform port ranges `(base, len)` that never reach the bus under KVM (in-kernel PIC,
/// PIT, speaker port, ELCR) and that the TCG's own chips serve: never granted to a forwarded
/// device.
pub const PLATFORM_PIO: [(u64, u64); 5] = [(0x20, 2), (0x40, 4), (0x61, 1), (0xa0, 2), (0x4d0, 2)];

/// Base address of virtio-mmio window `i`.
pub fn virtio_mmio_base(i: u32) -> u64 {
    VIRTIO_MMIO_START + u64::from(i) * VIRTIO_MMIO_SIZE
}
