//! The ACPI Generic Event Device (`ACPI0013`) of the hardware-reduced machine, as Cloud
//! Hypervisor and QEMU's microvm have it: events are bits of a read-to-clear MMIO register
//! ([`GED_START`]); raising one pulses the GED's interrupt ([`GED_GSI`]), Linux's `evged`
//! driver runs `_EVT`, which reads the register and `Notify`s the device concerned. Today
//! the one event is the power button: `\_SB_.PWRB` (`PNP0C0C`, Linux's `acpi_button`) gets
//! `Notify(0x80)` ("button pressed").

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use acpi_tables::{aml, Aml};

use crate::accel::{AccelError, Accelerator};
use crate::bus::BusDevice;
use crate::layout::{GED_GSI, GED_START};

/// Event bit of the power button.
pub const EVENT_POWER_BUTTON: u32 = 1 << 3;

/// The GED's event register as a bus device (any read returns the pending events and clears
/// them; writes are ignored).
#[derive(Debug, Default)]
pub struct GedDevice {
    events: Arc<AtomicU32>,
}

impl GedDevice {
    /// A GED with no event pending, and the handle that raises events on it.
    pub fn new() -> (Self, GedHandle) {
        let events = Arc::new(AtomicU32::new(0));
        (
            GedDevice {
                events: events.clone(),
            },
            GedHandle { events },
        )
    }
}

impl BusDevice for GedDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            let v = self.events.swap(0, Ordering::AcqRel).to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&v[..n]);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// Raises GED events from the host side (the management API).
#[derive(Debug, Clone)]
pub struct GedHandle {
    events: Arc<AtomicU32>,
}

impl GedHandle {
    /// Marks the power-button event pending and pulses the GED interrupt.
    pub fn power_button(&self, accel: &dyn Accelerator) -> Result<(), AccelError> {
        self.events.fetch_or(EVENT_POWER_BUTTON, Ordering::AcqRel);
        accel.set_irq_line(GED_GSI, true)?;
        accel.set_irq_line(GED_GSI, false)
    }

    /// Events raised and not yet read by the guest.
    pub fn pending(&self) -> u32 {
        self.events.load(Ordering::Acquire)
    }
}

/// The DSDT part: `\_SB_.GED_` (interrupt + `_EVT`), its register region, `\_SB_.PWRB`.
pub(super) fn aml(sink: &mut Vec<u8>) {
    let pwrb_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let pwrb_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    aml::Device::new("_SB_.PWRB".into(), vec![&pwrb_hid, &pwrb_uid]).to_aml_bytes(sink);

    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let irq = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
    let base = GED_START as usize;
    let len = 4usize;
    let region = aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemMemory, &base, &len);
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::Preserve,
        vec![aml::FieldEntry::Named(*b"GDAT", 32)],
    );
    let gdat = aml::Path::new("GDAT");
    let read = aml::Store::new(&aml::Local(0), &gdat);
    let bit = EVENT_POWER_BUTTON as usize;
    let and = aml::And::new(&aml::Local(1), &aml::Local(0), &bit);
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&pwrb, &0x80usize);
    let test = aml::Equal::new(&aml::Local(1), &bit);
    let on_button = aml::If::new(&test, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &and, &on_button]);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    )
    .to_aml_bytes(sink);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_reads_pending_events_once() {
        let (mut dev, handle) = GedDevice::new();
        let mut b = [0xffu8; 4];
        dev.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
        handle.events.fetch_or(EVENT_POWER_BUTTON, Ordering::AcqRel);
        assert_eq!(handle.pending(), EVENT_POWER_BUTTON);
        let mut one = [0u8; 1];
        dev.read(0, &mut one);
        assert_eq!(u32::from(one[0]), EVENT_POWER_BUTTON);
        dev.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0, "read clears");
        dev.read(8, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
