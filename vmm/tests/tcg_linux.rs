//! End-to-end: the reference guest (Debian cloud kernel bzImage + busybox initramfs, built by
//! `scripts/guest-assets.sh` into `target/guest/`) boots on the software CPU
//! (`rqemu-vmm --accel tcg`) to its init, which powers off through ACPI S5 (exit status 0).
//!
//! Prints (does not assert) the wall time to the init marker and to power-off, and the same
//! for `qemu-system-x86_64 -accel tcg -M microvm` when QEMU is installed, with the ratio.
//! A second test gives the guest a virtio-blk disk served by `rqemu-blk` (vhost-user): the
//! guest script (`rqemu.run=<base64>`) reads the host's pattern and writes its own, checked
//! in the image afterwards.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Generous: a debug-build VMM around the (always optimised) CPU takes tens of seconds.
const TIMEOUT: Duration = Duration::from_secs(600);
/// QEMU boots in seconds; a run that takes longer is reported, not waited for.
const QEMU_TIMEOUT: Duration = Duration::from_secs(120);
const INIT_MARKER: &str = "rqemu guest: init reached";
const EXIT_MARKER: &str = "RQEMU-EXIT=0";
/// The kernel parameters the guest needs on our machine model. `tsc_early_khz` gives the
/// TCG CPU's virtual TSC rate (1 GHz): the kernel's PIT calibration of the TSC measures
/// host preemption when the host is loaded (2 cores shared with builds), fails, and the
/// boot then stalls without a clocksource. On an idle host it is not needed.
const CMDLINE: &str = "console=ttyS0 panic=-1";
const TCG_EXTRA: &str = "tsc_early_khz=1000000";

fn guest_assets() -> (PathBuf, PathBuf) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest");
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.cpio.gz");
    for p in [&kernel, &initrd] {
        assert!(
            p.exists(),
            "guest asset {} is missing: run scripts/guest-assets.sh first",
            p.display()
        );
    }
    (kernel, initrd)
}

/// Outcome of one boot: exit status, console text, seconds to the init marker and to exit.
struct Boot {
    code: Option<i32>,
    console: String,
    stderr: String,
    to_init: Option<f64>,
    total: f64,
}

/// Runs `cmd` (stdout = guest console), timing the init marker; kills it after `TIMEOUT`.
fn timed_boot(mut cmd: Command, timeout: Duration) -> Boot {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the VMM");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        let mut seen = false;
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
            if !seen && String::from_utf8_lossy(&text).contains(INIT_MARKER) {
                seen = true;
                let _ = tx.send(Instant::now());
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let total = start.elapsed().as_secs_f64();
    let console = reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    let to_init = rx
        .try_recv()
        .ok()
        .map(|t| t.duration_since(start).as_secs_f64());
    Boot {
        code: status.and_then(|s| s.code()),
        console,
        stderr,
        to_init,
        total,
    }
}

fn qemu_boot(kernel: &Path, initrd: &Path) -> Option<Boot> {
    let qemu = "qemu-system-x86_64";
    let bios = Path::new("/usr/share/qemu/qboot.rom");
    let found = Command::new(qemu)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found || !bios.exists() {
        eprintln!(
            "*** QEMU comparison not run: {qemu} or {} missing ***",
            bios.display()
        );
        return None;
    }
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-M", "microvm,acpi=on", "-m", "512M"])
        .arg("-bios")
        .arg(bios)
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("{CMDLINE} tsc_early_khz={}", host_khz()))
        .args([
            "-nographic",
            "-nodefaults",
            "-no-reboot",
            "-serial",
            "stdio",
        ]);
    Some(timed_boot(cmd, QEMU_TIMEOUT))
}

/// Host TSC frequency estimate in kHz (QEMU's TCG TSC runs at the host rate; telling the
/// guest avoids PIT calibration on a loaded host).
fn host_khz() -> u64 {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split(':')
                .nth(1)?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(1_000_000, |mhz| (mhz * 1000.0) as u64)
}

fn fmt_time(t: Option<f64>) -> String {
    t.map_or_else(|| "never".into(), |t| format!("{t:.2} s"))
}

#[test]
fn tcg_boots_reference_linux_to_init_and_powers_off() {
    let (kernel, initrd) = guest_assets();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rqemu-vmm"));
    cmd.args(["--accel", "tcg", "--memory", "512M"])
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--cmdline")
        .arg(format!("{CMDLINE} {TCG_EXTRA}"));
    let r = timed_boot(cmd, TIMEOUT);
    let report = format!(
        "exit={:?}\n--- console ---\n{}\n--- stderr ---\n{}",
        r.code, r.console, r.stderr
    );
    assert!(r.console.contains(INIT_MARKER), "{report}");
    assert!(r.console.contains(EXIT_MARKER), "{report}");
    assert_eq!(r.code, Some(0), "{report}");
    eprintln!(
        "\n=== rqemu TCG: init marker after {}, power-off after {:.2} s ===",
        fmt_time(r.to_init),
        r.total
    );
    if let Some(q) = qemu_boot(&kernel, &initrd) {
        eprintln!(
            "=== QEMU TCG (microvm): init marker after {}, exit {:?} after {:.2} s ===",
            fmt_time(q.to_init),
            q.code,
            q.total
        );
        if let (Some(a), Some(b)) = (r.to_init, q.to_init) {
            eprintln!(
                "=== ratio rqemu/QEMU: to init {:.1}x, to power-off {:.1}x ===",
                a / b,
                r.total / q.total
            );
        }
    }
}

/// Standard base64 (the guest decodes `rqemu.run=` with busybox `base64 -d`).
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tcg_linux_reads_and_writes_an_rqemu_blk_disk() {
    const HOST: &[u8] = b"HOST-PATTERN-7f3a";
    const GUEST: &str = "TCG-GUEST-WROTE-THIS";
    let (kernel, initrd) = guest_assets();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let mut disk = vec![0u8; 8 << 20];
    disk[..HOST.len()].copy_from_slice(HOST);
    std::fs::write(&image, &disk).unwrap();
    let sock = dir.path().join("blk.sock");
    let mut child = Command::new(support::rqemu_blk_binary())
        .arg("--socket")
        .arg(&sock)
        .arg("--image")
        .arg(&image)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning rqemu-blk");
    wait_socket(&sock, &mut child, "rqemu-blk");
    let daemon = Daemon(child);
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
    let (r, report) = boot_with_device(
        &kernel,
        &initrd,
        &format!("blk:{}", sock.display()),
        &script,
        daemon,
    );
    let host = String::from_utf8_lossy(HOST);
    assert!(r.console.contains(&format!("blk read: {host}")), "{report}");
    assert!(
        r.console.contains(&format!("blk reread: {GUEST}")),
        "{report}"
    );
    assert!(r.console.contains(EXIT_MARKER), "{report}");
    assert_eq!(r.code, Some(0), "{report}");
    let after = std::fs::read(&image).unwrap();
    assert_eq!(&after[4096..4096 + GUEST.len()], GUEST.as_bytes());
    eprintln!(
        "\n=== rqemu TCG + rqemu-blk: init marker after {}, power-off after {:.2} s ===",
        fmt_time(r.to_init),
        r.total
    );
}

/// Boots the reference guest under `rqemu-vmm --accel tcg` with one `--device-socket` and
/// `script` as its test command; stops `daemon` once the VM is done. Returns the boot and a
/// report (exit status, console, stderr) for assertion messages.
fn boot_with_device(
    kernel: &Path,
    initrd: &Path,
    device_socket: &str,
    script: &str,
    daemon: Daemon,
) -> (Boot, String) {
    boot_with_devices(kernel, initrd, &[device_socket], script, vec![daemon])
}

/// [`boot_with_device`] with several device sockets and daemons.
fn boot_with_devices(
    kernel: &Path,
    initrd: &Path,
    device_sockets: &[&str],
    script: &str,
    daemons: Vec<Daemon>,
) -> (Boot, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rqemu-vmm"));
    cmd.args(["--accel", "tcg", "--memory", "512M"])
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd);
    for s in device_sockets {
        cmd.args(["--device-socket", s]);
    }
    cmd.arg("--cmdline").arg(format!(
        "{CMDLINE} {TCG_EXTRA} rqemu.run={}",
        base64(script.as_bytes())
    ));
    let r = timed_boot(cmd, TIMEOUT);
    drop(daemons);
    let report = format!(
        "exit={:?}\n--- console ---\n{}\n--- stderr ---\n{}",
        r.code, r.console, r.stderr
    );
    (r, report)
}

/// Waits for a daemon's socket to appear.
fn wait_socket(sock: &Path, child: &mut std::process::Child, name: &str) {
    let start = Instant::now();
    while !sock.exists() {
        assert!(child.try_wait().unwrap().is_none(), "{name} exited");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no {name} socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tcg_linux_mounts_an_rqemu_fs_share_found_by_discovery() {
    const HOST: &str = "written-by-the-host";
    const GUEST: &str = "written-by-the-guest";
    let (kernel, initrd) = guest_assets();
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("host.txt"), HOST).unwrap();
    let sock = dir.path().join("fs.sock");
    let mut child = Command::new(support::project_binary("rqemu-fs"))
        .arg("--socket")
        .arg(&sock)
        .arg("--shared-dir")
        .arg(&share)
        .args(["--tag", "share0"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning rqemu-fs");
    wait_socket(&sock, &mut child, "rqemu-fs");
    let daemon = Daemon(child);
    let script = format!(
        "set -e\n\
         mount -t virtiofs share0 /mnt\n\
         echo \"fs read: $(cat /mnt/host.txt)\"\n\
         echo -n {GUEST} > /mnt/guest.txt\n\
         sync\n\
         umount /mnt\n"
    );
    // No `fs:` prefix: the VMM discovers the device type from the daemon's identity.
    let (r, report) = boot_with_device(
        &kernel,
        &initrd,
        &sock.display().to_string(),
        &script,
        daemon,
    );
    assert!(r.console.contains(&format!("fs read: {HOST}")), "{report}");
    assert!(r.console.contains(EXIT_MARKER), "{report}");
    assert_eq!(r.code, Some(0), "{report}");
    assert_eq!(
        std::fs::read_to_string(share.join("guest.txt")).unwrap(),
        GUEST
    );
}

/// COM1 and the RTC out of process under a real kernel: the console (kernel messages and the
/// init's tty output, which the 8250 driver sends on THR-empty interrupts) arrives through
/// `rqemu-serial`, and the kernel reads the wall clock from `rqemu-rtc`.
#[test]
fn tcg_linux_console_on_rqemu_serial_and_clock_from_rqemu_rtc() {
    let (kernel, initrd) = guest_assets();
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.txt");
    let spawn = |bin: &str, sock: &Path, extra: &[String]| {
        let mut child = Command::new(support::project_binary(bin))
            .arg("--socket")
            .arg(sock)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {bin}: {e}"));
        wait_socket(sock, &mut child, bin);
        Daemon(child)
    };
    let serial_sock = dir.path().join("serial.sock");
    let rtc_sock = dir.path().join("rtc.sock");
    let serial = spawn(
        "rqemu-serial",
        &serial_sock,
        &["--console".into(), format!("file:{}", console.display())],
    );
    let rtc = spawn("rqemu-rtc", &rtc_sock, &[]);
    let year = {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        // Civil year from days since 1970 (proleptic Gregorian), good for this century.
        let days = secs / 86400;
        let mut y = 1970;
        let mut d = days;
        loop {
            let len = if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 {
                366
            } else {
                365
            };
            if d < len {
                break y;
            }
            d -= len;
            y += 1;
        }
    };
    let script = "echo \"guest year: $(date +%Y)\"\n";
    let (r, report) = boot_with_devices(
        &kernel,
        &initrd,
        &[serial_sock.to_str().unwrap(), rtc_sock.to_str().unwrap()],
        script,
        vec![serial, rtc],
    );
    let text = String::from_utf8_lossy(&std::fs::read(&console).unwrap()).into_owned();
    let report = format!("{report}\n--- rqemu-serial console ---\n{text}");
    assert_eq!(r.code, Some(0), "{report}");
    assert!(
        !r.console.contains(INIT_MARKER),
        "the in-VMM COM1 must not exist: {report}"
    );
    assert!(text.contains("Linux version"), "{report}");
    assert!(text.contains(INIT_MARKER), "{report}");
    assert!(text.contains(&format!("guest year: {year}")), "{report}");
    assert!(text.contains(EXIT_MARKER), "{report}");
}

#[test]
fn base64_matches_the_standard_alphabet() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}
