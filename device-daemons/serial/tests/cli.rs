//! Command-line and start-up errors of `rqemu-serial`: each ends the process with a non-zero
//! status and a message naming the bad value, the missing option or the conflict.

use std::process::Command;

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_rqemu-serial"))
        .args(args)
        .output()
        .expect("running rqemu-serial");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "rqemu-serial {args:?} succeeded");
    for n in needles {
        assert!(
            err.contains(n),
            "rqemu-serial {args:?}: want {n:?} in:\n{err}"
        );
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
    let out = Command::new(env!("CARGO_BIN_EXE_rqemu-serial"))
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
    assert_eq!(err.matches("rqemu-serial: error: ").count(), 1, "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    // fd 0 is never a listening socket.
    fails_with(
        &["--fd", "0"],
        &["rqemu-serial: error: fd 0 is not a listening UNIX seqpacket socket"],
    );
    fails_with(
        &["--socket", "/nonexistent/dir/s"],
        &["cannot listen on /nonexistent/dir/s"],
    );
}

#[test]
fn bad_console_and_irq_are_named() {
    fails_with(
        &["--socket", "/nonexistent/s", "--console", "tcp:1"],
        &["'tcp:1'", "--console"],
    );
    fails_with(
        &["--socket", "/nonexistent/s", "--irq", "four"],
        &["'four'", "--irq"],
    );
}
