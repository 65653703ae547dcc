//! Benchmark (printed, never asserted): `rqemu-vmm` start → first guest serial byte (the
//! payload's first instruction writes to COM1 right after the boot entry), start → ACPI
//! power-off exit, and the VMM's RSS while the tiny payload idles.
//!
//! Run: `cargo bench -p rqemu-vmm --bench boot_latency` (needs /dev/kvm and gcc).

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 10;

fn status_field(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{name:<32} min {:>9.0} us   median {:>9.0} us   max {:>9.0} us",
        us(v[0]),
        us(v[v.len() / 2]),
        us(v[v.len() - 1])
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if std::fs::metadata("/dev/kvm").is_err() {
        println!("boot_latency: /dev/kvm missing, benchmark NOT RUN");
        return;
    }
    let payload = support::payloads().elf.clone();
    let vmm = env!("CARGO_BIN_EXE_rqemu-vmm");
    let kernel = payload.to_str().unwrap();
    let mut first_byte = Vec::new();
    let mut idle_rss = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let mut child = Command::new(vmm)
            .args(["--kernel", kernel, "--accel", "kvm", "--memory", "64M"])
            .args(["--cmdline", "mode=halt"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning rqemu-vmm");
        let mut out = child.stdout.take().unwrap();
        let mut b = [0u8; 1];
        out.read_exact(&mut b).expect("first serial byte");
        first_byte.push(start.elapsed());
        // Wait until the payload idles, then sample RSS.
        let mut rest = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&rest).contains("action halt") {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
            }
        }
        if let Some(kb) = status_field(child.id(), "VmRSS:") {
            idle_rss.push(kb);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut poweroff = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let st = Command::new(vmm)
            .args(["--kernel", kernel, "--accel", "kvm", "--memory", "64M"])
            .args(["--cmdline", "mode=poweroff", "--serial", "none"])
            .stdin(Stdio::null())
            .status()
            .expect("running rqemu-vmm");
        poweroff.push(start.elapsed());
        if !st.success() {
            println!("warning: power-off run exited with {st}");
        }
    }
    println!("rqemu-vmm boot latency, tiny payload, 64 MiB, 1 vCPU, KVM ({RUNS} runs)");
    stats("start -> first serial byte", first_byte);
    stats("start -> exit after ACPI S5", poweroff);
    idle_rss.sort();
    if let (Some(min), Some(max)) = (idle_rss.first(), idle_rss.last()) {
        println!(
            "{:<32} min {min} KiB   median {} KiB   max {max} KiB",
            "VMM RSS (payload idle)",
            idle_rss[idle_rss.len() / 2]
        );
    }
}
