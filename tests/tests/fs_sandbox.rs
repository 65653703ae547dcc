//! `rqemu-fs`'s sandbox, seen from the host after it served a real frontend (a FUSE client over
//! vhost-user), and from inside the confined process:
//!
//! * `/proc` shows the confinement: the serving process is a child of the started one, in
//!   its own mount, pid, net and ipc namespaces; every thread has a seccomp filter, no_new_privs
//!   and only virtiofsd's capability set (bounding set too); the started process is a thin
//!   waiter holding no fd, no capability, under seccomp; its root is the share;
//! * the passthrough's `/proc/self/fd` fd leads to a private procfs where the only process is
//!   the daemon itself (the host's pids and `/` are out of reach through it);
//! * from inside: `--self-check-escape` tries `openat(procfd, "../../<pid>/root")` for every
//!   pid it can see, then mounts a new procfs — which must kill the process (SIGSYS);
//! * virtiofsd's command line (as Kata and libvirt write it) serves.
//!
//! Needs root (the tests look into another process's `/proc`) and `cargo build -p rqemu-fs`.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rqemu_e2e::daemon::DEFAULT_START_TIMEOUT;
use rqemu_e2e::fs::{spawn_rqemu_fs, FsDaemonOptions};
use rqemu_e2e::{project_binary, Daemon};
use rqemu_vhost_driver::fs::{FsOptions, FuseClient};

/// virtiofsd's capabilities: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID, MKNOD,
/// SETFCAP.
const FS_CAPS: u64 =
    (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 7) | (1 << 27) | (1 << 31);

fn need_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "these tests look into another process's /proc: run as root"
    );
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// `Name:\tvalue` of `/proc/PID/task/TID/status`.
fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in\n{status}"))
        .trim()
        .to_string()
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s, 16).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// A shared directory with known content, next to a secret outside it.
fn share(outside: &Path) -> std::path::PathBuf {
    let shared = outside.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(outside.join("secret-outside"), b"secret").unwrap();
    std::fs::write(shared.join("file.txt"), b"inside").unwrap();
    std::fs::create_dir(shared.join("sub")).unwrap();
    shared
}

/// Lists `path` relative to `dirfd`.
fn list_at(dirfd: &OwnedFd, path: &str) -> Result<BTreeSet<String>, i32> {
    let c = CString::new(path).unwrap();
    // SAFETY: valid NUL-terminated path; the fd returned is owned below.
    let fd = unsafe {
        libc::openat(
            dirfd.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    // SAFETY: fd was just opened and is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(names(Path::new(&format!(
        "/proc/self/fd/{}",
        fd.as_raw_fd()
    ))))
}

#[test]
fn fs_confinement_is_visible_in_proc_after_serving_a_frontend() {
    need_root();
    let work = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let shared = share(outside.path());
    let (mut daemon, _dev) = spawn_rqemu_fs(work.path(), &shared, &FsDaemonOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut c = FuseClient::connect_init(daemon.socket(), &FsOptions::default())
        .unwrap_or_else(|e| panic!("connecting to rqemu-fs: {e}\n{}", daemon.log()));
    c.timeout = Duration::from_secs(20);
    // Serve real requests: look up, read, create and write a file.
    let f = c.lookup(1, "file.txt").unwrap();
    let o = c.open(f.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(c.read(f.nodeid, o.fh, 0, 64).unwrap(), b"inside");
    let (n, o2) = c
        .create(1, "made-by-guest", libc::O_WRONLY as u32, 0o644)
        .unwrap();
    assert_eq!(c.write(n.nodeid, o2.fh, 0, b"guest").unwrap(), 5);
    c.release(n.nodeid, o2.fh, false).unwrap();
    assert_eq!(
        std::fs::read(shared.join("made-by-guest")).unwrap(),
        b"guest"
    );
    let log = daemon.log();
    assert!(
        log.contains("sandbox namespace (strongest allowed)"),
        "the start-up log must say which sandbox was chosen:\n{log}"
    );

    // The started process is the waiter; the server is its only child.
    let parent = daemon.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap();
    let kids: Vec<u32> = children
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(kids.len(), 1, "children of {parent}: {children:?}");
    let child = kids[0];

    // Every thread of the server: seccomp filter, no_new_privs, virtiofsd's capabilities only.
    let tasks = names(Path::new(&format!("/proc/{child}/task")));
    assert!(
        tasks.len() >= 3,
        "a serving rqemu-fs has a control, a signal and queue worker threads: {tasks:?}"
    );
    for tid in &tasks {
        let st = std::fs::read_to_string(format!("/proc/{child}/task/{tid}/status")).unwrap();
        let who = format!("thread {tid} ({})", status_field(&st, "Name"));
        assert_eq!(
            status_field(&st, "Seccomp"),
            "2",
            "{who}: no seccomp filter"
        );
        assert_eq!(status_field(&st, "NoNewPrivs"), "1", "{who}");
        let bnd = hex(&status_field(&st, "CapBnd"));
        assert_eq!(bnd, FS_CAPS, "{who}: bounding set {bnd:#x}");
        let prm = hex(&status_field(&st, "CapPrm"));
        assert_eq!(prm & !FS_CAPS, 0, "{who}: permitted {prm:#x}");
        assert_eq!(hex(&status_field(&st, "CapInh")), 0, "{who}");
        assert_eq!(hex(&status_field(&st, "CapAmb")), 0, "{who}");
    }
    // Queue workers narrow themselves: one filter more than the main thread.
    let filters = |tid: &String| {
        let st = std::fs::read_to_string(format!("/proc/{child}/task/{tid}/status")).unwrap();
        status_field(&st, "Seccomp_filters").parse::<u32>().unwrap()
    };
    let main_filters = filters(&child.to_string());
    assert!(main_filters >= 1);
    assert!(
        tasks.iter().any(|t| filters(t) > main_filters),
        "no thread installed a narrower filter than the main thread's {main_filters}"
    );
    // Its own namespaces.
    for ns in ["mnt", "pid", "net", "ipc"] {
        let theirs = std::fs::read_link(format!("/proc/{child}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "rqemu-fs shares the host's {ns} namespace");
    }
    // PID 1 of its pid namespace.
    let st = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap();
    let nspid = status_field(&st, "NSpid");
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "NSpid {nspid}");
    // Its root is the share.
    let mut want = names(&shared);
    assert_eq!(names(Path::new(&format!("/proc/{child}/root"))), want);

    // The waiter: no fd beyond stdio but the socket's directory (to remove the socket at
    // exit), no capability, a seccomp filter.
    let st = std::fs::read_to_string(format!("/proc/{parent}/status")).unwrap();
    assert_eq!(
        status_field(&st, "Seccomp"),
        "2",
        "the waiter has no filter"
    );
    assert_eq!(status_field(&st, "NoNewPrivs"), "1");
    assert_eq!(hex(&status_field(&st, "CapEff")), 0);
    assert_eq!(hex(&status_field(&st, "CapBnd")), 0);
    let fd_dir = format!("/proc/{parent}/fd");
    let extra: Vec<PathBuf> = names(Path::new(&fd_dir))
        .into_iter()
        .filter(|n| !["0", "1", "2"].contains(&n.as_str()))
        .map(|n| std::fs::read_link(format!("{fd_dir}/{n}")).unwrap())
        .collect();
    let socket_dir = daemon.socket().parent().unwrap().canonicalize().unwrap();
    assert_eq!(extra, [socket_dir], "waiter fds beyond stdio");

    // Every procfs fd the server holds is a private procfs where it is alone: walking up and
    // into another process's root (the escape of issue #12) reaches only the share.
    let host_proc_dev = std::fs::metadata("/proc").unwrap().dev();
    let mut proc_fds = 0;
    for fd in names(Path::new(&format!("/proc/{child}/fd"))) {
        let path = format!("/proc/{child}/fd/{fd}");
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let Ok(dir) = std::fs::File::open(&path) else {
            continue;
        };
        let dir = OwnedFd::from(dir);
        // SAFETY: fstatfs into a zeroed struct on a valid fd.
        let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::fstatfs(dir.as_raw_fd(), &mut sfs) }, 0);
        if sfs.f_type != libc::PROC_SUPER_MAGIC {
            continue;
        }
        assert_ne!(meta.dev(), host_proc_dev, "fd {fd} is on the host's procfs");
        if !meta.is_dir() {
            // /proc/self/mountinfo (the passthrough's mount table): a file, no walking from it.
            continue;
        }
        proc_fds += 1;
        let top = list_at(&dir, "../..").unwrap_or_else(|e| panic!("listing its procfs: {e}"));
        let pids: Vec<&String> = top
            .iter()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            .collect();
        assert_eq!(pids, ["1"], "processes visible through fd {fd}: {top:?}");
        assert!(!top.contains("sys"), "its procfs shows /proc/sys: {top:?}");
        let me = std::process::id();
        assert_eq!(
            list_at(&dir, &format!("../../{me}/root")),
            Err(libc::ENOENT)
        );
        assert_eq!(list_at(&dir, "../../1/root").unwrap(), want);
    }
    assert_eq!(
        proc_fds, 1,
        "the passthrough's /proc/self/fd fd was not found"
    );

    // Still serving.
    want.insert("second".into());
    c.mkdir(1, "second", 0o755).unwrap();
    assert_eq!(names(&shared), want);
    assert!(daemon.is_running(), "rqemu-fs died; log:\n{}", daemon.log());
    drop(c);
    let st = daemon
        .terminate(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "rqemu-fs exited with {st}");
}

#[test]
fn fs_proc_fd_escape_from_inside_fails_and_a_forbidden_syscall_kills() {
    need_root();
    let work = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let shared = share(outside.path());
    let mut child = Command::new(project_binary("rqemu-fs").unwrap())
        .arg("--socket")
        .arg(work.path().join("s.sock"))
        .arg("--shared-dir")
        .arg(&shared)
        .arg("--self-check-escape")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("rqemu-fs --self-check-escape did not end");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("self-check: mounting a new procfs"),
        "the self-check did not run:\n{err}"
    );
    assert!(!err.contains("still alive"), "mount was allowed:\n{err}");
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "a syscall outside the allow-list must kill rqemu-fs (waiter re-raises it): {status}\n{err}"
    );
    // What the escape attempts reached: errors, or the share — never the host's `/`, never
    // the directory around the share.
    let host_root = names(Path::new("/"));
    let share_names = names(&shared);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("self-check: "))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("self-check: proc-root: ")),
        "{err}"
    );
    for l in &lines {
        let Some((what, rest)) = l["self-check: ".len()..].split_once(": ") else {
            continue;
        };
        let Some(list) = rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')) else {
            assert!(
                rest.starts_with("error") || what.starts_with("mounting"),
                "{l}"
            );
            continue;
        };
        let got: BTreeSet<String> = list
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        assert_ne!(got, host_root, "{what} reached the host's /:\n{err}");
        assert!(
            !got.contains("secret-outside"),
            "{what} left the share:\n{err}"
        );
        if what == "proc-root" {
            let pids: Vec<&String> = got
                .iter()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .collect();
            assert_eq!(pids, ["1"], "{err}");
        } else {
            assert_eq!(got, share_names, "{what}:\n{err}");
        }
    }
}

#[test]
fn fs_virtiofsd_command_line_serves() {
    need_root();
    let work = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let shared = share(outside.path());
    let socket = work.path().join("virtiofsd.sock");
    let log = work.path().join("rqemu-fs.log");
    let mut cmd = Command::new(project_binary("rqemu-fs").unwrap());
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--shared-dir")
        .arg(&shared)
        .args([
            "--cache",
            "always",
            "--sandbox",
            "namespace",
            "--seccomp",
            "kill",
        ])
        .args(["--thread-pool-size", "0", "--announce-submounts", "--xattr"])
        .args(["--log-level", "debug", "--writeback"])
        .env_remove("RQEMU_LOG")
        .env_remove("RUST_LOG");
    let daemon = Daemon::spawn("rqemu-fs", cmd, &socket, &log, DEFAULT_START_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut c = FuseClient::connect_init(&socket, &FsOptions::default())
        .unwrap_or_else(|e| panic!("connecting to rqemu-fs: {e}\n{}", daemon.log()));
    c.timeout = Duration::from_secs(20);
    let f = c.lookup(1, "file.txt").unwrap();
    let o = c.open(f.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(c.read(f.nodeid, o.fh, 0, 64).unwrap(), b"inside");
    let text = daemon.log();
    assert!(
        text.contains("DEBUG"),
        "--log-level debug had no effect:\n{text}"
    );
    assert!(
        text.contains("--announce-submounts ignored") && text.contains("--writeback"),
        "differences from virtiofsd must be warned about:\n{text}"
    );
    assert!(text.contains("sandbox namespace,"), "{text}");
    assert!(!text.contains("strongest allowed"), "{text}");
    drop(c);
    let st = daemon
        .terminate(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "rqemu-fs exited with {st}");

    let out = Command::new(project_binary("rqemu-fs").unwrap())
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let caps = String::from_utf8(out.stdout).unwrap();
    assert!(caps.contains("\"type\": \"fs\""), "{caps}");
    // A flag that would change what the guest sees is refused, not ignored.
    let out = Command::new(project_binary("rqemu-fs").unwrap())
        .args(["--socket-path", "/nonexistent/s", "--shared-dir", "/tmp"])
        .args(["--translate-uid", "map:0:1000:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn fs_unprivileged_runs_in_a_user_namespace() {
    need_root();
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65534;
    let work = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let shared = share(outside.path());
    for p in [
        work.path(),
        outside.path(),
        &shared,
        &shared.join("file.txt"),
    ] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let socket = work.path().join("fs.sock");
    let log = work.path().join("rqemu-fs.log");
    let mut cmd = Command::new(project_binary("rqemu-fs").unwrap());
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--shared-dir")
        .arg(&shared)
        .uid(NOBODY)
        .gid(NOBODY);
    let daemon = Daemon::spawn("rqemu-fs", cmd, &socket, &log, DEFAULT_START_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut c = FuseClient::connect_init(&socket, &FsOptions::default())
        .unwrap_or_else(|e| panic!("connecting to rqemu-fs: {e}\n{}", daemon.log()));
    c.timeout = Duration::from_secs(20);
    let f = c.lookup(1, "file.txt").unwrap();
    let o = c.open(f.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(c.read(f.nodeid, o.fh, 0, 64).unwrap(), b"inside");
    c.mkdir(1, "by-nobody", 0o755).unwrap();
    let made = std::fs::metadata(shared.join("by-nobody")).unwrap();
    assert_eq!(made.uid(), NOBODY, "files are created as the daemon's user");
    let text = daemon.log();
    assert!(
        text.contains("sandbox namespace (strongest allowed) via a user namespace"),
        "{text}"
    );
    let parent = daemon.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap();
    let child: u32 = children.trim().parse().unwrap();
    for ns in ["user", "mnt", "pid", "net", "ipc"] {
        let theirs = std::fs::read_link(format!("/proc/{child}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "rqemu-fs shares the host's {ns} namespace");
    }
    for tid in names(Path::new(&format!("/proc/{child}/task"))) {
        let st = std::fs::read_to_string(format!("/proc/{child}/task/{tid}/status")).unwrap();
        assert_eq!(status_field(&st, "Seccomp"), "2", "thread {tid}");
        assert_eq!(status_field(&st, "NoNewPrivs"), "1", "thread {tid}");
        assert_eq!(
            status_field(&st, "Uid").split_whitespace().next(),
            Some("65534")
        );
    }
    drop(c);
    let st = daemon
        .terminate(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "rqemu-fs exited with {st}");
}
