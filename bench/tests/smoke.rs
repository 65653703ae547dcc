//! `rqemu-bench blk` against a real `rqemu-blk`: a short verified run must report operations,
//! no errors and no verify failures.

use std::path::PathBuf;
use std::process::{Command, Stdio};
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

#[test]
fn verified_mixed_run_against_rqemu_blk() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let sock = dir.path().join("b.sock");
    let mut daemon = Command::new(rqemu_blk())
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
    let out = Command::new(env!("CARGO_BIN_EXE_rqemu-bench"))
        .args([
            "blk",
            "--rw",
            "mixed",
            "--verify",
            "--queues",
            "2",
            "--iodepth",
            "8",
        ])
        .args(["--runtime", "0.5", "--size", "1M", "--json", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("\"errors\":0") && text.contains("\"verify_failures\":0"),
        "{text}"
    );
    let ops: u64 = text
        .split("\"ops\":")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(ops > 0, "{text}");
    println!("{text}");
}

#[test]
fn conformance_checks_pass_against_rqemu_blk() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let sock = dir.path().join("c.sock");
    let mut daemon = Command::new(rqemu_blk())
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
    let out = Command::new(env!("CARGO_BIN_EXE_rqemu-bench"))
        .args(["blk", "--check", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("check: 10 passed, 0 failed"), "{text}");
}
