//! Emulated devices out of process: the test payload on KVM and TCG with COM1 served by
//! `rqemu-serial` and the CMOS RTC by `rqemu-rtc`, both real processes found through
//! `--device-socket` probing; a daemon killed and restarted under a running guest; and the
//! forwarded register read latency seen by a guest (printed, not asserted).

mod support;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::daemon::{read, wait_until, Daemon};
use support::{kvm_or_skip, on_both, payloads, run_vmm, Accel, Run};

const T: Duration = Duration::from_secs(120);

on_both!(
    payload_prints_through_rqemu_serial_and_reads_rqemu_rtc,
    restarted_daemons_are_reattached_under_a_running_guest
);

fn payload_prints_through_rqemu_serial_and_reads_rqemu_rtc(accel: Accel) {
    if !accel.usable("payload_prints_through_rqemu_serial_and_reads_rqemu_rtc") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.txt");
    let serial = Daemon::serial(dir.path(), &console);
    let rtc = Daemon::rtc(dir.path());
    let k = payloads().elf.to_str().unwrap().to_string();
    // Two VMMs one after the other: the daemons serve the second as they served the first.
    for round in 0..2 {
        let r = run_vmm(
            &[
                "--kernel",
                &k,
                "--accel",
                accel.arg(),
                "--memory",
                "64M",
                "--cmdline",
                "mode=poweroff",
                "--device-socket",
                serial.arg(),
                "--device-socket",
                rtc.arg(),
            ],
            T,
        );
        assert_eq!(r.code, Some(0), "round {round}: {r}");
        assert!(
            !r.stdout.contains("rqemu-payload"),
            "COM1 is the daemon's, the in-VMM serial must not exist: {r}"
        );
        let text = read(&console);
        let guest = Run {
            code: r.code,
            stdout: text
                .rsplit_once("rqemu-payload start")
                .map(|(_, last)| format!("rqemu-payload start{last}"))
                .unwrap_or_default(),
            stderr: String::new(),
        };
        assert_eq!(
            text.matches("rqemu-payload start").count(),
            round + 1,
            "{text}"
        );
        // Read through rqemu-rtc: a plausible year, the battery-good bit.
        let year: u32 = guest.field("rtc", "year").parse().unwrap();
        assert!((2024..2200).contains(&year), "{guest}");
        assert_eq!(guest.field("rtc", "status_d"), "0x80");
        // `rep outsb` to a forwarded (posted) window arrives whole and in order.
        assert!(guest.stdout.contains("\nrepouts ok\n"), "{guest}");
        assert!(guest.stdout.ends_with("action poweroff\n"), "{guest}");
    }
}

/// Last `tick k=K sec=S` of `text`: (K, S).
fn last_tick(text: &str) -> Option<(u64, u32)> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("tick ") && l.ends_with(' '))?;
    let get = |key: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    Some((get("k=")?, u32::try_from(get("sec=")?).ok()?))
}

fn restarted_daemons_are_reattached_under_a_running_guest(accel: Accel) {
    if !accel.usable("restarted_daemons_are_reattached_under_a_running_guest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console1 = dir.path().join("console1.txt");
    let console2 = dir.path().join("console2.txt");
    let serial = Daemon::serial(dir.path(), &console1);
    let rtc = Daemon::rtc(dir.path());
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_rqemu-vmm"))
        .args([
            "--kernel",
            payloads().elf.to_str().unwrap(),
            "--accel",
            accel.arg(),
        ])
        .args(["--memory", "64M", "--cmdline", "mode=ticks"])
        .args([
            "--device-socket",
            serial.arg(),
            "--device-socket",
            rtc.arg(),
        ])
        .env_remove("RQEMU_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = vmm.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let alive = |vmm: &mut Child| {
        assert!(
            vmm.try_wait().unwrap().is_none(),
            "the VMM exited while the guest should run"
        );
    };

    wait_until("ticks with a valid RTC second", || {
        last_tick(&read(&console1)).is_some_and(|(_, s)| s < 0x60)
    });

    // The RTC daemon dies: the guest keeps running and reads all ones.
    rtc.kill();
    wait_until("ticks reading all ones", || {
        last_tick(&read(&console1)).is_some_and(|(_, s)| s == 0xff)
    });
    alive(&mut vmm);
    // It is restarted and reattached: valid seconds again.
    let rtc = Daemon::rtc(dir.path());
    wait_until("ticks with a valid RTC second after the restart", || {
        last_tick(&read(&console1)).is_some_and(|(_, s)| s < 0x60)
    });

    // The serial daemon dies and comes back with another console: the same guest (the tick
    // count goes on) prints there.
    serial.kill();
    let (k_before, _) = last_tick(&read(&console1)).unwrap();
    alive(&mut vmm);
    let serial = Daemon::serial(dir.path(), &console2);
    wait_until("ticks on the restarted serial daemon's console", || {
        last_tick(&read(&console2)).is_some_and(|(k, _)| k > k_before)
    });
    alive(&mut vmm);
    let (k_after, _) = last_tick(&read(&console2)).unwrap();
    assert!(
        k_after > k_before,
        "the guest went on: tick {k_before} then {k_after}"
    );

    // SAFETY: plain kill(2) to our child.
    unsafe { libc::kill(vmm.id() as i32, libc::SIGTERM) };
    let st = vmm.wait().unwrap();
    let log = log.join().unwrap();
    // Exit status 4: stopped by a signal (vmm/README.md), not a panic's 101 or an error's 1.
    assert_eq!(
        st.code(),
        Some(4),
        "the VMM stops on SIGTERM with status 4: {st:?}\n{log}"
    );
    assert_eq!(log.matches("reattached").count(), 2, "{log}");
    assert!(log.contains("is gone"), "{log}");
    drop((serial, rtc));
}

/// Host TSC frequency in kHz, measured against the monotonic clock.
fn tsc_khz() -> f64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    let t = || unsafe { std::arch::x86_64::_rdtsc() };
    let (c0, i0) = (t(), Instant::now());
    std::thread::sleep(Duration::from_millis(200));
    let (c1, i1) = (t(), Instant::now());
    (c1 - c0) as f64 / (i1 - i0).as_secs_f64() / 1000.0
}

/// The forwarded register read round trip as the guest sees it (TSC around each `inb`),
/// through the ring, the socket, and the in-VMM RTC for comparison. Printed, not asserted:
/// `cargo test --release -p rqemu-vmm --test forwarded -- --nocapture latency`.
#[test]
fn forwarded_port_read_latency_with_kvm_payload() {
    if !kvm_or_skip("forwarded_port_read_latency_with_kvm_payload") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rtc = Daemon::rtc(dir.path());
    let k = payloads().elf.to_str().unwrap().to_string();
    let khz = tsc_khz();
    let base = [
        "--kernel",
        &k,
        "--accel",
        "kvm",
        "--memory",
        "64M",
        "--cmdline",
        "mode=portloop",
    ];
    let cases: [(&str, Vec<&str>); 3] = [
        ("in-VMM RTC (KVM exit, no daemon)", vec![]),
        (
            "rqemu-rtc via shared-memory ring",
            vec!["--device-socket", rtc.arg()],
        ),
        (
            "rqemu-rtc via socket",
            vec!["--device-socket", rtc.arg(), "--forward-via", "socket"],
        ),
    ];
    println!(
        "\nforwarded port read (guest-timed inb, 20000 samples, TSC {:.0} MHz)",
        khz / 1000.0
    );
    println!(
        "{:<36} {:>10} {:>10} {:>10} {:>10}",
        "path", "p50 ns", "p99 ns", "min ns", "max ns"
    );
    for (name, extra) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra);
        let r = run_vmm(&args, T);
        assert_eq!(r.code, Some(0), "{r}");
        let ns = |key: &str| -> f64 {
            let cycles: f64 = r.field("portloop", key).parse().unwrap();
            cycles / khz * 1e6
        };
        let (p50, p99) = (ns("p50"), ns("p99"));
        assert!(p50 > 0.0 && p99 >= p50, "{r}");
        println!(
            "{name:<36} {p50:>10.0} {p99:>10.0} {:>10.0} {:>10.0}",
            ns("min"),
            ns("max")
        );
    }
}
