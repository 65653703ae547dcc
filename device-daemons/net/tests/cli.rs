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
    fails_with(&["--tap", "t0"], "--socket");
    fails_with(
        &["--socket", "/nonexistent/s", "--tap", "t0", "--tap-fd", "5"],
        "cannot be used with",
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
    fails_with(&with(&["--mac", "52:54:00:00:01"]), "bad MAC address");
    fails_with(&with(&["--queues", "0"]), "queue pairs must be");
    fails_with(&with(&["--queues", "17"]), "queue pairs must be");
    fails_with(&with(&["--mtu", "100"]), "MTU must be");
}
