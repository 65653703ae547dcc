//! SMP on the software CPU: `rqemu-vmm --accel tcg --cpus 2` boots the reference guest and
//! the kernel brings both CPUs online (INIT/SIPI through the userspace LAPICs, the AP running
//! Linux's real-mode trampoline); CPU 1 is unplugged and plugged back (INIT/SIPI to a CPU
//! that ran); work pinned
//! to each CPU with busybox `taskset` finishes; a C program (`tcg_smp_counter.c`, compiled
//! here with the host's gcc, dynamically linked, its libraries copied in) runs two threads
//! pinned one per CPU, each adding 1 to a shared counter N times with `lock add`
//! (`__atomic_fetch_add`) and to a second counter with a plain load + store. The atomic
//! counter must end exactly 2N; the plain one is printed (it normally loses updates, which
//! shows the two CPUs really ran at the same time).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rqemu_e2e::cpio::{append_initramfs, CpioArchive};
use rqemu_e2e::paths::host_program_files;
use rqemu_e2e::vmm::RqemuVm;
use rqemu_e2e::GuestAssets;

const TIMEOUT: Duration = Duration::from_secs(1200);
const N: u64 = 300_000;

const SCRIPT: &str = r#"#!/bin/sh
echo "SMP online=$(cat /sys/devices/system/cpu/online) nproc=$(nproc)"
for c in 0 1; do
  taskset -c $c sh -c "i=0; while [ \$i -lt 3000 ]; do i=\$((i+1)); done; echo SMP pinned cpu=$c done" &
done
wait
/smp_counter N_ITERS
echo 0 > /sys/devices/system/cpu/cpu1/online
echo "SMP unplugged online=$(cat /sys/devices/system/cpu/online)"
echo 1 > /sys/devices/system/cpu/cpu1/online
echo "SMP replugged online=$(cat /sys/devices/system/cpu/online)"
taskset -c 1 sh -c 'echo "SMP after replug cpu=1 ran"'
echo "SMP done"
"#;

#[test]
fn two_tcg_cpus_come_online_and_lock_add_is_exact() {
    let assets = GuestAssets::locate().expect("guest assets (run scripts/guest-assets.sh)");
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tcg_smp_counter.c");
    let bin = dir.path().join("smp_counter");
    let cc = Command::new("gcc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("gcc is needed to build the guest's counter program (scripts/install-deps.sh)");
    assert!(cc.success(), "gcc failed on {}", src.display());

    let mut extra = CpioArchive::new();
    let script = SCRIPT.replace("N_ITERS", &N.to_string());
    extra.add_file("test.sh", 0o755, script.as_bytes()).unwrap();
    for (path, data) in host_program_files(&bin, "/", "gcc") {
        extra.add_file(&path, 0o755, &data).unwrap();
    }
    let initrd = dir.path().join("initrd.img");
    append_initramfs(&assets.initramfs, &extra.finish(), &initrd).expect("initramfs");
    let run = RqemuVm::new(&assets)
        .cpus(2)
        .initrd(&initrd)
        .timeout(TIMEOUT)
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    let status = run.finished();
    let text = &run.console;
    let report = run.transcript();
    let has = |s: &str| text.lines().any(|l| l.trim_end_matches('\r') == s);
    assert!(has("SMP online=0-1 nproc=2"), "two CPUs online\n{report}");
    // CPUID describes one package: the AP takes the BSP's delay-loop calibration instead of
    // calibrating against the timer (which failed and cost a quarter second).
    assert!(
        text.contains("smpboot: Max logical packages: 1")
            && !text.contains("calibrate_delay_direct() failed"),
        "one package, no AP calibration\n{report}"
    );
    for c in 0..2 {
        assert!(
            has(&format!("SMP pinned cpu={c} done")),
            "work pinned to CPU {c}\n{report}"
        );
        assert!(
            has(&format!("SMP thread cpu={c} ran_on={c}")),
            "counter thread on CPU {c}\n{report}"
        );
    }
    let counters = text
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("SMP counters "))
        .unwrap_or_else(|| panic!("no counters line\n{report}"));
    let field = |k: &str| -> u64 {
        counters
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {counters:?}"))
    };
    let (n, atomic, plain) = (field("n="), field("atomic="), field("plain="));
    eprintln!(
        "tcg_smp: n={n} per thread: lock add counter {atomic}, plain counter {plain} \
         (lost {}), guest run {:.1} s",
        2 * n - plain.min(2 * n),
        run.elapsed.as_secs_f64()
    );
    // CPU 1 offline, then online again: a second INIT and STARTUP to a CPU that ran,
    // through the real-mode trampoline again.
    assert!(has("SMP unplugged online=0"), "CPU 1 unplugged\n{report}");
    assert!(
        has("SMP replugged online=0-1"),
        "CPU 1 plugged back\n{report}"
    );
    assert!(
        has("SMP after replug cpu=1 ran"),
        "work on CPU 1 again\n{report}"
    );
    assert_eq!(n, N);
    assert_eq!(atomic, 2 * N, "lock add from both CPUs\n{report}");
    assert!(has("SMP done") && text.contains("RQEMU-EXIT=0"), "{report}");
    assert!(status.success(), "{report}");
}
