//! ACPI tables for the hardware-reduced machine, built with `acpi_tables` 0.2 and written
//! into the BIOS area at [`ACPI_START`] (RSDP first, so both the BIOS-area scan and
//! `boot_params.acpi_rsdp_addr` / PVH `rsdp_paddr` find it):
//! RSDP → XSDT → {FADT → DSDT, MADT}.

mod dsdt;
pub mod ged;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

pub use dsdt::{build_dsdt, VirtioWindow};

use crate::devices::acpi_pm::{
    RESET_OFFSET, RESET_VALUE, SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET,
};
use crate::layout::{ACPI_END, ACPI_PM_START, ACPI_START, IOAPIC_START, LAPIC_START};
use crate::memory::GuestMemory;

/// OEM ID in every table.
pub const OEM_ID: [u8; 6] = *b"RQEMU ";
/// OEM table ID in every table.
pub const OEM_TABLE_ID: [u8; 8] = *b"RQEMUVMM";
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;

/// Errors from building/writing ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the BIOS area.
    #[error("ACPI tables ({0} bytes) do not fit below 1 MiB")]
    TooBig(u64),
    /// Writing to guest memory failed.
    #[error("writing ACPI table {0} to guest memory")]
    GuestWrite(&'static str),
}

/// What the tables describe.
#[derive(Debug, Clone)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC IDs 0..n).
    pub vcpus: u32,
    /// virtio-mmio windows to declare.
    pub virtio: Vec<VirtioWindow>,
}

/// The serialized tables with their guest addresses.
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// `(guest address, bytes)` for RSDP, XSDT, FADT, MADT, DSDT in that order.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

impl AcpiTables {
    /// Address of the RSDP.
    pub fn rsdp_addr(&self) -> u64 {
        ACPI_START
    }

    /// Writes all tables to guest memory.
    pub fn write(&self, mem: &GuestMemory) -> Result<(), AcpiError> {
        for (addr, bytes) in &self.blobs {
            mem.write_slice(bytes, GuestAddress(*addr))
                .map_err(|_| AcpiError::GuestWrite("table"))?;
        }
        Ok(())
    }
}

fn aml_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn align16(a: u64) -> u64 {
    (a + 15) & !15
}

fn pm_gas(offset: u64) -> GAS {
    GAS::new(
        AddressSpace::SystemMemory,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_PM_START + offset,
    )
}

/// Builds the FADT pointing at `dsdt`.
pub fn build_fadt(dsdt: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = pm_gas(RESET_OFFSET);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = pm_gas(SLEEP_CONTROL_OFFSET);
    fadt.sleep_status_reg = pm_gas(SLEEP_STATUS_OFFSET);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_NO_VGA.into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"RQEMUVMM").into();
    aml_bytes(&fadt.finalize())
}

/// Builds the MADT: one LAPIC per vCPU, the IOAPIC, ISA overrides (IRQ0 → GSI2, SCI 9
/// level/high) and LINT1 = NMI on all processors.
pub fn build_madt(vcpus: u32) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, 1);
    madt.write_u32(36, LAPIC_START as u32);
    madt.write_u32(40, 1); // PCAT_COMPAT: a (KVM) 8259 pair is present
    for i in 0..vcpus.min(255) {
        madt.append_slice(&[0, 8, i as u8, i as u8, 1, 0, 0, 0]);
    }
    let mut ioapic = vec![1, 12, 0, 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    madt.append_slice(&ioapic);
    for (src, gsi, flags) in [(0u8, 2u32, 0u16), (9, 9, 0x000d)] {
        let mut iso = vec![2, 10, 0, src];
        iso.extend_from_slice(&gsi.to_le_bytes());
        iso.extend_from_slice(&flags.to_le_bytes());
        madt.append_slice(&iso);
    }
    madt.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt.as_slice().to_vec()
}

/// Builds every table and lays them out from [`ACPI_START`].
pub fn build(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    // XSDT: header + 2 entries.
    let fadt_addr = align16(xsdt_addr + 36 + 2 * 8);
    let fadt_len = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1).finalize();
    let fadt_addr_end = fadt_addr + aml_bytes(&fadt_len).len() as u64;
    let madt = build_madt(cfg.vcpus);
    let madt_addr = align16(fadt_addr_end);
    let dsdt_addr = align16(madt_addr + madt.len() as u64);
    let dsdt = build_dsdt(&cfg.virtio);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooBig(end - ACPI_START));
    }
    let fadt = build_fadt(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    Ok(AcpiTables {
        blobs: vec![
            (rsdp_addr, aml_bytes(&rsdp)),
            (xsdt_addr, aml_bytes(&xsdt)),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (dsdt_addr, dsdt),
        ],
    })
}

#[cfg(test)]
mod tests;
