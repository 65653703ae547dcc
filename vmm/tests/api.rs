//! End-to-end tests of the management API: a tiny guest that prints a tick line in a loop
//! (`mode=ticks`) runs under the real `rqemu-vmm --api-socket`; it is paused (its output
//! stops), resumed (it prints again) and shut down (exit status 0), through raw HTTP requests
//! and through `rqemu-ctl`, on KVM and on the software CPU.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{on_both, payloads, project_binary, Accel};

on_both!(
    pause_resume_shutdown_over_http,
    pause_resume_shutdown_with_rqemu_ctl,
    power_button_reaches_the_guest_through_the_ged,
);

const WAIT: Duration = Duration::from_secs(30);

/// A running `rqemu-vmm` with its console file and API socket.
struct Guest {
    child: Child,
    console: PathBuf,
    api: PathBuf,
    _dir: tempfile::TempDir,
}

impl Guest {
    fn start(accel: Accel, extra_cmdline: &str) -> Guest {
        let g = Guest::spawn(accel, &format!("mode=ticks {extra_cmdline}"));
        g.wait_console(|s| s.matches("tick ").count() >= 2, "two tick lines");
        g
    }

    fn spawn(accel: Accel, cmdline: &str) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        let api = dir.path().join("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_rqemu-vmm"))
            .arg("--kernel")
            .arg(&payloads().elf)
            .args(["--accel", accel.arg(), "--memory", "64M"])
            .args(["--cmdline", cmdline])
            .arg(format!("--serial=file:{}", console.display()))
            .arg("--api-socket")
            .arg(&api)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning rqemu-vmm");
        Guest {
            child,
            console,
            api,
            _dir: dir,
        }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn wait_console(&self, done: impl Fn(&str) -> bool, what: &str) {
        let start = Instant::now();
        loop {
            let s = self.console();
            if done(&s) {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "guest never printed {what}; console:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the VMM to exit; returns its status and stderr.
    fn wait_exit(mut self) -> (Option<i32>, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > WAIT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("rqemu-vmm did not exit after vm.shutdown");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        // The confined VMM cannot reach the socket file to remove it (an empty root): it stays,
        // answered by nobody, and the next `rqemu-vmm` on that path replaces it.
        assert!(
            std::os::unix::net::UnixStream::connect(&self.api).is_err(),
            "the API socket still answers after rqemu-vmm exited"
        );
        (status.code(), err)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One raw HTTP/1.1 request; returns the status and the body.
fn http(sock: &Path, method: &str, path: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connecting to the API socket");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_string())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

/// `(k, tsc)` of every complete tick line (`tick k=K sec=S tsc=T`).
fn ticks(console: &str) -> Vec<(u64, u64)> {
    let field = |l: &str, key: &str| -> Option<u64> {
        l.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    console
        .lines()
        .filter(|l| l.starts_with("tick ") && l.contains(" tsc=") && l.ends_with(' '))
        .filter_map(|l| Some((field(l, "k=")?, field(l, "tsc=")?)))
        .collect()
}

fn last_tick(console: &str) -> u64 {
    ticks(console)
        .last()
        .unwrap_or_else(|| panic!("no tick line in:\n{console}"))
        .0
}

/// How long the tests hold a pause.
const PAUSE: Duration = Duration::from_millis(1500);

/// While paused the console does not grow at all; after resume it does. Returns the guest
/// TSC of the last tick before the pause and of the first after it, and how long the test
/// held the pause (at least).
fn check_paused_then_resumed(
    g: &Guest,
    pause: impl Fn(),
    resume: impl Fn(),
) -> (u64, u64, Duration) {
    pause();
    let frozen = g.console();
    let held = Instant::now();
    std::thread::sleep(PAUSE);
    assert_eq!(
        g.console().len(),
        frozen.len(),
        "the guest printed while paused (console grew)"
    );
    let held = held.elapsed();
    resume();
    let before = last_tick(&frozen);
    g.wait_console(
        |s| s.len() > frozen.len() && last_tick(s) > before,
        "a new tick after resume",
    );
    let all = ticks(&g.console());
    let i = all
        .iter()
        .position(|&(k, _)| k == before)
        .expect("the last tick before the pause");
    (all[i].1, all[i + 1].1, held)
}

fn pause_resume_shutdown_over_http(accel: Accel) {
    if !accel.usable("pause_resume_shutdown_over_http") {
        return;
    }
    let g = Guest::start(accel, "");
    let api = g.api.clone();

    let (st, body) = http(&api, "GET", "/api/v1/vmm.ping");
    assert_eq!(st, 200, "{body}");
    assert_eq!(json(&body)["pid"], g.child.id());
    let (st, body) = http(&api, "GET", "/api/v1/vm.info");
    assert_eq!(st, 200, "{body}");
    let info = json(&body);
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(info["vcpus"], 1);
    assert_eq!(info["memory"], 64u64 << 20);
    assert_eq!(info["accelerator"], accel.arg());
    let kinds: Vec<_> = info["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["type"].clone(), d["connection"].clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("serial".into(), "in-vmm".into()),
            ("rtc".into(), "in-vmm".into())
        ]
    );

    let (tsc_before, tsc_after, held) = check_paused_then_resumed(
        &g,
        || {
            assert_eq!(http(&api, "PUT", "/api/v1/vm.pause").0, 204);
            let (st, body) = http(&api, "GET", "/api/v1/vm.info");
            assert_eq!((st, json(&body)["state"].clone()), (200, "Paused".into()));
            // Pausing a paused VM is a conflict, with a JSON error.
            let (st, body) = http(&api, "PUT", "/api/v1/vm.pause");
            assert_eq!(st, 409, "{body}");
            assert!(json(&body)["error"].as_str().unwrap().contains("paused"));
        },
        || {
            assert_eq!(http(&api, "PUT", "/api/v1/vm.resume").0, 204);
            let (_, body) = http(&api, "GET", "/api/v1/vm.info");
            assert_eq!(json(&body)["state"], "Running");
        },
    );
    if accel == Accel::Tcg {
        // The guest clock was held: between the last tick before the pause and the first
        // after it, the software CPU's TSC (1 GHz) advanced by less than the pause lasted.
        let ticked = Duration::from_nanos(tsc_after.wrapping_sub(tsc_before));
        assert!(
            ticked < held,
            "the guest TSC advanced {ticked:?} across a pause of {held:?}: the clock was not held"
        );
    } else {
        // KVM: the raw TSC keeps running across a pause (kvmclock is held instead).
        let _ = (tsc_before, tsc_after, held);
    }
    assert_eq!(http(&api, "PUT", "/api/v1/vm.resume").0, 409);
    let (st, body) = http(&api, "GET", "/api/v1/vm.counters");
    assert_eq!(st, 200, "{body}");
    let c = json(&body);
    assert_eq!(
        (c["vm"]["pauses"].clone(), c["vm"]["resumes"].clone()),
        (1.into(), 1.into())
    );
    // Register accesses the VMM saw: the guest printed its ticks through COM1 and read the
    // CMOS 2000 times per tick (it printed at least two).
    let n = |dev: &str, k: &str| {
        c[dev][k]
            .as_u64()
            .unwrap_or_else(|| panic!("{dev}.{k}: {c}"))
    };
    assert!(n("serial0", "writes") > 0, "{c}");
    assert!(n("rtc1", "reads") >= 4000, "{c}");
    assert!(n("rtc1", "writes") >= 4000, "{c}");
    // Unknown endpoints and wrong methods.
    assert_eq!(http(&api, "GET", "/api/v1/vm.nothing").0, 404);
    assert_eq!(http(&api, "GET", "/api/v1/vm.shutdown").0, 405);

    assert_eq!(http(&api, "PUT", "/api/v1/vm.shutdown").0, 204);
    let (code, err) = g.wait_exit();
    assert_eq!(code, Some(0), "{err}");
}

fn ctl(api: &Path, cmd: &str) -> (bool, String, String) {
    let out = Command::new(project_binary("rqemu-ctl"))
        .arg("--api-socket")
        .arg(api)
        .arg(cmd)
        .output()
        .expect("running rqemu-ctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn pause_resume_shutdown_with_rqemu_ctl(accel: Accel) {
    if !accel.usable("pause_resume_shutdown_with_rqemu_ctl") {
        return;
    }
    let g = Guest::start(accel, "");
    let api = g.api.clone();
    let (ok, out, err) = ctl(&api, "ping");
    assert!(ok, "{err}");
    assert_eq!(json(&out)["pid"], g.child.id());
    check_paused_then_resumed(
        &g,
        || {
            let (ok, _, err) = ctl(&api, "pause");
            assert!(ok, "{err}");
            let (ok, out, err) = ctl(&api, "info");
            assert!(ok, "{err}");
            assert_eq!(json(&out)["state"], "Paused");
        },
        || {
            let (ok, _, err) = ctl(&api, "resume");
            assert!(ok, "{err}");
        },
    );
    // An error answer: message on stderr, failure status.
    let (ok, _, err) = ctl(&api, "resume");
    assert!(!ok);
    assert!(err.contains("not paused") && err.contains("409"), "{err}");
    let (ok, _, err) = ctl(&api, "shutdown");
    assert!(ok, "{err}");
    let (code, err) = g.wait_exit();
    assert_eq!(code, Some(0), "{err}");
    // The VMM is gone: rqemu-ctl says it cannot connect.
    let (ok, _, err) = ctl(&api, "ping");
    assert!(!ok);
    assert!(err.contains("connecting to"), "{err}");
}

/// `vm.power-button` sets the GED's power-button event and pulses its interrupt; the payload
/// polls the GED event register (what the DSDT's `_EVT` reads), sees the event, reads the
/// register clear again, and powers off.
fn power_button_reaches_the_guest_through_the_ged(accel: Accel) {
    if !accel.usable("power_button_reaches_the_guest_through_the_ged") {
        return;
    }
    let g = Guest::spawn(accel, "mode=button");
    g.wait_console(
        |s| s.contains("action button-wait"),
        "that it waits for the button",
    );
    assert!(!g.console().contains("button events"), "{}", g.console());
    let (ok, _, err) = ctl(&g.api, "power-button");
    assert!(ok, "{err}");
    g.wait_console(|s| s.contains("action poweroff"), "the power-button event");
    let console = g.console();
    let line = console
        .lines()
        .find(|l| l.starts_with("button "))
        .unwrap_or_else(|| panic!("{console}"));
    assert_eq!(line, "button events=0x8 after=0x0 ", "{console}");
    let (code, err) = g.wait_exit();
    assert_eq!(code, Some(0), "{err}");
}

/// An `--api-socket` path that is a regular file, or a socket somebody listens on, is refused
/// at start-up (exit 1, the path named) and left alone.
#[test]
fn api_socket_path_in_use_or_not_a_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let live = dir.path().join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    for path in [&file, &live] {
        let out = Command::new(env!("CARGO_BIN_EXE_rqemu-vmm"))
            .arg("--kernel")
            .arg(&payloads().elf)
            .args([
                "--accel",
                "tcg",
                "--memory",
                "64M",
                "--cmdline",
                "mode=ticks",
            ])
            .args(["--serial", "none", "--api-socket"])
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .expect("running rqemu-vmm");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("API socket") && err.contains(&*path.to_string_lossy()),
            "{err}"
        );
        assert!(path.exists());
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}
