//! `rqemu-run`'s runc command line driven directly, as an engine does, without an engine:
//! `create` returns with the monitor up (the VM boots behind it), `state`/`list`/`ps`/
//! `--pid-file` report the monitor, `start` works while the agent may still be booting, a
//! SIGKILL of the monitor takes the VM and its daemons down (PDEATHSIG) and leaves the
//! container `stopped`, `delete --force` of a created container and `delete` of a stopped one
//! leave no process and no file; ids with path tricks and unknown signals are refused with
//! the error in the `--log` file as JSON (the last line's `msg`, as podman reads it).
//!
//! Cheap: the VMs are killed while they boot. Needs scripts/guest-assets.sh and
//! `cargo build -p rqemu-run -p rqemu-vmm -p rqemu-fs -p rqemu-vsock`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rqemu_e2e::oci::{agent_assets, assert_nothing_left, make_rootfs, rqemu_run};

const LIMIT: Duration = Duration::from_secs(120);

struct Cli {
    root: PathBuf,
    log: PathBuf,
    guest_dir: PathBuf,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        let mut c = Command::new(rqemu_run());
        c.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&self.log)
            .args(["--log-format", "json", "--accel", "tcg"])
            .arg("--guest-dir")
            .arg(&self.guest_dir)
            .args(args);
        // Files, not pipes: the monitor keeps `create`'s stdio (the container's) open.
        let out = self.log.with_extension("stdout");
        let err = self.log.with_extension("stderr");
        c.stdin(Stdio::null())
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap());
        let mut child = c.spawn().unwrap_or_else(|e| panic!("{c:?}: {e}"));
        let deadline = Instant::now() + LIMIT;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{c:?} did not finish within {LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: std::fs::read(&out).unwrap(),
            stderr: std::fs::read(&err).unwrap(),
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "rqemu-run {args:?}: {:?}\n{}\nlog: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
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
        field(&state, "status")
    }
}

/// The value of `"key": value` in pretty-printed JSON (strings unquoted).
fn field(json: &str, key: &str) -> String {
    let pat = format!("\"{key}\": ");
    json.lines()
        .find_map(|l| l.trim().strip_prefix(&pat))
        .map(|v| v.trim_end_matches(',').trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("no {key} in {json}"))
}

fn bundle(dir: &Path) -> PathBuf {
    let b = dir.join("bundle");
    make_rootfs(&b.join("rootfs"));
    std::fs::write(
        b.join("config.json"),
        r#"{"ociVersion": "1.0.2",
            "process": {"terminal": false, "user": {"uid": 0, "gid": 0},
                        "args": ["/bin/sleep", "1000"], "env": ["PATH=/bin"], "cwd": "/"},
            "root": {"path": "rootfs"}, "hostname": "cli",
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}]}"#,
    )
    .unwrap();
    b
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
    let cli = Cli {
        root: dir.path().join("root"),
        log: dir.path().join("log.json"),
        guest_dir: assets.dir.clone(),
    };
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
    assert_eq!(field(&state, "status"), "created", "{state}");
    assert_eq!(field(&state, "pid"), pid.to_string(), "{state}");
    assert_eq!(field(&state, "id"), "c1", "{state}");
    assert_eq!(field(&state, "bundle"), b, "{state}");
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

    cli.fails(&["kill", "c2", "NOSUCHSIG"], "unknown signal");
    cli.fails(&["state", "../c2"], "invalid container id");
    cli.fails(&["state", "c3"], "does not exist");
    assert_eq!(cli.status("c2"), "created");
    cli.ok(&["delete", "--force", "c2"]);
    cli.ok(&["delete", "--force", "c2"]); // already gone: --force says nothing
    let root = cli.root.display().to_string();
    assert_nothing_left(&cli.root, &[&root], Duration::from_secs(10));
}
