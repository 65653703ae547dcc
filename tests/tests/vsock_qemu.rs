//! `rqemu-vsock` with QEMU TCG (`vhost-user-vsock-device` on `-M microvm`, memfd memory) as
//! the frontend and Linux's virtio-vsock transport in the guest, host side in Firecracker's
//! hybrid-vsock convention:
//!
//! * guest → host: three `socat`s in the guest connect to CID 2 port 1234 at once, the daemon
//!   to `PATH_1234`, where this test listens; 1 MiB uploaded on each, checksums compared;
//! * guest → a host port nobody serves: refused (RST);
//! * host → guest: this test connects to `PATH`, writes `CONNECT 5001\n`, gets `OK <port>\n`,
//!   and streams 1 MiB through a guest `socat VSOCK-LISTEN:5001 EXEC:cat` (echo, both
//!   directions at once, each beyond the 256 KiB credit); then `CONNECT 5000` and
//!   1 MiB downloaded into the guest (more than the daemon's 256 KiB credit: flow control
//!   both ways), checksums compared.
//!
//! The guest needs the kernel's vsock modules and `socat` (Debian, dynamically linked): both
//! are appended to the test initramfs (from the guest assets' kernel tree and the host), the
//! shared initramfs is unchanged. The daemon runs with its default sandbox (as root: a mount
//! namespace keeping only the directory of `PATH`, seccomp kill): while a guest is served,
//! every thread of it is checked (seccomp, no_new_privs, no capability); `PATH` is 0600.
//!
//! Needs root, `scripts/install-deps.sh` (socat, QEMU 10), `scripts/guest-assets.sh`,
//! `cargo build -p rqemu-vsock`.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rqemu_e2e::daemon::process_tree;
use rqemu_e2e::net::{pattern, sha256_hex};
use rqemu_e2e::vsock::{self, host_connect};
use rqemu_e2e::{project_binary, Daemon, GuestAssets, GuestRun, QemuVm};

const TIMEOUT: Duration = Duration::from_secs(900);
const UP_LEN: usize = 1 << 20;
const UPLOADS: usize = 3;
const ECHO_LEN: usize = 1 << 20;
const DOWN_LEN: usize = 1 << 20;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "rqemu-vsock e2e needs root (the daemon's default sandbox)"
    );
}

fn guest_script() -> String {
    let mut s = String::from("set -u\n");
    s.push_str(&vsock::insmod_script());
    s.push_str(&format!(
        r#"# Every socat is bounded: a host side that gave up fails the guest instead of hanging it.
S="timeout 120 /opt/vsock/socat"
pids=
for i in $(seq 1 {UPLOADS}); do
    head -c {UP_LEN} /dev/urandom >/tmp/up$i
    echo "RQEMU-VAL up-sha256-$i=$(sha256sum /tmp/up$i | cut -d' ' -f1)"
done
for i in $(seq 1 {UPLOADS}); do
    $S -u FILE:/tmp/up$i VSOCK-CONNECT:2:1234 &
    pids="$pids $!"
done
for p in $pids; do wait $p || {{ echo 'upload failed'; exit 11; }}; done
if $S -u /dev/null VSOCK-CONNECT:2:999 2>/tmp/refused; then r=no; else r=yes; fi
echo "RQEMU-VAL refused=$r"
$S VSOCK-LISTEN:5001 EXEC:cat &
echo=$!
$S -u VSOCK-LISTEN:5000 CREATE:/tmp/down || {{ echo 'download failed'; exit 12; }}
wait $echo || {{ echo 'echo failed'; exit 13; }}
echo "RQEMU-VAL down-sha256=$(sha256sum /tmp/down | cut -d' ' -f1)"
echo "RQEMU-VAL down-len=$(wc -c </tmp/down)"
"#
    ));
    s
}

/// The host side of the test, on its own thread: takes the uploads on `PATH_1234` (each read
/// on its own thread, all at once), then talks to the guest's echo and download listeners.
/// Returns the uploads.
fn host_side(path: PathBuf, upload: UnixListener, pid: u32) -> Result<Vec<Vec<u8>>, String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut readers = Vec::new();
    for _ in 0..UPLOADS {
        let (mut s, _) = upload.accept().map_err(|e| e.to_string())?;
        readers.push(std::thread::spawn(move || {
            let mut up = Vec::new();
            s.read_to_end(&mut up).map(|_| up)
        }));
    }
    let mut ups = Vec::new();
    for r in readers {
        ups.push(
            r.join()
                .map_err(|_| "upload reader panicked".to_string())?
                .map_err(|e| e.to_string())?,
        );
    }

    let (mut echo, port) = host_connect(&path, 5001, deadline)?;
    // While the guest is served: the control, signal and queue worker threads at least.
    let threads = check_confined(pid)?;
    if threads < 3 {
        return Err(format!("only {threads} daemon threads"));
    }
    if port < 1024 {
        return Err(format!("host port {port}"));
    }
    // Full duplex: a writer thread streams while this thread reads the echo back.
    let mut w = echo.try_clone().map_err(|e| e.to_string())?;
    let writer = std::thread::spawn(move || {
        w.write_all(&pattern(ECHO_LEN, 9))?;
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut back = Vec::new();
    echo.read_to_end(&mut back).map_err(|e| e.to_string())?;
    writer
        .join()
        .map_err(|_| "echo writer panicked".to_string())?
        .map_err(|e| format!("echo writer: {e}"))?;
    if back != pattern(ECHO_LEN, 9) {
        return Err(format!("echo gave back {} different bytes", back.len()));
    }

    let (mut down, _) = host_connect(&path, 5000, deadline)?;
    down.write_all(&pattern(DOWN_LEN, 5))
        .map_err(|e| e.to_string())?;
    down.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    down.read_to_end(&mut rest).map_err(|e| e.to_string())?;
    Ok(ups)
}

/// Every thread of the daemon (its queue worker included, while a guest is served) runs
/// under seccomp with no_new_privs and no capability; returns the threads checked.
fn check_confined(pid: u32) -> Result<usize, String> {
    let field = |status: &str, name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let mut threads = 0;
    for p in process_tree(pid) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
                continue;
            };
            let who = format!(
                "pid {p} thread {:?} ({})",
                t.file_name(),
                field(&status, "Name")
            );
            for (name, want) in [
                ("Seccomp", "2"),
                ("NoNewPrivs", "1"),
                ("CapEff", "0000000000000000"),
            ] {
                if field(&status, name) != want {
                    return Err(format!("{who}: {name} {}", field(&status, name)));
                }
            }
            threads += 1;
        }
    }
    Ok(threads)
}

fn fail(what: &str, run: Option<&GuestRun>, daemon: &Daemon) -> ! {
    panic!(
        "{what}\n--- guest ---\n{}\n--- rqemu-vsock log ---\n{}",
        run.map(GuestRun::transcript).unwrap_or_default(),
        daemon.log()
    )
}

fn boot_guest(assets: &GuestAssets, dir: &Path, vhost: &Path, daemon: &Daemon) -> GuestRun {
    let mut vm = QemuVm::new(assets, dir)
        .memory_mib(512)
        .timeout(TIMEOUT)
        .arg("-chardev")
        .arg(format!("socket,id=vsk,path={}", vhost.display()))
        .arg("-device")
        .arg("vhost-user-vsock-device,chardev=vsk")
        .script(&guest_script());
    for (path, mode, bytes) in vsock::guest_files(assets) {
        vm = vm.file(&path, mode, bytes);
    }
    vm.run()
        .unwrap_or_else(|e| fail(&e.to_string(), None, daemon))
}

fn check_run(boot: u32, run: &GuestRun, ups: &[Vec<u8>], daemon: &Daemon) {
    // The uploads arrive in any order: compare the sets of checksums.
    let mut host: Vec<String> = ups
        .iter()
        .map(|u| format!("{} {}", u.len(), sha256_hex(u).unwrap()))
        .collect();
    let mut guest: Vec<String> = (1..=UPLOADS)
        .map(|i| {
            format!(
                "{UP_LEN} {}",
                run.value(&format!("up-sha256-{i}")).unwrap_or("?")
            )
        })
        .collect();
    host.sort();
    guest.sort();
    if host != guest {
        fail(
            &format!("boot {boot}: uploads: host got {host:?}, guest sent {guest:?}"),
            Some(run),
            daemon,
        );
    }
    let down_sha = sha256_hex(&pattern(DOWN_LEN, 5)).unwrap();
    if run.value("down-sha256") != Some(down_sha.as_str())
        || run.value("down-len") != Some(DOWN_LEN.to_string().as_str())
    {
        fail(
            &format!("boot {boot}: download mismatch"),
            Some(run),
            daemon,
        );
    }
    if run.value("refused") != Some("yes") {
        fail(
            &format!("boot {boot}: a connection to an unserved host port was not refused"),
            Some(run),
            daemon,
        );
    }
}

#[test]
fn guest_and_host_connect_both_ways_over_hybrid_vsock() {
    require_root();
    let assets = GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let vhost = dir.path().join("vsock.vhost");
    let uds = dir.path().join("v.sock");
    let mut cmd = Command::new(project_binary("rqemu-vsock").unwrap_or_else(|e| panic!("{e}")));
    cmd.arg("--socket")
        .arg(&vhost)
        .args(["--guest-cid", "3"])
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
    // Created after the daemon confined itself: reachable through the kept directory.
    let upload = UnixListener::bind(dir.path().join("v.sock_1234")).unwrap();
    let mode = std::fs::metadata(&uds).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "--uds-path socket mode");
    // Two guests in turn on one daemon: the second finds it ready again (connections of the
    // first reset, the host sockets' epoll polled by the new connection's worker).
    for boot in 1..=2 {
        let host = {
            let uds = uds.clone();
            let upload = upload.try_clone().unwrap();
            let pid = daemon.pid();
            std::thread::spawn(move || host_side(uds, upload, pid))
        };
        let run = boot_guest(&assets, dir.path(), &vhost, &daemon);
        let ups = match host.join() {
            Ok(Ok(ups)) => ups,
            Ok(Err(e)) => fail(&format!("boot {boot}: host side: {e}"), Some(&run), &daemon),
            Err(_) => fail("host side panicked", Some(&run), &daemon),
        };
        // The host side first: its error explains a guest that gave up waiting.
        if let Err(e) = run.expect_success() {
            fail(
                &format!("boot {boot}: guest failed: {e}"),
                Some(&run),
                &daemon,
            );
        }
        check_run(boot, &run, &ups, &daemon);
    }
    // The daemon notices the second frontend's departure on its own time: wait for its line.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon.log().contains("connections: 10,") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = daemon.log();
    assert!(log.contains("sandbox namespace"), "not confined:\n{log}");
    // The counters logged when the second frontend went away: five connections (three
    // uploads, echo, download) per guest, no packet of the Linux driver refused.
    assert!(
        log.contains("bad_packets: 0, connections: 10,"),
        "unexpected counters:\n{log}"
    );
    let status = daemon
        .terminate(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "rqemu-vsock exited with {status}");
}
