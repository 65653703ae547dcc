//! The userspace interrupt/timer platform of the TCG machine: 8259 pair, 8254 PIT, IOAPIC
//! and one local APIC per vCPU (APIC ID = vCPU index), wired like the MADT describes (ISA
//! IRQ0 → GSI 2, identity for the other ISA IRQs, GSIs 16+ on the IOAPIC only).
//!
//! * The IOAPIC sends each interrupt to the first LAPIC its destination (physical, or
//!   logical flat/cluster) matches: Linux programs one CPU per pin.
//! * The 8259 (ExtINT through LINT0 / the disabled APIC) reaches the BSP only.
//! * IPIs (ICR writes): fixed, lowest priority (first match), NMI, INIT and STARTUP with the
//!   shorthands. INIT resets the target's LAPIC and stops the vCPU (also a running one: CPU
//!   hot-unplug and re-plug); the next STARTUP starts it in real mode at the vector's page.
//!
//! Shared between the vCPU threads (MMIO/PIO, interrupt polling and acknowledgement) and the
//! irqfd thread (raising GSIs). One mutex guards all controllers; one condition variable
//! wakes halted vCPUs (every change that may make an interrupt or SIPI deliverable notifies
//! all of them, each re-checks its own LAPIC).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::chips::ioapic::IoApic;
use super::chips::lapic::{Ipi, Lapic, LapicAction};
use super::chips::pic8259::PicPair;
use super::chips::pit8254::Pit;

/// GSI the PIT's IRQ0 is routed to on the IOAPIC (the MADT's interrupt source override).
const PIT_GSI: u32 = 2;

/// Start-up state of one vCPU, as seen by the chip.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSignals {
    /// INIT received: waiting for a STARTUP IPI.
    wait_sipi: bool,
    /// STARTUP vector received, not yet taken by the vCPU.
    sipi: Option<u8>,
    /// NMI sent (moved to `IrqChip::nmi` right after the ICR write).
    nmi: bool,
    /// INIT sent to a vCPU that may be running (moved to `IrqChip::init` like `nmi`).
    init: bool,
}

/// Controllers behind one lock.
#[derive(Debug)]
pub(super) struct Controllers {
    pub(super) pic: PicPair,
    pub(super) pit: Pit,
    pub(super) ioapic: IoApic,
    /// Indexed by vCPU (= APIC ID).
    pub(super) lapics: Vec<Lapic>,
    cpus: Vec<CpuSignals>,
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
        let lapics = &mut self.lapics;
        self.ioapic.service(|v, level, dest, logical| {
            if let Some(l) = lapics.iter_mut().find(|l| l.matches(dest, logical)) {
                l.accept(v, level);
            }
        });
    }

    /// Applies a register write's side effect of vCPU `from`'s LAPIC. True if another vCPU
    /// may have to wake up.
    pub(super) fn lapic_action(&mut self, from: usize, action: LapicAction) -> bool {
        match action {
            LapicAction::None => false,
            LapicAction::LevelEoi(v) => {
                self.ioapic.eoi(v);
                self.service_ioapic();
                true
            }
            LapicAction::Ipi(ipi) => {
                self.send_ipi(from, ipi);
                true
            }
        }
    }

    fn send_ipi(&mut self, from: usize, ipi: Ipi) {
        let targets: Vec<usize> = (0..self.lapics.len())
            .filter(|&i| match ipi.shorthand {
                0 => self.lapics[i].matches(ipi.dest, ipi.logical),
                1 => i == from,
                2 => true,
                _ => i != from,
            })
            .collect();
        let targets = if ipi.mode == 1 {
            &targets[..targets.len().min(1)]
        } else {
            &targets[..]
        };
        for &t in targets {
            match ipi.mode {
                0 | 1 => self.lapics[t].accept(ipi.vector, false),
                4 => self.cpus[t].nmi = true,
                // INIT: the LAPIC resets and the CPU waits for a STARTUP IPI (the BSP, which
                // the VMM starts, ignores it).
                5 if ipi.assert && t != 0 => {
                    self.cpus[t].wait_sipi = true;
                    self.cpus[t].sipi = None;
                    self.cpus[t].init = true;
                    self.lapics[t] = Lapic::new(t as u32);
                }
                6 if self.cpus[t].wait_sipi => {
                    self.cpus[t].wait_sipi = false;
                    self.cpus[t].sipi = Some(ipi.vector);
                }
                _ => {}
            }
        }
    }

    /// Runs the timers up to `now`.
    fn poll_timers(&mut self, now: Instant) {
        if self.pit.poll_irq0(now) {
            self.set_isa_irq0(true);
            self.set_isa_irq0(false);
        }
        for l in &mut self.lapics {
            l.poll_timer(now);
        }
    }

    fn accepts_pic(&self, cpu: usize) -> bool {
        cpu == 0 && self.lapics.first().is_some_and(|l| l.accepts_pic())
    }

    fn pending(&self, cpu: usize) -> bool {
        self.lapics
            .get(cpu)
            .is_some_and(|l| l.deliverable().is_some())
            || (self.accepts_pic(cpu) && self.pic.pending())
    }

    fn next_deadline(&self, cpu: usize) -> Option<Instant> {
        let lapic = self.lapics.get(cpu).and_then(|l| l.next_deadline());
        match (self.pit.next_deadline(), lapic) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The interrupt platform shared by the vCPUs and the irqfd thread.
#[derive(Debug)]
pub(super) struct IrqChip {
    ctl: Mutex<Controllers>,
    wake: Condvar,
    /// Bumped when a device interrupt was raised from outside the vCPU threads (device DMA
    /// may have written guest RAM: each CPU must revalidate its cached code).
    external: AtomicU64,
    /// Host time the VM spent paused: the guest clock (timers, TSC) is the host's monotonic
    /// clock minus this, so it continues from where a pause held it.
    held_ns: AtomicU64,
    /// The common base of every vCPU's TSC.
    epoch: Instant,
    /// Pending NMIs, one bit per vCPU.
    nmi: AtomicU64,
    /// INITs not yet taken by their vCPU, one bit per vCPU.
    init: AtomicU64,
}

impl IrqChip {
    /// The guest's "now": host monotonic time minus the time spent paused.
    pub(super) fn now(&self) -> Instant {
        let now = Instant::now();
        now.checked_sub(self.held()).unwrap_or(now)
    }

    /// The instant every vCPU's TSC counts from (one clock for all: the TSCs are in sync).
    pub(super) fn epoch(&self) -> Instant {
        self.epoch
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

    /// The platform with the BSP's LAPIC; [`IrqChip::add_cpu`] adds the others.
    pub(super) fn new() -> Self {
        IrqChip {
            ctl: Mutex::new(Controllers {
                pic: PicPair::new(),
                pit: Pit::new(),
                ioapic: IoApic::new(),
                lapics: vec![Lapic::new(0)],
                cpus: vec![CpuSignals::default()],
            }),
            wake: Condvar::new(),
            external: AtomicU64::new(0),
            held_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            nmi: AtomicU64::new(0),
            init: AtomicU64::new(0),
        }
    }

    /// Makes sure vCPU `cpu` has its LAPIC (APIC ID `cpu`).
    pub(super) fn add_cpu(&self, cpu: usize) {
        let mut c = self.lock();
        while c.lapics.len() <= cpu {
            let id = c.lapics.len() as u32;
            c.lapics.push(Lapic::new(id));
            c.cpus.push(CpuSignals::default());
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Controllers> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads vCPU `cpu`'s LAPIC register window.
    pub(super) fn lapic_read(&self, cpu: usize, off: u64, data: &mut [u8]) {
        let now = self.now();
        match self.lock().lapics.get(cpu) {
            Some(l) => l.read(off, data, now),
            None => data.fill(0),
        }
    }

    /// Writes vCPU `cpu`'s LAPIC register window (IPIs, EOIs).
    pub(super) fn lapic_write(&self, cpu: usize, off: u64, data: &[u8]) {
        let now = self.now();
        let wake = {
            let mut c = self.lock();
            let Some(l) = c.lapics.get_mut(cpu) else {
                return;
            };
            let action = l.write(off, data, now);
            let wake = c.lapic_action(cpu, action);
            for (i, s) in c.cpus.iter_mut().enumerate() {
                if std::mem::take(&mut s.nmi) {
                    self.nmi.fetch_or(1 << (i % 64), Ordering::AcqRel);
                }
                if std::mem::take(&mut s.init) {
                    self.init.fetch_or(1 << (i % 64), Ordering::AcqRel);
                }
            }
            wake
        };
        if wake {
            self.wake.notify_all();
        }
    }

    /// Wakes every waiting vCPU (an interrupt may have become deliverable).
    pub(super) fn notify(&self) {
        self.wake.notify_all();
    }

    /// Sets the level of `gsi` (from `Accelerator::set_irq_line`).
    pub(super) fn set_gsi(&self, gsi: u32, level: bool) {
        self.lock().set_gsi(gsi, level);
        self.external.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_all();
    }

    /// Raises an edge on `gsi` (irqfd).
    pub(super) fn pulse_gsi(&self, gsi: u32) {
        {
            let mut c = self.lock();
            c.set_gsi(gsi, true);
            c.set_gsi(gsi, false);
        }
        self.external.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_all();
    }

    /// Whether a device interrupt came from outside since `seen` (updated).
    pub(super) fn take_external(&self, seen: &mut u64) -> bool {
        let g = self.external.load(Ordering::Acquire);
        std::mem::replace(seen, g) != g
    }

    /// Whether an interrupt is ready for vCPU `cpu` (runs the timers first).
    pub(super) fn interrupt_pending(&self, cpu: usize) -> bool {
        let now = self.now();
        let mut c = self.lock();
        c.poll_timers(now);
        c.pending(cpu)
    }

    /// Consumes a pending NMI of vCPU `cpu` (lock-free: polled with every interrupt check).
    pub(super) fn take_nmi(&self, cpu: usize) -> bool {
        let bit = 1u64 << (cpu % 64);
        self.nmi.load(Ordering::Acquire) & bit != 0
            && self.nmi.fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Consumes an INIT sent to vCPU `cpu` (lock-free: polled by the vCPU between slices):
    /// the vCPU stops and waits for a STARTUP IPI.
    pub(super) fn take_init(&self, cpu: usize) -> bool {
        let bit = 1u64 << (cpu % 64);
        self.init.load(Ordering::Acquire) & bit != 0
            && self.init.fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// INTA of vCPU `cpu`: LAPIC first, then the 8259 through LINT0 / the disabled APIC.
    pub(super) fn acknowledge(&self, cpu: usize) -> Option<u8> {
        let mut c = self.lock();
        if let Some(v) = c.lapics.get_mut(cpu).and_then(|l| l.acknowledge()) {
            return Some(v);
        }
        if c.accepts_pic(cpu) {
            return c.pic.acknowledge();
        }
        None
    }

    /// Sets vCPU `cpu`'s TPR from a CR8 write.
    pub(super) fn set_cr8(&self, cpu: usize, v: u8) {
        if let Some(l) = self.lock().lapics.get_mut(cpu) {
            l.set_cr8(v);
        }
    }

    /// Blocks vCPU `cpu` until an interrupt may be pending for it or `max` elapsed.
    pub(super) fn wait(&self, cpu: usize, max: Duration) {
        let now = self.now();
        let mut c = self.lock();
        c.poll_timers(now);
        if c.pending(cpu) {
            return;
        }
        let mut timeout = max;
        if let Some(d) = c.next_deadline(cpu) {
            timeout = timeout.min(d.saturating_duration_since(now));
        }
        let _unused = self
            .wake
            .wait_timeout(c, timeout)
            .unwrap_or_else(|e| e.into_inner());
    }

    /// For a vCPU that has not started: takes its STARTUP vector, or waits up to `max` for
    /// one.
    pub(super) fn wait_sipi(&self, cpu: usize, max: Duration) -> Option<u8> {
        let mut c = self.lock();
        let mut v = c.cpus.get_mut(cpu).and_then(|s| s.sipi.take());
        if v.is_none() {
            c = self
                .wake
                .wait_timeout(c, max)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            v = c.cpus.get_mut(cpu).and_then(|s| s.sipi.take());
        }
        if v.is_some() {
            // The INIT that came before this STARTUP is consumed with it (under the lock that
            // orders both): a later `take_init` must not stop the CPU it starts.
            self.init.fetch_and(!(1u64 << (cpu % 64)), Ordering::AcqRel);
        }
        v
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
            c.lapics[0].write(0xf0, &0x1ffu32.to_le_bytes(), Instant::now());
            let t = Instant::now();
            c.pit.write(0x43, 0x30, t);
            c.pit.write(0x40, 1, t);
            c.pit.write(0x40, 0, t);
        }
        std::thread::sleep(Duration::from_millis(1));
        assert!(chip.interrupt_pending(0));
        assert_eq!(chip.acknowledge(0), Some(0x30));
        assert!(!chip.interrupt_pending(0));
    }

    /// ICW1-4 of the master 8259 (vectors 0x30-0x37, cascade on IRQ 2, 8086 mode), then
    /// every IRQ but 4 masked.
    fn init_master_pic(chip: &IrqChip) {
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

    #[test]
    fn pic_delivers_while_the_lapic_is_disabled() {
        let chip = IrqChip::new();
        init_master_pic(&chip);
        chip.pulse_gsi(4);
        assert!(chip.take_external(&mut 0));
        assert!(chip.interrupt_pending(0));
        assert_eq!(chip.acknowledge(0), Some(0x34));
        // GSI 16 is IOAPIC-only and masked there.
        chip.pulse_gsi(16);
        assert!(!chip.interrupt_pending(0));
    }

    fn lapic_w(chip: &IrqChip, cpu: usize, reg: u64, v: u32) {
        chip.lapic_write(cpu, reg, &v.to_le_bytes());
    }

    fn enable(chip: &IrqChip, cpu: usize) {
        lapic_w(chip, cpu, 0xf0, 0x1ff);
    }

    #[test]
    fn init_sipi_and_fixed_ipis_reach_their_destination() {
        let chip = IrqChip::new();
        chip.add_cpu(2);
        for c in 0..3 {
            enable(&chip, c);
        }
        // STARTUP without INIT first: ignored.
        lapic_w(&chip, 0, 0x310, 1 << 24);
        lapic_w(&chip, 0, 0x300, 0x0600 | 0x9a);
        assert_eq!(chip.wait_sipi(1, Duration::ZERO), None);
        // INIT assert, INIT de-assert, STARTUP vector 0x9a to APIC 1.
        lapic_w(&chip, 0, 0x300, 0xc500);
        lapic_w(&chip, 0, 0x300, 0x8500);
        lapic_w(&chip, 0, 0x300, 0x0600 | 0x9a);
        assert_eq!(chip.wait_sipi(1, Duration::ZERO), Some(0x9a));
        assert_eq!(chip.wait_sipi(2, Duration::ZERO), None, "only APIC 1");
        // A second STARTUP (Linux sends two) is ignored once started.
        lapic_w(&chip, 0, 0x300, 0x0600 | 0x9a);
        assert_eq!(chip.wait_sipi(1, Duration::ZERO), None);
        assert!(
            !chip.take_init(1),
            "the INIT before the STARTUP the vCPU took does not stop it again"
        );
        // INIT to the running CPU 1 (CPU hot-plug): it stops, its LAPIC resets, and the next
        // STARTUP starts it again; the BSP ignores INIT.
        lapic_w(&chip, 0, 0x300, 0xc500);
        assert!(chip.take_init(1));
        assert!(!chip.lock().lapics[1].enabled(), "LAPIC reset by INIT");
        lapic_w(&chip, 0, 0x300, 0x0600 | 0x9b);
        assert_eq!(chip.wait_sipi(1, Duration::ZERO), Some(0x9b));
        lapic_w(&chip, 1, 0x310, 0);
        lapic_w(&chip, 1, 0x300, 0xc500);
        assert!(!chip.take_init(0), "INIT to the BSP is ignored");
        enable(&chip, 1);
        // Fixed IPI, physical destination 2.
        lapic_w(&chip, 0, 0x310, 2 << 24);
        lapic_w(&chip, 0, 0x300, 0x00f1);
        assert!(!chip.interrupt_pending(1));
        assert!(chip.interrupt_pending(2));
        assert_eq!(chip.acknowledge(2), Some(0xf1));
        // All-but-self from CPU 1.
        lapic_w(&chip, 1, 0x300, (3 << 18) | 0xf2);
        assert_eq!(chip.acknowledge(0), Some(0xf2));
        assert_eq!(chip.acknowledge(1), None);
        assert_eq!(chip.acknowledge(2), None, "0xf1 still in service");
        lapic_w(&chip, 2, 0xb0, 0);
        assert_eq!(chip.acknowledge(2), Some(0xf2));
        // NMI to CPU 2 (physical).
        lapic_w(&chip, 0, 0x300, 0x0400);
        assert!(chip.take_nmi(2));
        assert!(!chip.take_nmi(2) && !chip.take_nmi(0));
        // Logical flat: LDR bit 1 on CPU 1 only.
        lapic_w(&chip, 1, 0xd0, 2 << 24);
        lapic_w(&chip, 0, 0x310, 2 << 24);
        lapic_w(&chip, 0, 0x300, (1 << 11) | 0x00e3);
        assert_eq!(chip.acknowledge(1), Some(0xe3));
        assert_eq!(chip.acknowledge(0), None);
    }

    #[test]
    fn ioapic_routes_to_the_programmed_cpu_and_pic_to_the_bsp() {
        let chip = IrqChip::new();
        chip.add_cpu(1);
        enable(&chip, 0);
        enable(&chip, 1);
        {
            let mut c = chip.lock();
            // Pin 16: vector 0x41, edge, physical destination APIC 1.
            c.ioapic.write(0, &[0x30]);
            c.ioapic.write(0x10, &0x41u32.to_le_bytes());
            c.ioapic.write(0, &[0x31]);
            c.ioapic.write(0x10, &(1u32 << 24).to_le_bytes());
        }
        chip.pulse_gsi(16);
        assert!(!chip.interrupt_pending(0));
        assert_eq!(chip.acknowledge(1), Some(0x41));
        // A halted CPU 1 is woken by an IPI sent from CPU 0's thread.
        let waker = std::thread::scope(|s| {
            let h = s.spawn(|| {
                let t = Instant::now();
                while !chip.interrupt_pending(1) {
                    chip.wait(1, Duration::from_secs(5));
                    if t.elapsed() > Duration::from_secs(30) {
                        return false;
                    }
                }
                true
            });
            std::thread::sleep(Duration::from_millis(20));
            lapic_w(&chip, 0, 0x310, 1 << 24);
            lapic_w(&chip, 0, 0x300, 0x00e5);
            h.join().unwrap()
        });
        assert!(waker);
        assert_eq!(chip.acknowledge(1), Some(0xe5));
        // The 8259 reaches only the BSP (both LAPICs accept ExtINT on LINT0).
        lapic_w(&chip, 0, 0x350, 0x700);
        lapic_w(&chip, 1, 0x350, 0x700);
        init_master_pic(&chip);
        chip.pulse_gsi(4);
        assert!(!chip.interrupt_pending(1));
        assert_eq!(chip.acknowledge(0), Some(0x34));
    }
}
