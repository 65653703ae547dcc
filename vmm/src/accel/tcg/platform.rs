//! The [`rqemu_tcg::Platform`] of a TCG vCPU: LAPIC/IOAPIC MMIO and PIC/PIT ports go to the
//! userspace [`IrqChip`]; every other access goes to the VMM's buses (which also signal
//! ioevent eventfds, see [`crate::bus::Bus::add_ioevent`]).

use std::sync::atomic::{AtomicU8, Ordering};

use rqemu_tcg::{Platform, StopReason};

use super::chip::IrqChip;
use super::chips::ioapic::IOAPIC_SIZE;
use super::chips::lapic::LAPIC_SIZE;
use super::chips::pit8254::{PIT_PORT, PORT_61};
use crate::bus::Bus;
use crate::exit::ExitRequester;
use crate::layout::{IOAPIC_START, LAPIC_START};

/// Stop reason used when the vCPU thread was kicked (VMM exit or pause).
pub(super) const STOP_KICKED: u32 = 0x6b69_636b;

/// Borrowed view of everything a running TCG vCPU talks to.
pub(super) struct TcgPlatform<'a> {
    /// The vCPU index (= APIC ID): which LAPIC the window and interrupts are.
    pub(super) cpu: usize,
    pub(super) chip: &'a IrqChip,
    pub(super) pio: &'a Bus,
    pub(super) mmio: &'a Bus,
    pub(super) exit: &'a ExitRequester,
    pub(super) kick: &'a AtomicU8,
}

fn in_window(addr: u64, base: u64, size: u64) -> Option<u64> {
    addr.checked_sub(base).filter(|o| *o < size)
}

impl Platform for TcgPlatform<'_> {
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        if let Some(off) = in_window(gpa, LAPIC_START, LAPIC_SIZE) {
            self.chip.lapic_read(self.cpu, off, data);
        } else if let Some(off) = in_window(gpa, IOAPIC_START, IOAPIC_SIZE) {
            data.fill(0);
            self.chip.lock().ioapic.read(off, data);
        } else {
            self.mmio.read(gpa, data);
        }
    }

    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        if let Some(off) = in_window(gpa, LAPIC_START, LAPIC_SIZE) {
            self.chip.lapic_write(self.cpu, off, data);
        } else if let Some(off) = in_window(gpa, IOAPIC_START, IOAPIC_SIZE) {
            let mut c = self.chip.lock();
            if c.ioapic.write(off, data) {
                c.service_ioapic();
                drop(c);
                self.chip.notify();
            }
        } else if !self.mmio.write(gpa, data) {
            tracing::trace!(gpa, ?data, "unhandled MMIO write");
        }
    }

    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        let v = match port {
            0x20 | 0x21 | 0xa0 | 0xa1 => self.chip.lock().pic.read(port),
            PIT_PORT..=0x43 => self.chip.lock().pit.read(port, self.chip.now()),
            PORT_61 => self.chip.lock().pit.read_port61(self.chip.now()),
            _ => {
                self.pio.read(u64::from(port), data);
                return;
            }
        };
        data.fill(0);
        if let Some(d) = data.first_mut() {
            *d = v;
        }
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) {
        let v = data.first().copied().unwrap_or(0);
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 => self.chip.lock().pic.write(port, v),
            PIT_PORT..=0x43 => self.chip.lock().pit.write(port, v, self.chip.now()),
            PORT_61 => self.chip.lock().pit.write_port61(v, self.chip.now()),
            _ => {
                if !self.pio.write(u64::from(port), data) {
                    tracing::trace!(port, ?data, "unhandled port write");
                }
            }
        }
    }

    fn interrupt_pending(&mut self) -> bool {
        self.chip.interrupt_pending(self.cpu)
    }

    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        self.chip.acknowledge(self.cpu)
    }

    fn take_nmi(&mut self) -> bool {
        self.chip.take_nmi(self.cpu)
    }

    fn stop_requested(&mut self) -> Option<StopReason> {
        // A device access may have requested the VM's exit (ACPI power-off, i8042 reset):
        // stop at once, like KVM returning to the vCPU loop after the exit.
        let stop = self.kick.load(Ordering::Relaxed) != 0 || self.exit.should_stop();
        stop.then_some(StopReason::Other(STOP_KICKED))
    }

    fn set_tpr(&mut self, tpr: u8) {
        self.chip.set_cr8(self.cpu, tpr);
    }
}
