//! The monitor: the host process whose pid `create` reports. It keeps `create`'s stdio (or a
//! pseudo-terminal's slave with `--console-socket`) as the container's, starts the daemons and
//! the VMM as its children, talks to the agent ([`Session`]), forwards the signals it receives,
//! and exits with the container's exit code once the VM is down.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::Duration;

use rqemu_agent_protocol::{read_msg, AgentMsg, ContainerSpec};
use serde::{Deserialize, Serialize};

use crate::console;
use crate::log::Logger;
use crate::session::{Event, Outcome, Session, LOST};
use crate::spec::Share;
use crate::state::{write_atomic, Container, ExitRecord};
use crate::vm::{Children, Sockets, VmSettings};

/// How long the agent's last frames may trail the VMM's exit.
const AGENT_GRACE: Duration = Duration::from_secs(3);
/// How long a guest may take to power off after its process ended.
const POWEROFF_GRACE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("monitor config: {0}")]
    Config(#[source] serde_json::Error),
    #[error(transparent)]
    Vm(#[from] crate::vm::Error),
    #[error(transparent)]
    Console(#[from] console::Error),
    #[error(transparent)]
    State(#[from] crate::state::Error),
    #[error(transparent)]
    Network(#[from] crate::network::Error),
}

/// What `create` hands the monitor (`monitor.json` in the state directory).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MonitorConfig {
    pub spec: ContainerSpec,
    pub shares: Vec<Share>,
    pub vm: VmSettings,
    pub console_socket: Option<PathBuf>,
    pub sock_dir: PathBuf,
    /// The network namespace whose interfaces the guest takes over (see [`crate::network`]).
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The signals the monitor takes over (all catchable ones but the synchronous faults).
fn forwarded_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in 1..=crate::signals::MAX_SIGNAL {
            let sync = [
                libc::SIGKILL,
                libc::SIGSTOP,
                libc::SIGSEGV,
                libc::SIGBUS,
                libc::SIGFPE,
                libc::SIGILL,
                libc::SIGTRAP,
                libc::SIGSYS,
            ];
            // glibc's own real-time signals (32, 33) are not ours to take.
            if sync.contains(&s) || s == 32 || s == 33 {
                continue;
            }
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn spawn_signal_thread(tx: Sender<Event>, set: libc::sigset_t, tty: Option<File>) {
    std::thread::spawn(move || loop {
        let mut sig = 0;
        // SAFETY: sigwait on a set blocked in every thread of this process.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        let ev = match sig {
            libc::SIGCHLD => Event::VmExited(String::new()),
            libc::SIGPIPE => continue,
            libc::SIGWINCH => match tty.as_ref().and_then(console::size) {
                Some((r, c)) => Event::Resize(r, c),
                None => continue,
            },
            s => Event::Signal(s),
        };
        if tx.send(ev).is_err() {
            break;
        }
    });
}

fn spawn_agent_thread(tx: Sender<Event>, listener: UnixListener) {
    std::thread::spawn(move || {
        let Ok((conn, _)) = listener.accept() else {
            return;
        };
        let Ok(mut reader) = conn.try_clone() else {
            return;
        };
        if tx.send(Event::AgentConnected(conn)).is_err() {
            return;
        }
        loop {
            let ev = match read_msg::<_, AgentMsg>(&mut reader) {
                Ok(Some(m)) => Event::Agent(m),
                Ok(None) => Event::AgentClosed("end of stream".into()),
                Err(e) => Event::AgentClosed(e.to_string()),
            };
            let last = matches!(ev, Event::AgentClosed(_));
            if tx.send(ev).is_err() || last {
                break;
            }
        }
    });
}

fn spawn_start_thread(tx: Sender<Event>, listener: UnixListener) {
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let mut line = [0u8; 6];
            if conn.read_exact(&mut line).is_ok()
                && &line == b"start\n"
                && tx.send(Event::Start(conn)).is_err()
            {
                break;
            }
        }
    });
}

fn spawn_stdin_thread(tx: Sender<Event>, mut input: File, terminal: bool) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; rqemu_agent_protocol::STDIO_CHUNK];
        loop {
            match input.read(&mut buf) {
                Ok(0) => {
                    let _ = tx.send(Event::StdinEof);
                    break;
                }
                Ok(n) => {
                    if tx.send(Event::Stdin(buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A terminal whose master closed reads EIO: the engine detached.
                Err(_) => {
                    if !terminal {
                        let _ = tx.send(Event::StdinEof);
                    }
                    break;
                }
            }
        }
    });
}

fn dup_file(fd: i32) -> Result<File, Error> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd we own (or -1).
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        return Err(io(Path::new("stdio"))(std::io::Error::last_os_error()));
    }
    // SAFETY: `n` is a fresh fd owned by nobody else.
    Ok(unsafe { File::from_raw_fd(n) })
}

/// Set-up before `create` may return: console, listeners, daemons, VMM.
struct Prepared {
    input: File,
    output: File,
    errput: File,
    tty: Option<File>,
    agent: UnixListener,
    start: UnixListener,
    children: Children,
}

/// Joins the spec's network namespace (when it names one): taps and tc redirects beside its
/// interfaces, recorded in the state directory; the interfaces go into the agent's spec.
fn prepare_network(
    c: &Container,
    cfg: &mut MonitorConfig,
) -> Result<Vec<crate::network::Nic>, Error> {
    let Some(netns) = cfg.netns.clone() else {
        return Ok(Vec::new());
    };
    let rec_path = c.path(crate::network::RECORD);
    let mut write_err = None;
    let result = crate::network::setup(&netns, &mut |rec| {
        if let Err(e) = serde_json::to_vec(rec)
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|t| std::fs::write(&rec_path, t))
        {
            write_err.get_or_insert(e);
        }
    });
    if let Some(e) = write_err {
        return Err(io(&rec_path)(e));
    }
    let nics = result?;
    cfg.spec.network = nics.iter().map(|n| n.interface.clone()).collect();
    Ok(nics)
}

/// Removes what [`prepare_network`] added (after the children are gone).
fn teardown_network(c: &Container, log: &Logger) {
    let rec_path = c.path(crate::network::RECORD);
    if let Some(rec) = crate::network::load_record(&rec_path) {
        match crate::network::teardown(&rec) {
            Ok(()) => {
                let _ = std::fs::remove_file(&rec_path);
            }
            Err(e) => log.error(&format!("container {}: {e}", c.id)),
        }
    }
}

fn prepare(c: &Container, cfg: &mut MonitorConfig) -> Result<Prepared, Error> {
    let (input, output, errput, tty) = match &cfg.console_socket {
        Some(sock) => {
            let p = &cfg.spec.process;
            let pty = console::open(p.rows, p.cols)?;
            console::make_controlling(&pty.slave)?;
            console::send_fd(sock, &pty.master, &pty.name)?;
            drop(pty.master);
            let s = pty.slave;
            let dup = |f: &File| f.try_clone().map_err(io(Path::new("pty")));
            (dup(&s)?, dup(&s)?, dup(&s)?, Some(s))
        }
        None => (dup_file(0)?, dup_file(1)?, dup_file(2)?, None),
    };
    crate::state::private_dir(&cfg.sock_dir)?;
    let socks = Sockets {
        dir: cfg.sock_dir.clone(),
    };
    let agent = UnixListener::bind(socks.control()).map_err(io(&socks.control()))?;
    let start = UnixListener::bind(socks.start()).map_err(io(&socks.start()))?;
    let nics = prepare_network(c, cfg)?;
    let mut children = Children::default();
    if let Err(e) = children.start(&cfg.vm, &cfg.shares, nics, &socks, &c.dir) {
        children.stop(Duration::ZERO);
        return Err(e.into());
    }
    write_atomic(&c.path("pgid"), children.pgid.to_string().as_bytes())?;
    Ok(Prepared {
        input,
        output,
        errput,
        tty,
        agent,
        start,
        children,
    })
}

/// Runs the monitor of container `c`; reports readiness (`ok` or `error: ...`) on
/// `ready_fd`; returns the exit code.
pub fn run(c: &Container, ready_fd: i32, log: &Logger) -> i32 {
    // SAFETY: the fd was handed to us by `create` for this purpose only.
    let mut ready = unsafe { File::from_raw_fd(ready_fd) };
    // Not for the children: `create` waits for this pipe's answer.
    // SAFETY: fcntl on the fd just taken over.
    unsafe { libc::fcntl(ready_fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let set = forwarded_signals();
    // SAFETY: blocks the signals in this (the only) thread before any other exists; children
    // get an empty mask back in their pre_exec.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let cfg_path = c.path("monitor.json");
    let cfg: Result<MonitorConfig, Error> = std::fs::read(&cfg_path)
        .map_err(io(&cfg_path))
        .and_then(|t| serde_json::from_slice(&t).map_err(Error::Config));
    let prepared = cfg.and_then(|mut cfg| prepare(c, &mut cfg).map(|p| (cfg, p)));
    let (cfg, p) = match prepared {
        Ok(x) => x,
        Err(e) => {
            teardown_network(c, log);
            let _ = writeln!(ready, "error: {e}");
            return 1;
        }
    };
    let _ = writeln!(ready, "ok");
    drop(ready);
    let Prepared {
        input,
        output,
        errput,
        tty,
        agent,
        start,
        mut children,
    } = p;

    let (tx, rx) = mpsc::channel();
    spawn_signal_thread(
        tx.clone(),
        set,
        tty.as_ref().and_then(|t| t.try_clone().ok()),
    );
    spawn_agent_thread(tx.clone(), agent);
    spawn_start_thread(tx.clone(), start);
    spawn_stdin_thread(tx.clone(), input, cfg.spec.process.terminal);
    drop(tx);

    let mut session = Session::new(cfg.spec, output, errput, Some(c.path("started")));
    let outcome = loop {
        let ev =
            if session.vm_gone {
                match rx.recv_timeout(AGENT_GRACE) {
                    Ok(ev) => ev,
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                        // The state directory goes with `delete`: say here what the guest said.
                        let why =
                            format!(
                        "the VM stopped before the container process ended ({}); the end of \
                         its console and of rqemu-vmm's log:\n{}\n{}",
                        session.log.last().map(String::as_str).unwrap_or("rqemu-vmm exited"),
                        tail(&c.path("console.log"), 15),
                        tail(&c.path("rqemu-vmm.log"), 5)
                    );
                        break session.fail(why);
                    }
                }
            } else {
                match rx.recv() {
                    Ok(ev) => ev,
                    Err(_) => {
                        break Outcome {
                            code: LOST,
                            clean: false,
                            why: "every event source ended".into(),
                        }
                    }
                }
            };
        let ev = match ev {
            // SIGCHLD: only the VMM's exit matters (a daemon's death shows in the guest).
            Event::VmExited(_) => match children.vmm_exited() {
                Some(st) if !session.vm_gone => Event::VmExited(st.to_string()),
                _ => continue,
            },
            ev => ev,
        };
        if let Some(o) = session.handle(ev) {
            break o;
        }
    };
    for line in &session.log {
        log.debug(line);
    }
    session.close_channel();
    if outcome.clean {
        // The agent powers the guest off once the channel is closed after Exited.
        let deadline = std::time::Instant::now() + POWEROFF_GRACE;
        while children.vmm_exited().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    } else {
        log.error(&format!("container {}: {}", c.id, outcome.why));
    }
    children.stop(Duration::from_secs(2));
    teardown_network(c, log);
    let text = serde_json::to_vec(&ExitRecord { code: outcome.code }).unwrap_or_default();
    if let Err(e) = write_atomic(&c.path("exit.json"), &text) {
        log.error(&e.to_string());
    }
    let _ = std::fs::write(
        c.path("monitor.log"),
        format!(
            "{}\nexit code {}: {}\n",
            session.log.join("\n"),
            outcome.code,
            outcome.why
        ),
    );
    outcome.code
}

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Asks the monitor to start the process (`rqemu-run start`).
pub fn request_start(sock: &Path) -> Result<(), String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    s.write_all(b"start\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    match reply.trim() {
        "ok" => Ok(()),
        "" => Err("the monitor ended before taking start".into()),
        other => Err(other.to_string()),
    }
}

/// Raw fd of a `File` (for `create`'s readiness pipe).
pub fn raw(f: &File) -> i32 {
    f.as_raw_fd()
}
