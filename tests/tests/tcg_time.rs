//! End-to-end: time and entropy on the software CPU (`rqemu-vmm --accel tcg`) with a plain
//! `console=ttyS0` command line (the harness adds only `panic=-1`, `quiet` and the
//! `rqemu.run=` script; no `tsc_early_khz` or other timing flag). The one flag added,
//! `random.trust_cpu=off`, takes an entropy source away rather than adding help: the CPU
//! advertises RDRAND/RDSEED, which the kernel credits at boot, so without it the CRNG is ready
//! before `/init` and the hard path below would never run.
//!
//! The guest script, run by `/init` before anything else could have initialised the kernel's
//! CRNG, reads 64 KiB from `/dev/urandom`: on Linux 6.1 that read runs
//! `try_to_generate_entropy()`, which needs about 256 timer ticks taken inside a busy
//! `schedule()` / `mix_pool_bytes()` loop whose interrupt windows are a few instructions long
//! (this hung the whole guest while the CPU polled interrupts too late after STI). It then
//! times `sleep 1` against the guest's own uptime (printed, not asserted: the host is shared)
//! and reports the clocksource and the CPU vendor the kernel recognised.

use std::time::Duration;

use rqemu_e2e::{GuestAssets, RqemuVm};

/// The script's read and sleep take seconds; booting the software CPU dominates.
const TIMEOUT: Duration = Duration::from_secs(600);

const SCRIPT: &str = r#"
if dmesg | grep -q 'crng init done'; then echo "time: crng-ready-before-read"; fi
echo "time: entropy_avail $(cat /proc/sys/kernel/random/entropy_avail)"
a=$(cut -d' ' -f1 /proc/uptime)
n=$(head -c 65536 /dev/urandom | wc -c)
b=$(cut -d' ' -f1 /proc/uptime)
echo "time: urandom-bytes $n uptime $a -> $b"
a=$(cut -d' ' -f1 /proc/uptime)
sleep 1
b=$(cut -d' ' -f1 /proc/uptime)
echo "time: sleep-1 uptime $a -> $b"
echo "time: clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "time: vendor $(grep -m1 vendor_id /proc/cpuinfo | cut -d: -f2)"
echo "time: unknown-vendor-lines $(dmesg | grep -ciE 'unknown vendor|vendor.*unknown')"
dmesg | grep -iE 'tsc|clocksource|crng' | sed 's/^/time: dmesg /'
"#;

/// The value after `time: KEY ` on the console, if printed.
fn field<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("time: {key} ");
    console
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix.as_str()))
        .map(str::trim)
}

fn uptime_span(s: &str) -> Option<f64> {
    let (a, b) = s.rsplit_once("uptime ")?.1.split_once(" -> ")?;
    Some(b.trim().parse::<f64>().ok()? - a.trim().parse::<f64>().ok()?)
}

#[test]
fn tcg_urandom_and_sleep_work_with_a_plain_cmdline() {
    let assets = GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"));
    let vm = RqemuVm::new(&assets)
        .cmdline("quiet random.trust_cpu=off")
        .run_cmdline(SCRIPT)
        .timeout(TIMEOUT);
    let cmdline = vm.kernel_cmdline();
    let (plain, _script) = cmdline
        .split_once(" rqemu.run=")
        .unwrap_or_else(|| panic!("no rqemu.run= in {cmdline}"));
    assert_eq!(
        plain, "console=ttyS0 panic=-1 quiet random.trust_cpu=off",
        "no timing flag on the command line"
    );
    let r = vm.run().unwrap_or_else(|e| panic!("{e}"));
    let report = r.transcript();
    assert_eq!(
        r.code(),
        Some(0),
        "the guest must finish (a hang in the urandom read is killed at {TIMEOUT:?})\n{report}"
    );
    assert!(
        !r.console.contains("time: crng-ready-before-read"),
        "the CRNG was initialised before the read, so this run did not exercise \
         try_to_generate_entropy() (a new entropy source, e.g. RDRAND, at boot?)\n{report}"
    );
    assert_eq!(
        field(&r.console, "urandom-bytes").and_then(|s| s.split_whitespace().next()),
        Some("65536"),
        "64 KiB read from /dev/urandom\n{report}"
    );
    assert_eq!(
        field(&r.console, "clocksource"),
        Some("tsc"),
        "the TSC stays the clocksource\n{report}"
    );
    let vendor = field(&r.console, "vendor").unwrap_or_default();
    assert!(
        matches!(vendor, "GenuineIntel" | "AuthenticAMD"),
        "a vendor the kernel knows, got {vendor:?}\n{report}"
    );
    assert_eq!(
        field(&r.console, "unknown-vendor-lines"),
        Some("0"),
        "no unknown-vendor warning in dmesg\n{report}"
    );
    assert!(
        r.console.contains("RQEMU-EXIT=0"),
        "script status\n{report}"
    );
    let secs = |key: &str| {
        field(&r.console, key)
            .and_then(uptime_span)
            .map_or_else(|| "?".into(), |s| format!("{s:.2} s"))
    };
    assert!(
        field(&r.console, "sleep-1").and_then(uptime_span).is_some(),
        "sleep 1 timed\n{report}"
    );
    eprintln!(
        "\n=== rqemu TCG guest uptime: 64 KiB urandom read {}, `sleep 1` {} (entropy_avail \
         before: {}; boot to exit {:.1} s wall) ===",
        secs("urandom-bytes"),
        secs("sleep-1"),
        field(&r.console, "entropy_avail").unwrap_or("?"),
        r.elapsed.as_secs_f64()
    );
}
