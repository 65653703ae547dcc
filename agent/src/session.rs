//! The control channel's loop: one poll(2) over the channel, SIGCHLD (a signalfd), the
//! process's output and its stdin. Ordering comes from the single loop: `Exited` is sent
//! once the process has been reaped *and* its output drained (every other process is killed
//! when it exits, as in a pid namespace, so the pipes close).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use rqemu_agent_protocol::{self as proto, AgentMsg, ExitStatus, HostMsg, STDIO_CHUNK};

use crate::alog;
use crate::container::{self, Container};
use crate::process::{self, Stdio};
use crate::sys::{self, check};

/// How long output may still come after the process exited (a process stuck in the kernel
/// holding a pipe open does not hold the VM up for ever).
const DRAIN: Duration = Duration::from_secs(5);
/// How long after `Exited` the host may take to close the channel before the power-off.
const LINGER: Duration = Duration::from_secs(5);
/// Host stdin held for a process that does not read it; past this the channel is not read
/// (back-pressure through vsock credit).
const MAX_PENDING: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("control channel: {0}")]
    Channel(#[from] proto::Error),
    #[error("the host closed the control channel before the container exited")]
    Closed,
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

struct Running {
    pid: libc::pid_t,
    terminal: bool,
    /// Where host stdin goes: the pipe, or a duplicate of the pty master.
    stdin: Option<OwnedFd>,
    outputs: Vec<(OwnedFd, Stream)>,
    master: Option<OwnedFd>,
}

pub struct Session {
    chan: File,
    sigfd: OwnedFd,
    container: Option<Container>,
    create_tried: bool,
    running: Option<Running>,
    started: bool,
    pending: Vec<u8>,
    close_stdin: bool,
    exit: Option<(ExitStatus, Instant)>,
    exited_sent: Option<Instant>,
    chan_eof: bool,
}

/// Blocks SIGCHLD and returns a signalfd for it (before any child exists).
pub fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset manipulation on a local set, then sigprocmask/signalfd with it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        check(libc::sigprocmask(
            libc::SIG_BLOCK,
            &set,
            std::ptr::null_mut(),
        ))?;
        sys::owned(libc::signalfd(
            -1,
            &set,
            libc::SFD_CLOEXEC | libc::SFD_NONBLOCK,
        ))
    }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> SessionError {
    move |source| SessionError::Io { what, source }
}

impl Session {
    pub fn new(chan: File, sigfd: OwnedFd) -> Self {
        Self {
            chan,
            sigfd,
            container: None,
            create_tried: false,
            running: None,
            started: false,
            pending: Vec::new(),
            close_stdin: false,
            exit: None,
            exited_sent: None,
            chan_eof: false,
        }
    }

    pub fn send(&mut self, msg: &AgentMsg) -> Result<(), SessionError> {
        proto::write_msg(&mut self.chan, msg).map_err(SessionError::from)
    }

    /// Runs until the container exited, `Exited` was sent and the host closed the channel
    /// (or [`LINGER`] passed).
    pub fn run(&mut self) -> Result<(), SessionError> {
        loop {
            self.maybe_finish()?;
            if let Some(sent) = self.exited_sent {
                if self.chan_eof || sent.elapsed() >= LINGER {
                    return Ok(());
                }
            }
            self.poll_once()?;
        }
    }

    fn timeout_ms(&self) -> libc::c_int {
        let deadline = match (self.exited_sent, self.exit) {
            (Some(sent), _) => Some(sent + LINGER),
            (None, Some((_, at))) => Some(at + DRAIN),
            _ => None,
        };
        match deadline {
            None => -1,
            Some(d) => {
                d.saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(60_000) as libc::c_int
                    + 1
            }
        }
    }

    fn poll_once(&mut self) -> Result<(), SessionError> {
        let mut fds = Vec::with_capacity(5);
        let pfd = |fd: libc::c_int, events: libc::c_short| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let read_chan = !self.chan_eof && self.pending.len() < MAX_PENDING;
        fds.push(pfd(
            if read_chan { self.chan.as_raw_fd() } else { -1 },
            libc::POLLIN,
        ));
        fds.push(pfd(self.sigfd.as_raw_fd(), libc::POLLIN));
        let want_out = self
            .running
            .as_ref()
            .and_then(|r| r.stdin.as_ref())
            .filter(|_| !self.pending.is_empty() || self.close_stdin)
            .map_or(-1, |fd| fd.as_raw_fd());
        fds.push(pfd(want_out, libc::POLLOUT));
        if let Some(r) = &self.running {
            for (fd, _) in &r.outputs {
                fds.push(pfd(fd.as_raw_fd(), libc::POLLIN));
            }
        }
        let timeout = self.timeout_ms();
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(io_err("poll")(e));
        }
        let ready = |i: usize| fds.get(i).is_some_and(|p| p.revents != 0);
        // Output first: what the process wrote before exiting goes out before `Exited`.
        let outputs_ready: Vec<usize> = (3..fds.len()).filter(|&i| ready(i)).collect();
        self.read_outputs(outputs_ready.iter().map(|i| i - 3).collect())?;
        if ready(2) {
            self.write_stdin();
        }
        if ready(1) {
            self.reap()?;
        }
        if ready(0) {
            self.read_host()?;
        }
        Ok(())
    }

    fn read_outputs(&mut self, ready: Vec<usize>) -> Result<(), SessionError> {
        let Some(r) = self.running.as_mut() else {
            return Ok(());
        };
        let mut buf = vec![0u8; STDIO_CHUNK];
        let mut closed = Vec::new();
        let mut msgs = Vec::new();
        for i in ready {
            let Some((fd, stream)) = r.outputs.get(i) else {
                continue;
            };
            match sys::read(fd, &mut buf) {
                Ok(0) => closed.push(i),
                Ok(n) => {
                    let data = buf[..n].to_vec();
                    msgs.push(match stream {
                        Stream::Stdout => AgentMsg::Stdout(data),
                        Stream::Stderr => AgentMsg::Stderr(data),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EIO: the pty's slave side is closed everywhere.
                Err(e) => {
                    if e.raw_os_error() != Some(libc::EIO) {
                        alog!("reading the process output: {e}");
                    }
                    closed.push(i);
                }
            }
        }
        for i in closed.into_iter().rev() {
            r.outputs.remove(i);
        }
        for m in msgs {
            self.send(&m)?;
        }
        Ok(())
    }

    fn write_stdin(&mut self) {
        let Some(r) = self.running.as_mut() else {
            return;
        };
        let Some(fd) = r.stdin.as_ref() else {
            return;
        };
        if !self.pending.is_empty() {
            match sys::write(fd, &self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The process closed its stdin: what the host sends is dropped.
                    self.pending.clear();
                    r.stdin = None;
                }
            }
        }
        // Done: the pipe is closed (end of input); a terminal got its ^D and only the
        // duplicate used for input is dropped (polling it for POLLOUT would spin).
        if self.pending.is_empty() && self.close_stdin {
            r.stdin = None;
        }
    }

    /// Reaps every child (PID 1 adopts orphans); the container's exit is recorded and every
    /// other process killed.
    fn reap(&mut self) -> Result<(), SessionError> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        while sys::read(&self.sigfd, &mut info).is_ok() {}
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return Ok(());
            }
            let Some(r) = self.running.as_mut() else {
                continue;
            };
            if pid != r.pid || self.exit.is_some() {
                continue;
            }
            let st = if libc::WIFSIGNALED(status) {
                ExitStatus::Signal(libc::WTERMSIG(status))
            } else {
                ExitStatus::Code(libc::WEXITSTATUS(status))
            };
            alog!("container process {pid} ended: {st:?}");
            self.exit = Some((st, Instant::now()));
            r.stdin = None;
            self.pending.clear();
            // As when a pid namespace's init dies: nothing of the container outlives it.
            // SAFETY: getpid has no preconditions; kill(-1) from PID 1 spares PID 1.
            if unsafe { libc::getpid() } == 1 {
                // SAFETY: as above.
                unsafe { libc::kill(-1, libc::SIGKILL) };
            }
        }
    }

    fn maybe_finish(&mut self) -> Result<(), SessionError> {
        let Some((status, at)) = self.exit else {
            return Ok(());
        };
        if self.exited_sent.is_some() {
            return Ok(());
        }
        let drained = self.running.as_ref().is_none_or(|r| r.outputs.is_empty());
        if !drained && at.elapsed() < DRAIN {
            return Ok(());
        }
        if !drained {
            alog!("output still open {DRAIN:?} after the exit: not waiting for it");
        }
        self.send(&AgentMsg::Exited(status))?;
        // SAFETY: shutdown of our socket's sending side: the host reads EOF after `Exited`.
        unsafe { libc::shutdown(self.chan.as_raw_fd(), libc::SHUT_WR) };
        self.exited_sent = Some(Instant::now());
        Ok(())
    }

    fn read_host(&mut self) -> Result<(), SessionError> {
        let msg = match proto::read_msg::<_, HostMsg>(&mut self.chan) {
            Ok(Some(m)) => m,
            Ok(None) => {
                self.chan_eof = true;
                return if self.exited_sent.is_some() {
                    Ok(())
                } else {
                    Err(SessionError::Closed)
                };
            }
            // One malformed frame was read whole: say so and go on.
            Err(proto::Error::Decode(e)) => {
                alog!("malformed message from the host: {e}");
                return self.send(&AgentMsg::Error(format!("malformed message: {e}")));
            }
            Err(e) if self.exited_sent.is_some() => {
                alog!("control channel after the exit: {e}");
                self.chan_eof = true;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        self.handle(msg)
    }

    fn handle(&mut self, msg: HostMsg) -> Result<(), SessionError> {
        match msg {
            HostMsg::Create(spec) => {
                if self.create_tried {
                    return self.error("Create: already done (one container per VM)");
                }
                self.create_tried = true;
                match container::create(*spec) {
                    Ok(c) => {
                        self.container = Some(c);
                        self.send(&AgentMsg::Created)
                    }
                    Err(e) => self.error(&format!("Create: {e}")),
                }
            }
            HostMsg::Start => self.start(),
            HostMsg::Stdin(data) => {
                // Dropped once the process's stdin is gone (it closed it, or it exited).
                let gone = self.running.as_ref().is_some_and(|r| r.stdin.is_none());
                if self.exit.is_none() && !self.close_stdin && !gone {
                    self.pending.extend_from_slice(&data);
                }
                Ok(())
            }
            HostMsg::CloseStdin => {
                if !self.close_stdin && self.exit.is_none() {
                    self.close_stdin = true;
                    if self.running.as_ref().is_some_and(|r| r.terminal)
                        || self
                            .container
                            .as_ref()
                            .is_some_and(|c| c.spec.process.terminal)
                    {
                        // A terminal has no end of input but the EOF character (^D).
                        self.pending.push(4);
                    }
                }
                Ok(())
            }
            HostMsg::Signal(sig) => {
                if !(1..=64).contains(&sig) {
                    return self.error(&format!("Signal: {sig} is not a signal number"));
                }
                let Some(r) = &self.running else {
                    return self.error("Signal: the process is not running");
                };
                if self.exit.is_some() {
                    return Ok(());
                }
                // SAFETY: kill(2) with integer arguments; `pid` is our unreaped child.
                match check(unsafe { libc::kill(r.pid, sig) }) {
                    Ok(_) => Ok(()),
                    Err(e) => self.error(&format!("Signal {sig}: {e}")),
                }
            }
            HostMsg::Resize { rows, cols } => {
                if let Some(m) = self.running.as_ref().and_then(|r| r.master.as_ref()) {
                    if let Err(e) = process::resize(m, rows, cols) {
                        alog!("resize: {e}");
                    }
                }
                Ok(())
            }
        }
    }

    fn error(&mut self, text: &str) -> Result<(), SessionError> {
        alog!("error: {text}");
        self.send(&AgentMsg::Error(text.to_string()))
    }

    fn start(&mut self) -> Result<(), SessionError> {
        if self.started {
            return self.error("Start: already started");
        }
        let Some(c) = &self.container else {
            return self.error("Start: no container (Create first)");
        };
        self.started = true;
        let child = match process::spawn(&c.root, &c.spec.process) {
            Ok(child) => child,
            Err(e) => return self.error(&format!("Start: {e}")),
        };
        let running = match child.stdio {
            Stdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                for fd in [&stdin, &stdout, &stderr] {
                    sys::set_nonblocking(fd.as_raw_fd()).map_err(io_err("O_NONBLOCK"))?;
                }
                Running {
                    pid: child.pid,
                    terminal: false,
                    stdin: Some(stdin),
                    outputs: vec![(stdout, Stream::Stdout), (stderr, Stream::Stderr)],
                    master: None,
                }
            }
            Stdio::Pty(master) => {
                sys::set_nonblocking(master.as_raw_fd()).map_err(io_err("O_NONBLOCK"))?;
                let input = sys::dup(&master).map_err(io_err("dup"))?;
                let output = sys::dup(&master).map_err(io_err("dup"))?;
                Running {
                    pid: child.pid,
                    terminal: true,
                    stdin: Some(input),
                    outputs: vec![(output, Stream::Stdout)],
                    master: Some(master),
                }
            }
        };
        alog!(
            "started {:?} as pid {}",
            c.spec.process.args.first(),
            running.pid
        );
        let pid = running.pid as u32;
        self.running = Some(running);
        self.send(&AgentMsg::Started { pid })
    }
}
