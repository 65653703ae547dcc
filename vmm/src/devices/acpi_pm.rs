//! ACPI power management for the hardware-reduced platform: the FADT's sleep control,
//! sleep status and reset registers, one byte each in a small MMIO window.
//!
//! Layout (offsets into [`crate::layout::ACPI_PM_START`]):
//! - `+0` sleep control: a write with `SLP_EN` (bit 5) and `SLP_TYP` (bits 2..4) == 5 (S5,
//!   matching the DSDT's `_S5_` package) powers off;
//! - `+1` sleep status: reads `WAK_STS` clear;
//! - `+2` reset register: writing [`RESET_VALUE`] resets.

use crate::bus::BusDevice;
use crate::exit::{ExitRequester, GuestExit};

/// Offset of the sleep control register.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register.
pub const RESET_OFFSET: u64 = 2;
/// Value that triggers a reset (the FADT's `RESET_VALUE`).
pub const RESET_VALUE: u8 = 0x01;
/// SLP_TYP value for S5 (as declared in the DSDT `_S5_` package).
pub const S5_SLP_TYP: u8 = 5;
const SLP_EN: u8 = 1 << 5;

/// The ACPI PM device.
#[derive(Debug)]
pub struct AcpiPm {
    exit: ExitRequester,
}

impl AcpiPm {
    /// A device that reports power-off/reset to `exit`.
    pub fn new(exit: ExitRequester) -> Self {
        AcpiPm { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            SLEEP_CONTROL_OFFSET if v & SLP_EN != 0 && (v >> 2) & 7 == S5_SLP_TYP => {
                self.exit.request(GuestExit::PowerOff)
            }
            RESET_OFFSET if v == RESET_VALUE => {
                self.exit.request(GuestExit::Reset("ACPI reset register"))
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off() {
        let ex = ExitRequester::new();
        let mut pm = AcpiPm::new(ex.clone());
        pm.write(SLEEP_CONTROL_OFFSET, &[S5_SLP_TYP << 2]); // no SLP_EN
        pm.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | SLP_EN]); // S3: ignored
        assert!(!ex.should_stop());
        pm.write(SLEEP_CONTROL_OFFSET, &[(S5_SLP_TYP << 2) | SLP_EN]);
        assert_eq!(ex.wait(), GuestExit::PowerOff);
    }

    #[test]
    fn reset_register_resets() {
        let ex = ExitRequester::new();
        let mut pm = AcpiPm::new(ex.clone());
        pm.write(RESET_OFFSET, &[0x02]);
        pm.write(RESET_OFFSET, &[]);
        assert!(!ex.should_stop());
        pm.write(RESET_OFFSET, &[RESET_VALUE]);
        assert!(matches!(ex.wait(), GuestExit::Reset(_)));
    }
}
