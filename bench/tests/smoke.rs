//! `rqemu-bench blk` against a real `rqemu-blk`: a short verified run must report operations,
//! no errors and no verify failures; the conformance checks must all pass.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn rqemu_blk() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .join("rqemu-blk");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build -p rqemu-blk` first",
        bin.display()
    );
    bin
}

/// An 8 MiB raw image served by a 2-queue `rqemu-blk` in `dir`: the daemon and its socket.
fn start_blk(dir: &Path) -> (Child, PathBuf) {
    let img = dir.join("d.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let sock = dir.join("b.sock");
    let daemon = Command::new(rqemu_blk())
        .args(["--queues", "2", "--socket"])
        .arg(&sock)
        .arg("--image")
        .arg(&img)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    (daemon, sock)
}

/// Runs `rqemu-bench blk ARGS --socket SOCK` and stops the daemon.
fn bench(mut daemon: Child, sock: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rqemu-bench"))
        .arg("blk")
        .args(args)
        .arg("--socket")
        .arg(sock)
        .output()
        .unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    (out.status.success(), text)
}

#[test]
fn verified_mixed_run_against_rqemu_blk() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, sock) = start_blk(dir.path());
    let args = [
        "--rw",
        "mixed",
        "--verify",
        "--queues",
        "2",
        "--iodepth",
        "8",
    ];
    let (ok, text) = bench(
        daemon,
        &sock,
        &[&args[..], &["--runtime", "0.5", "--size", "1M", "--json"]].concat(),
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("\"errors\":0") && text.contains("\"verify_failures\":0"),
        "{text}"
    );
    let ops: u64 = text
        .split("\"ops\":")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(ops > 0, "{text}");
}

#[test]
fn conformance_checks_pass_against_rqemu_blk() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, sock) = start_blk(dir.path());
    let (ok, text) = bench(daemon, &sock, &["--check"]);
    assert!(ok, "{text}");
    assert!(text.contains("check: 10 passed, 0 failed"), "{text}");
}
