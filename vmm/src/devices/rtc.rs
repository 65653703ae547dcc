//! The in-VMM CMOS RTC at ports 0x70/0x71, used when no `rqemu-rtc` daemon is given: the same
//! register logic as the daemon (`rqemu-emulated-backend`'s `cmos`), on the bus.

pub use rqemu_emulated_backend::cmos::{DateTime, Rtc};

use crate::bus::BusDevice;

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        Rtc::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        Rtc::write(self, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_host_clock_through_the_bus() {
        let bus = crate::bus::Bus::new();
        bus.insert(
            std::sync::Arc::new(std::sync::Mutex::new(Rtc::new())),
            0x70,
            2,
        )
        .unwrap();
        assert!(bus.write(0x70, &[0x0d]));
        let mut d = [0u8];
        assert!(bus.read(0x71, &mut d));
        assert_eq!(d[0], 0x80, "status D: valid RAM and time");
        assert!(bus.write(0x70, &[0x32]));
        assert!(bus.read(0x71, &mut d));
        assert!((0x20..0x22).contains(&d[0]), "BCD century {:#x}", d[0]);
    }
}
