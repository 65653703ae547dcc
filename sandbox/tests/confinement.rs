//! End-to-end: the probe (`rqemu-sandbox-probe`, a stand-in daemon) enters each policy; the
//! confinement is checked from outside in `/proc` (seccomp, no_new_privs, capabilities,
//! namespaces, the root) and from inside (what it can still open and do, what kills it).
//! These tests need root (they also run the probe as uid 65534 for the unprivileged paths).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};

const PROBE: &str = env!("CARGO_BIN_EXE_rqemu-sandbox-probe");
const SIGSYS: i32 = 31;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests need root: they create namespaces and drop to uid 65534"
    );
}

/// A scratch directory every uid can traverse, with the probe's data file and a shared dir.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let img = dir.path().join("img");
        std::fs::write(&img, vec![0u8; 1 << 16]).unwrap();
        std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o666)).unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join("inside"), b"inside").unwrap();
        Scratch { dir }
    }
    fn img(&self) -> PathBuf {
        self.dir.path().join("img")
    }
    fn shared(&self) -> PathBuf {
        self.dir.path().join("shared")
    }
}

/// Kills a probe that hangs (so that a broken sandbox fails the test instead of blocking it).
struct Watchdog(Option<std::sync::mpsc::Sender<()>>);

impl Watchdog {
    const LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

    fn new(pid: i32) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Self::LIMIT) {
                eprintln!("probe {pid} still running after {:?}: killed", Self::LIMIT);
                // SAFETY: kill with the pid of a child this test spawned and has not reaped.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        Watchdog(Some(tx))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.0.take());
    }
}

struct Probe {
    child: Child,
    _watchdog: Watchdog,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Lines up to `ready`.
    lines: Vec<String>,
}

impl Probe {
    fn start(scratch: &Scratch, args: &[&str]) -> Probe {
        let mut cmd = Command::new(PROBE);
        cmd.arg("--file").arg(scratch.img()).args(args);
        if args.contains(&"fs") {
            cmd.arg("--dir").arg(scratch.shared());
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let watchdog = Watchdog::new(child.id() as i32);
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            if stdout.read_line(&mut l).unwrap() == 0 {
                let status = child.wait().unwrap();
                panic!("probe {args:?} ended before ready ({status}); said {lines:#?}");
            }
            let l = l.trim_end().to_string();
            if l == "ready" {
                break;
            }
            lines.push(l);
        }
        Probe {
            child,
            _watchdog: watchdog,
            stdin,
            stdout,
            lines,
        }
    }

    /// Sends a command; its (first) answer line, or None if the probe died.
    fn cmd(&mut self, c: &str) -> Option<String> {
        writeln!(self.stdin, "{c}").ok()?;
        self.next()
    }

    /// The next answer line, or None if the probe died.
    fn next(&mut self) -> Option<String> {
        let mut l = String::new();
        match self.stdout.read_line(&mut l) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(l.trim_end().trim_start_matches("done ").to_string()),
        }
    }

    fn has(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }

    fn assert_all_ok(&self, kinds: &[&str]) {
        let fails: Vec<_> = self
            .lines
            .iter()
            .filter(|l| l.starts_with("fail"))
            .collect();
        assert!(fails.is_empty(), "{fails:#?} in {:#?}", self.lines);
        for k in kinds {
            assert!(
                self.has(&format!("ok {k}")),
                "no 'ok {k}' in {:#?}",
                self.lines
            );
        }
        assert!(self.has("stray-fd-closed true"), "{:#?}", self.lines);
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The confined process: the pid-1 child when there is a pid namespace, else the probe.
    fn confined(&self) -> i32 {
        children_of(self.pid())
            .first()
            .copied()
            .unwrap_or(self.pid())
    }

    fn finish(mut self, c: &str) -> ExitStatus {
        let _ = self.cmd(c);
        drop(self.stdin);
        self.child.wait().unwrap()
    }
}

fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/status")) {
            if status_map(&s).get("PPid").map(String::as_str) == Some(&pid.to_string()) {
                out.push(p);
            }
        }
    }
    out
}

fn status_map(s: &str) -> BTreeMap<String, String> {
    s.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// `/proc/<pid>/task/*/status` of every thread.
fn tasks(pid: i32) -> Vec<BTreeMap<String, String>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let s = std::fs::read_to_string(e.path().join("status")).unwrap();
        v.push(status_map(&s));
    }
    assert!(!v.is_empty());
    v
}

/// Every thread: seccomp filter mode, no_new_privs, and the effective capabilities given.
fn assert_confined(pid: i32, cap_eff: &str, what: &str) -> usize {
    let ts = tasks(pid);
    for t in &ts {
        let name = &t["Name"];
        assert_eq!(
            t["Seccomp"], "2",
            "{what}: thread {name} not filtered: {t:#?}"
        );
        assert_eq!(t["NoNewPrivs"], "1", "{what}: thread {name}");
        assert_eq!(t["CapEff"], cap_eff, "{what}: thread {name}");
        assert_eq!(t["CapInh"], "0000000000000000", "{what}: thread {name}");
        assert_eq!(t["CapAmb"], "0000000000000000", "{what}: thread {name}");
    }
    ts.len()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

fn killed_by_sigsys(status: ExitStatus, what: &str) {
    assert_eq!(status.signal(), Some(SIGSYS), "{what}: {status}");
}

const NO_CAPS: &str = "0000000000000000";

#[test]
fn blk_namespace_mode_confines_every_thread_and_kills_on_a_forbidden_syscall() {
    require_root();
    let s = Scratch::new();
    let mut p = Probe::start(&s, &["--policy", "blk", "--sandbox", "namespace"]);
    p.assert_all_ok(&["control", "queue", "helper", "signal"]);
    let child = p.confined();
    assert_ne!(child, p.pid(), "no pid-1 child: {:#?}", p.lines);
    // PID 1 of its namespace.
    let st = status_map(&std::fs::read_to_string(format!("/proc/{child}/status")).unwrap());
    assert_eq!(st["NSpid"].split_whitespace().last(), Some("1"), "{st:#?}");
    // Control, queue, helper (the relay) and signal threads, every one filtered: the process's
    // two filters (clone3, allow-list) plus its own kind's, once.
    assert_eq!(assert_confined(child, NO_CAPS, "rqemu-blk"), 4);
    for t in tasks(child) {
        assert_eq!(t["CapPrm"], NO_CAPS);
        assert_eq!(t["CapBnd"], NO_CAPS);
        assert_eq!(t["Seccomp_filters"], "3", "{t:#?}");
    }
    // The parent only waits: filtered too, no capabilities, no fds beyond stdio.
    assert_confined(p.pid(), NO_CAPS, "pid-1 parent");
    let fds = std::fs::read_dir(format!("/proc/{}/fd", p.pid()))
        .unwrap()
        .count();
    assert_eq!(fds, 3, "pid-1 parent fds");
    for kind in ["mnt", "pid", "net", "ipc"] {
        assert_ne!(ns(&child.to_string(), kind), ns("self", kind), "{kind}");
    }
    // Its root is an empty tmpfs: no host file is reachable.
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{child}/root"))
        .unwrap()
        .collect();
    assert!(root.is_empty(), "{root:?}");
    assert!(!Path::new(&format!("/proc/{child}/root/etc/passwd")).exists());
    // Held fds keep working.
    assert_eq!(p.cmd("read-held").as_deref(), Some("held sector!!"));
    // A syscall outside the allow-list kills it (and the parent dies of the same signal).
    assert_eq!(p.cmd("forbidden"), None);
    killed_by_sigsys(p.finish("exit"), "uname under kill");
}

#[test]
fn sigterm_reaches_pid_1_and_its_exit_status_comes_back() {
    require_root();
    let s = Scratch::new();
    for policy in ["blk", "vmm-tcg"] {
        let mut p = Probe::start(&s, &["--policy", policy]);
        p.assert_all_ok(&["control", "signal"]);
        let pid1 = policy == "blk";
        assert_eq!(p.confined() != p.pid(), pid1, "{policy}: pid-1 child");
        // SAFETY: kill with a pid we spawned.
        assert_eq!(unsafe { libc::kill(p.pid(), libc::SIGTERM) }, 0);
        assert_eq!(p.next().as_deref(), Some("terminated"), "{policy}");
        let status = p.child.wait().unwrap();
        assert_eq!(status.code(), Some(7), "{policy}: {status}");
    }
}

#[test]
fn log_action_lets_forbidden_syscalls_through() {
    require_root();
    let s = Scratch::new();
    let mut p = Probe::start(&s, &["--policy", "blk", "--seccomp", "log"]);
    p.assert_all_ok(&["control", "queue", "signal"]);
    assert_confined(p.confined(), NO_CAPS, "log");
    assert_eq!(p.cmd("forbidden").as_deref(), Some("uname 0"));
    assert_eq!(p.cmd("exec-map").as_deref(), Some("mmap-exec mapped"));
    let status = p.finish("exit");
    assert!(status.success(), "{status}");
}

#[test]
fn trap_action_delivers_sigsys() {
    require_root();
    let s = Scratch::new();
    let mut p = Probe::start(&s, &["--policy", "rtc", "--seccomp", "trap"]);
    p.assert_all_ok(&["control", "ring", "helper", "signal"]);
    assert_eq!(p.cmd("forbidden"), None);
    killed_by_sigsys(p.finish("exit"), "uname under trap");
}

#[test]
fn argument_filters_and_thread_filters_kill() {
    require_root();
    let s = Scratch::new();
    for (policy, cmd) in [
        // clone without thread flags (a new process).
        ("blk", "fork"),
        // an executable mapping.
        ("blk", "exec-map"),
        // ioctl only with listed request numbers (vCPU threads may KVM_RUN: checked in the
        // vmm-kvm workload).
        ("vmm-kvm", "ioctl-other"),
        // socket() only for AF_UNIX (the VMM may create UNIX sockets).
        ("vmm-tcg", "socket-inet"),
        // path lookups are not the control thread's business.
        ("net", "open /etc/passwd"),
    ] {
        let mut p = Probe::start(&s, &["--policy", policy]);
        assert_eq!(p.cmd(cmd), None, "{policy}: {cmd} survived");
        killed_by_sigsys(p.finish("exit"), &format!("{policy}: {cmd}"));
    }
    // accept4 is the control thread's, not a queue worker's: a worker thread (spawned by the
    // already narrowed control thread) narrows itself, then dies of accept4.
    let mut p = Probe::start(&s, &["--policy", "blk"]);
    assert_eq!(p.cmd("queue-accept").as_deref(), Some("narrowed"));
    assert_eq!(p.next(), None, "accept4 in a queue worker survived");
    killed_by_sigsys(p.finish("exit"), "blk: accept4 in a queue worker");
    // glibc's malloc trimming a thread arena (its lazy open of /proc/sys/vm/overcommit_memory
    // was done before confinement).
    let mut p = Probe::start(&s, &["--policy", "blk"]);
    assert_eq!(p.cmd("churn").as_deref(), Some("churned 2016"));
    assert_eq!(p.cmd("churn").as_deref(), Some("churned 2016"));
    assert!(p.finish("exit").success());
    // The same calls with the allowed arguments go through.
    let mut p = Probe::start(&s, &["--policy", "serial"]);
    // serial has no queue kind: the thread keeps its parent's filter (control, which accepts):
    // accept4(-1) is EBADF.
    assert_eq!(p.cmd("queue-accept").as_deref(), Some("narrowed"));
    assert_eq!(p.next().as_deref(), Some("accept4 -1 errno 9"));
    assert!(p.finish("exit").success());
}

#[test]
fn every_policy_survives_its_daemons_syscalls_under_kill() {
    require_root();
    let s = Scratch::new();
    for (policy, kinds, caps) in [
        (
            "blk",
            &["control", "queue", "helper", "signal"][..],
            NO_CAPS,
        ),
        (
            "net",
            &["control", "queue", "helper", "signal"][..],
            NO_CAPS,
        ),
        (
            "fs",
            &["control", "queue", "helper", "signal"][..],
            "00000000880000db",
        ),
        (
            "serial",
            &["control", "ring", "helper", "signal"][..],
            NO_CAPS,
        ),
        ("rtc", &["control", "ring", "helper", "signal"][..], NO_CAPS),
        (
            "vmm-kvm",
            &["control", "vcpu", "helper", "signal"][..],
            NO_CAPS,
        ),
        (
            "vmm-tcg",
            &["control", "vcpu", "helper", "signal", "compiler"][..],
            NO_CAPS,
        ),
    ] {
        let mut p = Probe::start(&s, &["--policy", policy, "--seccomp", "kill"]);
        p.assert_all_ok(kinds);
        assert!(p.has("mode namespace"), "{policy}: {:#?}", p.lines);
        let n = assert_confined(p.confined(), caps, policy);
        assert_eq!(n, kinds.len(), "{policy}: threads");
        let pid = p.confined().to_string();
        assert_ne!(ns(&pid, "mnt"), ns("self", "mnt"), "{policy}");
        assert_eq!(
            p.cmd("read-held").as_deref(),
            Some("held sector!!"),
            "{policy}"
        );
        let status = p.finish("exit");
        assert!(status.success(), "{policy}: {status}");
    }
}

#[test]
fn empty_root_hides_host_files_while_held_fds_work() {
    require_root();
    let s = Scratch::new();
    for mode in ["namespace", "chroot"] {
        let mut p = Probe::start(
            &s,
            &["--policy", "blk", "--sandbox", mode, "--seccomp", "none"],
        );
        assert!(p.has(&format!("mode {mode}")), "{:#?}", p.lines);
        assert_eq!(
            p.cmd("open /etc/passwd").as_deref(),
            Some("errno 2"),
            "{mode}"
        );
        // Even its (empty) root cannot be opened: landlock allows no filesystem access.
        assert_eq!(p.cmd("open /").as_deref(), Some("errno 13"), "{mode}");
        assert_eq!(
            p.cmd("read-held").as_deref(),
            Some("held sector!!"),
            "{mode}"
        );
        let pid = p.confined().to_string();
        let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
            .unwrap()
            .collect();
        assert!(root.is_empty(), "{mode}: {root:?}");
        let same_mnt = ns(&pid, "mnt") == ns("self", "mnt");
        assert_eq!(same_mnt, mode == "chroot", "{mode}: mount namespace");
        assert!(p.finish("exit").success());
    }
    // Nothing left behind by the chroot's empty directory.
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("rqemu-sandbox-")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn fs_root_is_the_shared_directory() {
    require_root();
    let s = Scratch::new();
    let mut p = Probe::start(
        &s,
        &[
            "--policy",
            "fs",
            "--sandbox",
            "namespace",
            "--seccomp",
            "none",
        ],
    );
    p.assert_all_ok(&["control", "queue", "helper", "signal"]);
    assert_eq!(p.cmd("open /inside").as_deref(), Some("opened"));
    assert_eq!(p.cmd("open /etc/passwd").as_deref(), Some("errno 2"));
    assert_eq!(p.cmd("open /../../inside").as_deref(), Some("opened"));
    let child = p.confined();
    assert!(Path::new(&format!("/proc/{child}/root/inside")).exists());
    assert!(!Path::new(&format!("/proc/{child}/root/shared")).exists());
    assert!(p.finish("exit").success());
}

#[test]
fn read_only_shared_directory() {
    require_root();
    let s = Scratch::new();
    for (mode, errno) in [("namespace", "errno 30"), ("none", "errno 13")] {
        let mut p = Probe::start(
            &s,
            &[
                "--policy",
                "fs",
                "--readonly",
                "--sandbox",
                mode,
                "--seccomp",
                "none",
            ],
        );
        p.assert_all_ok(&["control", "queue", "helper", "signal"]);
        let root = if mode == "none" {
            std::fs::canonicalize(s.shared()).unwrap()
        } else {
            PathBuf::from("/")
        };
        let inside = root.join("inside");
        let new = root.join("new");
        assert_eq!(
            p.cmd(&format!("open {}", inside.display())).as_deref(),
            Some("opened"),
            "{mode}"
        );
        // The mount (namespace) or landlock (none) refuses writes.
        assert_eq!(
            p.cmd(&format!("create {}", new.display())).as_deref(),
            Some(errno),
            "{mode}"
        );
        assert!(p.finish("exit").success());
    }
    assert!(!s.shared().join("new").exists());
}

#[test]
fn unprivileged_landlock_denies_opens_and_keeps_held_fds() {
    require_root();
    let s = Scratch::new();
    let mut p = Probe::start(
        &s,
        &[
            "--policy",
            "blk",
            "--setuid",
            "65534",
            "--sandbox",
            "none",
            "--seccomp",
            "none",
        ],
    );
    p.assert_all_ok(&["control", "queue", "signal"]);
    // /etc/passwd is world-readable: only landlock stands in the way.
    assert_eq!(p.cmd("open /etc/passwd").as_deref(), Some("errno 13"));
    assert_eq!(p.cmd("read-held").as_deref(), Some("held sector!!"));
    let t = &tasks(p.confined())[0];
    assert_eq!(t["Uid"].split_whitespace().next(), Some("65534"));
    assert_eq!(t["NoNewPrivs"], "1");
    assert!(p.finish("exit").success());
}

#[test]
fn unprivileged_namespace_mode_goes_through_a_user_namespace() {
    require_root();
    let s = Scratch::new();
    let mut p = Probe::start(&s, &["--policy", "blk", "--setuid", "65534"]);
    p.assert_all_ok(&["control", "queue", "helper", "signal"]);
    assert!(p.has("mode namespace"), "{:#?}", p.lines);
    assert!(p.has("user-namespace true"), "{:#?}", p.lines);
    let child = p.confined();
    assert_ne!(child, p.pid());
    assert_eq!(assert_confined(child, NO_CAPS, "unprivileged blk"), 4);
    for kind in ["user", "mnt", "pid", "net", "ipc"] {
        assert_ne!(ns(&child.to_string(), kind), ns("self", kind), "{kind}");
    }
    assert_eq!(p.cmd("forbidden"), None);
    killed_by_sigsys(p.finish("exit"), "unprivileged uname");
}

#[test]
fn an_explicit_mode_the_privileges_do_not_allow_is_refused() {
    require_root();
    let s = Scratch::new();
    let out = Command::new(PROBE)
        .arg("--file")
        .arg(s.img())
        .args([
            "--policy",
            "blk",
            "--setuid",
            "65534",
            "--sandbox",
            "chroot",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--sandbox chroot is not possible here: chroot needs CAP_SYS_CHROOT"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ready"));
}

#[test]
fn unprivileged_fs_serves_its_shared_directory() {
    require_root();
    let s = Scratch::new();
    let shared = std::ffi::CString::new(s.shared().to_str().unwrap()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::chown(shared.as_ptr(), 65534, 65534) }, 0);
    let mut p = Probe::start(
        &s,
        &["--policy", "fs", "--setuid", "65534", "--seccomp", "none"],
    );
    p.assert_all_ok(&["control", "queue", "helper", "signal"]);
    assert!(p.has("user-namespace true"), "{:#?}", p.lines);
    assert_eq!(p.cmd("open /inside").as_deref(), Some("opened"));
    assert_eq!(p.cmd("open /etc/passwd").as_deref(), Some("errno 2"));
    assert!(p.finish("exit").success());
}
