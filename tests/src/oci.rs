//! Helpers of the `rqemu-run` end-to-end tests with real container engines (podman,
//! containerd): a busybox root filesystem, commands under a time limit, and the checks that
//! nothing of a container is left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::paths::{project_binary, GuestAssets};

/// Name of the agent initramfs in the guest-assets directory.
pub const AGENT_INITRD: &str = "agent-initramfs.cpio.gz";

/// The guest assets rqemu-run needs (kernel + agent initramfs), or a panic saying how to build
/// them.
pub fn agent_assets() -> GuestAssets {
    let assets = GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"));
    let initrd = assets.dir.join(AGENT_INITRD);
    assert!(
        initrd.is_file(),
        "{} is missing: run scripts/guest-assets.sh (it builds the agent initramfs)",
        initrd.display()
    );
    assets
}

/// The guest kernel's release (`uname -r` in the guest).
pub fn guest_kernel_release(assets: &GuestAssets) -> String {
    let dir = assets.dir.join("kernel-tree/lib/modules");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/guest-assets.sh)", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .unwrap_or_else(|| panic!("no kernel release under {}", dir.display()))
}

/// The host's `uname -r`.
pub fn host_kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A busybox-static tree: `/bin/busybox` and its applets, the usual empty directories.
pub fn make_rootfs(dir: &Path) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox missing: run scripts/install-deps.sh (busybox-static)"
    );
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root", "run"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy(busybox, dir.join("bin/busybox")).unwrap();
    let list = Command::new(busybox).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
        }
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
}

/// A host tool, or a panic naming what is missing (the tests never skip).
pub fn require_tool(name: &str, how: &str) -> PathBuf {
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
    {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{name}` is not installed: {how}");
}

/// rqemu-run and the daemons it needs beside it.
pub fn rqemu_run() -> PathBuf {
    for b in ["rqemu-vmm", "rqemu-fs", "rqemu-vsock"] {
        project_binary(b).unwrap_or_else(|e| panic!("{e}"));
    }
    project_binary("rqemu-run").unwrap_or_else(|e| panic!("{e}"))
}

/// Writes an executable `rqemu-run` wrapper that fixes `--root` (engines do not pass runtime
/// flags to every call: podman's exit command `container cleanup` runs the runtime without
/// `--runtime-flag`s).
pub fn runtime_wrapper(dir: &Path, root: &Path, extra: &[&str]) -> PathBuf {
    let path = dir.join("rqemu-run-wrapper");
    let script = format!(
        "#!/bin/sh\nexec {} --root {} {} \"$@\"\n",
        rqemu_run().display(),
        root.display(),
        extra.join(" ")
    );
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Runs `cmd` with stdin closed, killing it after `limit`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    output_with_input(cmd, None, limit)
}

/// Runs `cmd` with `input` on its stdin (then closed; `None`: stdin is /dev/null), killing it
/// after `limit`.
pub fn output_with_input(cmd: &mut Command, input: Option<&[u8]>, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        let data = data.to_vec();
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(&data);
        });
    }
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => {
            // SAFETY: kill(2) on the child we spawned (not yet reaped: its waiter is blocked).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{what} did not finish within {limit:?}");
        }
    }
}

/// Pids of the processes whose command line contains `needle`.
pub fn processes_with(needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) {
            v.push((pid, cmdline));
        }
    }
    v
}

/// Waits (up to `limit`) until no process mentions any of `needles` and `root` is empty;
/// panics with what remains.
pub fn assert_nothing_left(root: &Path, needles: &[&str], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let procs: Vec<(i32, String)> = needles.iter().flat_map(|n| processes_with(n)).collect();
        let files: Vec<String> = std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().display().to_string())
            .collect();
        if procs.is_empty() && files.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "left behind after {limit:?}: processes {procs:#?}, files under {}: {files:#?}",
                root.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `rqemu-run` called as an engine calls it: a state root, a JSON `--log`, `--accel tcg` and a
/// guest directory.
#[derive(Debug, Clone)]
pub struct RunCli {
    /// `--root`.
    pub root: PathBuf,
    /// `--log` (JSON lines).
    pub log: PathBuf,
    /// `--guest-dir`.
    pub guest_dir: PathBuf,
}

impl RunCli {
    /// `rqemu-run <these options> <globals> <args>`, waited for at most `limit`. Its stdout and
    /// stderr go to the files `<stdio>.stdout` and `<stdio>.stderr` and are read back: files,
    /// not pipes, because the monitor keeps `create`'s stdio (the container's) open.
    pub fn run(&self, globals: &[&str], args: &[&str], stdio: &Path, limit: Duration) -> Output {
        let out = stdio.with_extension("stdout");
        let err = stdio.with_extension("stderr");
        let mut c = Command::new(rqemu_run());
        c.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&self.log)
            .args(["--log-format", "json", "--accel", "tcg"])
            .arg("--guest-dir")
            .arg(&self.guest_dir)
            .args(globals)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        let mut child = c.spawn().unwrap_or_else(|e| panic!("{c:?}: {e}"));
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{c:?} did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: std::fs::read(&out).unwrap(),
            stderr: std::fs::read(&err).unwrap(),
        }
    }

    /// Panics unless `out` (of `args`) succeeded, with its stderr and the log; its stdout.
    pub fn expect_ok(&self, args: &[&str], out: Output) -> String {
        assert!(
            out.status.success(),
            "rqemu-run {args:?}: {:?}\n{}\nlog: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The value of `"key": value` in pretty-printed JSON (strings unquoted).
pub fn json_field(json: &str, key: &str) -> String {
    let pat = format!("\"{key}\": ");
    json.lines()
        .find_map(|l| l.trim().strip_prefix(&pat))
        .map(|v| v.trim_end_matches(',').trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("no {key} in {json}"))
}
