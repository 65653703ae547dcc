//! End-to-end: the reference guest (Debian cloud kernel bzImage + busybox initramfs, built by
//! `scripts/guest-assets.sh` into `$RQEMU_GUEST_DIR`, default `target/guest/`) boots on the
//! software CPU (`rqemu-vmm --accel tcg`) to its init, which powers off through ACPI S5 (exit
//! status 0).
//!
//! Prints (does not assert) the wall time to the init marker and to power-off, and the same
//! for `qemu-system-x86_64 -accel tcg -M microvm` when QEMU is installed, with the ratio.
//! Other tests give the guest devices served by the daemons (vhost-user `rqemu-blk` and
//! `rqemu-fs`; `rqemu-serial` and `rqemu-rtc` over the forwarding protocol): the guest script
//! (`rqemu.run=<base64>`) uses them, and the host checks what the guest did.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rqemu_e2e::blk::{BlkBackend, BlkOptions};
use rqemu_e2e::daemon::DEFAULT_START_TIMEOUT;
use rqemu_e2e::fs::{spawn_rqemu_fs, FsDaemonOptions};
use rqemu_e2e::paths::{host_tool, project_binary};
use rqemu_e2e::qemu::{firmware, host_tsc_khz, INIT_GREETING};
use rqemu_e2e::vmm::{timed_run, TimedRun, BASE_CMDLINE};
use rqemu_e2e::{Daemon, GuestAssets, RqemuVm};

/// QEMU boots in seconds; a run that takes longer is reported, not waited for.
const QEMU_TIMEOUT: Duration = Duration::from_secs(120);
const EXIT_MARKER: &str = "RQEMU-EXIT=0";

fn assets() -> GuestAssets {
    GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"))
}

/// The same guest under QEMU's TCG, for the time comparison (`None`, said loudly, when QEMU
/// or its qboot firmware is not installed).
fn qemu_boot(assets: &GuestAssets) -> Option<TimedRun> {
    let (qemu, bios) = match (host_tool("qemu-system-x86_64"), firmware()) {
        (Ok(q), Ok(b)) => (q, b),
        (q, b) => {
            eprintln!("*** QEMU comparison not run: {q:?} / {b:?} ***");
            return None;
        }
    };
    let khz = host_tsc_khz().unwrap_or(1_000_000);
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-M", "microvm,acpi=on", "-m", "512M"])
        .arg("-bios")
        .arg(bios)
        .arg("-kernel")
        .arg(&assets.vmlinuz)
        .arg("-initrd")
        .arg(&assets.initramfs)
        .arg("-append")
        .arg(format!("{BASE_CMDLINE} tsc_early_khz={khz}"))
        .args([
            "-nographic",
            "-nodefaults",
            "-no-reboot",
            "-serial",
            "stdio",
        ]);
    Some(timed_run(cmd, QEMU_TIMEOUT).unwrap_or_else(|e| panic!("{e}")))
}

fn fmt_time(t: Option<Duration>) -> String {
    t.map_or_else(|| "never".into(), |t| format!("{:.2} s", t.as_secs_f64()))
}

#[test]
fn tcg_boots_reference_linux_to_init_and_powers_off() {
    let assets = assets();
    let r = RqemuVm::new(&assets)
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    let report = r.transcript();
    assert!(r.console.contains(INIT_GREETING), "{report}");
    assert!(r.console.contains(EXIT_MARKER), "{report}");
    assert_eq!(r.code(), Some(0), "{report}");
    eprintln!(
        "\n=== rqemu TCG: init marker after {}, power-off after {:.2} s ===",
        fmt_time(r.init_reached),
        r.elapsed.as_secs_f64()
    );
    if let Some(q) = qemu_boot(&assets) {
        eprintln!(
            "=== QEMU TCG (microvm): init marker after {}, exit {:?} after {:.2} s ===",
            fmt_time(q.init_reached),
            q.code(),
            q.elapsed.as_secs_f64()
        );
        if let (Some(a), Some(b)) = (r.init_reached, q.init_reached) {
            eprintln!(
                "=== ratio rqemu/QEMU: to init {:.1}x, to power-off {:.1}x ===",
                a.as_secs_f64() / b.as_secs_f64(),
                r.elapsed.as_secs_f64() / q.elapsed.as_secs_f64()
            );
        }
    }
}

/// What the guest's init printed: the lines from the init marker on, without kernel log
/// lines (timestamps differ between runs).
fn init_output(console: &str) -> Vec<String> {
    console
        .lines()
        .skip_while(|l| !l.contains(INIT_GREETING))
        .filter(|l| !l.trim_start().starts_with('['))
        .map(|l| l.trim_end().to_string())
        .collect()
}

/// The JIT (`--tcg-mode jit`, every block translated after 2 runs) and the interpreter
/// (`--tcg-mode interp`) boot the reference guest to the same init output, including a
/// small compute workload of real programs (shell arithmetic, sort, md5sum, awk).
#[test]
fn tcg_jit_and_interpreter_boot_to_the_same_init_output() {
    let assets = assets();
    let script = "i=0; s=0; while [ $i -lt 4000 ]; do s=$(( (s * 31 + i * i) % 1000003 )); \
                  i=$((i + 1)); done; echo sum=$s; seq 1 3000 | sort -r | md5sum; \
                  seq 1 2000 | awk '{ t += $1 * $1 % 97 } END { print \"awk\", t }'";
    let mut outputs = Vec::new();
    for (mode, extra) in [
        ("jit", &["--tcg-jit-threshold", "2"][..]),
        ("interp", &[][..]),
    ] {
        let mut vm = RqemuVm::new(&assets)
            .run_cmdline(script)
            .vmm_arg("--tcg-mode")
            .vmm_arg(mode);
        for a in extra {
            vm = vm.vmm_arg(a);
        }
        let r = vm.run().unwrap_or_else(|e| panic!("{e}"));
        let report = r.transcript();
        assert!(r.console.contains(INIT_GREETING), "{mode}: {report}");
        assert!(r.console.contains(EXIT_MARKER), "{mode}: {report}");
        assert_eq!(r.code(), Some(0), "{mode}: {report}");
        let out = init_output(&r.console);
        assert!(
            out.iter().any(|l| l.starts_with("sum=")) && out.iter().any(|l| l.starts_with("awk ")),
            "{mode}: the workload did not print: {out:?}"
        );
        eprintln!(
            "=== {mode}: power-off after {:.2} s; init output {out:?}",
            r.elapsed.as_secs_f64()
        );
        outputs.push(out);
    }
    assert_eq!(
        outputs[0], outputs[1],
        "jit and interpreter init outputs differ"
    );
}

/// Boots the reference guest under `rqemu-vmm --accel tcg` with `device_sockets` and
/// `script` as its test command; stops `daemons` once the VM is done.
fn boot_with_devices(
    assets: &GuestAssets,
    device_sockets: &[&str],
    script: &str,
    daemons: Vec<Daemon>,
) -> TimedRun {
    let mut vm = RqemuVm::new(assets).run_cmdline(script);
    for s in device_sockets {
        vm = vm.device_socket(s);
    }
    let r = vm.run().unwrap_or_else(|e| panic!("{e}"));
    drop(daemons);
    r
}

#[test]
fn tcg_linux_reads_and_writes_an_rqemu_blk_disk() {
    const HOST: &[u8] = b"HOST-PATTERN-7f3a";
    const GUEST: &str = "TCG-GUEST-WROTE-THIS";
    let assets = assets();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let mut disk = vec![0u8; 8 << 20];
    disk[..HOST.len()].copy_from_slice(HOST);
    std::fs::write(&image, &disk).unwrap();
    let daemon = BlkBackend::Rqemu
        .spawn(dir.path(), "blk", &image, &BlkOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let socket = format!("blk:{}", daemon.socket().display());
    let script = format!(
        "set -e\n\
         test -b /dev/vda\n\
         echo \"blk read: $(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c {})\"\n\
         printf {GUEST} | dd of=/dev/vda bs=512 seek=8 conv=notrunc 2>/dev/null\n\
         sync\n\
         echo 3 > /proc/sys/vm/drop_caches\n\
         echo \"blk reread: $(dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c {})\"\n",
        HOST.len(),
        GUEST.len()
    );
    let r = boot_with_devices(&assets, &[&socket], &script, vec![daemon]);
    let report = r.transcript();
    let host = String::from_utf8_lossy(HOST);
    assert!(r.console.contains(&format!("blk read: {host}")), "{report}");
    assert!(
        r.console.contains(&format!("blk reread: {GUEST}")),
        "{report}"
    );
    assert!(r.console.contains(EXIT_MARKER), "{report}");
    assert_eq!(r.code(), Some(0), "{report}");
    let after = std::fs::read(&image).unwrap();
    assert_eq!(&after[4096..4096 + GUEST.len()], GUEST.as_bytes());
    eprintln!(
        "\n=== rqemu TCG + rqemu-blk: init marker after {}, power-off after {:.2} s ===",
        fmt_time(r.init_reached),
        r.elapsed.as_secs_f64()
    );
}

#[test]
fn tcg_linux_mounts_an_rqemu_fs_share_found_by_discovery() {
    const HOST: &str = "written-by-the-host";
    const GUEST: &str = "written-by-the-guest";
    let assets = assets();
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("host.txt"), HOST).unwrap();
    let opts = FsDaemonOptions {
        tag: "share0".into(),
        ..FsDaemonOptions::default()
    };
    let (daemon, _) = spawn_rqemu_fs(dir.path(), &share, &opts).unwrap_or_else(|e| panic!("{e}"));
    // No `fs:` prefix: the VMM discovers the device type from the daemon's identity.
    let socket = daemon.socket().display().to_string();
    let script = format!(
        "set -e\n\
         mount -t virtiofs share0 /mnt\n\
         echo \"fs read: $(cat /mnt/host.txt)\"\n\
         echo -n {GUEST} > /mnt/guest.txt\n\
         sync\n\
         umount /mnt\n"
    );
    let r = boot_with_devices(&assets, &[&socket], &script, vec![daemon]);
    let report = r.transcript();
    assert!(r.console.contains(&format!("fs read: {HOST}")), "{report}");
    assert!(r.console.contains(EXIT_MARKER), "{report}");
    assert_eq!(r.code(), Some(0), "{report}");
    assert_eq!(
        std::fs::read_to_string(share.join("guest.txt")).unwrap(),
        GUEST
    );
}

/// Spawns the emulated-device daemon `bin` on `sock` (log beside it), with `extra` arguments.
fn spawn_emulated(bin: &str, sock: &Path, extra: &[String]) -> Daemon {
    let mut cmd = Command::new(project_binary(bin).unwrap_or_else(|e| panic!("{e}")));
    cmd.arg("--socket").arg(sock).args(extra);
    Daemon::spawn(
        bin,
        cmd,
        sock,
        &sock.with_extension("log"),
        DEFAULT_START_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The current civil year (proleptic Gregorian from days since 1970; good for this century).
fn this_year() -> u64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut d = secs / 86400;
    let mut y = 1970;
    loop {
        let len = if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 {
            366
        } else {
            365
        };
        if d < len {
            return y;
        }
        d -= len;
        y += 1;
    }
}

/// COM1 and the RTC out of process under a real kernel: the console (kernel messages and the
/// init's tty output, which the 8250 driver sends on THR-empty interrupts) arrives through
/// `rqemu-serial`, and the kernel reads the wall clock from `rqemu-rtc`.
#[test]
fn tcg_linux_console_on_rqemu_serial_and_clock_from_rqemu_rtc() {
    let assets = assets();
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.txt");
    let serial_sock = dir.path().join("serial.sock");
    let rtc_sock = dir.path().join("rtc.sock");
    let serial = spawn_emulated(
        "rqemu-serial",
        &serial_sock,
        &["--console".into(), format!("file:{}", console.display())],
    );
    let rtc = spawn_emulated("rqemu-rtc", &rtc_sock, &[]);
    let year = this_year();
    let script = "echo \"guest year: $(date +%Y)\"\n";
    let r = boot_with_devices(
        &assets,
        &[serial_sock.to_str().unwrap(), rtc_sock.to_str().unwrap()],
        script,
        vec![serial, rtc],
    );
    let text = String::from_utf8_lossy(&std::fs::read(&console).unwrap()).into_owned();
    let report = format!("{}\n--- rqemu-serial console ---\n{text}", r.transcript());
    assert_eq!(r.code(), Some(0), "{report}");
    assert!(
        !r.console.contains(INIT_GREETING),
        "the in-VMM COM1 must not exist: {report}"
    );
    assert!(text.contains("Linux version"), "{report}");
    assert!(text.contains(INIT_GREETING), "{report}");
    assert!(text.contains(&format!("guest year: {year}")), "{report}");
    assert!(text.contains(EXIT_MARKER), "{report}");
}
