//! `rqemu-rtc` in its own process: the time read through the protocol matches the host clock.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rqemu_protocol::{DeviceClass, ForwardedDevice, GrantPolicy, Handle, Space};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(sock: &Path) -> Daemon {
    let child = Command::new(env!("CARGO_BIN_EXE_rqemu-rtc"))
        .args(["--socket", sock.to_str().unwrap()])
        .spawn()
        .expect("spawning rqemu-rtc");
    let d = Daemon(child);
    let end = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < end, "rqemu-rtc did not create its socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    d
}

fn cmos(h: &Handle, reg: u8) -> u8 {
    h.write(0, Space::Pio, 0x70, &[reg]).unwrap();
    let mut b = [0u8];
    h.read(0, Space::Pio, 0x71, &mut b).unwrap();
    b[0]
}

fn bcd(v: u8) -> i64 {
    assert!(v & 0x0f < 10 && v >> 4 < 10, "{v:#x} is not BCD");
    i64::from(v >> 4) * 10 + i64::from(v & 0x0f)
}

/// Host UTC broken down by libc (independent of the daemon's own conversion).
fn host_utc() -> libc::tm {
    // SAFETY: time(NULL) is always valid; gmtime_r writes into a zeroed tm we own.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::gmtime_r(&t, &mut tm);
        tm
    }
}

#[test]
fn reads_host_time_in_bcd() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("rtc.sock");
    let _d = spawn(&sock);
    let (claims, h) = ForwardedDevice::connect(&sock, &GrantPolicy::isa_default(1)).unwrap();
    assert_eq!(claims.class, DeviceClass::Rtc);
    assert_eq!((claims.windows[0].base, claims.windows[0].size), (0x70, 2));
    assert!(claims.irqs.is_empty());

    // Retry if a second/minute/day boundary falls between the reads.
    for _ in 0..5 {
        let before = host_utc();
        let (s, m, hr) = (bcd(cmos(&h, 0)), bcd(cmos(&h, 2)), bcd(cmos(&h, 4)));
        let (day, mon, yr, cent) = (
            bcd(cmos(&h, 7)),
            bcd(cmos(&h, 8)),
            bcd(cmos(&h, 9)),
            bcd(cmos(&h, 0x32)),
        );
        let after = host_utc();
        if before.tm_min != after.tm_min || before.tm_mday != after.tm_mday {
            continue;
        }
        let host_secs = i64::from(after.tm_hour) * 3600
            + i64::from(after.tm_min) * 60
            + i64::from(after.tm_sec);
        let rtc_secs = hr * 3600 + m * 60 + s;
        assert!(
            (host_secs - rtc_secs).abs() <= 2,
            "rtc {hr}:{m}:{s} vs host {host_secs}s"
        );
        assert_eq!(day, i64::from(after.tm_mday));
        assert_eq!(mon, i64::from(after.tm_mon) + 1);
        assert_eq!(cent * 100 + yr, i64::from(after.tm_year) + 1900);
        // Status D says the RTC is valid; CMOS RAM round-trips over the socket path too.
        assert_eq!(cmos(&h, 0x0d), 0x80);
        h.write_socket(Space::Pio, 0x70, &[0x40]).unwrap();
        h.write_socket(Space::Pio, 0x71, &[0xa5]).unwrap();
        assert_eq!(cmos(&h, 0x40), 0xa5);
        // Snapshot: index byte + 128 bytes of RAM.
        let snap = h.snapshot().unwrap();
        assert_eq!(snap.len(), 129);
        assert_eq!(snap[1 + 0x40], 0xa5);
        return;
    }
    panic!("host clock kept crossing minute boundaries");
}
