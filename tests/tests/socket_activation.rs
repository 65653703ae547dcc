//! Every daemon started the way systemd starts it: `systemd-socket-activate` binds the socket
//! (stream, or `--seqpacket` for the forwarding protocol), passes it with `LISTEN_FDS` and no
//! `--socket`/`--fd` flag, and the daemon tells `NOTIFY_SOCKET` (bound here) `READY=1`. Each
//! daemon then serves a conformance run or a protocol handshake, takes a SIGHUP, serves a
//! second run, and on SIGTERM says `STOPPING=1` and exits 0.
//!
//! Needs `systemd-socket-activate` (Debian package `systemd`, installed by
//! `scripts/install-deps.sh`) and the project binaries; rqemu-fs and rqemu-net need root (the
//! tests fail saying so otherwise); the rqemu-vmm test needs the guest assets.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rqemu_e2e::net::NetNs;
use rqemu_e2e::paths::host_tool;
use rqemu_e2e::project_binary;

/// How long a notification or the socket may take to show up (an upper bound, never asserted).
const WAIT: Duration = Duration::from_secs(30);

/// A daemon under `systemd-socket-activate`, with the notification socket it reports to.
struct Activated {
    name: &'static str,
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    /// Notifications received so far, read by a thread as they come (the daemon never
    /// blocks on a manager that does not read: it would drop them).
    seen: Arc<(Mutex<Vec<String>>, Condvar)>,
}

/// Reads `notify` into `seen` until the socket is closed or fails.
fn collect(notify: UnixDatagram, seen: Arc<(Mutex<Vec<String>>, Condvar)>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = notify.recv(&mut buf) {
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.0.lock().unwrap().push(m);
        seen.1.notify_all();
    }
}

impl Activated {
    /// Starts `systemd-socket-activate -l DIR/NAME.sock [--seqpacket] BIN ARGS` (inside `ns`
    /// if given) and waits for the socket to exist.
    fn start(
        dir: &Path,
        name: &'static str,
        seqpacket: bool,
        ns: Option<&NetNs>,
        args: &[&str],
    ) -> Self {
        Self::start_with_env(dir, name, seqpacket, ns, &[], args)
    }

    /// [`start`](Self::start) with more `NAME=VALUE` variables for the daemon.
    fn start_with_env(
        dir: &Path,
        name: &'static str,
        seqpacket: bool,
        ns: Option<&NetNs>,
        env: &[&str],
        args: &[&str],
    ) -> Self {
        let ssa = host_tool("systemd-socket-activate").unwrap_or_else(|e| {
            panic!("{e} (Debian package `systemd`): socket activation cannot be tested")
        });
        let bin = project_binary(name).unwrap_or_else(|e| panic!("{e}"));
        let socket = dir.join(format!("{name}.sock"));
        let notify_path = dir.join(format!("{name}.notify"));
        let notify = UnixDatagram::bind(&notify_path).expect("binding the notify socket");
        let log = dir.join(format!("{name}.log"));
        let mut cmd = match ns {
            Some(ns) => ns.command(&ssa).unwrap_or_else(|e| panic!("{e}")),
            None => Command::new(&ssa),
        };
        cmd.arg("-l").arg(&socket);
        if seqpacket {
            cmd.arg("--seqpacket");
        }
        cmd.arg("--fdname=listen")
            .arg("-E")
            .arg(format!("NOTIFY_SOCKET={}", notify_path.display()))
            .args(["-E", "RQEMU_LOG=info"]);
        for e in env {
            cmd.args(["-E", e]);
        }
        cmd.arg(&bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap());
        let child = cmd.spawn().expect("spawning systemd-socket-activate");
        let seen = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let s = seen.clone();
        std::thread::spawn(move || collect(notify, s));
        let mut a = Activated {
            name,
            child,
            socket,
            log,
            seen,
        };
        let deadline = Instant::now() + WAIT;
        while !a.socket.exists() {
            if let Ok(Some(st)) = a.child.try_wait() {
                panic!(
                    "{name}: systemd-socket-activate exited with {st}:\n{}",
                    a.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{name}: no socket after {WAIT:?}:\n{}",
                a.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        a
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a notification with the line `line` and returns it.
    fn expect_notify(&mut self, line: &str) -> String {
        self.wait_notify(line, |m| m.lines().any(|l| l == line))
    }

    /// Waits for a notification containing `part` and returns it.
    fn expect_notify_containing(&mut self, part: &str) -> String {
        self.wait_notify(part, |m| m.contains(part))
    }

    fn wait_notify(&mut self, line: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        let (lock, cv) = &*self.seen;
        let mut seen = lock.lock().unwrap();
        loop {
            if let Some(m) = seen.iter().find(|m| wanted(m)) {
                return m.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "{}: no {line} on NOTIFY_SOCKET within {WAIT:?}; got {:?}; log:\n{}",
                    self.name,
                    *seen,
                    self.log()
                );
            }
            seen = cv.wait_timeout(seen, deadline - now).unwrap().0;
        }
    }

    /// Waits until the daemon's log contains `part` (log lines are written by other threads,
    /// so a signal's line may follow the signal by a moment).
    fn wait_log(&self, part: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log().contains(part) {
            assert!(
                Instant::now() < deadline,
                "{}: no {part:?} in the log within {WAIT:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill {sig}");
    }

    /// SIGTERM: STOPPING=1, then exit status 0.
    fn stop(mut self) {
        self.signal(libc::SIGTERM);
        self.expect_notify("STOPPING=1");
        let st = self.child.wait().unwrap();
        assert!(
            st.success(),
            "{}: exit {st}; log:\n{}",
            self.name,
            self.log()
        );
    }

    /// The daemon is still running (SIGHUP did not end it).
    fn assert_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "{} exited; log:\n{}",
            self.name,
            self.log()
        );
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `rqemu-bench ARGS` and asserts it succeeded (its conformance checks passed).
fn bench(args: &[&str], daemon: &Activated) {
    let out = Command::new(project_binary("rqemu-bench").unwrap_or_else(|e| panic!("{e}")))
        .args(args)
        .output()
        .expect("running rqemu-bench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "rqemu-bench {args:?} failed ({}):\n{text}\ndaemon log:\n{}",
        out.status,
        daemon.log()
    );
    assert!(text.contains("check:"), "no conformance summary:\n{text}");
}

/// A run, a SIGHUP, a second run, then SIGTERM.
fn twice_around_a_hangup(mut d: Activated, run: impl Fn(&Activated)) {
    run(&d);
    let ready = d.expect_notify("READY=1");
    assert!(
        ready.contains("STATUS="),
        "READY=1 without a status: {ready:?}"
    );
    // A frontend was served: the status said so (the daemon sends it before serving).
    let serving = d.expect_notify_containing("serving a");
    assert!(serving.starts_with("STATUS="), "{serving:?}");
    d.signal(libc::SIGHUP);
    d.wait_log("SIGHUP");
    run(&d);
    d.assert_running();
    d.stop();
}

fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "{what} needs root: run the tests as root");
}

#[test]
fn rqemu_blk_socket_activated() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let img = img.to_str().unwrap();
    let d = Activated::start(
        dir.path(),
        "rqemu-blk",
        false,
        None,
        &["--image", img, "--format", "raw", "--queues", "2"],
    );
    twice_around_a_hangup(d, |d| {
        bench(
            &["blk", "--socket", d.socket.to_str().unwrap(), "--check"],
            d,
        )
    });
}

#[test]
fn rqemu_fs_socket_activated() {
    require_root("rqemu-fs");
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let d = Activated::start(
        dir.path(),
        "rqemu-fs",
        false,
        None,
        &["--shared-dir", shared.to_str().unwrap(), "--tag", "rqemu"],
    );
    twice_around_a_hangup(d, |d| {
        bench(
            &[
                "fs",
                "--socket",
                d.socket.to_str().unwrap(),
                "--tag",
                "rqemu",
                "--check",
            ],
            d,
        )
    });
}

#[test]
fn rqemu_net_socket_activated_in_a_namespace() {
    use rqemu_protocol::identity::{Identity, IDENTITY_LEN, IDENTITY_OFFSET};
    use rqemu_vhost_driver::{Device, DriverOptions};
    require_root("rqemu-net (a tap in a network namespace)");
    let ns = NetNs::create().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let mac = "52:54:00:12:34:77";
    let d = Activated::start(
        dir.path(),
        "rqemu-net",
        false,
        Some(&ns),
        &["--tap", "rqsa0", "--mac", mac],
    );
    twice_around_a_hangup(d, |d| {
        let opts = DriverOptions {
            num_queues: 2,
            ..DriverOptions::default()
        };
        let mut dev = Device::connect(&d.socket, &opts)
            .unwrap_or_else(|e| panic!("vhost-user handshake: {e}; log:\n{}", d.log()));
        let id = dev.config(IDENTITY_OFFSET, IDENTITY_LEN).unwrap();
        let id = Identity::decode(&id).unwrap_or_else(|e| panic!("identity: {e}"));
        assert_eq!(id.name, "rqemu-net");
        let cfg = dev.config(0, 6).unwrap();
        let got: Vec<String> = cfg.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got.join(":"), mac, "the MAC in the config space");
        ns.ip(&["link", "show", "rqsa0"])
            .unwrap_or_else(|e| panic!("rqemu-net's tap: {e}; log:\n{}", d.log()));
    });
}

/// A forwarding-protocol handshake with the daemon, then a register read through the socket.
fn forwarded_read(d: &Activated, port: u64, index: Option<(u64, u8)>) -> u8 {
    use rqemu_protocol::{ForwardedDevice, GrantPolicy, Space};
    let (_claims, handle) = ForwardedDevice::connect(&d.socket, &GrantPolicy::isa_default(1))
        .unwrap_or_else(|e| panic!("handshake with {}: {e}; log:\n{}", d.name, d.log()));
    assert_eq!(handle.name(), d.name);
    if let Some((p, v)) = index {
        handle.write_socket(Space::Pio, p, &[v]).unwrap();
    }
    let mut b = [0u8; 1];
    handle
        .read_socket(Space::Pio, port, &mut b)
        .unwrap_or_else(|e| panic!("read from {}: {e}; log:\n{}", d.name, d.log()));
    b[0]
}

#[test]
fn rqemu_serial_socket_activated_seqpacket() {
    let dir = tempfile::tempdir().unwrap();
    let console = format!("file:{}", dir.path().join("console.log").display());
    let d = Activated::start(
        dir.path(),
        "rqemu-serial",
        true,
        None,
        &["--console", &console],
    );
    twice_around_a_hangup(d, |d| {
        // LSR (base + 5) of an idle 16550: transmitter empty (THRE | TEMT).
        let lsr = forwarded_read(d, 0x3fd, None);
        assert_eq!(lsr & 0x60, 0x60, "LSR {lsr:#x}");
    });
}

#[test]
fn rqemu_rtc_socket_activated_seqpacket() {
    let dir = tempfile::tempdir().unwrap();
    // With a watchdog (WatchdogSec=1s), WATCHDOG=1 keeps coming while it serves.
    let mut d = Activated::start_with_env(
        dir.path(),
        "rqemu-rtc",
        true,
        None,
        &["WATCHDOG_USEC=1000000"],
        &[],
    );
    forwarded_read(&d, 0x71, Some((0x70, 0x0d)));
    d.expect_notify("WATCHDOG=1");
    twice_around_a_hangup(d, |d| {
        // Status register D: bit 7 (valid RAM and time) set.
        let reg_d = forwarded_read(d, 0x71, Some((0x70, 0x0d)));
        assert_eq!(reg_d & 0x80, 0x80, "register D {reg_d:#x}");
    });
}

/// Runs `rqemu-rtc --socket DIR/rtc.sock ARGS` with stderr into a file (`JOURNAL_STREAM`
/// naming that file when `journal`) until it logs that it listens; returns that log.
fn rtc_start_log(dir: &Path, journal: bool, args: &[&str]) -> String {
    use std::os::unix::fs::MetadataExt;
    let log = dir.join("rtc.log");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let mut cmd = Command::new(project_binary("rqemu-rtc").unwrap_or_else(|e| panic!("{e}")));
    cmd.arg("--socket").arg(dir.join("rtc.sock")).args(args);
    if journal {
        cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    }
    let mut child = cmd.env("RQEMU_LOG", "info").stderr(file).spawn().unwrap();
    let deadline = Instant::now() + WAIT;
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("listening on") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    text
}

/// With stderr on the journal (`JOURNAL_STREAM` names it, as systemd sets it), each log line
/// starts with its syslog priority and carries no timestamp of its own.
#[test]
fn logs_on_the_journal_stream_carry_syslog_priorities() {
    let dir = tempfile::tempdir().unwrap();
    let text = rtc_start_log(dir.path(), true, &[]);
    let line = text
        .lines()
        .find(|l| l.contains("listening on"))
        .unwrap_or_else(|| panic!("no `listening on` line:\n{text}"));
    assert!(line.starts_with("<6> INFO listening on"), "{line:?}");
    assert!(
        !text.contains('\u{1b}'),
        "ANSI codes on the journal:\n{text}"
    );
}

/// `--log-format json`: one JSON object per line.
#[test]
fn log_format_json_writes_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = rtc_start_log(dir.path(), false, &["--log-format", "json"]);
    let line = text
        .lines()
        .find(|l| l.contains("listening on"))
        .unwrap_or_else(|| panic!("no `listening on` line:\n{text}"));
    assert!(line.starts_with("{\"ts\":"), "{line:?}");
    assert!(
        line.contains(r#""level":"INFO","message":"listening on "#),
        "{line:?}"
    );
    assert!(line.ends_with('}'), "{line:?}");
}

/// rqemu-vmm (its unit is `Type=notify` too) says `READY=1` once the guest starts, and a
/// SIGTERM then stops the VM with status 4 (the unit's `SuccessExitStatus=4`).
#[test]
fn rqemu_vmm_says_ready_when_the_guest_starts() {
    let assets = rqemu_e2e::GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("vmm.notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let log = dir.path().join("vmm.log");
    let mut child = Command::new(project_binary("rqemu-vmm").unwrap_or_else(|e| panic!("{e}")))
        .args(["--accel", "tcg", "--memory", "256M", "--serial", "none"])
        .arg("--kernel")
        .arg(&assets.vmlinuz)
        .arg("--initrd")
        .arg(&assets.initramfs)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let got = notify.recv(&mut buf).map(|n| buf[..n].to_vec());
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let got = got.unwrap_or_else(|e| panic!("no notification from rqemu-vmm ({e}); log:\n{log}"));
    let text = String::from_utf8_lossy(&got);
    assert!(text.lines().any(|l| l == "READY=1"), "{text:?}");
    assert_eq!(status.code(), Some(4), "{status}; log:\n{log}");
}
