//! Complete block-device scenarios shared by the e2e tests of every backend: prepare images,
//! start the backend, boot QEMU with the guest workload, stop the backend, check the image.

use std::fmt::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use super::{BlkBackend, BlkError, BlkOptions, STOP_TIMEOUT};
use crate::daemon::{Daemon, DaemonError};
use crate::disk::{
    pattern, sha256_script, DiskModel, DiskOp, Workload, GUEST_HELPERS, UL_BLKDISCARD,
};
use crate::paths::{GuestAssets, PathError};
use crate::qemu::{GuestRun, QemuError, QemuVm, VhostUserDevice};
use crate::qemu_img::{self, Format, ImageError};

const MIB: u64 = 1 << 20;

/// Errors of a scenario (each carries enough context to diagnose from the test output).
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Assets or binaries missing.
    #[error(transparent)]
    Path(#[from] PathError),
    /// Backend failed to start.
    #[error(transparent)]
    Blk(#[from] BlkError),
    /// Backend misbehaved while stopping.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The guest run failed.
    #[error(transparent)]
    Qemu(#[from] QemuError),
    /// Image handling failed (including `qemu-img check`).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Temp dir creation failed.
    #[error("temp dir: {0}")]
    TempDir(#[source] std::io::Error),
    /// A check failed.
    #[error("{what}\n--- guest console ---\n{console}\n--- daemon log ---\n{log}")]
    Check {
        /// What was wrong.
        what: String,
        /// Guest console (may be empty).
        console: String,
        /// Daemon log (may be empty).
        log: String,
    },
}

fn check_err(what: impl Into<String>, run: Option<&GuestRun>, log: &str) -> ScenarioError {
    ScenarioError::Check {
        what: what.into(),
        console: run.map(GuestRun::transcript).unwrap_or_default(),
        log: log.to_string(),
    }
}

/// Writes back the guest page cache and sends a FLUSH (`sync` alone does not flush a raw
/// block device's write cache; `fsync` on the device does).
/// What the guest prints (the string split so that the script itself never matches) once
/// its final fsync returned, in the SIGKILL scenario.
const KILL_POINT: &str = "RQEMU-KILL-POINT";
const KILL_POINT_ECHO: &str = "RQEMU-KILL-\"\"POINT";

const FLUSH_VDA: &str = "sync\nrun flush dd if=/dev/null of=/dev/vda conv=notrunc,fsync\n";

/// Initial contents under the tested image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// A fresh, empty image.
    None,
    /// A qcow2 overlay on a raw backing file holding a pattern.
    Raw,
    /// A qcow2 overlay on a smaller qcow2 backing file with compressed clusters and holes.
    Qcow2Compressed,
}

/// A read/write workload scenario on one disk.
#[derive(Debug, Clone)]
pub struct Workloads {
    /// Backend under test.
    pub backend: BlkBackend,
    /// Image format.
    pub format: Format,
    /// Backing file setup (only with qcow2).
    pub backing: Backing,
    /// virtio queues (`--queues` and `num-queues`); > 1 also boots that many vCPUs and runs a
    /// second workload concurrently, pinned to the other vCPU.
    pub queues: u16,
    /// `--serial`, checked in `/sys/block/vda/serial`.
    pub serial: Option<String>,
    /// Disk size.
    pub disk_size: u64,
    /// Pattern seed.
    pub seed: u64,
    /// SIGKILL the daemon right after the guest's final fsync returned, QEMU still connected
    /// (instead of SIGTERM after the guest powered off): whatever the guest flushed must be in
    /// the image, and a qcow2 clean (no leaks), without a disconnect or a clean exit.
    pub kill: bool,
    /// More `rqemu-blk` arguments ([`BlkOptions::extra`]).
    pub extra: Vec<String>,
}

impl Workloads {
    /// A 32 MiB fresh disk, one queue, no serial.
    pub fn new(backend: BlkBackend, format: Format) -> Self {
        Self {
            backend,
            format,
            backing: Backing::None,
            queues: 1,
            serial: None,
            disk_size: 32 * MIB,
            seed: 1,
            kill: false,
            extra: Vec::new(),
        }
    }

    /// Runs the scenario; every check failure is an error with the console and daemon log.
    pub fn run(&self) -> Result<(), ScenarioError> {
        let assets = GuestAssets::locate()?;
        let dir = tempfile::tempdir().map_err(ScenarioError::TempDir)?;
        let images = Images::prepare(dir.path(), self.format, self.backing, self.disk_size)?;
        let mut model = DiskModel::new(self.disk_size, &images.initial);
        let opts = BlkOptions {
            format: self.format,
            readonly: false,
            queues: self.queues,
            serial: self.serial.clone(),
            extra: self.extra.clone(),
        };
        let daemon = self
            .backend
            .spawn(dir.path(), "blk0", &images.image, &opts)?;

        let cpus = u32::from(self.queues.clamp(1, 2));
        let main = Workload::standard("/dev/vda", "w", self.disk_size, self.seed);
        let mut vm = QemuVm::new(&assets, dir.path())
            .cpus(cpus)
            .device(VhostUserDevice::blk(daemon.socket(), self.queues));
        let mut script = String::from(GUEST_HELPERS);
        script.push_str(&device_info_script("vda"));
        let mut workloads = vec![main];
        if self.queues > 1 {
            workloads.push(Workload::stripes(
                "/dev/vda",
                "q",
                self.disk_size,
                22 * MIB,
                8 * MIB,
                self.seed + 7,
            ));
        }
        for (i, w) in workloads.iter().enumerate() {
            for (path, data) in w.guest_files() {
                vm = vm.file(&path, 0o644, data);
            }
            let body = format!("{GUEST_HELPERS}\n{}", w.guest_script());
            vm = vm.file(&format!("/{}.sh", w.tag), 0o755, body.into_bytes());
            if self.queues > 1 {
                let _ = writeln!(
                    script,
                    "taskset {} sh /{}.sh & pid{i}=$!",
                    1 << (i % 2),
                    w.tag
                );
            } else {
                let _ = writeln!(
                    script,
                    "sh /{}.sh || fail \"workload {} failed\"",
                    w.tag, w.tag
                );
            }
        }
        if self.queues > 1 {
            for (i, w) in workloads.iter().enumerate() {
                let _ = writeln!(script, "wait $pid{i} || fail \"workload {} failed\"", w.tag);
            }
            script.push_str(
                "for h in /sys/kernel/debug/block/vda/hctx*; do \
                 echo \"RQEMU-VAL run-${h##*/}=$(cat $h/run)\"; done\n",
            );
        }
        if self.kill {
            // The digest first (reads only), then the guest's fsync, then the kill point: the
            // daemon is SIGKILLed as soon as the console shows it, with QEMU still connected,
            // so only what the FLUSH itself made durable is in the image.
            script.push_str(&sha256_script("/dev/vda", "disk-sha256"));
            script.push_str(FLUSH_VDA);
            script.push_str(&format!("echo {KILL_POINT_ECHO}\nsleep 1000\n"));
            vm = vm.kill_on_console(KILL_POINT, daemon.pid());
        } else {
            script.push_str(FLUSH_VDA);
            script.push_str(&sha256_script("/dev/vda", "disk-sha256"));
        }
        let run = vm.script(&script).run();
        let log = daemon.log();
        let run = run.map_err(|e| check_err(e.to_string(), None, &log))?;
        if self.kill {
            if !run.killed_at_marker {
                return Err(check_err(
                    format!("the guest never reached the kill point {KILL_POINT:?}"),
                    Some(&run),
                    &log,
                ));
            }
        } else {
            run.expect_success()
                .map_err(|e| check_err(e.to_string(), None, &log))?;
        }
        let fail = |what: String| check_err(what, Some(&run), &log);

        // What the guest saw of the device.
        let val = |k: &str| run.value(k).unwrap_or_default().to_string();
        if val("ro") != "0" {
            return Err(fail(format!("guest sees ro={:?}, expected 0", val("ro"))));
        }
        for k in ["discard_max", "write_zeroes_max"] {
            if val(k).parse::<u64>().unwrap_or(0) == 0 {
                return Err(fail(format!(
                    "guest queue limit {k}={:?}: DISCARD/WRITE_ZEROES not offered",
                    val(k)
                )));
            }
        }
        // rqemu-blk offers FLUSH with a write-back cache, so the guest's fsyncs reach the
        // daemon as FLUSH requests. (QSD's export reports write-through: nothing to flush.)
        if self.backend == BlkBackend::Rqemu && val("write_cache") != "write back" {
            return Err(fail(format!(
                "guest sees write_cache={:?}: FLUSH not offered (expected \"write back\")",
                val("write_cache")
            )));
        }
        if let Some(serial) = &self.serial {
            if &val("serial") != serial {
                return Err(fail(format!(
                    "guest serial {:?}, expected {serial:?}",
                    val("serial")
                )));
            }
        }
        let want_queues = self.queues.min(cpus as u16).to_string();
        if val("hw_queues") != want_queues {
            return Err(fail(format!(
                "guest uses {} hw queues, expected {want_queues}",
                val("hw_queues")
            )));
        }
        if self.queues > 1 {
            for q in 0..self.queues {
                let k = format!("run-hctx{q}");
                if val(&k).parse::<u64>().unwrap_or(0) == 0 {
                    return Err(fail(format!(
                        "no request went through virtqueue {q} ({k}={:?})",
                        val(&k)
                    )));
                }
            }
        }
        for w in &workloads {
            w.apply(&mut model);
        }
        let ops: Vec<DiskOp> = workloads
            .iter()
            .flat_map(|w| w.ops.iter().cloned())
            .collect();
        let stop = if self.kill { Stop::Kill } else { Stop::Term };
        finish(daemon, stop, &run, &images, &model, &ops, "disk-sha256")
    }
}

/// How the daemon is stopped before the image is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM; exit status 0 required.
    Term,
    /// SIGKILL.
    Kill,
}

/// Stops the daemon (SIGTERM must give exit status 0) and checks the image: against the model
/// (`ops` name the culprit of a mismatch), against the guest's whole-disk digest printed as
/// `RQEMU-VAL <digest_key>=`, `qemu-img check`, and the backing file unchanged.
fn finish(
    daemon: Daemon,
    stop: Stop,
    run: &GuestRun,
    images: &Images,
    model: &DiskModel,
    ops: &[DiskOp],
    digest_key: &str,
) -> Result<(), ScenarioError> {
    let name = daemon.name().to_string();
    let log_path = images.dir.join("blk0.log");
    let status = match stop {
        Stop::Term => daemon.terminate(STOP_TIMEOUT)?,
        Stop::Kill => daemon.kill()?,
    };
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    let fail = |what: String| check_err(what, Some(run), &log);
    if stop == Stop::Term && !status.success() {
        return Err(fail(format!(
            "{name} exited with {status} after SIGTERM, expected 0"
        )));
    }
    if stop == Stop::Kill && status.signal() != Some(libc::SIGKILL) {
        return Err(fail(format!(
            "{name} ended with {status} before the SIGKILL"
        )));
    }
    let actual = qemu_img::read_image(&images.image, images.format)?;
    model
        .check(&actual, ops)
        .map_err(|e| fail(format!("image contents: {e}")))?;
    let host = qemu_img::sha256(&actual)?;
    let guest = run.value(digest_key).unwrap_or_default();
    if guest != host {
        return Err(fail(format!(
            "guest digest {digest_key}={guest:?} but the image's is {host}"
        )));
    }
    images.verify_unchanged_backing()?;
    if images.format == Format::Qcow2 {
        qemu_img::check(&images.image)?;
    }
    Ok(())
}

/// A daemon serving two frontends one after another: the second guest sees the first one's
/// data and writes on top (qcow2, fresh image).
pub fn reconnect(backend: BlkBackend) -> Result<(), ScenarioError> {
    let assets = GuestAssets::locate()?;
    let dir = tempfile::tempdir().map_err(ScenarioError::TempDir)?;
    let size = 32 * MIB;
    let images = Images::prepare(dir.path(), Format::Qcow2, Backing::None, size)?;
    let opts = BlkOptions {
        format: Format::Qcow2,
        ..BlkOptions::default()
    };
    let mut daemon = backend.spawn(dir.path(), "blk0", &images.image, &opts)?;
    let mut model = DiskModel::new(size, &images.initial);
    let mut ops = Vec::new();
    let mut first_digest = String::new();
    let mut last_run = None;
    for (phase, tag) in ["a", "b"].into_iter().enumerate() {
        let w = Workload::standard("/dev/vda", tag, size, 100 + phase as u64);
        let mut vm =
            QemuVm::new(&assets, dir.path()).device(VhostUserDevice::blk(daemon.socket(), 1));
        for (path, data) in w.guest_files() {
            vm = vm.file(&path, 0o644, data);
        }
        let script = format!(
            "{GUEST_HELPERS}\n{}{}{}{FLUSH_VDA}{}",
            device_info_script("vda"),
            sha256_script("/dev/vda", "before-sha256"),
            w.guest_script(),
            sha256_script("/dev/vda", "after-sha256"),
        );
        let run = vm.script(&script).run();
        let log = daemon.log();
        let run = run.map_err(|e| check_err(e.to_string(), None, &log))?;
        run.expect_success()
            .map_err(|e| check_err(e.to_string(), None, &log))?;
        let before = run.value("before-sha256").unwrap_or_default().to_string();
        if phase == 1 && before != first_digest {
            return Err(check_err(
                format!("second guest sees disk digest {before}, the first left {first_digest}"),
                Some(&run),
                &log,
            ));
        }
        first_digest = run.value("after-sha256").unwrap_or_default().to_string();
        if !daemon.is_running() {
            return Err(check_err(
                format!(
                    "{} exited after the frontend of phase {tag} disconnected",
                    daemon.name()
                ),
                Some(&run),
                &log,
            ));
        }
        w.apply(&mut model);
        ops.extend(w.ops.iter().cloned());
        last_run = Some(run);
    }
    let run = last_run.ok_or_else(|| check_err("no guest ran", None, ""))?;
    finish(
        daemon,
        Stop::Term,
        &run,
        &images,
        &model,
        &ops,
        "after-sha256",
    )
}

/// Read-only export of a raw and a qcow2 image (told apart by size) in one guest: both show
/// `ro=1`, writes, discards and write-zeroes fail, reads return the image contents, and the
/// image files are left byte-for-byte unchanged.
pub fn readonly(backend: BlkBackend) -> Result<(), ScenarioError> {
    let assets = GuestAssets::locate()?;
    let dir = tempfile::tempdir().map_err(ScenarioError::TempDir)?;
    let mut disks = Vec::new();
    for (i, (format, size)) in [(Format::Raw, 16 * MIB), (Format::Qcow2, 24 * MIB)]
        .into_iter()
        .enumerate()
    {
        let sub = dir.path().join(format!("d{i}"));
        std::fs::create_dir(&sub).map_err(ScenarioError::TempDir)?;
        let mut images = Images::prepare(&sub, format, Backing::None, size)?;
        let mut bytes = pattern(0x5EED + i as u64, size as usize);
        bytes[..MIB as usize].fill(0); // an unallocated range in the qcow2
        images.fill(&bytes)?;
        let file_before = std::fs::read(&images.image).map_err(|source| ImageError::Io {
            path: images.image.clone(),
            source,
        })?;
        let opts = BlkOptions {
            format,
            readonly: true,
            ..BlkOptions::default()
        };
        let daemon = backend.spawn(&sub, "blk0", &images.image, &opts)?;
        disks.push((images, file_before, daemon, size));
    }
    let mut vm = QemuVm::new(&assets, dir.path());
    let mut script = String::from(GUEST_HELPERS);
    for (i, (_, _, daemon, size)) in disks.iter().enumerate() {
        vm = vm.device(VhostUserDevice::blk(daemon.socket(), 1));
        let sectors = size / 512;
        let _ = write!(
            script,
            "dev=; for d in /sys/block/vd*; do [ \"$(cat $d/size)\" = {sectors} ] && dev=${{d##*/}}; done\n\
             [ -n \"$dev\" ] || fail \"no disk with {sectors} sectors\"\n\
             echo \"RQEMU-VAL ro{i}=$(cat /sys/block/$dev/ro)\"\n\
             if dd if=/dev/zero of=/dev/$dev bs=4096 count=1 oflag=direct conv=notrunc 2>/dev/null; then fail \"disk {i}: direct write succeeded\"; fi\n\
             if dd if=/dev/zero of=/dev/$dev bs=4096 count=1 seek=7 conv=notrunc,fsync 2>/dev/null; then fail \"disk {i}: buffered write succeeded\"; fi\n\
             if {UL_BLKDISCARD} -o 0 -l 65536 /dev/$dev 2>/dev/null; then fail \"disk {i}: discard succeeded\"; fi\n\
             if {UL_BLKDISCARD} -z -o 0 -l 65536 /dev/$dev 2>/dev/null; then fail \"disk {i}: write-zeroes succeeded\"; fi\n\
             echo \"RQEMU-VAL sha{i}=$(dd if=/dev/$dev bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)\"\n"
        );
    }
    let run = vm.script(&script).run();
    let logs: String = disks.iter().map(|(_, _, d, _)| d.log()).collect();
    let run = run.map_err(|e| check_err(e.to_string(), None, &logs))?;
    run.expect_success()
        .map_err(|e| check_err(e.to_string(), None, &logs))?;
    for (i, (images, file_before, daemon, _)) in disks.into_iter().enumerate() {
        let fail = |what: String| check_err(what, Some(&run), &logs);
        let ro = run.value(&format!("ro{i}")).unwrap_or_default().to_string();
        if ro != "1" {
            return Err(fail(format!(
                "disk {i} ({:?}): guest sees ro={ro:?}, expected 1",
                images.format
            )));
        }
        let want = qemu_img::sha256(&images.initial)?;
        let got = run
            .value(&format!("sha{i}"))
            .unwrap_or_default()
            .to_string();
        if got != want {
            return Err(fail(format!(
                "disk {i} ({:?}): guest read digest {got}, image holds {want}",
                images.format
            )));
        }
        let name = daemon.name().to_string();
        let status = daemon.terminate(STOP_TIMEOUT)?;
        if !status.success() {
            return Err(fail(format!(
                "{name} exited with {status} after SIGTERM, expected 0"
            )));
        }
        let file_now = std::fs::read(&images.image).map_err(|source| ImageError::Io {
            path: images.image.clone(),
            source,
        })?;
        if file_now != file_before {
            return Err(fail(format!(
                "read-only image {} was modified",
                images.image.display()
            )));
        }
        if images.format == Format::Qcow2 {
            qemu_img::check(&images.image)?;
        }
    }
    Ok(())
}

/// Shell lines printing what the guest sees of block device `name` (`RQEMU-VAL` lines `ro`,
/// `serial`, `discard_max`, `write_zeroes_max`, `hw_queues`, `write_cache`, `size`).
pub fn device_info_script(name: &str) -> String {
    let q = format!("/sys/block/{name}/queue");
    format!(
        "[ -b /dev/{name} ] || fail \"no /dev/{name}\"\n\
         echo \"RQEMU-VAL size=$(cat /sys/block/{name}/size)\"\n\
         echo \"RQEMU-VAL ro=$(cat /sys/block/{name}/ro)\"\n\
         echo \"RQEMU-VAL serial=$(cat /sys/block/{name}/serial 2>/dev/null)\"\n\
         echo \"RQEMU-VAL discard_max=$(cat {q}/discard_max_bytes)\"\n\
         echo \"RQEMU-VAL write_zeroes_max=$(cat {q}/write_zeroes_max_bytes)\"\n\
         echo \"RQEMU-VAL hw_queues=$(ls /sys/block/{name}/mq | wc -l)\"\n\
         echo \"RQEMU-VAL write_cache=$(cat {q}/write_cache)\"\n"
    )
}

/// The image under test and its backing file.
#[derive(Debug)]
pub struct Images {
    /// Directory holding them.
    pub dir: PathBuf,
    /// The image the daemon serves.
    pub image: PathBuf,
    /// Its format.
    pub format: Format,
    /// Guest-visible contents before the test.
    pub initial: Vec<u8>,
    /// Backing file and its bytes before the test.
    pub backing: Option<(PathBuf, Vec<u8>)>,
}

impl Images {
    /// Creates the image (and backing file) in `dir`.
    pub fn prepare(
        dir: &Path,
        format: Format,
        backing: Backing,
        size: u64,
    ) -> Result<Self, ScenarioError> {
        let image = dir.join(format!("disk.{}", format.name()));
        let mut backing_file = None;
        let initial = match (format, backing) {
            (_, Backing::None) => {
                qemu_img::create(&image, format, size, None)?;
                Vec::new()
            }
            (Format::Raw, _) => {
                return Err(check_err(
                    "a raw image cannot have a backing file",
                    None,
                    "",
                ));
            }
            (Format::Qcow2, Backing::Raw) => {
                let bytes = pattern(0xBAC0, size as usize);
                let file = dir.join("backing.raw");
                qemu_img::write_image(&file, Format::Raw, &bytes, false)?;
                qemu_img::create(&image, format, size, Some((&file, Format::Raw)))?;
                backing_file = Some(file);
                bytes
            }
            (Format::Qcow2, Backing::Qcow2Compressed) => {
                // Smaller than the overlay (the rest reads as zeroes), with all-zero 1 MiB holes.
                let len = (size * 3 / 4) as usize;
                let mut bytes = pattern(0xBAC1, len);
                for (i, chunk) in bytes.chunks_mut(MIB as usize).enumerate() {
                    if i % 3 == 1 {
                        chunk.fill(0);
                    }
                }
                let file = dir.join("backing.qcow2");
                qemu_img::write_image(&file, Format::Qcow2, &bytes, true)?;
                qemu_img::create(&image, format, size, Some((&file, Format::Qcow2)))?;
                backing_file = Some(file);
                bytes
            }
        };
        let backing = match backing_file {
            Some(file) => {
                let bytes = std::fs::read(&file).map_err(|source| ImageError::Io {
                    path: file.clone(),
                    source,
                })?;
                Some((file, bytes))
            }
            None => None,
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            image,
            format,
            initial,
            backing,
        })
    }

    /// Fills the image with `bytes` (before any daemon runs).
    pub fn fill(&mut self, bytes: &[u8]) -> Result<(), ScenarioError> {
        qemu_img::write_image(&self.image, self.format, bytes, false)?;
        self.initial = bytes.to_vec();
        Ok(())
    }

    /// The backing file must be byte-for-byte what it was (the daemon must never write it);
    /// a qcow2 backing file must also pass `qemu-img check`.
    pub fn verify_unchanged_backing(&self) -> Result<(), ScenarioError> {
        if let Some((file, before)) = &self.backing {
            let now = std::fs::read(file).map_err(|source| ImageError::Io {
                path: file.clone(),
                source,
            })?;
            if &now != before {
                return Err(check_err(
                    format!("backing file {} was modified", file.display()),
                    None,
                    "",
                ));
            }
            if file.extension().is_some_and(|e| e == "qcow2") {
                qemu_img::check(file)?;
            }
        }
        Ok(())
    }
}
