//! Command-line and start-up errors of `rqemu-rtc`: each ends the process with a non-zero
//! status and a message naming the bad value, the missing option or the conflict.

use std::process::Command;

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_rqemu-rtc"))
        .args(args)
        .output()
        .expect("running rqemu-rtc");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "rqemu-rtc {args:?} succeeded");
    for n in needles {
        assert!(err.contains(n), "rqemu-rtc {args:?}: want {n:?} in:\n{err}");
    }
}

#[test]
fn bad_command_lines_name_the_problem() {
    fails_with(&[], &["--socket <PATH>|--fd <N>"]);
    fails_with(
        &["--socket", "/nonexistent/s", "--fd", "3"],
        &["'--socket <PATH>' cannot be used with '--fd <N>'"],
    );
    fails_with(&["--fd", "three"], &["'three'", "--fd <N>"]);
    fails_with(
        &["--socket", "/nonexistent/s", "--base", "0x10000"],
        &["\"0x10000\" is not a port number", "--base"],
    );
    fails_with(
        &["--socket", "/nonexistent/s", "--base", "com1"],
        &["\"com1\""],
    );
}

#[test]
fn listening_errors_name_the_socket_or_fd() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rqemu-rtc"))
        .arg("--socket")
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not-a-socket exists and is not a socket"),
        "{err}"
    );
    assert_eq!(err.matches("rqemu-rtc: error: ").count(), 1, "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    // fd 0 is never a listening socket.
    fails_with(
        &["--fd", "0"],
        &["rqemu-rtc: error: fd 0 is not a listening UNIX seqpacket socket"],
    );
    fails_with(
        &["--socket", "/nonexistent/dir/s"],
        &["cannot listen on /nonexistent/dir/s"],
    );
}
