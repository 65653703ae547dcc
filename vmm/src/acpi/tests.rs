use super::*;
use crate::layout::{virtio_mmio_base, VIRTIO_MMIO_GSI_BASE, VIRTIO_MMIO_SIZE};

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn cfg(vcpus: u32, n: u32) -> AcpiConfig {
    AcpiConfig {
        vcpus,
        virtio: (0..n)
            .map(|i| VirtioWindow {
                base: virtio_mmio_base(i),
                size: VIRTIO_MMIO_SIZE,
                gsi: VIRTIO_MMIO_GSI_BASE + i,
            })
            .collect(),
    }
}

fn table_at(t: &AcpiTables, addr: u64) -> &[u8] {
    &t.blobs
        .iter()
        .find(|(a, _)| *a == addr)
        .expect("pointer to a table")
        .1
}

#[test]
fn every_table_checksums_and_pointers_resolve() {
    let t = build(&cfg(3, 2)).unwrap();
    let rsdp = table_at(&t, t.rsdp_addr());
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0);
    assert_eq!(sum(rsdp), 0);
    assert_eq!(t.rsdp_addr() % 16, 0);
    let xsdt = table_at(&t, u64_at(rsdp, 24));
    assert_eq!(&xsdt[0..4], b"XSDT");
    assert_eq!(u32_at(xsdt, 4) as usize, xsdt.len());
    assert_eq!(sum(xsdt), 0);
    let mut sigs = Vec::new();
    for i in 0..(xsdt.len() - 36) / 8 {
        let tbl = table_at(&t, u64_at(xsdt, 36 + i * 8));
        assert_eq!(u32_at(tbl, 4) as usize, tbl.len());
        assert_eq!(sum(tbl), 0, "{:?}", &tbl[0..4]);
        sigs.push(tbl[0..4].to_vec());
        if &tbl[0..4] == b"FACP" {
            let dsdt = table_at(&t, u64_at(tbl, 140));
            assert_eq!(&dsdt[0..4], b"DSDT");
            assert_eq!(sum(dsdt), 0);
            // Hardware-reduced, reset register supported.
            let flags = u32_at(tbl, 112);
            assert_ne!(flags & (1 << 20), 0);
            assert_ne!(flags & (1 << 10), 0);
            // Sleep control register GAS (offset 244): system memory at the PM device.
            assert_eq!(tbl[244], 0);
            assert_eq!(u64_at(tbl, 248), ACPI_PM_START);
            assert_eq!(u64_at(tbl, 120), ACPI_PM_START + RESET_OFFSET);
            assert_eq!(tbl[128], RESET_VALUE);
        }
    }
    assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
    let (last_addr, last) = t.blobs.last().unwrap();
    assert!(last_addr + last.len() as u64 <= ACPI_END);
}

#[test]
fn madt_lists_each_cpu_ioapic_and_overrides() {
    let madt = build_madt(4);
    assert_eq!(u32_at(&madt, 36), LAPIC_START as u32);
    let mut off = 44;
    let (mut lapics, mut ioapic, mut isos, mut nmis) = (Vec::new(), None, Vec::new(), 0);
    while off < madt.len() {
        let (ty, len) = (madt[off], madt[off + 1] as usize);
        assert!(len >= 2 && off + len <= madt.len());
        match ty {
            0 => lapics.push(madt[off + 3]),
            1 => ioapic = Some(u32_at(&madt, off + 4)),
            2 => isos.push((madt[off + 3], u32_at(&madt, off + 4))),
            4 => nmis += 1,
            t => panic!("unexpected MADT entry {t}"),
        }
        off += len;
    }
    assert_eq!(lapics, vec![0, 1, 2, 3]);
    assert_eq!(ioapic, Some(IOAPIC_START as u32));
    assert_eq!(isos, vec![(0, 2), (9, 9)]);
    assert_eq!(nmis, 1);
}

#[test]
fn dsdt_declares_com1_virtio_windows_and_s5() {
    let d = build_dsdt(&cfg(1, 3).virtio);
    let count = |needle: &[u8]| d.windows(needle.len()).filter(|w| *w == needle).count();
    assert_eq!(count(b"LNRO0005\0"), 3);
    assert_eq!(count(b"_S5_"), 1);
    assert_eq!(count(b"COM1"), 1);
    // EISAID("PNP0501") encodes as 0x0105D041.
    assert_eq!(count(&0x0105_d041u32.to_le_bytes()), 1);
    // Memory32Fixed descriptor (0x86) with window 2's base.
    let mut m = vec![0x86, 9, 0, 1];
    m.extend_from_slice(&(virtio_mmio_base(2) as u32).to_le_bytes());
    assert_eq!(count(&m), 1);
    assert_eq!(sum(&d), 0);
}

#[test]
fn tables_fit_with_many_cpus() {
    let t = build(&cfg(255, 8)).unwrap();
    let mem = crate::memory::GuestRam::new(4 << 20).unwrap();
    t.write(mem.memory()).unwrap();
}
