//! `rqemu-agent` end to end: the agent initramfs of `scripts/guest-assets.sh` booted by
//! `rqemu-vmm --accel tcg` with the container's root shared by `rqemu-fs` (tag `rootfs`) and
//! the control channel over `rqemu-vsock` (guest CID 3 → host port 1024 = the UNIX socket
//! `<uds>_1024` this test listens on). The test plays `rqemu-run`: Ready, Create, Start, stdio,
//! signals, Exited; the VM must then power itself off.
//!
//! One container per VM, so three boots cover everything:
//! 1. pipes, rw rootfs, uid 0: a malformed frame and a Start before Create answered with
//!    errors (the agent goes on), stdout/stderr split, the guest's `uname -r`, a write that
//!    appears in the host directory, stdin relayed to `cat` and ended by CloseStdin, cwd,
//!    env, hostname, a sysctl, a copied file, the default `/dev`, a second share mounted
//!    read-only by tag at `/data` (a host bind mount as rqemu-run maps it), an orphan holding stdout
//!    (killed when the process exits, as in a pid namespace), `Exited(Code(7))`;
//! 2. terminal, read-only rootfs, uid/gid 1000 + group 10: `tty`/`test -t 0`, the initial
//!    size, ids, a refused write, a line typed on the terminal, `Resize`, `Signal(15)` to
//!    `sleep` → `Exited(Signal(15))`;
//! 3. a program that does not exist: `Start` answered with an `Error` naming execve, then the
//!    host closes the channel and the VM powers itself off.
//!
//! Needs `scripts/guest-assets.sh` (agent-initramfs.cpio.gz) and
//! `cargo build -p rqemu-vmm -p rqemu-fs -p rqemu-vsock`.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rqemu_agent_protocol::{
    read_msg, write_msg, AgentMsg, ContainerSpec, ExitStatus, FileCopy, HostMsg, Mount, Process,
    Rootfs, CONTROL_PORT, VERSION,
};
use rqemu_e2e::fs::{spawn_rqemu_fs, FsDaemonOptions};
use rqemu_e2e::oci::make_rootfs;
use rqemu_e2e::vmm::{timed_run, TimedRun};
use rqemu_e2e::{project_binary, Daemon, GuestAssets, RqemuVm};

const TIMEOUT: Duration = Duration::from_secs(600);
const GUEST_CID: u64 = 3;
const HOSTS: &[u8] = b"127.0.0.1 localhost agent-test\n";

fn agent_initramfs(assets: &GuestAssets) -> PathBuf {
    let p = assets.dir.join("agent-initramfs.cpio.gz");
    assert!(
        p.is_file(),
        "\n*** {} is missing: run scripts/guest-assets.sh (it builds the agent initramfs) ***\n",
        p.display()
    );
    p
}

/// The guest kernel's release: the one directory under the kernel package's lib/modules.
fn kernel_release(assets: &GuestAssets) -> String {
    let dir = assets.dir.join("kernel-tree/lib/modules");
    let entry = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/guest-assets.sh)", dir.display()))
        .filter_map(|e| e.ok())
        .next()
        .unwrap_or_else(|| panic!("no kernel release under {}", dir.display()));
    entry.file_name().to_string_lossy().into_owned()
}

fn mount(dest: &str, fstype: &str, options: &[&str]) -> Mount {
    Mount {
        destination: dest.into(),
        fstype: fstype.into(),
        source: fstype.into(),
        options: options.iter().map(|s| s.to_string()).collect(),
    }
}

/// The mounts of runc's default spec.
fn default_mounts() -> Vec<Mount> {
    vec![
        mount("/proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount("/dev/mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
        mount("/sys", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
        mount(
            "/sys/fs/cgroup",
            "cgroup2",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
    ]
}

/// What the host saw on the control channel.
#[derive(Debug, Default)]
struct Transcript {
    ready: Option<(u32, String)>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<ExitStatus>,
    /// The channel ended (EOF) after `Exited`.
    closed: bool,
}

impl Transcript {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

struct Chan {
    s: UnixStream,
    t: Transcript,
}

impl Chan {
    fn send(&mut self, m: HostMsg) -> Result<(), String> {
        write_msg(&mut self.s, &m).map_err(|e| format!("sending {m:?}: {e}"))
    }

    /// Reads messages (recording output and the exit) until `stop` says so; an `Error` from
    /// the agent or the end of the channel fails.
    fn until(
        &mut self,
        what: &str,
        stop: impl Fn(&AgentMsg, &Transcript) -> bool,
    ) -> Result<(), String> {
        loop {
            let m = read_msg::<_, AgentMsg>(&mut self.s)
                .map_err(|e| format!("waiting for {what}: {e}"))?
                .ok_or_else(|| format!("channel closed while waiting for {what}"))?;
            match &m {
                AgentMsg::Ready { version, kernel } => {
                    self.t.ready = Some((*version, kernel.clone()))
                }
                AgentMsg::Stdout(d) => self.t.stdout.extend_from_slice(d),
                AgentMsg::Stderr(d) => self.t.stderr.extend_from_slice(d),
                AgentMsg::Exited(st) => self.t.exit = Some(*st),
                AgentMsg::Error(e) => {
                    return Err(format!("agent error while waiting for {what}: {e}"))
                }
                AgentMsg::Created | AgentMsg::Started { .. } => {}
            }
            if stop(&m, &self.t) {
                return Ok(());
            }
        }
    }

    /// After `Exited`: the agent closes its side; the host closes too.
    fn finish(&mut self) -> Result<(), String> {
        self.until("Exited", |m, _| matches!(m, AgentMsg::Exited(_)))?;
        match read_msg::<_, AgentMsg>(&mut self.s) {
            Ok(None) => self.t.closed = true,
            other => return Err(format!("after Exited: {other:?}")),
        }
        Ok(())
    }
}

/// Accepts the agent's connection on `listener` (polled: a guest that never connects must
/// not hang the test), then runs `talk`.
fn host_side(
    listener: UnixListener,
    talk: impl FnOnce(&mut Chan) -> Result<(), String>,
) -> Result<Transcript, (String, Transcript)> {
    let deadline = Instant::now() + TIMEOUT;
    listener.set_nonblocking(true).unwrap();
    let s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => return Err((format!("accept: {e}"), Transcript::default())),
        }
    };
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut chan = Chan {
        s,
        t: Transcript::default(),
    };
    match talk(&mut chan) {
        Ok(()) => Ok(chan.t),
        Err(e) => Err((e, chan.t)),
    }
}

/// A virtiofs share of the container VM: tag, host directory, `rqemu-fs --readonly`.
type Share<'a> = (&'a str, &'a Path, bool);

/// Boots one container VM with `shares` (each its own `rqemu-fs`); `talk` is the host side of
/// the conversation.
fn boot(
    assets: &GuestAssets,
    shares: &[Share<'_>],
    talk: impl FnOnce(&mut Chan) -> Result<(), String> + Send + 'static,
) -> (Transcript, TimedRun) {
    let work = tempfile::tempdir().unwrap();
    let fs: Vec<Daemon> = shares
        .iter()
        .map(|(tag, dir, readonly)| {
            let opts = FsDaemonOptions {
                tag: tag.to_string(),
                readonly: *readonly,
                ..FsDaemonOptions::default()
            };
            let sub = work.path().join(tag);
            std::fs::create_dir(&sub).unwrap();
            spawn_rqemu_fs(&sub, dir, &opts)
                .unwrap_or_else(|e| panic!("{e}"))
                .0
        })
        .collect();
    let vhost = work.path().join("vsock.vhost");
    let uds = work.path().join("v.sock");
    let mut cmd = Command::new(project_binary("rqemu-vsock").unwrap_or_else(|e| panic!("{e}")));
    cmd.arg("--socket")
        .arg(&vhost)
        .args(["--guest-cid", &GUEST_CID.to_string()])
        .arg("--uds-path")
        .arg(&uds);
    let vsock = Daemon::spawn(
        "rqemu-vsock",
        cmd,
        &vhost,
        &work.path().join("vsock.log"),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let listener = UnixListener::bind(work.path().join(format!("v.sock_{CONTROL_PORT}"))).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(host_side(listener, talk));
    });
    let mut vm = RqemuVm::new(assets).initrd(&agent_initramfs(assets));
    for d in &fs {
        vm = vm.device_socket(&d.socket().display().to_string());
    }
    let cmd = vm
        .device_socket(&vhost.display().to_string())
        .timeout(TIMEOUT)
        .command()
        .unwrap_or_else(|e| panic!("{e}"));
    let run = timed_run(cmd, TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let report = |what: &str| {
        format!(
            "{what}\n{}\n--- rqemu-fs logs ---\n{}\n--- rqemu-vsock log ---\n{}",
            run.transcript(),
            fs.iter()
                .map(|d| d.log())
                .collect::<Vec<_>>()
                .join("\n---\n"),
            vsock.log()
        )
    };
    let t = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(t)) => t,
        Ok(Err((e, t))) => panic!("{}", report(&format!("host side: {e}\ntranscript: {t:?}"))),
        Err(e) => panic!("{}", report(&format!("host side did not finish: {e}"))),
    };
    assert!(
        run.status.is_some(),
        "{}",
        report("the VM did not power itself off")
    );
    assert_eq!(run.code(), Some(0), "{}", report("VMM exit status"));
    assert!(
        run.console.contains("rqemu-agent: connected to the host"),
        "{}",
        report("no agent log line on the console")
    );
    for l in run.console.lines().filter(|l| l.contains("rqemu-agent")) {
        eprintln!("  console: {l}");
    }
    eprintln!(
        "container VM done after {:.1} s (exit {:?})",
        run.elapsed.as_secs_f64(),
        t.exit
    );
    (t, run)
}

#[test]
fn agent_runs_a_container_with_pipes_stdin_and_exit_code() {
    let assets = GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"));
    let release = kernel_release(&assets);
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    make_rootfs(&rootfs);
    let script = "echo out; echo err >&2; uname -r; echo hi > /written; \
                  cat; \
                  echo \"pwd=$(pwd) foo=$FOO host=$(hostname) uid=$(id -u)\"; \
                  cat /etc/hosts; echo msgmax=$(cat /proc/sys/kernel/msgmax); \
                  test -c /dev/null && test -c /dev/urandom && test -L /dev/ptmx && \
                  test -d /dev/shm && test -e /proc/self/fd/0 && echo devok; \
                  grep -q ' /dev/pts devpts ' /proc/mounts && echo ptsok; \
                  cat /data/from-host; touch /data/new 2>/dev/null || echo data-ro; \
                  (sleep 1000 &); \
                  exit 7";
    let spec = ContainerSpec {
        rootfs: Rootfs {
            tag: "rootfs".into(),
            readonly: false,
        },
        hostname: Some("agent-test".into()),
        mounts: {
            let mut m = default_mounts();
            // A host directory bind-mounted read-only: its own share, mounted by tag.
            m.push(Mount {
                destination: "/data".into(),
                fstype: "virtiofs".into(),
                source: "data".into(),
                options: ["rbind", "ro", "nosuid"].map(String::from).to_vec(),
            });
            m
        },
        files: vec![FileCopy {
            destination: "/etc/hosts".into(),
            contents: HOSTS.to_vec(),
            mode: 0o644,
            readonly: true,
        }],
        sysctl: vec![("kernel.msgmax".into(), "12345".into())],
        process: Process {
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/bin".into(), "FOO=bar baz".into()],
            cwd: "/tmp".into(),
            ..Default::default()
        },
        network: Vec::new(),
    };
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("from-host"), "host data\n").unwrap();
    let shares = [
        ("rootfs", rootfs.as_path(), false),
        ("data", data.as_path(), false),
    ];
    let (t, run) = boot(&assets, &shares, move |c| {
        c.until("Ready", |m, _| matches!(m, AgentMsg::Ready { .. }))?;
        // A malformed frame (whole, undecodable) is answered with an Error, not fatal.
        c.s.write_all(&[2, 0, 0, 0, 0xff, 0xff])
            .map_err(|e| e.to_string())?;
        match read_msg::<_, AgentMsg>(&mut c.s) {
            Ok(Some(AgentMsg::Error(e))) if e.contains("malformed") => {}
            other => return Err(format!("after a malformed frame: {other:?}")),
        }
        // Start before Create is refused.
        c.send(HostMsg::Start)?;
        match read_msg::<_, AgentMsg>(&mut c.s) {
            Ok(Some(AgentMsg::Error(e))) if e.contains("Create first") => {}
            other => return Err(format!("after Start without Create: {other:?}")),
        }
        c.send(HostMsg::Create(Box::new(spec)))?;
        c.until("Created", |m, _| matches!(m, AgentMsg::Created))?;
        c.send(HostMsg::Start)?;
        c.until("Started", |m, _| matches!(m, AgentMsg::Started { .. }))?;
        c.send(HostMsg::Stdin(b"line one\n".to_vec()))?;
        c.send(HostMsg::Stdin(b"line two\n".to_vec()))?;
        c.send(HostMsg::CloseStdin)?;
        c.finish()
    });
    let ctx = || {
        format!(
            "transcript: {t:?}\nstdout:\n{}\n{}",
            t.out(),
            run.transcript()
        )
    };
    assert_eq!(t.ready, Some((VERSION, release.clone())), "{}", ctx());
    assert_eq!(t.exit, Some(ExitStatus::Code(7)), "{}", ctx());
    assert!(t.closed, "{}", ctx());
    assert_eq!(t.stderr, b"err\n", "{}", ctx());
    let expected = format!(
        "out\n{release}\nline one\nline two\n\
         pwd=/tmp foo=bar baz host=agent-test uid=0\n{}msgmax=12345\ndevok\nptsok\n\
         host data\ndata-ro\n",
        String::from_utf8_lossy(HOSTS)
    );
    assert_eq!(t.out(), expected, "{}", ctx());
    assert_eq!(
        std::fs::read(rootfs.join("written")).ok().as_deref(),
        Some(&b"hi\n"[..]),
        "the guest's write is not in the host rootfs\n{}",
        ctx()
    );
    // The orphan holding stdout open was killed when the container process exited, so the
    // output was drained without waiting for it.
    assert!(!run.console.contains("output still open"), "{}", ctx());
    // The copied file was bound over an empty mount point: the host's stays empty.
    assert_eq!(std::fs::read(rootfs.join("etc/hosts")).unwrap(), b"");
    assert!(!data.join("new").exists());
}

#[test]
fn agent_runs_a_terminal_container_read_only_as_a_user_and_signals_it() {
    let assets = GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    make_rootfs(&rootfs);
    let script = "tty; test -t 0 && test -t 1 && echo ISATTY; stty size; \
                  echo \"ids=$(id -u):$(id -g):$(id -G)\"; \
                  touch /tmp/x || echo REFUSED; echo READY; read -r x; \
                  echo \"got=$x\"; stty size; exec sleep 1000";
    let spec = ContainerSpec {
        rootfs: Rootfs {
            tag: "rootfs".into(),
            readonly: true,
        },
        mounts: default_mounts(),
        process: Process {
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/bin".into(), "TERM=xterm".into()],
            cwd: "/".into(),
            uid: 1000,
            gid: 1000,
            additional_gids: vec![10],
            terminal: true,
            rows: 33,
            cols: 101,
            no_new_privileges: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let shares = [("rootfs", rootfs.as_path(), false)];
    let (t, run) = boot(&assets, &shares, move |c| {
        c.until("Ready", |m, _| matches!(m, AgentMsg::Ready { .. }))?;
        c.send(HostMsg::Create(Box::new(spec)))?;
        c.until("Created", |m, _| matches!(m, AgentMsg::Created))?;
        c.send(HostMsg::Start)?;
        c.until("READY", |_, t| t.out().contains("READY"))?;
        c.send(HostMsg::Resize {
            rows: 40,
            cols: 120,
        })?;
        c.send(HostMsg::Stdin(b"typed\r".to_vec()))?;
        c.until("the new size", |_, t| t.out().contains("40 120"))?;
        c.send(HostMsg::Signal(15))?;
        c.finish()
    });
    let out = t.out().replace('\r', "");
    let ctx = || format!("transcript: {t:?}\noutput:\n{out}\n{}", run.transcript());
    assert_eq!(t.exit, Some(ExitStatus::Signal(15)), "{}", ctx());
    assert!(t.stderr.is_empty(), "{}", ctx());
    for want in [
        "/dev/pts/0\n",
        "ISATTY\n",
        "33 101\n",
        "ids=1000:1000:1000 10\n",
        "Read-only file system",
        "REFUSED\n",
        "got=typed\n",
    ] {
        assert!(out.contains(want), "{want:?} missing\n{}", ctx());
    }
    assert!(!rootfs.join("tmp/x").exists());
}

#[test]
fn agent_reports_a_failed_start_and_powers_off_when_the_host_leaves() {
    let assets = GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    make_rootfs(&rootfs);
    let spec = ContainerSpec {
        rootfs: Rootfs {
            tag: "rootfs".into(),
            readonly: false,
        },
        process: Process {
            args: vec!["no-such-program".into()],
            env: vec!["PATH=/bin:/usr/bin".into()],
            ..Default::default()
        },
        ..Default::default()
    };
    let shares = [("rootfs", rootfs.as_path(), true)];
    let (_, run) = boot(&assets, &shares, move |c| {
        c.until("Ready", |m, _| matches!(m, AgentMsg::Ready { .. }))?;
        c.send(HostMsg::Create(Box::new(spec)))?;
        c.until("Created", |m, _| matches!(m, AgentMsg::Created))?;
        c.send(HostMsg::Start)?;
        match read_msg::<_, AgentMsg>(&mut c.s) {
            Ok(Some(AgentMsg::Error(e))) if e.contains("execve") && e.contains("No such file") => {
                Ok(())
            }
            other => Err(format!("after Start of a missing program: {other:?}")),
        }
        // Returning drops the channel: the agent must power the VM off.
    });
    assert!(
        run.console
            .contains("rqemu-agent: fatal: the host closed the control channel"),
        "{}",
        run.transcript()
    );
}
