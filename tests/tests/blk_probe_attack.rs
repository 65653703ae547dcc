//! The format-probing attack (CVE-2008-2004 class) replayed end to end: a QEMU guest whose disk
//! is a raw image served by `rqemu-blk --format auto` writes a qcow2 header naming a host file
//! as backing file into its own sector 0. Were it stored, the next start would probe the image
//! as qcow2 and open that host file for the guest to read. The writes must be refused
//! (EIO in the guest), the image must still probe as raw, and a restarted daemon must not
//! open the host file.
//!
//! A control proves the detection works: the same header planted by the host makes
//! `rqemu-blk --format auto` open the host file (that is what a stored header would do).
//!
//! Needs: `scripts/install-deps.sh`, `scripts/guest-assets.sh`, `cargo build -p rqemu-blk`.

use std::path::{Path, PathBuf};
use std::process::Command;

use rqemu_e2e::daemon::{process_tree, DEFAULT_START_TIMEOUT};
use rqemu_e2e::qemu_img::qemu_img;
use rqemu_e2e::{project_binary, Daemon, GuestAssets, QemuVm, VhostUserDevice};

const MIB: u64 = 1 << 20;
/// Size of the raw disk (the planted qcow2 claims a different virtual size).
const DISK: u64 = 16 * MIB;
const QCOW2_MAGIC: &[u8] = b"QFI\xfb";

/// Starts `rqemu-blk --format auto` on `image` (socket and log `name.*` in `dir`).
fn blk_auto(dir: &Path, name: &str, image: &Path) -> Daemon {
    let socket = dir.join(format!("{name}.sock"));
    let log = dir.join(format!("{name}.log"));
    let mut cmd = Command::new(project_binary("rqemu-blk").unwrap_or_else(|e| panic!("{e}")));
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(image)
        .args(["--format", "auto"]);
    Daemon::spawn("rqemu-blk", cmd, &socket, &log, DEFAULT_START_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Whether process `pid` or one of its descendants (a confined daemon serves from a child in
/// its pid namespace) has `path` open.
fn has_open(pid: u32, path: &Path) -> bool {
    process_tree(pid).into_iter().any(|p| {
        let fds = std::fs::read_dir(format!("/proc/{p}/fd"))
            .unwrap_or_else(|e| panic!("listing the fds of {p}: {e}"));
        fds.filter_map(Result::ok)
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .any(|target| target == path)
    })
}

/// A qcow2 image (64 MiB virtual) backed by `secret`, padded to whole sectors: what the
/// guest writes at the start of its disk.
fn evil_image(dir: &Path, secret: &Path) -> Vec<u8> {
    let evil = dir.join("evil.qcow2");
    let (e, s) = (evil.to_string_lossy(), secret.to_string_lossy());
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &s, "-F", "raw", &e, "64M",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let mut bytes = std::fs::read(&evil).unwrap();
    bytes.resize(bytes.len().next_multiple_of(512), 0);
    assert_eq!(&bytes[..4], QCOW2_MAGIC);
    bytes
}

fn canonical(p: PathBuf) -> PathBuf {
    p.canonicalize().unwrap_or(p)
}

#[test]
fn guest_cannot_turn_its_probed_raw_disk_into_a_qcow2_naming_a_host_file() {
    let assets = GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = canonical(tmp.path().to_path_buf());
    let secret = dir.join("host-secret.raw");
    std::fs::write(&secret, vec![0x5e; MIB as usize]).unwrap();
    let evil = evil_image(&dir, &secret);
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; DISK as usize]).unwrap();

    // Control: the header, had it been stored, makes a `--format auto` start open the file.
    let planted = dir.join("planted.raw");
    let mut bytes = vec![0u8; DISK as usize];
    bytes[..evil.len()].copy_from_slice(&evil);
    std::fs::write(&planted, &bytes).unwrap();
    let control = blk_auto(&dir, "control", &planted);
    assert!(
        has_open(control.pid(), &secret),
        "control: rqemu-blk did not open the backing file of a planted header; the check \
         below would prove nothing\n{}",
        control.log()
    );
    drop(control);

    // The attack, from inside a guest.
    let daemon = blk_auto(&dir, "blk0", &disk);
    assert!(
        daemon.log().contains("probed as raw"),
        "no start-up warning about the probed raw image:\n{}",
        daemon.log()
    );
    let half = evil.len() / 2 / 512 * 512;
    let script = format!(
        r#"
try() {{ key="$1"; shift; if "$@" 2>/tmp/err; then echo "RQEMU-VAL $key=written"; else echo "RQEMU-VAL $key=refused"; fi; }}
[ "$(cat /sys/block/vda/size)" = {sectors} ] || {{ echo "RQEMU-FAIL: no {sectors}-sector disk"; exit 1; }}
# Ordinary writes work: a boot sector, and the qcow2 away from sector 0.
try plain0 dd if=/dev/urandom of=/dev/vda bs=512 count=1 oflag=direct conv=notrunc,fsync
try elsewhere dd if=/evil.qcow2 of=/dev/vda bs=512 seek=2048 oflag=direct conv=notrunc,fsync
# A partial first sector: the 4-byte magic, through the page cache (read-modify-write).
try partial sh -c "printf 'QFI\373' | dd of=/dev/vda bs=1 count=4 conv=notrunc,fsync"
echo 1 >/proc/sys/vm/drop_caches
# Just sector 0.
try sector0 dd if=/evil.qcow2 of=/dev/vda bs=512 count=1 oflag=direct conv=notrunc,fsync
# Last, the whole qcow2 (header, tables) over the start of the disk: spans sector 0 and more.
try whole dd if=/evil.qcow2 of=/dev/vda bs={half} count=2 oflag=direct conv=notrunc,fsync
echo "RQEMU-VAL head=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 4 | od -An -tx1 | tr -d ' ')"
sync
dd if=/dev/null of=/dev/vda conv=notrunc,fsync 2>/dev/null || true
"#,
        sectors = DISK / 512,
    );
    let run = QemuVm::new(&assets, &dir)
        .device(VhostUserDevice::blk(daemon.socket(), 1))
        .file("/evil.qcow2", 0o644, evil.clone())
        .script(&script)
        .run()
        .unwrap_or_else(|e| panic!("{e}\n--- daemon log ---\n{}", daemon.log()));
    run.expect_success()
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let log = daemon.log();
    let ctx = || format!("{}\n--- daemon log ---\n{log}", run.transcript());
    let status = daemon
        .terminate(rqemu_e2e::blk::STOP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "rqemu-blk exited with {status}\n{log}");

    // The next start serves the disk as raw and leaves the host file alone.
    let again = blk_auto(&dir, "blk1", &disk);
    assert!(
        !has_open(again.pid(), &secret),
        "restarted rqemu-blk opened the host file\n{}",
        again.log()
    );
    assert!(
        again.log().contains("(raw, 16777216 bytes"),
        "restarted rqemu-blk does not serve the disk as raw:\n{}",
        again.log()
    );
    // On the host: the image still probes as raw, and the allowed write is there.
    let image = std::fs::read(&disk).unwrap();
    assert_ne!(&image[..4], QCOW2_MAGIC, "the guest stored a qcow2 header");
    assert_eq!(&image[MIB as usize..MIB as usize + evil.len()], &evil[..]);
    // What the guest was told.
    for (key, want) in [
        ("whole", "refused"),
        ("sector0", "refused"),
        ("partial", "refused"),
        ("plain0", "written"),
        ("elsewhere", "written"),
    ] {
        assert_eq!(run.value(key), Some(want), "guest write {key}\n{}", ctx());
    }
    assert_ne!(run.value("head"), Some("514649fb"), "{}", ctx());
}
