//! An 8254 programmable interval timer (ports 0x40–0x43) plus the channel-2 gate/output
//! bits of port 0x61, for accelerators without an in-kernel PIT (TCG).
//!
//! Time base: the host monotonic clock (`Instant`), 1.193182 MHz. Channel 0 drives ISA IRQ0
//! in mode 0 (one-shot) and modes 2/3 (periodic); channel 2 counts while its gate (port
//! 0x61 bit 0) is high and reports OUT2 in port 0x61 bit 5, which Linux uses to calibrate
//! the TSC. Counter latch and read-back (count latch) commands are supported.

use std::time::{Duration, Instant};

/// First PIT port (channel 0); the mode/command register is at +3.
pub const PIT_PORT: u16 = 0x40;
/// System control port B (speaker / channel 2 gate).
pub const PORT_61: u16 = 0x61;
/// Input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;

fn ticks_since(start: Instant, now: Instant) -> u64 {
    let ns = now.saturating_duration_since(start).as_nanos();
    (ns * u128::from(PIT_HZ) / 1_000_000_000) as u64
}

fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_nanos((u128::from(ticks) * 1_000_000_000 / u128::from(PIT_HZ)) as u64)
}

#[derive(Debug, Clone, Copy, Default)]
struct Channel {
    mode: u8,
    /// 1 = LSB, 2 = MSB, 3 = LSB then MSB.
    access: u8,
    /// 1..=0x10000.
    reload: u32,
    /// When counting started (None: not counting).
    start: Option<Instant>,
    latch: Option<u16>,
    /// Next read of a 16-bit value returns the MSB.
    read_msb: bool,
    /// LSB written, waiting for the MSB.
    write_lsb: Option<u8>,
    gate: bool,
}

impl Channel {
    fn periodic(&self) -> bool {
        matches!(self.mode & 3, 2 | 3)
    }

    fn count(&self, now: Instant) -> u16 {
        let Some(start) = self.start else {
            return self.reload as u16;
        };
        let t = ticks_since(start, now);
        let r = u64::from(self.reload.max(1));
        if self.periodic() {
            (r - t % r) as u16
        } else {
            (r.wrapping_sub(t) & 0xffff) as u16
        }
    }

    fn out(&self, now: Instant) -> bool {
        let Some(start) = self.start else {
            return self.mode != 0;
        };
        let t = ticks_since(start, now);
        let r = u64::from(self.reload.max(1));
        match self.mode & 7 {
            0 | 1 => t >= r,
            2 | 6 => t % r != r - 1,
            3 | 7 => t % r < r.div_ceil(2),
            _ => t != r,
        }
    }

    fn read(&mut self, now: Instant) -> u8 {
        let v = self.latch.unwrap_or_else(|| self.count(now));
        match self.access {
            1 => {
                self.latch = None;
                v as u8
            }
            2 => {
                self.latch = None;
                (v >> 8) as u8
            }
            _ => {
                let msb = self.read_msb;
                self.read_msb = !msb;
                if msb {
                    self.latch = None;
                    (v >> 8) as u8
                } else {
                    v as u8
                }
            }
        }
    }

    /// Returns true when a full count was written (counting restarts).
    fn write(&mut self, v: u8) -> bool {
        let value = match self.access {
            1 => u32::from(v),
            2 => u32::from(v) << 8,
            _ => match self.write_lsb.take() {
                None => {
                    self.write_lsb = Some(v);
                    return false;
                }
                Some(lo) => u32::from(lo) | (u32::from(v) << 8),
            },
        };
        self.reload = if value == 0 { 0x1_0000 } else { value };
        true
    }
}

/// The PIT.
#[derive(Debug, Clone)]
pub struct Pit {
    ch: [Channel; 3],
    /// Port 0x61 bit 1 (speaker data), kept for read-back.
    speaker: bool,
    /// Port 0x61 bit 4 (memory refresh), toggles on every read.
    refresh: bool,
    /// Next IRQ0 edge.
    next_irq: Option<Instant>,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// A PIT with no channel programmed (channels 0 and 1 gated on, channel 2 off).
    pub fn new() -> Self {
        let mut ch = [Channel::default(); 3];
        ch[0].gate = true;
        ch[1].gate = true;
        Pit {
            ch,
            speaker: false,
            refresh: false,
            next_irq: None,
        }
    }

    /// Reads port 0x40–0x43.
    pub fn read(&mut self, port: u16, now: Instant) -> u8 {
        match port.wrapping_sub(PIT_PORT) {
            i @ 0..=2 => self.ch[usize::from(i)].read(now),
            _ => 0xff,
        }
    }

    /// Writes port 0x40–0x43.
    pub fn write(&mut self, port: u16, v: u8, now: Instant) {
        match port.wrapping_sub(PIT_PORT) {
            i @ 0..=2 => {
                let c = &mut self.ch[usize::from(i)];
                if c.write(v) && c.gate {
                    c.start = Some(now);
                    if i == 0 {
                        self.next_irq = Some(now + ticks_to_duration(u64::from(c.reload)));
                    }
                }
            }
            3 => self.command(v, now),
            _ => {}
        }
    }

    fn command(&mut self, v: u8, now: Instant) {
        let sel = v >> 6;
        if sel == 3 {
            // Read-back: bit 5 clear = latch count of the selected channels.
            if v & 0x20 == 0 {
                for i in 0..3 {
                    if v & (2 << i) != 0 {
                        let c = &mut self.ch[i];
                        c.latch.get_or_insert(c.count(now));
                        c.read_msb = false;
                    }
                }
            }
            return;
        }
        let c = &mut self.ch[usize::from(sel)];
        let access = (v >> 4) & 3;
        if access == 0 {
            c.latch.get_or_insert(c.count(now));
            c.read_msb = false;
            return;
        }
        c.access = access;
        c.mode = (v >> 1) & 7;
        c.start = None;
        c.latch = None;
        c.read_msb = false;
        c.write_lsb = None;
        if sel == 0 {
            self.next_irq = None;
        }
    }

    /// Reads port 0x61: bit 0 gate 2, bit 1 speaker, bit 4 refresh toggle, bit 5 OUT2.
    pub fn read_port61(&mut self, now: Instant) -> u8 {
        self.refresh = !self.refresh;
        let refresh = self.refresh;
        let c = &self.ch[2];
        u8::from(c.gate)
            | (u8::from(self.speaker) << 1)
            | (u8::from(refresh) << 4)
            | (u8::from(c.gate && c.out(now)) << 5)
    }

    /// Writes port 0x61: a rising gate edge (re)starts channel 2.
    pub fn write_port61(&mut self, v: u8, now: Instant) {
        self.speaker = v & 2 != 0;
        let c = &mut self.ch[2];
        let gate = v & 1 != 0;
        let restarts = c.periodic() || matches!(c.mode & 7, 1 | 5);
        let waiting = c.start.is_none() && c.write_lsb.is_none() && c.reload != 0;
        if gate && !c.gate && (restarts || waiting) {
            c.start = Some(now);
        }
        c.gate = gate;
    }

    /// True if IRQ0 had an edge at or before `now` (advances the periodic schedule).
    pub fn poll_irq0(&mut self, now: Instant) -> bool {
        let Some(next) = self.next_irq else {
            return false;
        };
        if now < next {
            return false;
        }
        let c = &self.ch[0];
        self.next_irq = if c.periodic() {
            let period = ticks_to_duration(u64::from(c.reload)).max(Duration::from_micros(10));
            let mut n = next + period;
            if n <= now {
                // Lost ticks are dropped rather than replayed in a burst.
                n = now + period;
            }
            Some(n)
        } else {
            None
        };
        true
    }

    /// When IRQ0 fires next, if scheduled.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.next_irq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel0_periodic_and_oneshot_irq0() {
        let mut p = Pit::new();
        let t0 = Instant::now();
        // Mode 2, LSB+MSB, 11932 ticks = 10 ms.
        p.write(0x43, 0x34, t0);
        p.write(0x40, (11932 & 0xff) as u8, t0);
        assert!(p.next_deadline().is_none(), "counting starts after the MSB");
        p.write(0x40, (11932 >> 8) as u8, t0);
        let d = p.next_deadline().unwrap() - t0;
        assert!((Duration::from_micros(9_990)..Duration::from_micros(10_010)).contains(&d));
        assert!(!p.poll_irq0(t0 + Duration::from_millis(5)));
        assert!(p.poll_irq0(t0 + Duration::from_millis(11)));
        assert!(p.poll_irq0(t0 + Duration::from_millis(21)), "periodic");
        // Counter latch: 5 ms into a period the count is about half the reload.
        p.write(0x43, 0x00, t0);
        let t = t0 + Duration::from_millis(5);
        p.write(0x43, 0x34, t);
        p.write(0x40, 0x9c, t);
        p.write(0x40, 0x2e, t);
        p.write(0x43, 0x00, t + Duration::from_micros(5000));
        let c = u16::from(p.read(0x40, t)) | (u16::from(p.read(0x40, t)) << 8);
        assert!((5900..6020).contains(&c), "count {c}");
        // Mode 0 one-shot.
        p.write(0x43, 0x30, t);
        p.write(0x40, 0x10, t);
        p.write(0x40, 0x00, t);
        assert!(p.poll_irq0(t + Duration::from_millis(1)));
        assert!(!p.poll_irq0(t + Duration::from_millis(100)));
    }

    #[test]
    fn channel2_gate_and_out2_for_calibration() {
        let mut p = Pit::new();
        let t0 = Instant::now();
        // Linux pit_calibrate_tsc: gate on, speaker off, mode 0, 50 ms latch.
        p.write_port61(0x01, t0);
        p.write(0x43, 0xb0, t0);
        p.write(0x42, (59659 & 0xff) as u8, t0);
        p.write(0x42, (59659 >> 8) as u8, t0);
        assert_eq!(p.read_port61(t0) & 0x21, 0x01, "OUT2 low while counting");
        assert_eq!(p.read_port61(t0 + Duration::from_millis(49)) & 0x20, 0);
        assert_eq!(p.read_port61(t0 + Duration::from_millis(51)) & 0x20, 0x20);
        // Reading without a latch gives the live count LSB then MSB.
        let t = t0 + Duration::from_millis(25);
        let c = u16::from(p.read(0x42, t)) | (u16::from(p.read(0x42, t)) << 8);
        assert!((29000..30500).contains(&c), "count {c}");
        p.write_port61(0x00, t);
        assert_eq!(p.read_port61(t) & 0x21, 0, "gate off hides OUT2");
    }
}
