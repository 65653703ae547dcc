//! Minimal i8042 keyboard controller: only what a guest uses to reset the machine
//! (command 0xFE "pulse reset line" on port 0x64). No keyboard is attached.

use crate::bus::BusDevice;
use crate::exit::{ExitRequester, GuestExit};

/// Offset of the status/command register from the data port (0x64 - 0x60).
pub const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 device, inserted at port 0x60 with length 5.
#[derive(Debug)]
pub struct I8042 {
    exit: ExitRequester,
}

impl I8042 {
    /// A controller whose reset command requests [`GuestExit::Reset`].
    pub fn new(exit: ExitRequester) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty, system flag clear; data reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.exit
                .request(GuestExit::Reset("i8042 (0xfe to port 0x64)"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_reset_other_writes_do_not() {
        let ex = ExitRequester::new();
        let mut dev = I8042::new(ex.clone());
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert!(!ex.should_stop());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert!(matches!(ex.wait(), GuestExit::Reset(_)));
    }
}
