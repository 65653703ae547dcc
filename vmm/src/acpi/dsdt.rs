//! The DSDT: COM1 (`PNP0501`), the CMOS RTC (`PNP0B00`), one `LNRO0005` virtio-mmio node
//! per window (Memory32Fixed + edge Interrupt on its GSI), the Generic Event Device and
//! power button ([`super::ged`]) and the `_S5_` sleep package matching
//! [`crate::devices::acpi_pm`].

use acpi_tables::aml;
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{OEM_ID, OEM_TABLE_ID};
use crate::devices::acpi_pm::S5_SLP_TYP;
use crate::layout::{RTC_PORT, SERIAL_GSI, SERIAL_PORT};

/// One virtio-mmio window for the DSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioWindow {
    /// MMIO base.
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// Interrupt (edge, active high).
    pub gsi: u32,
}

fn device_aml(name: &str, hid: &dyn Aml, uid: u32, crs: &dyn Aml) -> Vec<u8> {
    let hid_n = aml::Name::new("_HID".into(), hid);
    let uid_n = aml::Name::new("_UID".into(), &uid);
    let crs_n = aml::Name::new("_CRS".into(), crs);
    let dev = aml::Device::new(name.into(), vec![&hid_n, &uid_n, &crs_n]);
    let mut v = Vec::new();
    dev.to_aml_bytes(&mut v);
    v
}

struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// Builds the DSDT bytes.
pub fn build_dsdt(virtio: &[VirtioWindow]) -> Vec<u8> {
    let mut devices = Vec::new();
    {
        let io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
        let irq = aml::Interrupt::new(true, true, false, false, SERIAL_GSI);
        let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
        devices.push(Raw(device_aml(
            "COM1",
            &aml::EISAName::new("PNP0501"),
            0,
            &crs,
        )));
    }
    {
        let io = aml::IO::new(RTC_PORT, RTC_PORT, 1, 2);
        let irq = aml::Interrupt::new(true, true, false, false, 8);
        let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
        devices.push(Raw(device_aml(
            "RTC0",
            &aml::EISAName::new("PNP0B00"),
            0,
            &crs,
        )));
    }
    for (i, w) in virtio.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, w.base as u32, w.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, w.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let name = format!("VR{:02X}", i.min(255));
        devices.push(Raw(device_aml(&name, &"LNRO0005", i as u32, &crs)));
    }
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    let sb = aml::Scope::new("_SB_".into(), children);
    let s5_typ = S5_SLP_TYP;
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5_typ, &s5_typ, &aml::ZERO, &aml::ZERO]),
    );
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    let mut body = Vec::new();
    sb.to_aml_bytes(&mut body);
    super::ged::aml(&mut body);
    s5.to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}
