//! MC146818-compatible CMOS RTC at ports 0x70 (index, bit 7 = NMI mask) / 0x71 (data).
//!
//! The time registers are computed from the host's UTC clock on every read; the guest's
//! choice of BCD or binary (status B bit 2) and 12/24 h (bit 1) is honoured. The other 114
//! bytes are plain CMOS RAM. Alarms and periodic interrupts are not implemented.

use std::time::{SystemTime, UNIX_EPOCH};

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
const B_24H: u8 = 1 << 1;
const B_BINARY: u8 = 1 << 2;

/// Errors of the CMOS RTC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmosError {
    /// A state blob of the wrong size.
    #[error("RTC state is {0} bytes, expected 129")]
    StateSize(usize),
}

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    /// Full year, e.g. 2026.
    pub year: u32,
    /// 1..=12.
    pub month: u32,
    /// 1..=31.
    pub day: u32,
    /// 0..=23.
    pub hour: u32,
    /// 0..=59.
    pub minute: u32,
    /// 0..=59.
    pub second: u32,
    /// 1 = Sunday .. 7 = Saturday (CMOS convention).
    pub weekday: u32,
}

impl DateTime {
    /// Converts seconds since the Unix epoch to a UTC date (proleptic Gregorian).
    pub fn from_unix(secs: u64) -> Self {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        // Howard Hinnant's civil_from_days, on non-negative day counts.
        let z = days as i64 + 719_468;
        let era = z / 146_097;
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
            // 1970-01-01 was a Thursday (CMOS weekday 5).
            weekday: ((days + 4) % 7) as u32 + 1,
        }
    }
}

/// The CMOS RTC device (insert at 0x70, length 2).
#[derive(Debug)]
pub struct Rtc {
    index: u8,
    ram: [u8; 128],
    clock: fn() -> u64,
}

fn host_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// An RTC reading the host clock, in 24 h BCD mode like a PC BIOS leaves it.
    pub fn new() -> Self {
        Self::with_clock(host_clock)
    }

    /// An RTC reading time from `clock` (seconds since the Unix epoch); for tests.
    pub fn with_clock(clock: fn() -> u64) -> Self {
        let mut ram = [0u8; 128];
        ram[usize::from(REG_A)] = 0x26; // 32.768 kHz divider, 1024 Hz rate, UIP clear
        ram[usize::from(REG_B)] = B_24H;
        ram[usize::from(REG_D)] = 0x80; // valid RAM and time (battery good)
        Rtc {
            index: 0,
            ram,
            clock,
        }
    }

    fn encode(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.ram[usize::from(REG_B)] & B_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn read_reg(&self, reg: u8) -> u8 {
        let now = || DateTime::from_unix((self.clock)());
        match reg {
            REG_SECONDS => self.encode(now().second),
            REG_MINUTES => self.encode(now().minute),
            REG_HOURS => {
                let h = now().hour;
                if self.ram[usize::from(REG_B)] & B_24H != 0 {
                    self.encode(h)
                } else {
                    let pm = if h >= 12 { 0x80 } else { 0 };
                    let h12 = match h % 12 {
                        0 => 12,
                        x => x,
                    };
                    self.encode(h12) | pm
                }
            }
            REG_WEEKDAY => self.encode(now().weekday),
            REG_DAY => self.encode(now().day),
            REG_MONTH => self.encode(now().month),
            REG_YEAR => self.encode(now().year % 100),
            REG_CENTURY => self.encode(now().year / 100),
            REG_C => 0, // no pending interrupt flags
            r => self.ram[usize::from(r & 0x7f)],
        }
    }

    fn write_reg(&mut self, reg: u8, v: u8) {
        match reg {
            // Time registers follow the host clock; the guest cannot set them.
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY | REG_C | REG_D => {}
            REG_A => self.ram[usize::from(REG_A)] = v & 0x7f, // UIP is read-only
            r => self.ram[usize::from(r & 0x7f)] = v,
        }
    }
}

impl Rtc {
    /// A read at `offset` (0 = index port, 1 = data port); `data` is 1 byte (more are left
    /// untouched).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(b) = data.first_mut() else { return };
        *b = match offset {
            0 => 0xff, // index register is write-only
            _ => self.read_reg(self.index),
        };
    }

    /// A write at `offset` (0 = index port, 1 = data port).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => self.index = v & 0x7f, // bit 7 is the NMI mask
            _ => self.write_reg(self.index, v),
        }
    }

    /// Machine reset: the CMOS RAM is battery backed and stays; only the index is lost.
    pub fn reset(&mut self) {
        self.index = 0;
    }

    /// The state: the index register then the 128 bytes of CMOS RAM.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut s = vec![self.index];
        s.extend_from_slice(&self.ram);
        s
    }

    /// Loads a state from [`snapshot`](Rtc::snapshot); a malformed one changes nothing.
    pub fn restore(&mut self, state: &[u8]) -> Result<(), CmosError> {
        let (&index, ram) = state.split_first().ok_or(CmosError::StateSize(0))?;
        let ram: [u8; 128] = ram
            .try_into()
            .map_err(|_| CmosError::StateSize(state.len()))?;
        self.index = index & 0x7f;
        self.ram = ram;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-02-29 13:05:09 UTC, a Thursday.
    const T: u64 = 1_709_211_909;

    fn read(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(0, &[reg | 0x80]);
        let mut b = [0];
        rtc.read(1, &mut b);
        b[0]
    }

    #[test]
    fn civil_date_conversion() {
        let d = DateTime::from_unix(T);
        assert_eq!((d.year, d.month, d.day), (2024, 2, 29));
        assert_eq!((d.hour, d.minute, d.second), (13, 5, 9));
        assert_eq!(d.weekday, 5);
        assert_eq!(DateTime::from_unix(0).year, 1970);
        assert_eq!(DateTime::from_unix(951_782_400).month, 2); // 2000-02-29
    }

    #[test]
    fn bcd_and_binary_modes() {
        let mut rtc = Rtc::with_clock(|| T);
        assert_eq!(read(&mut rtc, REG_YEAR), 0x24);
        assert_eq!(read(&mut rtc, REG_CENTURY), 0x20);
        assert_eq!(read(&mut rtc, REG_MONTH), 0x02);
        assert_eq!(read(&mut rtc, REG_HOURS), 0x13);
        assert_eq!(read(&mut rtc, REG_D), 0x80);
        rtc.write(0, &[REG_B]);
        rtc.write(1, &[B_24H | B_BINARY]);
        assert_eq!(read(&mut rtc, REG_YEAR), 24);
        assert_eq!(read(&mut rtc, REG_SECONDS), 9);
        rtc.write(0, &[REG_B]);
        rtc.write(1, &[B_BINARY]); // 12 h mode
        assert_eq!(read(&mut rtc, REG_HOURS), 0x80 | 1);
    }

    #[test]
    fn cmos_ram_is_writable_time_is_not() {
        let mut rtc = Rtc::with_clock(|| T);
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0x5a]);
        assert_eq!(read(&mut rtc, 0x40), 0x5a);
        rtc.write(0, &[REG_YEAR]);
        rtc.write(1, &[0x99]);
        assert_eq!(read(&mut rtc, REG_YEAR), 0x24);
        rtc.read(0, &mut []);
        rtc.write(1, &[]);
    }

    #[test]
    fn snapshot_round_trip() {
        let mut rtc = Rtc::with_clock(|| T);
        rtc.write(0, &[0x41]);
        rtc.write(1, &[0x17]);
        let s = rtc.snapshot();
        let mut other = Rtc::with_clock(|| T);
        other.restore(&s).unwrap();
        assert_eq!(read(&mut other, 0x41), 0x17);
        assert_eq!(other.restore(&s[..10]), Err(CmosError::StateSize(10)));
        assert_eq!(other.restore(&[]), Err(CmosError::StateSize(0)));
        assert_eq!(
            read(&mut other, 0x41),
            0x17,
            "a refused state changes nothing"
        );
        other.reset();
        assert_eq!(read(&mut other, 0x41), 0x17, "CMOS RAM survives a reset");
    }
}
