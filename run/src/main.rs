//! `rqemu-run`: an OCI runtime with runc's command line that runs each container in its own
//! rqemu microVM (rqemu-vmm + rqemu-fs shares + rqemu-vsock, the guest agent as PID 1).

mod console;
mod log;
mod monitor;
mod mountpoints;
mod network;
mod session;
mod signals;
mod spec;
mod state;
mod vm;

use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use crate::log::{Format, Logger};
use crate::monitor::MonitorConfig;
use crate::state::{Container, Record, Status};

#[derive(Debug, Parser)]
#[command(
    name = "rqemu-run",
    about = "OCI runtime running each container in an rqemu microVM",
    disable_version_flag = true,
    // runc's flag parser takes the last of a repeated option (a wrapper's `--root` then the
    // engine's).
    args_override_self = true
)]
struct Cli {
    /// Directory of the containers' state.
    #[arg(long, global = true, default_value = "/run/rqemu-run")]
    root: PathBuf,
    /// Where errors (and with --debug, debug lines) are written.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    #[arg(long = "log-format", global = true, value_enum, default_value_t = Format::Text)]
    log_format: Format,
    /// Accepted for runc compatibility; cgroups do not apply to a VM's processes.
    #[arg(long = "systemd-cgroup", global = true)]
    systemd_cgroup: bool,
    #[arg(long, global = true)]
    debug: bool,
    /// Guest kernel (default: `vmlinuz` in the guest-assets directory).
    #[arg(long, global = true)]
    kernel: Option<PathBuf>,
    /// Guest-assets directory (vmlinuz, agent-initramfs.cpio.gz); else $RQEMU_GUEST_DIR,
    /// else the built-in defaults.
    #[arg(long = "guest-dir", global = true)]
    guest_dir: Option<PathBuf>,
    #[arg(long, global = true, default_value = "auto", value_parser = ["kvm", "tcg", "auto"])]
    accel: String,
    #[arg(long, global = true, default_value = "512M")]
    memory: String,
    #[arg(long, global = true)]
    cpus: Option<u32>,
    /// Print the version.
    #[arg(long, short = 'v')]
    version: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a container: boots its VM and waits for `start`.
    Create {
        #[arg(long, short = 'b', default_value = ".")]
        bundle: PathBuf,
        #[arg(long = "pid-file")]
        pid_file: Option<PathBuf>,
        #[arg(long = "console-socket")]
        console_socket: Option<PathBuf>,
        #[arg(long = "no-pivot")]
        no_pivot: bool,
        #[arg(long = "no-new-keyring")]
        no_new_keyring: bool,
        #[arg(long = "preserve-fds", default_value_t = 0)]
        preserve_fds: u32,
        id: String,
    },
    /// Run the process of a created container.
    Start { id: String },
    /// Print the OCI state of a container.
    State { id: String },
    /// Send a signal to the container's process (default TERM).
    Kill {
        #[arg(long, short = 'a')]
        all: bool,
        id: String,
        signal: Option<String>,
    },
    /// Remove a stopped container (`--force`: whatever its state).
    Delete {
        #[arg(long, short = 'f')]
        force: bool,
        id: String,
    },
    /// The runtime's features (JSON).
    Features,
    /// List the containers.
    List {
        #[arg(long, short = 'f', default_value = "table")]
        format: String,
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// The host processes of a container.
    Ps {
        #[arg(long, short = 'f', default_value = "table")]
        format: String,
        id: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// (internal) The monitor process of a container.
    #[command(hide = true)]
    Monitor {
        #[arg(long = "ready-fd")]
        ready_fd: i32,
        id: String,
    },
}

/// `--log` and `--log-format` read from the raw arguments, for reporting a command line clap
/// refused (an unknown subcommand such as `exec`) where the engine looks.
fn logger_from_args() -> Logger {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        let eq = format!("{name}=");
        args.iter().enumerate().rev().find_map(|(i, a)| {
            a.strip_prefix(&eq)
                .map(str::to_string)
                .or_else(|| (a == name).then(|| args.get(i + 1).cloned()).flatten())
        })
    };
    Logger {
        file: value("--log").map(PathBuf::from),
        format: match value("--log-format").as_deref() {
            Some("json") => Format::Json,
            _ => Format::Text,
        },
        debug: false,
        stderr: false,
    }
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and friends.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let first = e.to_string();
            let first = first.lines().next().unwrap_or_default();
            logger_from_args().error(first.trim_start_matches("error: "));
            let _ = e.print();
            std::process::exit(1);
        }
    };
    let monitor = matches!(cli.cmd, Some(Cmd::Monitor { .. }));
    let logger = Logger {
        file: cli.log.clone(),
        format: cli.log_format,
        debug: cli.debug,
        stderr: !monitor,
    };
    if cli.version {
        println!(
            "rqemu-run version {}\nspec: {}",
            env!("CARGO_PKG_VERSION"),
            state::OCI_VERSION
        );
        return;
    }
    let code = match run(&cli, &logger) {
        Ok(code) => code,
        Err(e) => {
            logger.error(&format!("{e:#}"));
            1
        }
    };
    std::process::exit(code);
}

fn container(cli: &Cli, id: &str) -> anyhow::Result<Container> {
    Ok(Container::new(&cli.root, id)?)
}

fn run(cli: &Cli, log: &Logger) -> anyhow::Result<i32> {
    let Some(cmd) = &cli.cmd else {
        bail!("no command given (see --help)");
    };
    match cmd {
        Cmd::Create {
            bundle,
            pid_file,
            console_socket,
            id,
            ..
        } => create(
            cli,
            log,
            &container(cli, id)?,
            bundle,
            pid_file.as_deref(),
            console_socket.as_deref(),
        )?,
        Cmd::Start { id } => {
            let c = container(cli, id)?;
            let rec = c.load()?;
            match c.status(&rec) {
                Status::Created => monitor::request_start(&rec.sock_dir.join("start.sock"))
                    .map_err(|e| anyhow::anyhow!("cannot start container {id}: {e}"))?,
                Status::Running => bail!("container {id} is already running"),
                Status::Stopped => bail!("cannot start a container that has stopped"),
            }
        }
        Cmd::State { id } => {
            let c = container(cli, id)?;
            let rec = c.load()?;
            println!("{}", serde_json::to_string_pretty(&c.oci_state(&rec))?);
        }
        Cmd::Kill { id, signal, .. } => {
            let sig = signals::parse(signal.as_deref().unwrap_or("TERM"))?;
            let c = container(cli, id)?;
            let rec = c.load()?;
            if c.status(&rec) == Status::Stopped {
                bail!("container {id} is not running");
            }
            // SAFETY: kill(2) on the monitor whose identity (pid + start time) was checked.
            if unsafe { libc::kill(rec.pid, sig) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("kill {} (monitor of {id})", rec.pid));
            }
        }
        Cmd::Delete { force, id } => {
            let c = container(cli, id)?;
            if !c.exists() {
                if *force {
                    return Ok(0);
                }
                bail!("container {id} does not exist");
            }
            delete(&c, *force)?;
        }
        Cmd::Features => println!("{}", serde_json::to_string_pretty(&features())?),
        Cmd::List { format, quiet } => list(cli, format, *quiet)?,
        Cmd::Ps { format, id, .. } => {
            let c = container(cli, id)?;
            let rec = c.load()?;
            let pids: Vec<i32> = if c.status(&rec) == Status::Stopped {
                vec![]
            } else {
                vec![rec.pid]
            };
            if format == "json" {
                println!("{}", serde_json::to_string(&pids)?);
            } else {
                println!("PID");
                for p in pids {
                    println!("{p}");
                }
            }
        }
        Cmd::Monitor { ready_fd, id } => {
            return Ok(monitor::run(&container(cli, id)?, *ready_fd, log));
        }
    }
    Ok(0)
}

fn features() -> serde_json::Value {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": state::OCI_VERSION,
        "hooks": [],
        "mountOptions": ["ro", "rw", "bind", "rbind", "nosuid", "nodev", "noexec",
                         "relatime", "noatime", "private", "rprivate"],
        "linux": {
            "namespaces": ["network"],
            "capabilities": [],
            "cgroup": {"v1": false, "v2": false, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": false},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
        },
        "annotations": {
            "io.github.rqemu.run.vm": "each container runs in its own rqemu microVM",
        },
    })
}

fn create(
    cli: &Cli,
    log: &Logger,
    c: &Container,
    bundle: &Path,
    pid_file: Option<&Path>,
    console_socket: Option<&Path>,
) -> anyhow::Result<()> {
    let bundle = bundle
        .canonicalize()
        .with_context(|| format!("bundle {}", bundle.display()))?;
    let reduced = spec::load(&bundle)?;
    for what in &reduced.ignored {
        log.warn(&format!("container {}: ignored: {what}", c.id));
    }
    if reduced.spec.process.terminal && console_socket.is_none() {
        bail!("process.terminal is true but no --console-socket was given");
    }
    let (kernel, initrd) = vm::locate_assets(cli.guest_dir.as_deref(), cli.kernel.as_deref())?;
    if reduced.spec.rootfs.readonly {
        // A failure here shows again, and better said, as the agent's error.
        match mountpoints::prepare(&reduced.rootfs, &reduced.spec) {
            Ok(made) => {
                for m in made {
                    log.debug(&format!("container {}: created mount point {m}", c.id));
                }
            }
            Err(e) => log.warn(&format!("container {}: {e}", c.id)),
        }
    }
    let console_socket =
        console_socket.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
    c.create_dir(&cli.root)?;
    let sock_dir = state::sock_dir_for(&c.dir);
    let result = (|| -> anyhow::Result<()> {
        let cfg = MonitorConfig {
            spec: reduced.spec.clone(),
            shares: reduced.shares.clone(),
            vm: vm::VmSettings {
                kernel,
                initrd,
                accel: cli.accel.clone(),
                memory: cli.memory.clone(),
                cpus: cli.cpus,
                debug: cli.debug,
            },
            console_socket,
            sock_dir: sock_dir.clone(),
            netns: reduced.netns.clone(),
        };
        state::write_atomic(&c.path("monitor.json"), &serde_json::to_vec(&cfg)?)?;
        let pid = spawn_monitor(cli, c)?;
        let rec = Record {
            id: c.id.clone(),
            bundle: bundle.clone(),
            rootfs: reduced.rootfs.clone(),
            pid,
            pid_start: state::process_start(pid).unwrap_or(0),
            created: state::now_rfc3339(),
            annotations: reduced.annotations.clone(),
            sock_dir: sock_dir.clone(),
        };
        c.save(&rec)?;
        if let Some(p) = pid_file {
            let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            state::write_atomic(&p, pid.to_string().as_bytes())?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&c.dir);
        let _ = std::fs::remove_dir_all(&sock_dir);
    }
    result
}

/// Starts the monitor (this executable, `monitor` subcommand) in a session of its own with
/// our stdio; waits for its readiness report; returns its pid.
fn spawn_monitor(cli: &Cli, c: &Container) -> anyhow::Result<i32> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the array with two new fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: both fds are new and owned here.
    let (mut r, w) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let wfd = monitor::raw(&w);
    let exe = std::env::current_exe().context("locating rqemu-run")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root").arg(&cli.root);
    if let Some(l) = &cli.log {
        cmd.arg("--log")
            .arg(std::path::absolute(l).unwrap_or_else(|_| l.clone()));
    }
    cmd.args([
        "--log-format",
        match cli.log_format {
            Format::Json => "json",
            Format::Text => "text",
        },
    ]);
    if cli.debug {
        cmd.arg("--debug");
    }
    cmd.args(["monitor", "--ready-fd", &wfd.to_string(), &c.id]);
    // SAFETY: between fork and exec the child only calls setsid and fcntl (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::fcntl(wfd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the monitor")?;
    drop(w);
    // One line: `ok` or `error: ...` (EOF without it: the monitor died).
    let mut reply = String::new();
    let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut r), &mut reply);
    match reply.trim() {
        "ok" => Ok(child.id() as i32),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            let why = other.strip_prefix("error: ").unwrap_or(other);
            if why.is_empty() {
                bail!("the monitor of {} died while setting up", c.id);
            }
            bail!("{why}");
        }
    }
}

/// Kills what runs and removes every file of the container.
fn delete(c: &Container, force: bool) -> anyhow::Result<()> {
    let rec = c.load()?;
    let status = c.status(&rec);
    if status == Status::Running && !force {
        bail!(
            "cannot delete container {} that is not stopped: use --force",
            c.id
        );
    }
    let wait = |what: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while what() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    if state::process_alive(rec.pid, rec.pid_start) {
        // SAFETY: kill(2) on the monitor (identity checked just above).
        unsafe { libc::kill(rec.pid, libc::SIGKILL) };
        wait(&|| state::process_alive(rec.pid, rec.pid_start));
    }
    // The VM's processes die with the monitor (PDEATHSIG); make sure of it when the monitor
    // did not get to stop them.
    if c.exit_record().is_none() {
        if let Some(pgid) = c.pgid().filter(|p| *p > 1) {
            // SAFETY: kill(2) on the process group the monitor made for its children.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            // SAFETY: signal 0 only checks for existence.
            wait(&|| unsafe { libc::kill(-pgid, 0) } == 0);
        }
    }
    // What the monitor added to the network namespace, when it did not get to remove it.
    if let Some(net) = network::load_record(&c.path(network::RECORD)) {
        network::teardown(&net).context("removing the container's taps and tc qdiscs")?;
    }
    if rec.sock_dir != c.dir {
        let _ = std::fs::remove_dir_all(&rec.sock_dir);
    }
    std::fs::remove_dir_all(&c.dir).with_context(|| format!("removing {}", c.dir.display()))?;
    Ok(())
}

fn list(cli: &Cli, format: &str, quiet: bool) -> anyhow::Result<()> {
    let mut states = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&cli.root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(c) = Container::new(&cli.root, &name) else {
                continue;
            };
            if let Ok(rec) = c.load() {
                states.push(c.oci_state(&rec));
            }
        }
    }
    states.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    if format == "json" {
        println!("{}", serde_json::to_string(&states)?);
    } else if quiet {
        for s in &states {
            println!("{}", s["id"].as_str().unwrap_or(""));
        }
    } else {
        println!("ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER");
        for s in &states {
            println!(
                "{}\t{}\t{}\t{}\t{}\t",
                s["id"].as_str().unwrap_or(""),
                s["pid"],
                s["status"].as_str().unwrap_or(""),
                s["bundle"].as_str().unwrap_or(""),
                s["created"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
