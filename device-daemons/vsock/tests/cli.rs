//! Command-line and start-up errors of `rqemu-vsock`: each must end the process with status 1
//! (2 for usage errors) and one `rqemu-vsock: error: ...` line naming the problem, before
//! anything is served; and a started daemon must answer `CONNECT` on its `--uds-path` socket
//! only once a guest accepts (no frontend: the handshake stays pending, nothing is refused).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rqemu-vsock"))
        .args(args)
        .output()
        .expect("running rqemu-vsock");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fails_with(args: &[&str], code: i32, needle: &str) {
    let (status, err) = run(args);
    assert_eq!(status, Some(code), "rqemu-vsock {args:?}:\n{err}");
    assert!(
        err.contains(needle),
        "rqemu-vsock {args:?}: want {needle:?} in:\n{err}"
    );
}

#[test]
fn bad_arguments_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vhost.sock");
    let uds = dir.path().join("v.sock");
    let (sock, uds) = (sock.to_str().unwrap(), uds.to_str().unwrap());
    fails_with(
        &["--guest-cid", "3", "--uds-path", uds],
        2,
        "--socket <PATH>|--fd <N>",
    );
    fails_with(&["--socket", sock, "--uds-path", uds], 2, "--guest-cid <N>");
    fails_with(
        &["--socket", sock, "--guest-cid", "3"],
        2,
        "--uds-path <PATH>",
    );
    fails_with(
        &["--socket", sock, "--guest-cid", "2", "--uds-path", uds],
        1,
        "rqemu-vsock: error: --guest-cid: guest CID 2 is reserved",
    );
    fails_with(
        &[
            "--socket",
            sock,
            "--guest-cid",
            "4294967295",
            "--uds-path",
            uds,
        ],
        1,
        "reserved or out of range",
    );
    fails_with(
        &[
            "--socket",
            sock,
            "--guest-cid",
            "3",
            "--uds-path",
            "/nonexistent/dir/v.sock",
        ],
        1,
        "rqemu-vsock: error: --uds-path /nonexistent/dir/v.sock: directory /nonexistent/dir",
    );
    // A regular file where the host socket goes is never replaced.
    std::fs::write(uds, b"data").unwrap();
    fails_with(
        &["--socket", sock, "--guest-cid", "3", "--uds-path", uds],
        1,
        "rqemu-vsock: error: --uds-path",
    );
    assert_eq!(std::fs::read(uds).unwrap(), b"data");
}

#[test]
fn the_host_socket_takes_connect_lines_and_waits_for_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vhost.sock");
    let uds = dir.path().join("v.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rqemu-vsock"))
        .arg("--socket")
        .arg(&sock)
        .args(["--guest-cid", "3", "--sandbox", "none", "--uds-path"])
        .arg(&uds)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(sock.exists() && uds.exists()) {
        assert!(Instant::now() < deadline, "rqemu-vsock never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 5000\n").unwrap();
    // No guest: no answer (and no close) within a while.
    host.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    let e = host.read(&mut b).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}
