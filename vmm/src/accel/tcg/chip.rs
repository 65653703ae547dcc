//! The userspace interrupt/timer platform of the TCG machine: 8259 pair, 8254 PIT, IOAPIC
//! and the boot CPU's local APIC, wired like the MADT describes (ISA IRQ0 → GSI 2, identity
//! for the other ISA IRQs, GSIs 16+ on the IOAPIC only).
//!
//! Shared between the vCPU thread (MMIO/PIO, interrupt polling and acknowledgement) and the
//! irqfd thread (raising GSIs); a condition variable wakes a halted vCPU.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::chips::ioapic::IoApic;
use super::chips::lapic::{Lapic, LapicAction};
use super::chips::pic8259::PicPair;
use super::chips::pit8254::Pit;

/// GSI the PIT's IRQ0 is routed to on the IOAPIC (the MADT's interrupt source override).
const PIT_GSI: u32 = 2;

/// Controllers behind one lock.
#[derive(Debug)]
pub(super) struct Controllers {
    pub(super) pic: PicPair,
    pub(super) pit: Pit,
    pub(super) ioapic: IoApic,
    pub(super) lapic: Lapic,
}

impl Controllers {
    /// Sets GSI `gsi` to `level`, on the 8259 (ISA IRQs) and the IOAPIC.
    fn set_gsi(&mut self, gsi: u32, level: bool) {
        if gsi < 16 && gsi != PIT_GSI {
            self.pic.set_irq(gsi as u8, level);
        }
        self.ioapic.set_irq(gsi, level);
        self.service_ioapic();
    }

    fn set_isa_irq0(&mut self, level: bool) {
        self.pic.set_irq(0, level);
        self.ioapic.set_irq(PIT_GSI, level);
        self.service_ioapic();
    }

    pub(super) fn service_ioapic(&mut self) {
        let lapic = &mut self.lapic;
        self.ioapic.service(|v, level| lapic.accept(v, level));
    }

    /// Applies a LAPIC register write's side effect.
    pub(super) fn lapic_action(&mut self, action: LapicAction) {
        if let LapicAction::LevelEoi(v) = action {
            self.ioapic.eoi(v);
            self.service_ioapic();
        }
    }

    /// Runs the timers up to `now`.
    fn poll_timers(&mut self, now: Instant) {
        if self.pit.poll_irq0(now) {
            self.set_isa_irq0(true);
            self.set_isa_irq0(false);
        }
        self.lapic.poll_timer(now);
    }

    fn pending(&self) -> bool {
        self.lapic.deliverable().is_some() || (self.pic.pending() && self.lapic.accepts_pic())
    }

    fn next_deadline(&self) -> Option<Instant> {
        match (self.pit.next_deadline(), self.lapic.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The interrupt platform shared by the vCPU and the irqfd thread.
#[derive(Debug)]
pub(super) struct IrqChip {
    ctl: Mutex<Controllers>,
    wake: Condvar,
    /// Set when a device interrupt was raised from outside the vCPU thread (device DMA may
    /// have written guest RAM: the CPU must revalidate cached code).
    external: AtomicBool,
    /// Host time the VM spent paused: the guest clock (timers, TSC) is the host's monotonic
    /// clock minus this, so it continues from where a pause held it.
    held_ns: AtomicU64,
}

impl IrqChip {
    /// The guest's "now": host monotonic time minus the time spent paused.
    pub(super) fn now(&self) -> Instant {
        let now = Instant::now();
        now.checked_sub(self.held()).unwrap_or(now)
    }

    /// Total time the VM was paused.
    pub(super) fn held(&self) -> Duration {
        Duration::from_nanos(self.held_ns.load(Ordering::Acquire))
    }

    /// Adds a pause of `d` to the held time (called with every vCPU parked).
    pub(super) fn hold(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.held_ns.fetch_add(ns, Ordering::AcqRel);
    }

    pub(super) fn new() -> Self {
        IrqChip {
            ctl: Mutex::new(Controllers {
                pic: PicPair::new(),
                pit: Pit::new(),
                ioapic: IoApic::new(),
                lapic: Lapic::new(0),
            }),
            wake: Condvar::new(),
            external: AtomicBool::new(false),
            held_ns: AtomicU64::new(0),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Controllers> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the level of `gsi` (from `Accelerator::set_irq_line`).
    pub(super) fn set_gsi(&self, gsi: u32, level: bool) {
        self.lock().set_gsi(gsi, level);
        self.external.store(true, Ordering::Release);
        self.wake.notify_all();
    }

    /// Raises an edge on `gsi` (irqfd).
    pub(super) fn pulse_gsi(&self, gsi: u32) {
        {
            let mut c = self.lock();
            c.set_gsi(gsi, true);
            c.set_gsi(gsi, false);
        }
        self.external.store(true, Ordering::Release);
        self.wake.notify_all();
    }

    /// Consumes the "device interrupt from outside" flag.
    pub(super) fn take_external(&self) -> bool {
        self.external.swap(false, Ordering::AcqRel)
    }

    /// Whether an interrupt is ready for the CPU (runs the timers first).
    pub(super) fn interrupt_pending(&self) -> bool {
        let now = self.now();
        let mut c = self.lock();
        c.poll_timers(now);
        c.pending()
    }

    /// INTA: LAPIC first, then the 8259 through LINT0 / the disabled APIC.
    pub(super) fn acknowledge(&self) -> Option<u8> {
        let mut c = self.lock();
        if let Some(v) = c.lapic.acknowledge() {
            return Some(v);
        }
        if c.lapic.accepts_pic() {
            return c.pic.acknowledge();
        }
        None
    }

    /// Sets the TPR from a CR8 write.
    pub(super) fn set_cr8(&self, v: u8) {
        self.lock().lapic.set_cr8(v);
    }

    /// Blocks until an interrupt may be pending or `max` elapsed.
    pub(super) fn wait(&self, max: Duration) {
        let now = self.now();
        let mut c = self.lock();
        c.poll_timers(now);
        if c.pending() {
            return;
        }
        let mut timeout = max;
        if let Some(d) = c.next_deadline() {
            timeout = timeout.min(d.saturating_duration_since(now));
        }
        let _unused = self
            .wake
            .wait_timeout(c, timeout)
            .unwrap_or_else(|e| e.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pit_irq0_reaches_lapic_through_ioapic_pin2() {
        let chip = IrqChip::new();
        {
            let mut c = chip.lock();
            // IOAPIC pin 2 → vector 0x30, unmasked; LAPIC enabled.
            c.ioapic.write(0, &[0x14]);
            c.ioapic.write(0x10, &0x30u32.to_le_bytes());
            c.lapic.write(0xf0, &0x1ffu32.to_le_bytes(), Instant::now());
            let t = Instant::now();
            c.pit.write(0x43, 0x30, t);
            c.pit.write(0x40, 1, t);
            c.pit.write(0x40, 0, t);
        }
        std::thread::sleep(Duration::from_millis(1));
        assert!(chip.interrupt_pending());
        assert_eq!(chip.acknowledge(), Some(0x30));
        assert!(!chip.interrupt_pending());
    }

    #[test]
    fn pic_delivers_while_the_lapic_is_disabled() {
        let chip = IrqChip::new();
        {
            let mut c = chip.lock();
            for (p, v) in [
                (0x20, 0x11),
                (0x21, 0x30),
                (0x21, 4),
                (0x21, 1),
                (0x21, 0xef),
            ] {
                c.pic.write(p, v);
            }
        }
        chip.pulse_gsi(4);
        assert!(chip.take_external());
        assert!(chip.interrupt_pending());
        assert_eq!(chip.acknowledge(), Some(0x34));
        // GSI 16 is IOAPIC-only and masked there.
        chip.pulse_gsi(16);
        assert!(!chip.interrupt_pending());
    }
}
