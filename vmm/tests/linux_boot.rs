//! A stock Debian kernel (the reference guest's `vmlinux`, PVH entry) on KVM.
//!
//! On this machine's KVM-PVM a full Linux boot does not finish in useful time, so the test
//! checks the early boot log only: the kernel must see our e820 map, every ACPI table, both
//! CPUs (MADT), the IOAPIC and its overrides. The kernel is `$RQEMU_GUEST_KERNEL` or
//! `target/guest/vmlinux` (built by the guest-image script); without one the test says so
//! loudly and passes. `RQEMU_LINUX_FULL_BOOT=1` additionally waits for the virtio-mmio probe
//! messages (for hosts whose KVM boots Linux quickly).

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn kernel() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("RQEMU_GUEST_KERNEL") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest/vmlinux");
    p.exists().then_some(p)
}

#[test]
fn stock_kernel_sees_memory_acpi_cpus_and_ioapic() {
    let Some(kernel) = kernel() else {
        panic!(
            "no guest kernel: set RQEMU_GUEST_KERNEL or build target/guest/vmlinux with \
             scripts/guest-assets.sh"
        );
    };
    if !support::kvm_or_skip("stock_kernel_sees_memory_acpi_cpus_and_ioapic") {
        return;
    }
    let full = std::env::var("RQEMU_LINUX_FULL_BOOT").as_deref() == Ok("1");
    if !full {
        eprintln!(
            "*** Linux boot test: early boot only (KVM-PVM cannot boot Linux in useful time); \
             set RQEMU_LINUX_FULL_BOOT=1 on a fast KVM host ***"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rqemu-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--accel", "kvm", "--memory", "512M", "--cpus", "2"])
        .args(["--cmdline", "console=ttyS0 earlyprintk=ttyS0"])
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut wanted = vec![
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "Hypervisor detected: KVM",
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 9 global_irq 9 high level)",
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
    ];
    if full {
        wanted.push("virtio-mmio");
        wanted.push("ttyS0 at I/O 0x3f8");
    }
    let limit = Duration::from_secs(if full { 600 } else { 180 });
    let start = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if wanted.iter().all(|w| text.contains(w)) {
            break text;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("VMM exited early ({st}); console:\n{text}");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let missing: Vec<_> = wanted.iter().filter(|w| !text.contains(*w)).collect();
            panic!("after {limit:?} the kernel log lacks {missing:?}; console:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("Linux version"), "{text}");
}
