//! `rqemu-rtc`'s device: the CMOS RTC of `rqemu-emulated-backend` as an [`EmulatedDevice`].

use rqemu_emulated_backend::cmos::Rtc;
use rqemu_protocol::handshake::{FEATURE_POSTED, FEATURE_RING, FEATURE_SNAPSHOT, WINDOW_POSTED};
use rqemu_protocol::{DeviceClass, DeviceInfo, EmulatedDevice, Space, Window};

/// The RTC served over the forwarding protocol (one window: index port, data port).
#[derive(Debug, Default)]
pub struct RtcDevice(pub Rtc);

impl EmulatedDevice for RtcDevice {
    fn read(&mut self, _space: Space, _window: usize, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn write(&mut self, _space: Space, _window: usize, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }

    fn reset(&mut self) {
        self.0.reset();
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        Some(self.0.snapshot())
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        self.0.restore(state).map_err(|e| e.to_string())
    }
}

/// What `rqemu-rtc` claims: ports `base..base+2` (index writes are posted), no interrupt line
/// (alarms and periodic interrupts are not implemented).
pub fn device_info(base: u16) -> DeviceInfo {
    DeviceInfo {
        class: DeviceClass::Rtc,
        name: "rqemu-rtc".into(),
        windows: vec![Window {
            space: Space::Pio,
            base: base.into(),
            size: 2,
            flags: WINDOW_POSTED,
        }],
        irqs: Vec::new(),
        features: FEATURE_RING | FEATURE_POSTED | FEATURE_SNAPSHOT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trip_through_the_protocol_trait() {
        let mut a = RtcDevice::default();
        a.write(Space::Pio, 0, 0, &[0x41]);
        a.write(Space::Pio, 0, 1, &[0x17]);
        let s = EmulatedDevice::snapshot(&a).unwrap();
        let mut b = RtcDevice::default();
        b.restore(&s).unwrap();
        b.write(Space::Pio, 0, 0, &[0x41]);
        let mut v = [0u8];
        b.read(Space::Pio, 0, 1, &mut v);
        assert_eq!(v[0], 0x17);
        let e = b.restore(&s[..3]).unwrap_err();
        assert!(e.contains("129"), "{e}");
    }

    #[test]
    fn claims_two_posted_ports_and_snapshots() {
        let i = device_info(0x70);
        assert_eq!(i.windows.len(), 1);
        assert_eq!((i.windows[0].base, i.windows[0].size), (0x70, 2));
        assert!(i.irqs.is_empty());
        assert_ne!(i.features & FEATURE_SNAPSHOT, 0);
    }
}
