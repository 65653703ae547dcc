//! rqemu-blk SIGKILLed under a running Linux guest (`rqemu-vmm --accel tcg`): the VMM
//! reconnects each daemon the test starts again on the same socket path, and the guest's
//! O_DIRECT write+verify loop on `/dev/vda` finishes without an I/O error; the data is
//! checked on the host. A daemon restarted `--readonly` (no BLK_DISCARD, which the guest
//! negotiated) is refused with a log line naming the missing feature, and the proper daemon
//! started after it is accepted.
//!
//! The same runs on a qcow2 image (clusters allocated while the daemon is killed), which
//! `qemu-img check` must then find free of corruption: a SIGKILLed rqemu-blk may leak the
//! unused part of its pre-counted allocation reserve (refcount 1, no reference; by design, as
//! a crashed QEMU may), which `qemu-img check -r leaks` repairs to a clean image.
//!
//! Each 64 KiB write is one request and the guest waits for it before the next one, so at
//! most one request is in flight when the daemon dies: the used index the VMM resumes the
//! ring at is exact (see `vmm/src/virtio/vhost_user/control.rs`).

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use rqemu_e2e::blk::reconnect::{last_iter, read, script, Blk, BLOCKS};
use rqemu_e2e::qemu_img::{self, Format};
use rqemu_e2e::{GuestAssets, RqemuVm};

const TIMEOUT: Duration = Duration::from_secs(900);
/// The daemon is killed once the guest reports these iterations done.
const KILL_AFTER: [u32; 4] = [3, 11, 19, 27];

struct Run {
    dir: tempfile::TempDir,
    console: std::path::PathBuf,
    vmm_log: std::path::PathBuf,
    vmm: Child,
    start: Instant,
}

impl Run {
    fn report(&self) -> String {
        format!(
            "--- console ---\n{}\n--- rqemu-vmm ---\n{}\n--- rqemu-blk ---\n{}",
            read(&self.console),
            read(&self.vmm_log),
            read(&self.dir.path().join("blk.log"))
        )
    }

    /// Waits until `cond(console, vmm log)`, keeping `blk` up; panics if the VMM exits first.
    fn wait(&mut self, what: &str, blk: &mut Blk, cond: impl Fn(&str, &str) -> bool) {
        loop {
            if cond(&read(&self.console), &read(&self.vmm_log)) {
                return;
            }
            blk.keep_up();
            if let Some(st) = self.vmm.try_wait().unwrap() {
                panic!("rqemu-vmm exited ({st}) before {what}\n{}", self.report());
            }
            if self.start.elapsed() > TIMEOUT {
                let _ = self.vmm.kill();
                let _ = self.vmm.wait();
                panic!("no {what} within {TIMEOUT:?}\n{}", self.report());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn tcg_linux_io_survives_rqemu_blk_sigkills() {
    survives_sigkills(Format::Raw);
}

#[test]
fn tcg_linux_io_on_qcow2_survives_rqemu_blk_sigkills() {
    survives_sigkills(Format::Qcow2);
}

fn survives_sigkills(format: Format) {
    let assets = GuestAssets::locate().expect("guest assets (run scripts/guest-assets.sh)");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(format!("disk.{}", format.name()));
    qemu_img::create(&image, format, 64 << 20, None).unwrap_or_else(|e| panic!("{e}"));
    let mut blk = Blk::start(dir.path(), &image, format, false);
    let console = dir.path().join("console.log");
    let vmm_log = dir.path().join("vmm.log");
    let start = Instant::now();
    let vmm = RqemuVm::new(&assets)
        .device_socket(&format!("blk:{}", dir.path().join("blk0.sock").display()))
        .serial(&format!("file:{}", console.display()))
        .run_cmdline(&script())
        .command()
        .unwrap_or_else(|e| panic!("{e}"))
        .stdin(Stdio::null())
        .env("RQEMU_LOG", "info")
        .stderr(std::fs::File::create(&vmm_log).expect("creating the VMM log"))
        .spawn()
        .expect("spawning rqemu-vmm");
    let mut run = Run {
        dir,
        console,
        vmm_log,
        vmm,
        start,
    };
    let dir = run.dir.path().to_path_buf();

    // SIGKILL under the guest's loop, each time started again on the same path.
    for (n, after) in KILL_AFTER.into_iter().enumerate() {
        run.wait(&format!("iteration {after}"), &mut blk, |c, _| {
            last_iter(c).is_some_and(|i| i >= after)
        });
        blk.restart(false);
        run.wait("the reconnection", &mut blk, |_, l| {
            l.matches("blk0.sock reconnected").count() > n
        });
    }
    run.wait("the end of the write loop", &mut blk, |c, _| {
        c.contains("BLK-DONE")
    });

    // A read-only daemon lacks BLK_DISCARD, which the guest acked: refused, then a proper one.
    blk.restart(true);
    run.wait("the read-only daemon refused", &mut blk, |_, l| {
        l.contains("refusing the vhost-user daemon")
    });
    blk.restart(false);
    run.wait("the guest's power-off", &mut blk, |c, _| {
        c.contains("RQEMU-EXIT=")
    });
    let status = run.vmm.wait().unwrap();
    let report = run.report();
    drop(blk);

    let text = read(&run.console);
    assert!(!text.contains("BLK-FAIL"), "{report}");
    assert!(text.contains("BLK-END"), "{report}");
    assert!(
        text.contains("BLK-IOERR 0"),
        "the guest logged I/O errors\n{report}"
    );
    assert!(text.contains("RQEMU-EXIT=0"), "{report}");
    assert!(status.success(), "{status}\n{report}");
    let vlog = read(&run.vmm_log);
    let refusal = vlog
        .lines()
        .find(|l| l.contains("refusing the vhost-user daemon"))
        .unwrap_or_default();
    assert!(
        refusal.contains("BLK_DISCARD (bit 13)"),
        "the refusal names the missing feature: {refusal}"
    );
    assert_eq!(
        vlog.matches("blk0.sock reconnected").count(),
        KILL_AFTER.len() + 1,
        "{report}"
    );

    // The host sees exactly the guest's bytes.
    let want = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("BLK-SHA "))
        .unwrap_or_else(|| panic!("no BLK-SHA\n{report}"))
        .trim()
        .to_string();
    if format == Format::Qcow2 {
        check_after_kills(&image);
    }
    let bytes = qemu_img::read_image(&image, format).unwrap_or_else(|e| panic!("{e}"));
    let part = dir.join("written.bin");
    std::fs::write(&part, &bytes[..(BLOCKS as usize) << 16]).unwrap();
    let out = std::process::Command::new("sha256sum")
        .arg(&part)
        .output()
        .expect("sha256sum");
    let host = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        host.split_whitespace().next().unwrap_or_default(),
        want,
        "host image digest"
    );
    for l in vlog.lines().filter(|l| l.contains("reconnected after")) {
        eprintln!("{}", l.split("WARN").last().unwrap_or(l).trim());
    }
    eprintln!(
        "rqemu-vmm TCG, {}: {} rqemu-blk SIGKILLs + a refused read-only daemon, {BLOCKS} x 64 \
         KiB written and verified, power-off after {:.1} s",
        format.name(),
        KILL_AFTER.len(),
        run.start.elapsed().as_secs_f64()
    );
}

/// `qemu-img check` of a qcow2 image written across SIGKILLs: no corruption (exit 2) or other
/// failure; leaks (exit 3) are counted, repaired with `-r leaks`, and the image is then clean.
fn check_after_kills(image: &Path) {
    match qemu_img::check(image) {
        Ok(report) => eprintln!("qemu-img check: clean: {}", report.trim()),
        Err(qemu_img::ImageError::Failed { status, output, .. }) if status.code() == Some(3) => {
            let summary = output
                .lines()
                .filter(|l| !l.starts_with("Leaked cluster"))
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("qemu-img check: leaks only (exit 3): {}", summary.trim());
            let p = image.to_string_lossy();
            qemu_img::qemu_img(&["check", "-q", "-r", "leaks", "-f", "qcow2", &p])
                .unwrap_or_else(|e| panic!("{e}"));
            let report = qemu_img::check(image).unwrap_or_else(|e| panic!("after -r leaks: {e}"));
            eprintln!("qemu-img check after -r leaks: {}", report.trim());
        }
        Err(e) => panic!("the qcow2 image is damaged: {e}"),
    }
}
