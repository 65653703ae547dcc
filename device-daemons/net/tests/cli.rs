//! Command-line and start-up errors of `rqemu-net`: each must end the process with a
//! non-zero status and a message naming the problem, before anything is served.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rqemu-net"))
        .args(args)
        .output()
        .expect("running rqemu-net");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fails_with(args: &[&str], needle: &str) {
    let (ok, err) = run(args);
    assert!(!ok, "rqemu-net {args:?} succeeded");
    assert!(
        err.contains(needle),
        "rqemu-net {args:?}: want {needle:?} in:\n{err}"
    );
}

#[test]
fn bad_arguments_are_refused() {
    fails_with(&["--tap", "t0"], "--socket <PATH>|--fd <N>");
    fails_with(&["--socket", "/nonexistent/s"], "--tap <TAP>");
    fails_with(
        &["--socket", "/nonexistent/s", "--fd", "3", "--tap", "t0"],
        "'--socket <PATH>' cannot be used with '--fd <N>'",
    );
    fails_with(
        &["--socket", "/nonexistent/s", "--tap", "t0", "--tap-fd", "5"],
        "'--tap <TAP>' cannot be used with '--tap-fd <TAP_FD>'",
    );
    fails_with(
        &["--fd", "x3", "--tap", "t0"],
        "invalid value 'x3' for '--fd <N>'",
    );
    fails_with(
        &["--socket", "/nonexistent/s", "--tap-fd", "4,five"],
        "invalid value 'five' for '--tap-fd <TAP_FD>'",
    );
    fails_with(
        &[
            "--socket",
            "/nonexistent/s",
            "--tap",
            "t0",
            "--queues",
            "lots",
        ],
        "invalid value 'lots' for '--queues <QUEUES>'",
    );
    fails_with(
        &[
            "--socket",
            "/nonexistent/s",
            "--tap-fd",
            "5,6",
            "--queues",
            "1",
        ],
        "one fd per queue pair",
    );
    fails_with(
        &[
            "--socket",
            "/nonexistent/s",
            "--tap-fd",
            "7,7",
            "--queues",
            "2",
        ],
        "twice",
    );
    fails_with(
        &[
            "--socket",
            "/nonexistent/s",
            "--tap",
            "name-that-is-far-too-long",
        ],
        "invalid tap name",
    );
}

#[test]
fn a_non_tap_fd_is_refused() {
    // fd 0 (stdin) is never accepted as a tap.
    fails_with(
        &["--socket", "/nonexistent/s", "--tap-fd", "0"],
        "not a usable tap",
    );
}

#[test]
fn bad_mac_mtu_and_queue_counts_are_refused() {
    let base = ["--socket", "/nonexistent/s", "--tap", "rqcli0"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        base.iter().chain(extra).copied().collect()
    };
    fails_with(&with(&["--mac", "01:00:00:00:00:01"]), "bad MAC address");
    fails_with(&with(&["--mac", "01:00:00:00:00:01"]), "01:00:00:00:00:01");
    fails_with(&with(&["--mac", "52:54:00:00:01"]), "52:54:00:00:01");
    fails_with(&with(&["--queues", "0"]), "queue pairs must be");
    fails_with(&with(&["--queues", "17"]), "17");
    fails_with(&with(&["--mtu", "100"]), "MTU must be");
    fails_with(&with(&["--mtu", "100"]), "100");
}

#[test]
fn errors_are_reported_once_in_the_common_style() {
    let (ok, err) = run(&["--socket", "/nonexistent/s", "--tap-fd", "0"]);
    assert!(!ok);
    assert_eq!(err.matches("rqemu-net: error: ").count(), 1, "{err}");
}
