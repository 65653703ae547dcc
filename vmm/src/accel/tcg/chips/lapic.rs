//! A local APIC (xAPIC MMIO at [`crate::layout::LAPIC_START`]) for accelerators without an
//! in-kernel one (TCG): ID, version, TPR/PPR, EOI (with the EOI broadcast for level
//! interrupts reported to the caller), SVR, ISR/TMR/IRR with priority classes, ESR, ICR
//! (an IPI is returned to the caller, which delivers it to the destination LAPICs: see
//! [`Ipi`] and [`Lapic::matches`]), LVT entries and
//! the timer in one-shot and periodic mode with the divide configuration. No TSC-deadline
//! mode (the TCG CPU does not advertise it).
//!
//! Timer time base: the host monotonic clock with a 1 GHz bus clock, the same rate as the
//! TCG CPU's virtual TSC.

use std::time::{Duration, Instant};

/// Size of the MMIO window.
pub const LAPIC_SIZE: u64 = 0x1000;
/// Version register: version 0x14, 6 LVT entries (max LVT index 5).
pub const LAPIC_VERSION: u32 = 0x0005_0014;

const REG_ID: u64 = 0x20;
const REG_VERSION: u64 = 0x30;
const REG_TPR: u64 = 0x80;
const REG_APR: u64 = 0x90;
const REG_PPR: u64 = 0xa0;
const REG_EOI: u64 = 0xb0;
const REG_LDR: u64 = 0xd0;
const REG_DFR: u64 = 0xe0;
const REG_SVR: u64 = 0xf0;
const REG_ISR: u64 = 0x100;
const REG_TMR: u64 = 0x180;
const REG_IRR: u64 = 0x200;
const REG_ESR: u64 = 0x280;
const REG_ICR_LO: u64 = 0x300;
const REG_ICR_HI: u64 = 0x310;
const REG_LVT_TIMER: u64 = 0x320;
const REG_TIMER_INIT: u64 = 0x380;
const REG_TIMER_CUR: u64 = 0x390;
const REG_TIMER_DIV: u64 = 0x3e0;

const LVT_MASKED: u32 = 1 << 16;
const SVR_ENABLE: u32 = 1 << 8;
const TIMER_PERIODIC: u32 = 1 << 17;

/// LVT index of the timer / LINT0 (registers 0x320..=0x370 are LVT 0..=5 after CMCI 0x2f0).
const LVT_TIMER: usize = 1;
const LVT_LINT0: usize = 4;

/// What a register write asks the caller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LapicAction {
    /// Nothing.
    None,
    /// EOI of a level-triggered `vector`: broadcast it to the IOAPIC.
    LevelEoi(u8),
    /// An ICR write: send this IPI.
    Ipi(Ipi),
}

/// An inter-processor interrupt from an ICR write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipi {
    /// Vector (fixed/lowest priority) or SIPI page.
    pub vector: u8,
    /// Delivery mode: 0 fixed, 1 lowest priority, 4 NMI, 5 INIT, 6 STARTUP.
    pub mode: u8,
    /// Level bit (INIT with level 0 is the "INIT level de-assert", a no-op).
    pub assert: bool,
    /// Destination shorthand: 0 none, 1 self, 2 all, 3 all but self.
    pub shorthand: u8,
    /// Destination field (ICR bits 63:56).
    pub dest: u8,
    /// Logical destination mode.
    pub logical: bool,
}

fn bit(v: &[u32; 8], vector: u8) -> bool {
    v[usize::from(vector >> 5)] & (1 << (vector & 31)) != 0
}

fn set(v: &mut [u32; 8], vector: u8, on: bool) {
    let w = &mut v[usize::from(vector >> 5)];
    if on {
        *w |= 1 << (vector & 31);
    } else {
        *w &= !(1 << (vector & 31));
    }
}

fn highest(v: &[u32; 8]) -> Option<u8> {
    (0..8)
        .rev()
        .find(|&i| v[i] != 0)
        .map(|i| (i as u32 * 32 + 31 - v[i].leading_zeros()) as u8)
}

/// The local APIC of one CPU.
#[derive(Debug, Clone)]
pub struct Lapic {
    id: u32,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    esr: u32,
    icr: [u32; 2],
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    /// CMCI, timer, thermal, perf, LINT0, LINT1, error.
    lvt: [u32; 7],
    timer_init: u32,
    timer_div: u32,
    timer_start: Option<Instant>,
    timer_next: Option<Instant>,
}

impl Lapic {
    /// Reset state for APIC ID `id`: software-disabled, every LVT masked.
    pub fn new(id: u32) -> Self {
        Lapic {
            id,
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            esr: 0,
            icr: [0; 2],
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            lvt: [LVT_MASKED; 7],
            timer_init: 0,
            timer_div: 0,
            timer_start: None,
            timer_next: None,
        }
    }

    /// True if software-enabled (SVR bit 8).
    pub fn enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// True if the 8259 output (INTR) reaches the CPU: APIC disabled (virtual wire through
    /// the disabled APIC) or LINT0 unmasked in ExtINT mode.
    pub fn accepts_pic(&self) -> bool {
        let lint0 = self.lvt[LVT_LINT0];
        !self.enabled() || (lint0 & LVT_MASKED == 0 && (lint0 >> 8) & 7 == 7)
    }

    /// Sets TPR from CR8 writes (CR8 = TPR[7:4]).
    pub fn set_cr8(&mut self, v: u8) {
        self.tpr = u32::from(v & 0xf) << 4;
    }

    /// The APIC ID.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Whether this LAPIC is a destination of `dest` in physical or logical (flat or cluster
    /// model, per DFR) mode. 0xff is the broadcast.
    pub fn matches(&self, dest: u8, logical: bool) -> bool {
        if dest == 0xff {
            return true;
        }
        if !logical {
            return u32::from(dest) == self.id;
        }
        let ldr = (self.ldr >> 24) as u8;
        if self.dfr >> 28 == 0xf {
            ldr & dest != 0
        } else {
            ldr >> 4 == dest >> 4 && ldr & dest & 0xf != 0
        }
    }

    /// Accepts a fixed interrupt `vector` (from the IOAPIC or an IPI).
    pub fn accept(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.esr |= 1 << 6;
            return;
        }
        set(&mut self.irr, vector, true);
        set(&mut self.tmr, vector, level);
    }

    fn ppr(&self) -> u32 {
        let isrv = highest(&self.isr).map_or(0, u32::from);
        if self.tpr & 0xf0 >= isrv & 0xf0 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// The vector that would be delivered now, if any.
    pub fn deliverable(&self) -> Option<u8> {
        if !self.enabled() {
            return None;
        }
        let v = highest(&self.irr)?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// INTA: moves the deliverable vector from IRR to ISR and returns it.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let v = self.deliverable()?;
        set(&mut self.irr, v, false);
        set(&mut self.isr, v, true);
        Some(v)
    }

    fn timer_period(&self) -> Duration {
        Duration::from_nanos(u64::from(self.timer_init) * self.timer_divisor())
    }

    fn timer_divisor(&self) -> u64 {
        let d = self.timer_div;
        let shift = ((d & 3) | ((d >> 1) & 4)) + 1;
        if shift == 8 {
            1
        } else {
            1u64 << shift
        }
    }

    /// Fires the timer if due at `now` (sets the LVT timer vector in IRR unless masked).
    pub fn poll_timer(&mut self, now: Instant) {
        let Some(next) = self.timer_next else {
            return;
        };
        if now < next {
            return;
        }
        let lvt = self.lvt[LVT_TIMER];
        self.timer_next = if lvt & TIMER_PERIODIC != 0 {
            let period = self.timer_period().max(Duration::from_micros(1));
            let mut n = next + period;
            if n <= now {
                n = now + period;
            }
            Some(n)
        } else {
            None
        };
        if lvt & LVT_MASKED == 0 && self.enabled() {
            self.accept(lvt as u8, false);
        }
    }

    /// When the timer fires next, if armed.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timer_next
    }

    fn current_count(&self, now: Instant) -> u32 {
        let Some(start) = self.timer_start else {
            return 0;
        };
        let ticks = now.saturating_duration_since(start).as_nanos() as u64 / self.timer_divisor();
        let init = u64::from(self.timer_init);
        if init == 0 {
            return 0;
        }
        if self.lvt[LVT_TIMER] & TIMER_PERIODIC != 0 {
            (init - ticks % init) as u32
        } else {
            init.saturating_sub(ticks) as u32
        }
    }

    fn eoi(&mut self) -> LapicAction {
        let Some(v) = highest(&self.isr) else {
            return LapicAction::None;
        };
        set(&mut self.isr, v, false);
        if bit(&self.tmr, v) {
            set(&mut self.tmr, v, false);
            LapicAction::LevelEoi(v)
        } else {
            LapicAction::None
        }
    }

    fn read_reg(&self, reg: u64, now: Instant) -> u32 {
        match reg {
            REG_ID => self.id << 24,
            REG_VERSION => LAPIC_VERSION,
            REG_TPR => self.tpr,
            REG_APR => 0,
            REG_PPR => self.ppr(),
            REG_LDR => self.ldr,
            REG_DFR => self.dfr,
            REG_SVR => self.svr,
            0x100..=0x170 => self.isr[((reg - REG_ISR) >> 4) as usize],
            0x180..=0x1f0 => self.tmr[((reg - REG_TMR) >> 4) as usize],
            0x200..=0x270 => self.irr[((reg - REG_IRR) >> 4) as usize],
            REG_ESR => self.esr,
            REG_ICR_LO => self.icr[0],
            REG_ICR_HI => self.icr[1],
            0x2f0 => self.lvt[0],
            0x320..=0x370 => self.lvt[((reg - REG_LVT_TIMER) >> 4) as usize + 1],
            REG_TIMER_INIT => self.timer_init,
            REG_TIMER_CUR => self.current_count(now),
            REG_TIMER_DIV => self.timer_div,
            _ => 0,
        }
    }

    fn write_reg(&mut self, reg: u64, v: u32, now: Instant) -> LapicAction {
        match reg {
            REG_ID => self.id = v >> 24,
            REG_TPR => self.tpr = v & 0xff,
            REG_EOI => return self.eoi(),
            REG_LDR => self.ldr = v & 0xff00_0000,
            REG_DFR => self.dfr = v | 0x0fff_ffff,
            REG_SVR => {
                self.svr = v & 0x13ff;
                if !self.enabled() {
                    for l in self.lvt.iter_mut() {
                        *l |= LVT_MASKED;
                    }
                }
            }
            REG_ESR => self.esr = 0,
            REG_ICR_LO => {
                self.icr[0] = v & !(1 << 12);
                return self.send_ipi();
            }
            REG_ICR_HI => self.icr[1] = v & 0xff00_0000,
            0x2f0 => self.lvt[0] = self.lvt_value(v),
            0x320..=0x370 => {
                let i = ((reg - REG_LVT_TIMER) >> 4) as usize + 1;
                let old = self.lvt[i];
                self.lvt[i] = self.lvt_value(v);
                if i == LVT_TIMER && (old ^ v) & TIMER_PERIODIC != 0 {
                    self.arm_timer(now);
                }
            }
            REG_TIMER_INIT => {
                self.timer_init = v;
                self.arm_timer(now);
            }
            REG_TIMER_DIV => self.timer_div = v & 0xb,
            _ => {}
        }
        LapicAction::None
    }

    fn lvt_value(&self, v: u32) -> u32 {
        if self.enabled() {
            v
        } else {
            v | LVT_MASKED
        }
    }

    fn arm_timer(&mut self, now: Instant) {
        if self.timer_init == 0 {
            self.timer_start = None;
            self.timer_next = None;
        } else {
            self.timer_start = Some(now);
            self.timer_next = Some(now + self.timer_period());
        }
    }

    /// The IPI an ICR low write sends; a fixed self-IPI is accepted here directly.
    fn send_ipi(&mut self) -> LapicAction {
        let lo = self.icr[0];
        let ipi = Ipi {
            vector: lo as u8,
            mode: ((lo >> 8) & 7) as u8,
            assert: lo & (1 << 14) != 0,
            shorthand: ((lo >> 18) & 3) as u8,
            dest: (self.icr[1] >> 24) as u8,
            logical: lo & (1 << 11) != 0,
        };
        if ipi.shorthand == 1 {
            if ipi.mode == 0 {
                self.accept(ipi.vector, false);
            }
            return LapicAction::None;
        }
        LapicAction::Ipi(ipi)
    }

    /// MMIO read at `offset` (registers are 32 bits on 16-byte boundaries).
    pub fn read(&self, offset: u64, data: &mut [u8], now: Instant) {
        let v = self.read_reg(offset & !0xf, now);
        let b = v.to_le_bytes();
        let start = (offset & 3) as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(start + i).copied().unwrap_or(0);
        }
    }

    /// MMIO write at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8], now: Instant) -> LapicAction {
        if offset & 0xf != 0 {
            return LapicAction::None;
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        self.write_reg(offset, u32::from_le_bytes(b), now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(l: &mut Lapic, reg: u64, v: u32, now: Instant) -> LapicAction {
        l.write(reg, &v.to_le_bytes(), now)
    }

    fn r(l: &Lapic, reg: u64, now: Instant) -> u32 {
        let mut b = [0u8; 4];
        l.read(reg, &mut b, now);
        u32::from_le_bytes(b)
    }

    #[test]
    fn priorities_tpr_and_level_eoi() {
        let now = Instant::now();
        let mut l = Lapic::new(3);
        assert_eq!(r(&l, REG_ID, now), 3 << 24);
        assert_eq!(r(&l, REG_VERSION, now), LAPIC_VERSION);
        l.accept(0x41, false);
        assert_eq!(l.deliverable(), None, "software-disabled");
        w(&mut l, REG_SVR, 0x1ff, now);
        l.accept(0x31, false);
        l.accept(0x62, true);
        assert_eq!(l.acknowledge(), Some(0x62));
        // Same priority class as the one in service: blocked.
        l.accept(0x65, false);
        assert_eq!(l.deliverable(), None);
        assert_eq!(w(&mut l, REG_EOI, 0, now), LapicAction::LevelEoi(0x62));
        assert_eq!(l.acknowledge(), Some(0x65));
        assert_eq!(w(&mut l, REG_EOI, 0, now), LapicAction::None);
        w(&mut l, REG_TPR, 0x50, now);
        assert_eq!(l.deliverable(), None, "TPR blocks 0x41 and 0x31");
        w(&mut l, REG_TPR, 0x30, now);
        assert_eq!(l.acknowledge(), Some(0x41));
        assert_eq!(r(&l, REG_ISR + 0x20, now), 1 << 1);
        assert_eq!(r(&l, REG_PPR, now), 0x40);
    }

    #[test]
    fn self_ipi_and_timer_modes() {
        let t0 = Instant::now();
        let mut l = Lapic::new(0);
        w(&mut l, REG_SVR, 0x1ff, t0);
        w(&mut l, REG_ICR_LO, (1 << 18) | 0xf3, t0);
        assert_eq!(l.acknowledge(), Some(0xf3));
        w(&mut l, REG_EOI, 0, t0);
        // Divide by 16, one-shot 1000 ticks = 16 us.
        w(&mut l, REG_TIMER_DIV, 3, t0);
        w(&mut l, REG_LVT_TIMER, 0xec, t0);
        w(&mut l, REG_TIMER_INIT, 1000, t0);
        assert_eq!(r(&l, REG_TIMER_CUR, t0 + Duration::from_micros(8)), 500);
        l.poll_timer(t0 + Duration::from_micros(15));
        assert_eq!(l.deliverable(), None);
        l.poll_timer(t0 + Duration::from_micros(16));
        assert_eq!(l.acknowledge(), Some(0xec));
        w(&mut l, REG_EOI, 0, t0);
        assert_eq!(l.next_deadline(), None, "one-shot");
        assert_eq!(r(&l, REG_TIMER_CUR, t0 + Duration::from_micros(20)), 0);
        // Periodic, divide by 1.
        w(&mut l, REG_TIMER_DIV, 0xb, t0);
        w(&mut l, REG_LVT_TIMER, TIMER_PERIODIC | 0xec, t0);
        w(&mut l, REG_TIMER_INIT, 1000, t0);
        l.poll_timer(t0 + Duration::from_micros(1));
        assert!(l.next_deadline().is_some(), "periodic re-arms");
        assert_eq!(l.acknowledge(), Some(0xec));
        // Masked LVT: no interrupt.
        w(&mut l, REG_EOI, 0, t0);
        w(
            &mut l,
            REG_LVT_TIMER,
            LVT_MASKED | TIMER_PERIODIC | 0xec,
            t0,
        );
        l.poll_timer(t0 + Duration::from_millis(1));
        assert_eq!(l.deliverable(), None);
        assert!(!l.accepts_pic());
        w(&mut l, 0x350, 0x700, t0);
        assert!(l.accepts_pic());
    }
}
