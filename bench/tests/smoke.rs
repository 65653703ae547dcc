//! `rqemu-bench blk` against a real `rqemu-blk` and `rqemu-bench fs` against a real `rqemu-fs`:
//! short verified runs must report operations, no errors and no verify failures; the
//! conformance checks must all pass.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A workspace daemon binary next to this test's target directory
/// (`target/<profile>/deps/<test>` → `target/<profile>/<name>`).
fn project_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(|p| p.parent()).unwrap().join(name);
    assert!(
        bin.exists(),
        "{} missing: run `cargo build -p {name}` first",
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
    let daemon = Command::new(project_binary("rqemu-blk"))
        .args(["--queues", "2", "--socket"])
        .arg(&sock)
        .arg("--image")
        .arg(&img)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_socket(&sock, "rqemu-blk made no socket");
    (daemon, sock)
}

/// Waits (10 s at most) for a daemon's socket to appear.
fn wait_socket(sock: &Path, what: &str) {
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `rqemu-bench SUBCOMMAND ARGS --socket SOCK`: success and the printed output.
fn run_bench(subcommand: &str, sock: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rqemu-bench"))
        .arg(subcommand)
        .args(args)
        .arg("--socket")
        .arg(sock)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    (out.status.success(), text)
}

/// Runs `rqemu-bench blk ARGS --socket SOCK` and stops the daemon.
fn bench(daemon: Child, sock: &Path, args: &[&str]) -> (bool, String) {
    let r = run_bench("blk", sock, args);
    stop(daemon);
    r
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

/// An `rqemu-fs` (tag "benchtag", mount namespace: needs root) sharing `dir/share`.
fn start_fs(dir: &Path) -> (Child, PathBuf) {
    let share = dir.join("share");
    std::fs::create_dir(&share).unwrap();
    let sock = dir.join("f.sock");
    let daemon = Command::new(project_binary("rqemu-fs"))
        .args(["--tag", "benchtag", "--socket"])
        .arg(&sock)
        .arg("--shared-dir")
        .arg(&share)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_socket(
        &sock,
        "rqemu-fs made no socket (it needs root for its mount namespace)",
    );
    (daemon, sock)
}

/// Runs `rqemu-bench fs ARGS --socket SOCK` (daemon left running).
fn bench_fs(sock: &Path, args: &[&str]) -> (bool, String) {
    run_bench("fs", sock, args)
}

fn json_num(text: &str, key: &str) -> f64 {
    text.split(&format!("\"{key}\":"))
        .nth(1)
        .and_then(|s| s.split([',', '}']).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {text}"))
}

fn stop(mut daemon: Child) {
    let _ = daemon.kill();
    let _ = daemon.wait();
}

#[test]
fn fs_conformance_checks_pass_against_rqemu_fs() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, sock) = start_fs(dir.path());
    let (ok, text) = bench_fs(&sock, &["--check", "--tag", "benchtag"]);
    stop(daemon);
    assert!(ok, "{text}");
    assert!(text.contains("check: 21 passed, 0 failed"), "{text}");
    assert_eq!(
        std::fs::read_dir(dir.path().join("share")).unwrap().count(),
        0,
        "the checks left files behind"
    );
}

#[test]
fn fs_workloads_run_against_rqemu_fs() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, sock) = start_fs(dir.path());
    for w in ["metadata", "seqread", "randread", "create"] {
        let (ok, text) = bench_fs(
            &sock,
            &[
                "--workload",
                w,
                "--tag",
                "benchtag",
                "--runtime",
                "0.3",
                "--size",
                "2m",
                "--files",
                "50",
                "--iodepth",
                "4",
                "--verify",
                "--json",
            ],
        );
        assert!(ok, "{w}: {text}");
        assert!(json_num(&text, "ops") > 0.0, "{w}: {text}");
        assert_eq!(json_num(&text, "errors"), 0.0, "{w}: {text}");
        assert_eq!(json_num(&text, "verify_failures"), 0.0, "{w}: {text}");
        if w != "metadata" {
            assert!(json_num(&text, "mb_s") > 0.0, "{w}: {text}");
        }
    }
    // A wrong tag is refused with a clear message.
    let (ok, text) = bench_fs(&sock, &["--tag", "other", "--runtime", "0.1"]);
    stop(daemon);
    assert!(
        !ok && text.contains("tag is \"benchtag\", not \"other\""),
        "{text}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("share")).unwrap().count(),
        0,
        "the bench left files behind"
    );
}

#[test]
fn fs_host_mode_runs_every_workload() {
    let dir = tempfile::tempdir().unwrap();
    for w in ["metadata", "seqread", "randread", "create"] {
        let out = Command::new(env!("CARGO_BIN_EXE_rqemu-bench"))
            .args(["fs", "--workload", w, "--runtime", "0.2", "--size", "1m"])
            .args(["--files", "20", "--verify", "--json", "--host-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{w}: {text}");
        assert!(json_num(&text, "ops") > 0.0, "{w}: {text}");
        assert_eq!(json_num(&text, "verify_failures"), 0.0, "{w}: {text}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
