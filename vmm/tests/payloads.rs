//! End-to-end tests: tiny guest payloads built from `vmm/payloads/` boot through the real
//! `rqemu-vmm` binary and report what they found; exit statuses are checked. Every test
//! runs twice: on KVM (`*_kvm`) and on the software CPU (`*_tcg`, always available).

mod support;

use std::time::Duration;

use support::{kvm_or_skip, on_both, payloads, run_vmm, Accel, Run};

const T: Duration = Duration::from_secs(60);

on_both!(
    elf_linux64_entry_powers_off_via_acpi,
    bzimage_entry_with_initrd,
    pvh_entry_gets_start_info_memmap_and_module,
    smp_madt_and_large_memory_above_4g,
    i8042_reset_exits_nonzero,
    acpi_reset_register_exits_nonzero,
    triple_fault_exits_nonzero_with_message,
    serial_to_file_and_none,
    sigterm_stops_the_vm_cleanly,
);

fn boot(accel: Accel, kernel: &std::path::Path, extra: &[&str]) -> Run {
    let k = kernel.to_str().unwrap();
    let mut args = vec!["--kernel", k, "--accel", accel.arg(), "--memory", "64M"];
    args.extend_from_slice(extra);
    run_vmm(&args, T)
}

/// Checks the report every payload prints before its final action.
fn check_common_report(r: &Run, cpus: u32, accel: Accel) {
    assert!(r.stdout.starts_with("rqemu-payload start"), "{r}");
    // ACPI: RSDP found both by the BIOS-area scan and via the boot protocol, same place.
    assert_eq!(r.field("rsdp", "scan"), r.field("rsdp", "given"), "{r}");
    assert_ne!(r.field("rsdp", "scan"), "0x0");
    assert_eq!(r.field("acpi", "bad_checksums"), "0");
    assert_eq!(r.field("xsdt", "entries"), "2");
    assert_eq!(r.field("madt", "lapics"), cpus.to_string());
    assert_eq!(r.field("madt", "ioapic"), "0xfec00000");
    assert_eq!(r.field("madt", "lapic_addr"), "0xfee00000");
    assert_eq!(r.field("madt", "isos"), "2");
    assert_eq!(r.field("fadt", "hw_reduced"), "1");
    assert_eq!(r.field("dsdt", "lnro0005"), "8");
    assert_eq!(r.field("dsdt", "pnp0501"), "1");
    assert_eq!(r.field("dsdt", "s5"), "1");
    // CPUID: hypervisor bit + KVM signature (TCG: none); the LAPIC/IOAPIC (in-kernel on
    // KVM, userspace on TCG) answer MMIO.
    assert_eq!(r.field("cpu", "hv"), "1");
    let sig = if accel == Accel::Kvm { "KVMKVMKVM" } else { "" };
    assert_eq!(r.field("cpu", "sig"), sig);
    assert_eq!(r.field("cpu", "apic_id"), r.field("cpu", "lapic_id"));
    assert_eq!(r.field("cpu", "ioapic_ver"), "0x170011");
    // MMIO exits to the empty virtio-mmio windows; PIO to the RTC; rep outsb to COM1.
    assert_eq!(r.field("virtio", "magic_ok"), "8");
    let year: u32 = r.field("rtc", "year").parse().unwrap();
    assert!((2024..2200).contains(&year), "{r}");
    assert_eq!(r.field("rtc", "status_d"), "0x80");
    assert!(r.stdout.contains("\nrepouts ok\n"), "{r}");
}

fn elf_linux64_entry_powers_off_via_acpi(accel: Accel) {
    if !accel.usable("elf_linux64_entry_powers_off_via_acpi") {
        return;
    }
    let r = boot(accel, &payloads().elf, &["--cmdline", "mode=poweroff x=1"]);
    assert_eq!(r.code, Some(0), "{r}");
    check_common_report(&r, 1, accel);
    assert_eq!(r.field("boot", "bp"), "0x7000");
    assert_eq!(r.field("boot", "loader"), "0xff");
    assert_eq!(r.field("boot", "loadflags"), "0x80", "CAN_USE_HEAP");
    assert_eq!(r.line("cmdline"), "cmdline mode=poweroff x=1");
    assert_eq!(r.field("mem", "top"), "0x4000000");
    assert_eq!(r.field("fadt", "sleep_ctl"), "0xc0000000");
    assert!(r.stdout.ends_with("action poweroff\n"), "{r}");
}

fn bzimage_entry_with_initrd(accel: Accel) {
    if !accel.usable("bzimage_entry_with_initrd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.img");
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    std::fs::write(&initrd, &data).unwrap();
    let hash = data
        .iter()
        .fold(0u32, |s, &b| s.wrapping_mul(31).wrapping_add(u32::from(b)));
    let r = boot(
        accel,
        &payloads().bzimage,
        &[
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            "mode=poweroff",
        ],
    );
    assert_eq!(r.code, Some(0), "{r}");
    check_common_report(&r, 1, accel);
    assert_eq!(
        r.field("boot", "hdrs"),
        "1",
        "setup header copied from the image"
    );
    assert_eq!(r.field("boot", "loadflags"), "0x81");
    assert_eq!(r.field("initrd", "size"), "10000");
    assert_eq!(r.field("initrd", "hash"), format!("{hash:#x}"));
    let addr = u64::from_str_radix(r.field("initrd", "addr").trim_start_matches("0x"), 16).unwrap();
    assert_eq!(addr % 4096, 0);
    assert!(
        addr + 10_000 <= 64 << 20 && addr > 0x20_0000,
        "placed high: {addr:#x}"
    );
}

fn pvh_entry_gets_start_info_memmap_and_module(accel: Accel) {
    if !accel.usable("pvh_entry_gets_start_info_memmap_and_module") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.img");
    std::fs::write(&initrd, b"pvh module").unwrap();
    if accel == Accel::Tcg {
        // The software CPU has no 32-bit protected mode: the PVH entry is refused clearly.
        let r = boot(accel, &payloads().pvh, &["--cmdline", "mode=poweroff pvh"]);
        assert_eq!(r.code, Some(1), "{r}");
        assert!(r.stderr.contains("PVH entry is not supported"), "{r}");
        return;
    }
    let r = boot(
        accel,
        &payloads().pvh,
        &[
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            "mode=poweroff pvh",
        ],
    );
    assert_eq!(r.code, Some(0), "{r}");
    check_common_report(&r, 1, accel);
    assert_eq!(r.field("boot", "magic"), "0x336ec578");
    assert_eq!(r.line("cmdline"), "cmdline mode=poweroff pvh");
    assert_eq!(r.field("mem", "entries"), "3");
    assert_eq!(r.field("initrd", "size"), "10");
}

/// The vCPU count a test may ask of `accel`: the software CPU runs one (no SMP yet; asking it
/// for more is refused: `accel_choice.rs`).
fn cpus(accel: Accel, n: u32) -> u32 {
    match accel {
        Accel::Kvm => n,
        Accel::Tcg => 1,
    }
}

fn smp_madt_and_large_memory_above_4g(accel: Accel) {
    if !accel.usable("smp_madt_and_large_memory_above_4g") {
        return;
    }
    // 3 GiB + 256 MiB: RAM is split around the MMIO hole (memfd pages are touched lazily).
    let k = payloads().elf.to_str().unwrap();
    let n = cpus(accel, 3).to_string();
    let r = run_vmm(
        &[
            "--kernel",
            k,
            "--accel",
            accel.arg(),
            "--cpus",
            &n,
            "--memory",
            "3328M",
            "--cmdline",
            "mode=poweroff",
        ],
        T,
    );
    assert_eq!(r.code, Some(0), "{r}");
    check_common_report(&r, cpus(accel, 3), accel);
    assert_eq!(r.field("mem", "entries"), "4");
    assert_eq!(r.field("mem", "top"), "0x110000000");
    assert!(
        r.stdout
            .contains("e820 addr=0x100000000 size=0x10000000 type=1"),
        "{r}"
    );
    assert!(
        r.stdout
            .contains("e820 addr=0x100000 size=0xbff00000 type=1"),
        "{r}"
    );
}

fn i8042_reset_exits_nonzero(accel: Accel) {
    if !accel.usable("i8042_reset_exits_nonzero") {
        return;
    }
    let n = cpus(accel, 2).to_string();
    let r = boot(
        accel,
        &payloads().elf,
        &["--cmdline", "mode=i8042", "--cpus", &n],
    );
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("reset via i8042"), "{r}");
}

fn acpi_reset_register_exits_nonzero(accel: Accel) {
    if !accel.usable("acpi_reset_register_exits_nonzero") {
        return;
    }
    let r = boot(accel, &payloads().elf, &["--cmdline", "mode=acpireset"]);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("ACPI reset register"), "{r}");
}

fn triple_fault_exits_nonzero_with_message(accel: Accel) {
    if !accel.usable("triple_fault_exits_nonzero_with_message") {
        return;
    }
    let r = boot(accel, &payloads().elf, &["--cmdline", "mode=triple"]);
    assert_eq!(r.code, Some(3), "{r}");
    assert!(r.stderr.contains("triple-faulted"), "{r}");
    assert!(r.stdout.contains("action triple"), "{r}");
}

fn serial_to_file_and_none(accel: Accel) {
    if !accel.usable("serial_to_file_and_none") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let spec = format!("file:{}", log.display());
    let r = boot(
        accel,
        &payloads().elf,
        &["--cmdline", "mode=poweroff", "--serial", &spec],
    );
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.is_empty(), "{r}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("action poweroff"), "{text}");
    let r = boot(
        accel,
        &payloads().elf,
        &["--cmdline", "mode=poweroff", "--serial", "none"],
    );
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.is_empty(), "{r}");
}

#[test]
fn device_sockets_fail_clearly() {
    let k = payloads().elf.to_str().unwrap();
    let r = run_vmm(&["--kernel", k, "--device-socket", "/some/daemon.sock"], T);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("/some/daemon.sock"), "{r}");
    if kvm_or_skip("tcg_and_device_sockets_fail_clearly (missing daemon)") {
        let r = run_vmm(
            &["--kernel", k, "--device-socket", "blk:/nonexistent.sock"],
            T,
        );
        assert_eq!(r.code, Some(1), "{r}");
        let e = &r.stderr;
        assert!(
            e.contains("/nonexistent.sock") && e.contains("connect"),
            "{r}"
        );
    }
    let r = run_vmm(&["--kernel", "/nonexistent/kernel", "--accel", "kvm"], T);
    assert_ne!(r.code, Some(0), "{r}");
    assert!(r.stderr.contains("/nonexistent/kernel"), "{r}");
}

fn sigterm_stops_the_vm_cleanly(accel: Accel) {
    if !accel.usable("sigterm_stops_the_vm_cleanly") {
        return;
    }
    use std::io::Read;
    let k = payloads().elf.to_str().unwrap();
    let n = cpus(accel, 2).to_string();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rqemu-vmm"))
        .args([
            "--kernel",
            k,
            "--accel",
            accel.arg(),
            "--memory",
            "64M",
            "--cpus",
            &n,
        ])
        .args(["--cmdline", "mode=halt"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("action halt") {
        let n = out.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "guest output ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < T, "VMM did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(4), "{err}");
    assert!(err.contains("stopped by the host"), "{err}");
}
