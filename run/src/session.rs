//! The monitor's conversation with the agent, driven by events (agent frames, stdin, signals,
//! `start` requests, the VM's end) so it runs the same against the real agent and a fake one.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use rqemu_agent_protocol::{
    write_msg, AgentMsg, ContainerSpec, ExitStatus, HostMsg, STDIO_CHUNK, VERSION,
};

use crate::signals::harmless_by_default;

/// Exit code of a container whose VM ended without the agent reporting the process's end,
/// or whose agent could not run it.
pub const LOST: i32 = 255;

#[derive(Debug)]
pub enum Event {
    /// The agent connected (hybrid vsock, host port `CONTROL_PORT`).
    AgentConnected(UnixStream),
    Agent(AgentMsg),
    /// The control channel ended or carried garbage.
    AgentClosed(String),
    Stdin(Vec<u8>),
    StdinEof,
    /// A signal the monitor received (to forward).
    Signal(i32),
    /// The terminal was resized.
    Resize(u16, u16),
    /// `rqemu-run start`: the reply goes on the stream.
    Start(UnixStream),
    /// rqemu-vmm exited.
    VmExited(String),
}

/// How the container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub code: i32,
    /// Whether the process itself reported its end (else the VM is torn down at once).
    pub clean: bool,
    pub why: String,
}

pub struct Session<W: Write, E: Write> {
    spec: Option<ContainerSpec>,
    terminal: bool,
    agent: Option<UnixStream>,
    stdout: W,
    stderr: E,
    /// Where `start` is recorded (the state directory's `started`).
    started_marker: Option<PathBuf>,
    start_requested: bool,
    created: bool,
    start_sent: bool,
    running: bool,
    stdin: Vec<u8>,
    stdin_eof: bool,
    signals: Vec<i32>,
    size: Option<(u16, u16)>,
    pub vm_gone: bool,
    pub kernel: Option<String>,
    pub log: Vec<String>,
}

impl<W: Write, E: Write> Session<W, E> {
    pub fn new(spec: ContainerSpec, stdout: W, stderr: E, started_marker: Option<PathBuf>) -> Self {
        Self {
            terminal: spec.process.terminal,
            spec: Some(spec),
            agent: None,
            stdout,
            stderr,
            started_marker,
            start_requested: false,
            created: false,
            start_sent: false,
            running: false,
            stdin: Vec::new(),
            stdin_eof: false,
            signals: Vec::new(),
            size: None,
            vm_gone: false,
            kernel: None,
            log: Vec::new(),
        }
    }

    fn send(&mut self, msg: &HostMsg) -> Result<(), Outcome> {
        let Some(a) = self.agent.as_mut() else {
            return Ok(());
        };
        write_msg(a, msg).map_err(|e| Outcome {
            code: LOST,
            clean: false,
            why: format!("control channel: {e}"),
        })
    }

    /// Ends the container on a failure of the VM or agent, saying why on its stderr.
    pub fn fail(&mut self, why: String) -> Outcome {
        let _ = writeln!(self.stderr, "rqemu-run: {why}");
        let _ = self.stderr.flush();
        Outcome {
            code: LOST,
            clean: false,
            why,
        }
    }

    /// Sends what waited for the process to run.
    fn flush_pending(&mut self) -> Result<(), Outcome> {
        if !self.running {
            return Ok(());
        }
        let data = std::mem::take(&mut self.stdin);
        for chunk in data.chunks(STDIO_CHUNK) {
            self.send(&HostMsg::Stdin(chunk.to_vec()))?;
        }
        if self.stdin_eof && !self.terminal {
            self.stdin_eof = false;
            self.send(&HostMsg::CloseStdin)?;
        }
        for s in std::mem::take(&mut self.signals) {
            self.send(&HostMsg::Signal(s))?;
        }
        if let Some((rows, cols)) = self.size.take() {
            self.send(&HostMsg::Resize { rows, cols })?;
        }
        Ok(())
    }

    fn maybe_start(&mut self) -> Result<(), Outcome> {
        if self.start_requested && self.created && !self.start_sent {
            self.start_sent = true;
            self.send(&HostMsg::Start)?;
        }
        Ok(())
    }

    /// Closes the control channel: after `Exited` the agent powers the guest off as soon as
    /// the host closes it.
    pub fn close_channel(&mut self) {
        if let Some(a) = self.agent.take() {
            let _ = a.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Handles one event; `Some` once the container has ended.
    pub fn handle(&mut self, ev: Event) -> Option<Outcome> {
        self.step(ev).err()
    }

    fn step(&mut self, ev: Event) -> Result<(), Outcome> {
        match ev {
            Event::AgentConnected(s) => {
                if self.agent.is_some() {
                    self.log
                        .push("a second control connection was refused".into());
                } else {
                    self.agent = Some(s);
                }
            }
            Event::Agent(msg) => self.agent_msg(msg)?,
            Event::AgentClosed(why) => {
                return Err(self.fail(format!("the guest agent went away: {why}")));
            }
            Event::Stdin(data) => {
                self.stdin.extend_from_slice(&data);
                self.flush_pending()?;
            }
            Event::StdinEof => {
                self.stdin_eof = true;
                self.flush_pending()?;
            }
            Event::Signal(sig) => {
                if self.start_requested {
                    self.signals.push(sig);
                    self.flush_pending()?;
                } else if !harmless_by_default(sig) {
                    return Err(Outcome {
                        code: 128 + sig,
                        clean: false,
                        why: format!("signal {sig} before the process ran"),
                    });
                }
            }
            Event::Resize(rows, cols) => {
                self.size = Some((rows, cols));
                self.flush_pending()?;
            }
            Event::Start(mut s) => {
                let reply = match &self.started_marker {
                    Some(p) => match std::fs::write(p, b"") {
                        Ok(()) => "ok\n".to_string(),
                        Err(e) => format!("error: {}: {e}\n", p.display()),
                    },
                    None => "ok\n".into(),
                };
                let _ = s.write_all(reply.as_bytes());
                self.start_requested = true;
                self.maybe_start()?;
            }
            Event::VmExited(why) => {
                self.vm_gone = true;
                self.log.push(format!("rqemu-vmm exited: {why}"));
            }
        }
        Ok(())
    }

    fn agent_msg(&mut self, msg: AgentMsg) -> Result<(), Outcome> {
        match msg {
            AgentMsg::Ready { version, kernel } => {
                if version != VERSION {
                    return Err(self.fail(format!(
                        "guest agent speaks protocol {version}, rqemu-run {VERSION}: \
                         rebuild the agent initramfs (scripts/guest-assets.sh)"
                    )));
                }
                self.log.push(format!("agent ready, guest kernel {kernel}"));
                self.kernel = Some(kernel);
                if let Some(spec) = self.spec.take() {
                    self.send(&HostMsg::Create(Box::new(spec)))?;
                }
            }
            AgentMsg::Created => {
                self.created = true;
                self.maybe_start()?;
            }
            AgentMsg::Started { pid } => {
                self.log.push(format!("process started, guest pid {pid}"));
                self.running = true;
                self.flush_pending()?;
            }
            AgentMsg::Stdout(d) => {
                let _ = self.stdout.write_all(&d);
                let _ = self.stdout.flush();
            }
            AgentMsg::Stderr(d) => {
                let _ = self.stderr.write_all(&d);
                let _ = self.stderr.flush();
            }
            AgentMsg::Exited(st) => {
                let _ = self.stdout.flush();
                let _ = self.stderr.flush();
                let why = match st {
                    ExitStatus::Code(c) => format!("exited with code {c}"),
                    ExitStatus::Signal(s) => format!("killed by signal {s}"),
                };
                return Err(Outcome {
                    code: st.shell_code(),
                    clean: true,
                    why,
                });
            }
            AgentMsg::Error(text) => {
                if self.running {
                    self.log.push(format!("agent: {text}"));
                } else {
                    let mut o = self.fail(format!("guest agent: {text}"));
                    if self.start_sent {
                        // The shell's (and podman's) codes for a program that cannot be run.
                        if text.contains("No such file or directory") {
                            o.code = 127;
                        } else if text.contains("Permission denied") {
                            o.code = 126;
                        }
                    }
                    return Err(o);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rqemu_agent_protocol::read_msg;
    use std::io::Read;
    use std::sync::mpsc;

    /// Feeds the session from a channel as the monitor does, with the agent's frames read by a
    /// thread; returns the outcome, stdout, stderr.
    fn drive(
        spec: ContainerSpec,
        agent: impl FnOnce(UnixStream) + Send + 'static,
        before: Vec<Event>,
        after_start: Vec<Event>,
    ) -> (Outcome, Vec<u8>, Vec<u8>) {
        let (host, guest) = UnixStream::pair().unwrap();
        let fake = std::thread::spawn(move || agent(guest));
        let (tx, rx) = mpsc::channel();
        let reader = host.try_clone().unwrap();
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut r = reader;
                loop {
                    match read_msg::<_, AgentMsg>(&mut r) {
                        Ok(Some(m)) => {
                            if tx.send(Event::Agent(m)).is_err() {
                                break;
                            }
                        }
                        Ok(None) => {
                            let _ = tx.send(Event::AgentClosed("end of stream".into()));
                            break;
                        }
                        Err(e) => {
                            let _ = tx.send(Event::AgentClosed(e.to_string()));
                            break;
                        }
                    }
                }
            });
        }
        let mut s = Session::new(spec, Vec::new(), Vec::new(), None);
        for ev in before {
            assert!(s.handle(ev).is_none());
        }
        assert!(s.handle(Event::AgentConnected(host)).is_none());
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(s.handle(Event::Start(a)).is_none());
        for ev in after_start {
            tx.send(ev).unwrap();
        }
        let out = loop {
            if let Some(o) = s.handle(rx.recv().unwrap()) {
                break o;
            }
        };
        if let Some(a) = &s.agent {
            let _ = a.shutdown(std::net::Shutdown::Both);
        }
        fake.join().unwrap();
        (out, s.stdout, s.stderr)
    }

    fn expect(r: &mut UnixStream) -> HostMsg {
        read_msg::<_, HostMsg>(r).unwrap().expect("host closed")
    }

    fn send(w: &mut UnixStream, m: AgentMsg) {
        write_msg(w, &m).unwrap();
    }

    /// The fake agent's side up to the host's `Start`: Ready, Create answered with Created.
    fn ready_created(g: &mut UnixStream) {
        send(
            g,
            AgentMsg::Ready {
                version: VERSION,
                kernel: "k".into(),
            },
        );
        assert!(matches!(expect(g), HostMsg::Create(_)), "no Create");
        send(g, AgentMsg::Created);
        assert_eq!(expect(g), HostMsg::Start);
    }

    fn spec() -> ContainerSpec {
        let mut s = ContainerSpec::default();
        s.process.args = vec!["/bin/cat".into()];
        s
    }

    #[test]
    fn full_conversation_with_a_fake_agent() {
        let (out, stdout, stderr) = drive(
            spec(),
            |mut g| {
                send(
                    &mut g,
                    AgentMsg::Ready {
                        version: VERSION,
                        kernel: "6.1.0-guest".into(),
                    },
                );
                let HostMsg::Create(c) = expect(&mut g) else {
                    panic!("no Create")
                };
                assert_eq!(c.process.args, ["/bin/cat"]);
                send(&mut g, AgentMsg::Created);
                assert_eq!(expect(&mut g), HostMsg::Start);
                send(&mut g, AgentMsg::Started { pid: 7 });
                // Input that arrived before the process ran, then its end.
                let mut input = Vec::new();
                loop {
                    match expect(&mut g) {
                        HostMsg::Stdin(d) => input.extend(d),
                        HostMsg::CloseStdin => break,
                        m => panic!("unexpected {m:?}"),
                    }
                }
                assert_eq!(input, b"hello");
                assert_eq!(expect(&mut g), HostMsg::Signal(10));
                send(&mut g, AgentMsg::Stdout(input));
                send(&mut g, AgentMsg::Stderr(b"warn\n".to_vec()));
                send(&mut g, AgentMsg::Exited(ExitStatus::Code(3)));
                let mut rest = Vec::new();
                let _ = g.read_to_end(&mut rest);
            },
            vec![
                Event::Stdin(b"hel".to_vec()),
                Event::Stdin(b"lo".to_vec()),
                Event::StdinEof,
            ],
            vec![Event::Signal(10)],
        );
        assert_eq!(out.code, 3);
        assert!(out.clean);
        assert_eq!(stdout, b"hello");
        assert_eq!(stderr, b"warn\n");
    }

    #[test]
    fn signal_death_is_128_plus_n() {
        let (out, _, _) = drive(
            spec(),
            |mut g| {
                ready_created(&mut g);
                send(&mut g, AgentMsg::Started { pid: 1 });
                send(&mut g, AgentMsg::Exited(ExitStatus::Signal(15)));
            },
            vec![],
            vec![],
        );
        assert_eq!(out.code, 143);
    }

    #[test]
    fn wrong_version_and_start_errors_end_the_container() {
        let (out, _, stderr) = drive(
            spec(),
            |mut g| {
                send(
                    &mut g,
                    AgentMsg::Ready {
                        version: VERSION + 1,
                        kernel: "k".into(),
                    },
                )
            },
            vec![],
            vec![],
        );
        assert_eq!(out.code, LOST);
        assert!(String::from_utf8_lossy(&stderr).contains("protocol"));
        let (out, _, stderr) = drive(
            spec(),
            |mut g| {
                ready_created(&mut g);
                send(
                    &mut g,
                    AgentMsg::Error("execve /bin/nope: No such file or directory".into()),
                );
            },
            vec![],
            vec![],
        );
        assert_eq!(out.code, 127);
        assert!(String::from_utf8_lossy(&stderr).contains("/bin/nope"));
    }

    #[test]
    fn garbage_from_the_guest_ends_the_session_without_panic() {
        let (out, _, _) = drive(
            spec(),
            |mut g| {
                use std::io::Write;
                g.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
            },
            vec![],
            vec![],
        );
        assert_eq!(out.code, LOST);
        assert!(!out.clean);
    }

    #[test]
    fn a_signal_before_start_ends_a_created_container() {
        let mut s = Session::new(spec(), Vec::new(), Vec::new(), None);
        assert!(s.handle(Event::Signal(libc::SIGWINCH)).is_none());
        let o = s.handle(Event::Signal(libc::SIGTERM)).unwrap();
        assert_eq!(o.code, 143);
    }
}
