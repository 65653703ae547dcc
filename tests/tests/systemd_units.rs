//! The systemd units in `systemd/` pass `systemd-analyze verify` once installed by
//! `scripts/install.sh` (into a scratch prefix, so every `ExecStart=` names a built binary),
//! and a unit that names a missing binary does not (the check can fail).
//!
//! Needs `systemd-analyze` (Debian package `systemd`, installed by `scripts/install-deps.sh`)
//! and the project binaries (`cargo build --workspace --bins`).

use std::path::{Path, PathBuf};
use std::process::Command;

use rqemu_e2e::paths::{bin_dir, host_tool, repo_root};
use rqemu_e2e::project_binary;

const DAEMONS: [&str; 5] = ["blk", "net", "fs", "serial", "rtc"];

/// `systemd-analyze verify UNITS`: (success, everything it printed).
fn verify(units: &[PathBuf]) -> (bool, String) {
    let tool = host_tool("systemd-analyze")
        .unwrap_or_else(|e| panic!("{e} (Debian package `systemd`): the units cannot be verified"));
    let out = Command::new(tool)
        .arg("verify")
        .args(units)
        .output()
        .expect("running systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Installs into `prefix` with `scripts/install.sh` and returns the unit directory.
fn install(prefix: &Path) -> PathBuf {
    for b in [
        "rqemu-vmm",
        "rqemu-blk",
        "rqemu-net",
        "rqemu-fs",
        "rqemu-vsock",
        "rqemu-serial",
        "rqemu-rtc",
        "rqemu-run",
    ] {
        project_binary(b).unwrap_or_else(|e| panic!("{e}"));
    }
    let out = Command::new(repo_root().join("scripts/install.sh"))
        .arg("--prefix")
        .arg(prefix)
        .arg("--bin-dir")
        .arg(bin_dir().unwrap())
        .output()
        .expect("running scripts/install.sh");
    assert!(
        out.status.success(),
        "install.sh failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(prefix.join("bin/rqemu-blk").is_file());
    prefix.join("lib/systemd/system")
}

#[test]
fn every_unit_verifies_once_installed() {
    let scratch = tempfile::tempdir().unwrap();
    let units = install(&scratch.path().join("prefix"));
    let mut all = Vec::new();
    for d in DAEMONS {
        for kind in ["service", "socket"] {
            let u = units.join(format!("rqemu-{d}@.{kind}"));
            assert!(u.is_file(), "{} not installed", u.display());
            all.push(u);
        }
    }
    all.push(units.join("rqemu-vmm@.service"));
    let installed = std::fs::read_dir(&units).unwrap().count();
    assert_eq!(
        installed,
        all.len(),
        "unexpected files in {}",
        units.display()
    );
    for u in &all {
        let text = std::fs::read_to_string(u).unwrap();
        if u.extension().is_some_and(|e| e == "service") {
            assert!(text.contains("\nType=notify\n"), "{}", u.display());
            assert!(
                text.contains(&format!("ExecStart={}/", scratch.path().display())),
                "ExecStart= not rewritten to the prefix: {}",
                u.display()
            );
        }
    }
    for d in ["serial", "rtc"] {
        let text = std::fs::read_to_string(units.join(format!("rqemu-{d}@.socket"))).unwrap();
        assert!(
            text.contains("ListenSequentialPacket="),
            "rqemu-{d}@.socket"
        );
    }
    let (ok, text) = verify(&all);
    // Warnings (an unknown key, a bad value) do not fail `verify`: any output does here.
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
}

#[test]
fn a_unit_naming_a_missing_binary_fails_verification() {
    let scratch = tempfile::tempdir().unwrap();
    let units = install(&scratch.path().join("prefix"));
    let text = std::fs::read_to_string(units.join("rqemu-rtc@.service")).unwrap();
    let broken = text.replace("/bin/rqemu-rtc", "/bin/rqemu-no-such-daemon");
    assert_ne!(broken, text);
    let copy = units.join("rqemu-rtc@.service");
    std::fs::write(&copy, broken).unwrap();
    let (ok, out) = verify(&[copy]);
    assert!(!ok, "verify accepted a missing binary:\n{out}");
    assert!(out.contains("rqemu-no-such-daemon"), "{out}");
}
