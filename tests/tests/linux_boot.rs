//! A stock Debian kernel (the reference guest's `vmlinux`, PVH entry) on `rqemu-vmm --accel kvm`.
//!
//! On this machine's KVM-PVM a full Linux boot does not finish in useful time, so the test
//! checks the early boot log only: the kernel must see our e820 map, every ACPI table, both
//! CPUs (MADT), the IOAPIC and its overrides. The kernel is `vmlinux` from the guest assets
//! (`$RQEMU_GUEST_DIR`, default `target/guest/`, built by `scripts/guest-assets.sh`); without
//! it the test fails, saying what to run. Without `/dev/kvm` it fails too, unless
//! `RQEMU_ALLOW_NO_KVM=1` (then it says loudly that it did not run).
//! `RQEMU_LINUX_FULL_BOOT=1` additionally waits for the virtio-mmio probe messages (for hosts
//! whose KVM boots Linux quickly).

use std::time::{Duration, Instant};

use rqemu_e2e::vmm::kvm_or_skip;
use rqemu_e2e::{GuestAssets, RqemuVm};

#[test]
fn stock_kernel_sees_memory_acpi_cpus_and_ioapic() {
    let assets = GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"));
    if !kvm_or_skip("stock_kernel_sees_memory_acpi_cpus_and_ioapic") {
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
    let mut child = RqemuVm::new(&assets)
        .kernel(&assets.vmlinux)
        .no_initrd()
        .accel("kvm")
        .memory("512M")
        .cpus(2)
        .replace_cmdline("console=ttyS0 earlyprintk=ttyS0")
        .serial(&format!("file:{}", log.display()))
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
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
