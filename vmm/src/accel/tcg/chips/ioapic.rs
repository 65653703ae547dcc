//! An 82093AA-style I/O APIC (24 pins, version 0x11) at [`crate::layout::IOAPIC_START`],
//! for accelerators without an in-kernel irqchip (TCG). Matches what the MADT declares
//! (IOAPIC ID 0, GSI base 0) and reports the same version register as KVM's (0x170011).
//!
//! Registers through IOREGSEL (+0x00) / IOWIN (+0x10); redirection entries with vector,
//! delivery mode, polarity, trigger mode, remote IRR (level: set on delivery, cleared by the
//! local APIC's EOI broadcast, see [`IoApic::eoi`]) and mask. Delivery is returned to the
//! caller as `(vector, level_triggered, destination, logical)`; the caller picks the local
//! APIC(s).

/// Number of redirection entries.
pub const IOAPIC_PINS: usize = 24;
/// Size of the MMIO window.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// The version register: max redirection entry 23, version 0x11.
pub const IOAPIC_VERSION: u32 = 0x0017_0011;

const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
const POLARITY_LOW: u64 = 1 << 13;
const DELIVERY_STATUS: u64 = 1 << 12;
const RO_BITS: u64 = REMOTE_IRR | DELIVERY_STATUS;

/// The I/O APIC.
#[derive(Debug, Clone)]
pub struct IoApic {
    sel: u32,
    id: u32,
    redir: [u64; IOAPIC_PINS],
    /// Requests: level pins asserted, or edge pins with an undelivered edge.
    irr: u32,
    /// Input levels (after polarity), for edge detection.
    levels: u32,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    /// Reset state: every entry masked.
    pub fn new() -> Self {
        IoApic {
            sel: 0,
            id: 0,
            redir: [MASKED; IOAPIC_PINS],
            irr: 0,
            levels: 0,
        }
    }

    /// Sets the level of input `pin`; call [`IoApic::service`] afterwards.
    pub fn set_irq(&mut self, pin: u32, level: bool) {
        let Some(entry) = self.redir.get(pin as usize) else {
            return;
        };
        let bit = 1u32 << pin;
        let level = level != (entry & POLARITY_LOW != 0);
        let was = self.levels & bit != 0;
        if level {
            self.levels |= bit;
        } else {
            self.levels &= !bit;
        }
        if entry & LEVEL != 0 {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && !was {
            self.irr |= bit;
        }
    }

    /// Delivers every deliverable request through `deliver(vector, level_triggered,
    /// destination, logical_destination)`.
    pub fn service(&mut self, mut deliver: impl FnMut(u8, bool, u8, bool)) {
        let mut pending = self.irr;
        while pending != 0 {
            let pin = pending.trailing_zeros() as usize;
            pending &= pending - 1;
            let Some(entry) = self.redir.get_mut(pin) else {
                continue;
            };
            if *entry & MASKED != 0 {
                continue;
            }
            let level = *entry & LEVEL != 0;
            if level {
                if *entry & REMOTE_IRR != 0 {
                    continue;
                }
                *entry |= REMOTE_IRR;
            } else {
                self.irr &= !(1 << pin);
            }
            // Fixed (0) and lowest priority (1) go to the LAPIC; NMI/INIT/ExtINT are not
            // routed through the IOAPIC on this machine.
            if (*entry >> 8) & 7 <= 1 {
                deliver(
                    *entry as u8,
                    level,
                    (*entry >> 56) as u8,
                    *entry & (1 << 11) != 0,
                );
            }
        }
    }

    /// EOI broadcast from the local APIC for `vector`: clears remote IRR of level entries
    /// with that vector (call [`IoApic::service`] afterwards to re-deliver).
    pub fn eoi(&mut self, vector: u8) {
        for e in self.redir.iter_mut() {
            if *e & LEVEL != 0 && *e as u8 == vector {
                *e &= !REMOTE_IRR;
            }
        }
    }

    fn read_reg(&self) -> u32 {
        match self.sel {
            0 => self.id << 24,
            1 => IOAPIC_VERSION,
            2 => self.id << 24,
            r @ 0x10..=0x3f => {
                let e = self.redir[((r - 0x10) / 2) as usize];
                if r & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0xffff_ffff,
        }
    }

    fn write_reg(&mut self, v: u32) {
        match self.sel {
            0 => self.id = (v >> 24) & 0xf,
            r @ 0x10..=0x3f => {
                let e = &mut self.redir[((r - 0x10) / 2) as usize];
                if r & 1 == 0 {
                    *e = (*e & (0xffff_ffff << 32 | RO_BITS)) | (u64::from(v) & !RO_BITS);
                } else {
                    *e = (*e & 0xffff_ffff) | (u64::from(v) << 32);
                }
                if *e & LEVEL == 0 {
                    *e &= !REMOTE_IRR;
                }
                let pin = (r - 0x10) / 2;
                // A level pin that is still asserted keeps requesting.
                if *e & LEVEL != 0 && self.levels & (1 << pin) != 0 {
                    self.irr |= 1 << pin;
                }
            }
            _ => {}
        }
    }

    /// MMIO read at `offset` into the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0x00 => self.sel,
            0x10 => self.read_reg(),
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    /// MMIO write at `offset`; returns true if a redirection entry may have changed (call
    /// [`IoApic::service`]).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> bool {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            0x00 => self.sel = v & 0xff,
            0x10 => {
                self.write_reg(v);
                return true;
            }
            0x40 => {
                self.eoi(v as u8);
                return true;
            }
            _ => {}
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg_write(io: &mut IoApic, reg: u32, v: u32) {
        io.write(0, &reg.to_le_bytes());
        io.write(0x10, &v.to_le_bytes());
    }

    fn reg_read(io: &IoApic, reg: u32) -> u32 {
        let mut io2 = io.clone();
        io2.write(0, &reg.to_le_bytes());
        let mut b = [0u8; 4];
        io2.read(0x10, &mut b);
        u32::from_le_bytes(b)
    }

    fn collect(io: &mut IoApic) -> Vec<(u8, bool)> {
        let mut v = Vec::new();
        io.service(|vec, lvl, _, _| v.push((vec, lvl)));
        v
    }

    #[test]
    fn version_and_masked_reset_state() {
        let io = IoApic::new();
        assert_eq!(reg_read(&io, 1), IOAPIC_VERSION);
        assert_eq!(reg_read(&io, 0x10) & (1 << 16), 1 << 16);
    }

    #[test]
    fn edge_pin_delivers_once_per_edge_and_waits_while_masked() {
        let mut io = IoApic::new();
        io.set_irq(4, true);
        assert!(collect(&mut io).is_empty(), "masked");
        reg_write(&mut io, 0x10 + 8, 0x31);
        assert_eq!(
            collect(&mut io),
            vec![(0x31, false)],
            "edge kept until unmasked"
        );
        io.set_irq(4, true);
        assert!(collect(&mut io).is_empty(), "no new edge");
        io.set_irq(4, false);
        io.set_irq(4, true);
        assert_eq!(collect(&mut io), vec![(0x31, false)]);
    }

    #[test]
    fn level_pin_uses_remote_irr_until_eoi() {
        let mut io = IoApic::new();
        reg_write(&mut io, 0x10 + 2 * 16, 0x8000 | 0x41);
        io.set_irq(16, true);
        assert_eq!(collect(&mut io), vec![(0x41, true)]);
        assert_ne!(reg_read(&io, 0x10 + 32) & (1 << 14), 0, "remote IRR");
        assert!(collect(&mut io).is_empty());
        io.eoi(0x41);
        assert_eq!(collect(&mut io), vec![(0x41, true)], "still asserted");
        io.set_irq(16, false);
        io.eoi(0x41);
        assert!(collect(&mut io).is_empty());
        assert_eq!(reg_read(&io, 0x10 + 32) & (1 << 14), 0);
    }
}
