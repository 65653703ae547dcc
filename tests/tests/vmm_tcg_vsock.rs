//! `rqemu-vmm --accel tcg` (our own VMM and software CPU, not QEMU) with a virtio-vsock device
//! served by `rqemu-vsock`, host side in Firecracker's hybrid-vsock convention. The VMM holds
//! no vsock logic: a virtio-mmio window of device type 19 whose config space (`guest_cid`) is
//! the daemon's. The daemon runs with `--guest-cid 42`: it drops packets from any other source
//! CID, so the exchange only works when the guest's driver read the CID through the VMM.
//!
//! Two guests in turn on one daemon, the socket given bare (type probed from the daemon's
//! rqemu identity) then as `vsock:PATH`; each:
//! * guest → host: `socat` in the guest connects to CID 2 port 1234, the daemon to
//!   `PATH_1234` where this test listens; 64 KiB uploaded, checksums compared;
//! * host → guest: this test connects to `PATH`, writes `CONNECT 5000\n`, gets `OK <port>\n`
//!   and sends 64 KiB that a guest `socat VSOCK-LISTEN:5000` stores; checksums compared.
//!
//! The guest's vsock modules and `socat` are appended to a test initramfs (as in
//! `vsock_qemu.rs`, helpers in `rqemu_e2e::vsock`). Data is small: the TCG guest is slow.
//!
//! Needs `scripts/install-deps.sh` (socat), `scripts/guest-assets.sh`,
//! `cargo build -p rqemu-vmm -p rqemu-vsock`.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rqemu_e2e::cpio::test_initramfs;
use rqemu_e2e::net::{pattern, sha256_hex};
use rqemu_e2e::vmm::{timed_run, TimedRun};
use rqemu_e2e::vsock::{self, host_connect};
use rqemu_e2e::{project_binary, Daemon, GuestAssets, RqemuVm};

const TIMEOUT: Duration = Duration::from_secs(900);
const GUEST_CID: u64 = 42;
const UP_LEN: usize = 64 << 10;
const DOWN_LEN: usize = 64 << 10;

fn guest_script() -> String {
    let mut s = String::from("set -u\n");
    s.push_str(&vsock::insmod_script());
    s.push_str(&format!(
        r#"# Every socat is bounded: a host side that gave up fails the guest instead of hanging it.
S="timeout 300 {dir}/socat"
head -c {UP_LEN} /dev/urandom >/tmp/up
echo "RQEMU-VAL up-sha256=$(sha256sum /tmp/up | cut -d' ' -f1)"
$S -u FILE:/tmp/up VSOCK-CONNECT:2:1234 || {{ echo 'upload failed'; exit 11; }}
$S -u VSOCK-LISTEN:5000 CREATE:/tmp/down || {{ echo 'download failed'; exit 12; }}
echo "RQEMU-VAL down-sha256=$(sha256sum /tmp/down | cut -d' ' -f1)"
echo "RQEMU-VAL down-len=$(wc -c </tmp/down)"
"#,
        dir = vsock::GUEST_DIR
    ));
    s
}

/// The host side, on its own thread: takes the upload on `PATH_1234`, then sends the
/// download to guest port 5000. Returns the upload.
fn host_side(path: &Path, upload: &UnixListener) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + TIMEOUT;
    let (mut s, _) = upload.accept().map_err(|e| e.to_string())?;
    let mut up = Vec::new();
    s.read_to_end(&mut up).map_err(|e| format!("upload: {e}"))?;

    let (mut down, port) = host_connect(path, 5000, deadline)?;
    if port < 1024 {
        return Err(format!("host port {port}"));
    }
    down.write_all(&pattern(DOWN_LEN, 5))
        .map_err(|e| format!("download: {e}"))?;
    down.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    down.read_to_end(&mut rest).map_err(|e| e.to_string())?;
    Ok(up)
}

/// `value` of the last console line `RQEMU-VAL <key>=<value>`.
fn value<'a>(run: &'a TimedRun, key: &str) -> Option<&'a str> {
    run.console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("RQEMU-VAL "))
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v.trim())
        .next_back()
}

fn boot(assets: &GuestAssets, initrd: &Path, socket_spec: &str) -> TimedRun {
    let mut cmd = RqemuVm::new(assets)
        .initrd(initrd)
        .device_socket(socket_spec)
        .timeout(TIMEOUT)
        .command()
        .unwrap_or_else(|e| panic!("{e}"));
    cmd.env("RQEMU_LOG", "info");
    timed_run(cmd, TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn tcg_linux_talks_both_ways_through_rqemu_vsock() {
    let assets = GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let vhost = dir.path().join("vsock.vhost");
    let uds = dir.path().join("v.sock");
    let mut cmd = Command::new(project_binary("rqemu-vsock").unwrap_or_else(|e| panic!("{e}")));
    cmd.arg("--socket")
        .arg(&vhost)
        .args(["--guest-cid", &GUEST_CID.to_string()])
        .arg("--uds-path")
        .arg(&uds)
        .env("RUST_LOG", "info");
    let daemon = Daemon::spawn(
        "rqemu-vsock",
        cmd,
        &vhost,
        &dir.path().join("vsock.log"),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let upload = UnixListener::bind(dir.path().join("v.sock_1234")).unwrap();
    let initrd = dir.path().join("initramfs-vsock.img");
    test_initramfs(
        &assets.initramfs,
        &vsock::guest_files(&assets),
        Some(&guest_script()),
        &initrd,
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let specs = [
        vhost.display().to_string(),
        format!("vsock:{}", vhost.display()),
    ];
    for (i, spec) in specs.iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        {
            let uds: PathBuf = uds.clone();
            let upload = upload.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = tx.send(host_side(&uds, &upload));
            });
        }
        let run = boot(&assets, &initrd, spec);
        let report = |what: &str| {
            format!(
                "boot {} ({spec}): {what}\n{}\n--- rqemu-vsock log ---\n{}",
                i + 1,
                run.transcript(),
                daemon.log()
            )
        };
        // The host side first: its error explains a guest that gave up waiting. A guest that
        // died early leaves it blocked: give up on it a while after the VM is gone.
        let up = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(up)) => up,
            Ok(Err(e)) => panic!("{}", report(&format!("host side: {e}"))),
            Err(e) => panic!("{}", report(&format!("host side did not finish: {e}"))),
        };
        assert!(
            run.code() == Some(0) && run.console.contains("RQEMU-EXIT=0"),
            "{}",
            report("guest failed")
        );
        if i == 0 {
            assert!(
                run.stderr.contains("discovered a Vsock device"),
                "{}",
                report("type not discovered")
            );
        }
        let up_sha = sha256_hex(&up).unwrap();
        assert_eq!(up.len(), UP_LEN, "{}", report("upload length"));
        assert_eq!(
            value(&run, "up-sha256"),
            Some(up_sha.as_str()),
            "{}",
            report("upload checksum")
        );
        let down_sha = sha256_hex(&pattern(DOWN_LEN, 5)).unwrap();
        assert_eq!(
            value(&run, "down-sha256"),
            Some(down_sha.as_str()),
            "{}",
            report("download checksum")
        );
        assert_eq!(
            value(&run, "down-len"),
            Some(DOWN_LEN.to_string().as_str()),
            "{}",
            report("download length")
        );
        eprintln!(
            "boot {} ({spec}): init after {:?}, done after {:.1} s",
            i + 1,
            run.init_reached,
            run.elapsed.as_secs_f64()
        );
    }
    // Two connections per guest, no packet of the Linux driver refused (the guest used the
    // CID it read through the VMM's config space).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon.log().contains("connections: 4,") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = daemon.log();
    assert!(
        log.contains("bad_packets: 0, connections: 4,"),
        "unexpected counters:\n{log}"
    );
    let status = daemon
        .terminate(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "rqemu-vsock exited with {status}");
}
