//! fio with verification in a guest on `rqemu-blk --cache none` (O_DIRECT on the host, io_uring
//! with requests in flight), raw and qcow2: QEMU TCG (`-M microvm`) is the vhost-user
//! frontend; Debian's fio (dynamically linked, with its libraries) runs in the guest with
//! `--direct=1` on `/dev/vda`: random 4 KiB writes at queue depth 16 (libaio) and sequential
//! 128 KiB writes at depth 4 (io_uring), each read back and checked by fio (`--verify`,
//! `--verify_fatal`); then the guest's whole-disk SHA-256 must be the image's on the host and a
//! qcow2 must pass `qemu-img check`.
//!
//! Needs: `scripts/install-deps.sh` (fio, QEMU), `scripts/guest-assets.sh`,
//! `cargo build --workspace --bins`.

use std::path::Path;
use std::time::Duration;

use rqemu_e2e::blk::scenario::{Backing, Images};
use rqemu_e2e::blk::{BlkBackend, BlkOptions, STOP_TIMEOUT};
use rqemu_e2e::disk::sha256_script;
use rqemu_e2e::paths::host_program_files;
use rqemu_e2e::qemu::{QemuVm, VhostUserDevice};
use rqemu_e2e::qemu_img::{self, Format};
use rqemu_e2e::GuestAssets;

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;

/// fio jobs run one after another (name, KiB written and read back by the verification,
/// arguments); a verification failure makes fio exit non-zero.
const JOBS: &[(&str, u64, &str)] = &[
    (
        "randwrite-4k-qd16",
        24 * 1024,
        "--ioengine=libaio --rw=randwrite --bs=4k --iodepth=16 --size=24m \
         --verify=crc32c",
    ),
    (
        "write-128k-qd4",
        32 * 1024,
        "--ioengine=io_uring --rw=write --bs=128k --iodepth=4 --offset=32m --size=32m \
         --verify=sha256",
    ),
];

fn script() -> String {
    let mut s = String::from("fail() { echo \"RQEMU-FAIL: $*\"; exit 1; }\n");
    for (name, _, args) in JOBS {
        s.push_str(&format!(
            "/opt/fio/fio --name={name} --filename=/dev/vda --direct=1 --thread \
             --do_verify=1 --verify_fatal=1 --randrepeat=0 --output-format=terse \
             --terse-version=3 {args} > /tmp/{name}.out 2>&1 || \
             {{ cat /tmp/{name}.out; fail \"fio {name}\"; }}\n\
             echo \"RQEMU-VAL fio-{name}=$(cut -d';' -f1-6 /tmp/{name}.out | head -n 1)\"\n"
        ));
    }
    s.push_str("sync\ndd if=/dev/null of=/dev/vda conv=notrunc,fsync 2>/dev/null\n");
    s.push_str(&sha256_script("/dev/vda", "disk-sha256"));
    s
}

fn fio_in_guest(format: Format) {
    let assets = GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let images = Images::prepare(dir.path(), format, Backing::None, DISK).unwrap();
    let opts = BlkOptions {
        format,
        extra: vec!["--cache".into(), "none".into()],
        ..BlkOptions::default()
    };
    let daemon = BlkBackend::Rqemu
        .spawn(dir.path(), "blk0", &images.image, &opts)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut vm = QemuVm::new(&assets, dir.path())
        .memory_mib(1024)
        .timeout(Duration::from_secs(900))
        .device(VhostUserDevice::blk(daemon.socket(), 1));
    for (path, bytes) in host_program_files(Path::new("/usr/bin/fio"), "/opt/fio", "fio") {
        vm = vm.file(&path, 0o755, bytes);
    }
    let run = vm.script(&script()).run();
    let status = daemon.terminate(STOP_TIMEOUT).unwrap();
    let log = std::fs::read_to_string(dir.path().join("blk0.log")).unwrap_or_default();
    let run = run.unwrap_or_else(|e| panic!("{e}\n--- daemon log ---\n{log}"));
    let ctx = || format!("{}\n--- daemon log ---\n{log}", run.transcript());
    run.expect_success()
        .unwrap_or_else(|e| panic!("{e}\n{}", ctx()));
    assert!(
        status.success(),
        "rqemu-blk exited with {status}\n{}",
        ctx()
    );
    assert!(log.contains("cache None"), "not served O_DIRECT\n{}", ctx());
    for (name, kib, _) in JOBS {
        // terse v3: version;fio version;job name;groupid;error;read KiB (the verification's)
        let v = run.value(&format!("fio-{name}")).unwrap_or_default();
        let fields: Vec<&str> = v.split(';').collect();
        assert!(
            fields.len() == 6
                && fields[2] == *name
                && fields[4] == "0"
                && fields[5] == kib.to_string(),
            "fio {name}: {v:?}\n{}",
            ctx()
        );
        println!("fio {name} ({}): {v}", format.name());
    }
    let actual = qemu_img::read_image(&images.image, format).unwrap();
    let host = qemu_img::sha256(&actual).unwrap();
    assert_eq!(
        run.value("disk-sha256").unwrap_or_default(),
        host,
        "guest and host disagree on the disk\n{}",
        ctx()
    );
    assert!(
        actual[..24 * MIB as usize].iter().any(|&b| b != 0),
        "fio's writes are not in the image"
    );
    if format == Format::Qcow2 {
        qemu_img::check(&images.image).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn fio_verifies_on_raw_with_cache_none() {
    fio_in_guest(Format::Raw);
}

#[test]
fn fio_verifies_on_qcow2_with_cache_none() {
    fio_in_guest(Format::Qcow2);
}
