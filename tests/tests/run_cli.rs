//! `rqemu-run`'s runc command line driven directly, as an engine does, without an engine:
//! `create` returns with the monitor up (the VM boots behind it), `state`/`list`/`ps`/
//! `--pid-file` report the monitor, `start` works while the agent may still be booting, a
//! SIGKILL of the monitor takes the VM and its daemons down (PDEATHSIG) and leaves the
//! container `stopped`, `delete --force` of a created container and `delete` of a stopped one
//! leave no process and no file; ids with path tricks and unknown signals are refused with
//! the error in the `--log` file as JSON (the last line's `msg`, as podman reads it); a
//! SIGTERM before `start` ends a created container; a VM that cannot boot stops it too, with
//! the reason in the log.
//!
//! `console_socket_terminal_and_resize` boots one container with `terminal: true`: the pty
//! master arrives over `--console-socket` (SCM_RIGHTS), a size set on it reaches the guest's
//! terminal (SIGWINCH → `Resize`), lines typed reach the process, ^D ends it.
//!
//! The first test is cheap: its VMs are killed while they boot. Needs scripts/guest-assets.sh and
//! `cargo build -p rqemu-run -p rqemu-vmm -p rqemu-fs -p rqemu-vsock`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rqemu_e2e::oci::{agent_assets, assert_nothing_left, json_field, make_rootfs, RunCli};

const LIMIT: Duration = Duration::from_secs(120);

struct Cli(RunCli);

impl std::ops::Deref for Cli {
    type Target = RunCli;
    fn deref(&self) -> &RunCli {
        &self.0
    }
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        self.run_with(&[], args)
    }

    /// With extra global options first (a later one wins).
    fn run_with(&self, globals: &[&str], args: &[&str]) -> Output {
        self.0.run(globals, args, &self.log, LIMIT)
    }

    fn ok(&self, args: &[&str]) -> String {
        self.expect_ok(args, self.run(args))
    }

    /// Fails, and the last JSON line of the log says `want`.
    fn fails(&self, args: &[&str], want: &str) {
        let out = self.run(args);
        assert_eq!(out.status.code(), Some(1), "rqemu-run {args:?} should fail");
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let last = log.lines().last().unwrap_or_default();
        assert!(
            last.starts_with('{') && last.contains("\"level\":\"error\"") && last.contains(want),
            "rqemu-run {args:?}: last log line {last:?} should hold {want:?}"
        );
    }

    fn status(&self, id: &str) -> String {
        let state = self.ok(&["state", id]);
        json_field(&state, "status")
    }
}

fn bundle(dir: &Path) -> PathBuf {
    bundle_with(dir, false, r#""/bin/sleep", "1000""#)
}

/// A bundle whose process runs `args` (JSON list items).
fn bundle_with(dir: &Path, terminal: bool, args: &str) -> PathBuf {
    let b = dir.join("bundle");
    make_rootfs(&b.join("rootfs"));
    std::fs::write(
        b.join("config.json"),
        format!(
            r#"{{"ociVersion": "1.0.2",
            "process": {{"terminal": {terminal}, "user": {{"uid": 0, "gid": 0}},
                        "args": [{args}], "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/"}},
            "root": {{"path": "rootfs"}}, "hostname": "cli",
            "mounts": [{{"destination": "/proc", "type": "proc", "source": "proc"}},
                       {{"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                         "options": ["newinstance", "ptmxmode=0666", "mode=0620"]}}]}}"#
        ),
    )
    .unwrap();
    b
}

/// Receives the pty master as conmon does.
fn recv_fd(s: &UnixStream) -> File {
    // SAFETY: buffers sized for one fd; recvmsg fills them; the received fd is then ours.
    unsafe {
        let mut data = [0u8; 256];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        let mut control = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        assert!(libc::recvmsg(s.as_raw_fd(), &mut msg, 0) > 0, "recvmsg");
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        assert!(!cmsg.is_null(), "no fd with the console message");
        assert_eq!((*cmsg).cmsg_type, libc::SCM_RIGHTS);
        File::from_raw_fd(std::ptr::read_unaligned(
            libc::CMSG_DATA(cmsg).cast::<libc::c_int>(),
        ))
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn runc_contract_without_an_engine() {
    let assets = agent_assets();
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli(RunCli {
        root: dir.path().join("root"),
        log: dir.path().join("log.json"),
        guest_dir: assets.dir.clone(),
    });
    let b = bundle(dir.path());
    let b = b.to_str().unwrap();
    let pidfile = dir.path().join("c1.pid");

    cli.ok(&[
        "create",
        "--bundle",
        b,
        "--pid-file",
        pidfile.to_str().unwrap(),
        "c1",
    ]);
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let state = cli.ok(&["state", "c1"]);
    assert_eq!(json_field(&state, "status"), "created", "{state}");
    assert_eq!(json_field(&state, "pid"), pid.to_string(), "{state}");
    assert_eq!(json_field(&state, "id"), "c1", "{state}");
    assert_eq!(json_field(&state, "bundle"), b, "{state}");
    cli.fails(&["create", "--bundle", b, "c1"], "already exists");
    cli.ok(&["create", "--bundle", b, "c2"]);
    let list = cli.ok(&["list", "--format", "json"]);
    assert!(
        list.contains("\"id\":\"c1\"") && list.contains("\"id\":\"c2\""),
        "{list}"
    );
    assert_eq!(
        cli.ok(&["ps", "--format", "json", "c1"]).trim(),
        format!("[{pid}]")
    );

    // start answers whether or not the agent is up yet.
    cli.ok(&["start", "c1"]);
    assert_eq!(cli.status("c1"), "running");
    cli.fails(&["start", "c1"], "already running");
    cli.fails(&["delete", "c1"], "not stopped");

    // SIGKILL of the monitor: the VM and daemons follow it, the container is stopped.
    let c1_dir = cli.root.join("c1").display().to_string();
    // SAFETY: kill(2) on the monitor whose pid rqemu-run just reported.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_for("c1 not stopped after its monitor's SIGKILL", || {
        cli.status("c1") == "stopped"
    });
    wait_for("c1's VM processes outlived the monitor", || {
        rqemu_e2e::oci::processes_with(&c1_dir).is_empty()
    });
    cli.fails(&["kill", "c1", "TERM"], "not running");
    cli.ok(&["delete", "c1"]);

    // A signal that terminates, before start, ends a created container.
    cli.ok(&["create", "--bundle", b, "c3"]);
    cli.ok(&["kill", "c3", "SIGTERM"]);
    wait_for("c3 not stopped by SIGTERM before start", || {
        cli.status("c3") == "stopped"
    });
    cli.ok(&["delete", "c3"]);

    // A VM that cannot boot (no kernel in the file): the container stops, the log says why.
    let junk = dir.path().join("not-a-kernel");
    std::fs::write(&junk, b"junk").unwrap();
    let out = cli.run_with(
        &["--kernel", junk.to_str().unwrap()],
        &["create", "--bundle", b, "c4"],
    );
    assert!(out.status.success(), "create c4: {out:?}");
    cli.ok(&["start", "c4"]);
    wait_for("c4 not stopped after its VMM failed", || {
        cli.status("c4") == "stopped"
    });
    let log = std::fs::read_to_string(&cli.log).unwrap();
    assert!(
        log.contains("the VM stopped before the container process ended"),
        "{log}"
    );
    cli.ok(&["delete", "c4"]);

    cli.fails(&["kill", "c2", "NOSUCHSIG"], "unknown signal");
    cli.fails(&["exec", "c2", "/bin/true"], "unrecognized subcommand");
    cli.fails(&["state", "../c2"], "invalid container id");
    cli.fails(&["state", "c3"], "does not exist");
    assert_eq!(cli.status("c2"), "created");
    cli.ok(&["delete", "--force", "c2"]);
    cli.ok(&["delete", "--force", "c2"]); // already gone: --force says nothing
    let root = cli.root.display().to_string();
    assert_nothing_left(&cli.root, &[&root], Duration::from_secs(10));
}

#[test]
fn console_socket_terminal_and_resize() {
    let assets = agent_assets();
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli(RunCli {
        root: dir.path().join("root"),
        log: dir.path().join("log.json"),
        guest_dir: assets.dir.clone(),
    });
    let b = bundle_with(
        dir.path(),
        true,
        r#""/bin/sh", "-c", "while read x; do echo size=$(stty size) line=$x; done; echo bye""#,
    );
    let sock = dir.path().join("console.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    cli.ok(&[
        "create",
        "--bundle",
        b.to_str().unwrap(),
        "--console-socket",
        sock.to_str().unwrap(),
        "t1",
    ]);
    let (conn, _) = listener.accept().unwrap();
    let mut master = recv_fd(&conn);
    let output = Arc::new(Mutex::new(Vec::new()));
    {
        let output = output.clone();
        let mut reader = master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                output.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
    }
    cli.ok(&["start", "t1"]);
    let ws = libc::winsize {
        ws_row: 33,
        ws_col: 77,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads the winsize from our stack.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0, "TIOCSWINSZ on the master");
    // Lines until the process reports the new size (the VM boots meanwhile).
    let text = || String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
    let deadline = Instant::now() + LIMIT;
    let mut n = 0;
    while !text().contains("size=33 77 line=") {
        assert!(
            Instant::now() < deadline,
            "the terminal size never reached the guest: {:?}",
            text()
        );
        n += 1;
        master.write_all(format!("l{n}\r").as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    master.write_all(b"\x04").unwrap();
    wait_for("t1 did not stop after ^D", || cli.status("t1") == "stopped");
    let out = text();
    assert!(out.contains("bye"), "{out:?}");
    // The guest's terminal echoes and maps \n to \r\n; the host's pty passes bytes raw.
    assert!(out.contains("l1\r\n"), "{out:?}");
    cli.ok(&["delete", "t1"]);
    let root = cli.root.display().to_string();
    assert_nothing_left(&cli.root, &[&root], Duration::from_secs(10));
}
