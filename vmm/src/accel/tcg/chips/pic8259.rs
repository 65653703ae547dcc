//! A pair of cascaded 8259A programmable interrupt controllers (master at 0x20, slave at
//! 0xa0 on the master's IRQ2), for accelerators without an in-kernel irqchip (TCG).
//!
//! Edge-triggered inputs, ICW1–ICW4 initialisation, OCW1 mask, OCW2 (specific and
//! non-specific EOI), OCW3 (IRR/ISR read select), auto-EOI. Linux with ACPI and an IOAPIC
//! masks both chips, but probes them (`probe_8259A`) and needs them to answer.

/// Master command port.
pub const MASTER_PORT: u16 = 0x20;
/// Slave command port.
pub const SLAVE_PORT: u16 = 0xa0;

/// One 8259A.
#[derive(Debug, Clone, Default)]
struct Pic {
    imr: u8,
    irr: u8,
    isr: u8,
    /// Input levels (for edge detection).
    levels: u8,
    base: u8,
    /// Next expected ICW (0 = initialised, OCWs accepted).
    icw_step: u8,
    icw4_needed: bool,
    single: bool,
    auto_eoi: bool,
    read_isr: bool,
}

impl Pic {
    fn set_irq(&mut self, irq: u8, level: bool) {
        let bit = 1u8 << (irq & 7);
        if level && self.levels & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.levels |= bit;
        } else {
            self.levels &= !bit;
        }
    }

    /// Highest-priority requested, unmasked IRQ above everything in service.
    fn pending(&self) -> Option<u8> {
        let req = self.irr & !self.imr;
        let n = req.trailing_zeros() as u8;
        let in_service = self.isr.trailing_zeros() as u8;
        (n < 8 && n < in_service).then_some(n)
    }

    fn ack(&mut self, n: u8) {
        let bit = 1u8 << (n & 7);
        self.irr &= !bit;
        if !self.auto_eoi {
            self.isr |= bit;
        }
    }

    fn write(&mut self, data_port: bool, v: u8) {
        if !data_port {
            if v & 0x10 != 0 {
                // ICW1: reset.
                *self = Pic {
                    icw_step: 2,
                    icw4_needed: v & 1 != 0,
                    single: v & 2 != 0,
                    levels: self.levels,
                    ..Pic::default()
                };
            } else if v & 0x08 != 0 {
                // OCW3.
                if v & 2 != 0 {
                    self.read_isr = v & 1 != 0;
                }
            } else if v & 0x20 != 0 {
                // OCW2 EOI: specific (bit 6) or non-specific (highest in service).
                let n = if v & 0x40 != 0 {
                    v & 7
                } else {
                    self.isr.trailing_zeros() as u8
                };
                if n < 8 {
                    self.isr &= !(1 << n);
                }
            }
            return;
        }
        match self.icw_step {
            2 => {
                self.base = v & 0xf8;
                self.icw_step = if self.single {
                    if self.icw4_needed {
                        4
                    } else {
                        0
                    }
                } else {
                    3
                };
            }
            3 => self.icw_step = if self.icw4_needed { 4 } else { 0 },
            4 => {
                self.auto_eoi = v & 2 != 0;
                self.icw_step = 0;
            }
            _ => self.imr = v,
        }
    }

    fn read(&self, data_port: bool) -> u8 {
        match (data_port, self.read_isr) {
            (true, _) => self.imr,
            (false, true) => self.isr,
            (false, false) => self.irr,
        }
    }
}

/// The master/slave pair.
#[derive(Debug, Clone)]
pub struct PicPair {
    master: Pic,
    slave: Pic,
}

impl Default for PicPair {
    fn default() -> Self {
        Self::new()
    }
}

impl PicPair {
    /// Both chips uninitialised with every input masked.
    pub fn new() -> Self {
        let masked = Pic {
            imr: 0xff,
            ..Pic::default()
        };
        PicPair {
            master: masked.clone(),
            slave: masked,
        }
    }

    /// Sets the level of ISA IRQ `irq` (0..16); a rising edge requests an interrupt.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            0..=7 => self.master.set_irq(irq, level),
            8..=15 => {
                self.slave.set_irq(irq - 8, level);
                self.update_cascade();
            }
            _ => {}
        }
    }

    fn update_cascade(&mut self) {
        let level = self.slave.pending().is_some();
        self.master.set_irq(2, level);
    }

    /// True if the pair asserts INTR.
    pub fn pending(&self) -> bool {
        self.master.pending().is_some()
    }

    /// INTA cycle: the vector of the highest-priority request, if any.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let n = self.master.pending()?;
        self.master.ack(n);
        if n == 2 {
            // Re-arm the cascade edge for the next slave request.
            self.master.levels &= !(1 << 2);
            let Some(s) = self.slave.pending() else {
                // Spurious slave IRQ 7.
                return Some(self.slave.base | 7);
            };
            self.slave.ack(s);
            self.update_cascade();
            return Some(self.slave.base | s);
        }
        Some(self.master.base | n)
    }

    /// Port read (`port` is 0x20/0x21/0xa0/0xa1).
    pub fn read(&self, port: u16) -> u8 {
        match port {
            0x20 | 0x21 => self.master.read(port & 1 != 0),
            0xa0 | 0xa1 => self.slave.read(port & 1 != 0),
            _ => 0xff,
        }
    }

    /// Port write.
    pub fn write(&mut self, port: u16, v: u8) {
        match port {
            0x20 | 0x21 => self.master.write(port & 1 != 0, v),
            0xa0 | 0xa1 => {
                self.slave.write(port & 1 != 0, v);
                self.master.levels &= !(1 << 2);
                self.update_cascade();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(p: &mut PicPair) {
        // Linux init_8259A: ICW1 0x11, ICW2 vector base, ICW3 cascade, ICW4 8086 mode.
        for (port, v) in [(0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01)] {
            p.write(port, v);
        }
        for (port, v) in [(0xa0, 0x11), (0xa1, 0x38), (0xa1, 0x02), (0xa1, 0x01)] {
            p.write(port, v);
        }
    }

    #[test]
    fn master_and_cascaded_slave_delivery_with_eoi() {
        let mut p = PicPair::new();
        init(&mut p);
        p.write(0x21, 0xff);
        p.set_irq(4, true);
        assert!(!p.pending(), "masked");
        p.write(0x21, !((1 << 4) | (1 << 2)));
        p.write(0xa1, !(1 << 3));
        assert!(p.pending());
        p.set_irq(11, true);
        // IRQ2 (cascade) outranks IRQ4.
        assert_eq!(p.acknowledge(), Some(0x38 + 3));
        // IRQ4 is below IRQ2 in service: blocked until EOI.
        assert!(!p.pending());
        p.write(0xa0, 0x20);
        p.write(0x20, 0x20);
        assert_eq!(p.acknowledge(), Some(0x34));
        assert!(!p.pending());
        // No new edge without the line going low first.
        p.write(0x20, 0x64);
        p.set_irq(4, true);
        assert!(!p.pending());
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert!(p.pending());
        p.write(0x20, 0x0b);
        assert_eq!(p.read(0x20), 0, "ISR empty");
        assert_eq!(p.read(0x21), !((1 << 4) | (1 << 2)));
    }
}
