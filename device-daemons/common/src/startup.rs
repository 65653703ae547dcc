//! The one start-up of every rqemu daemon (`rqemu-blk`, `rqemu-net`, `rqemu-fs`,
//! `rqemu-serial`, `rqemu-rtc`):
//!
//! * [`ListenArgs`]: the `--socket PATH | --fd N` options, flattened into each daemon's CLI;
//! * [`main`]: parse the command line, set up logging, block the termination signals (before
//!   any thread exists), run the daemon, and end the process in the one error-exit style
//!   ([`exit_code`]: `rqemu-X: error: <cause chain>` on stderr once, status 1);
//! * [`Daemon`]: the listening socket ([`Daemon::listen_stream`] for vhost-user,
//!   [`Daemon::listen_seqpacket`] for the forwarding protocol) and the signal thread
//!   ([`Daemon::exit_on_signal`]: quiesce the device, remove the socket file it bound, exit).

use std::error::Error;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

use rqemu_protocol::sys::SeqListener;

use crate::listen::{Endpoint, ListenError};
use crate::{activation, logging, notify, signals};

/// Where a daemon listens: a socket path, or an inherited listening fd (socket activation).
/// Flatten it into the daemon's `clap::Parser` (`#[command(flatten)]`); exactly one of the
/// two is required, or neither under socket activation ([`crate::activation`]).
#[derive(Debug, Clone, clap::Args)]
#[group(skip)]
#[command(group(
    clap::ArgGroup::new("listen")
        .required(true)
        .multiple(false)
        .args(["socket", "fd"])
))]
pub struct ListenArgs {
    /// UNIX socket path to listen on (a stale socket is replaced, anything else refused).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Inherited listening UNIX socket fd. Under systemd socket activation (`LISTEN_FDS`)
    /// neither option is needed.
    #[arg(long, value_name = "N")]
    pub fd: Option<RawFd>,
    /// Also serve peers running as this uid (besides the daemon's own; repeatable).
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uid: Vec<u32>,
    /// `--sandbox namespace|chroot|none`, `--seccomp kill|log|trap|none` (see
    /// [`crate::confine`]).
    #[command(flatten)]
    pub sandbox: rqemu_sandbox::SandboxArgs,
}

impl ListenArgs {
    /// The endpoint the options name; without either, the socket-activation socket.
    pub fn endpoint(&self) -> Result<Endpoint, ListenError> {
        match (&self.socket, self.fd, activation::inherited()) {
            (None, None, Some(a)) => Ok(Endpoint::Fd(a.fd)),
            _ => Endpoint::from_args(self.socket.clone(), self.fd),
        }
    }
}

/// Errors of the common start-up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `pthread_sigmask` failed.
    #[error("blocking the termination signals")]
    Signals(#[source] io::Error),
    /// No listening socket.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The signal thread could not be started.
    #[error("starting the signal thread")]
    SignalThread(#[source] io::Error),
    /// The socket-activation variables are malformed.
    #[error(transparent)]
    Activation(#[from] activation::ActivationError),
    /// `NOTIFY_SOCKET` is set but unusable.
    #[error(transparent)]
    Notify(#[from] notify::NotifyError),
}

/// A daemon being started: its name and the socket path it bound (removed when a signal ends
/// it).
#[derive(Debug)]
pub struct Daemon {
    name: &'static str,
    bound: Option<PathBuf>,
    confined: bool,
}

impl Daemon {
    /// The binary's name (`rqemu-blk`, ...).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The socket path this daemon bound, if it bound one.
    pub(crate) fn bound_path(&self) -> Option<&std::path::Path> {
        self.bound.as_deref()
    }

    /// Records that the process is confined: the socket path is out of reach (and `unlink`
    /// outside the allow-list); the pid-namespace parent removes it at exit (see
    /// [`crate::confine`]), or it is left for the next start to replace.
    pub(crate) fn set_confined(&mut self, confined: bool) {
        self.confined = confined;
    }

    fn listen<L>(
        &mut self,
        args: &ListenArgs,
        open: impl FnOnce(&Endpoint) -> Result<L, ListenError>,
    ) -> Result<L, StartError> {
        let endpoint = args.endpoint()?;
        rqemu_protocol::listen::allow_uids(args.allow_uid.clone());
        let l = open(&endpoint)?;
        // Only a path this daemon bound is removed at exit, never one it was refused.
        if let Endpoint::Path(p) = &endpoint {
            self.bound = Some(p.clone());
        }
        tracing::info!("listening on {endpoint}");
        Ok(l)
    }

    /// Listens for vhost-user frontends (`SOCK_STREAM`).
    pub fn listen_stream(&mut self, args: &ListenArgs) -> Result<UnixListener, StartError> {
        self.listen(args, crate::listen::stream)
    }

    /// Listens for VMMs speaking the forwarding protocol (`SOCK_SEQPACKET`).
    pub fn listen_seqpacket(&mut self, args: &ListenArgs) -> Result<SeqListener, StartError> {
        self.listen(args, SeqListener::listen)
    }

    /// Starts the signal thread: on SIGTERM/SIGINT it tells the service manager `STOPPING=1`,
    /// runs `quiesce` (finish in-flight work, flush; returns the exit status), removes the
    /// socket file this daemon bound, and exits the process (SIGHUP is ignored).
    pub fn exit_on_signal(
        &self,
        quiesce: impl FnOnce() -> u8 + Send + 'static,
    ) -> Result<(), StartError> {
        let path = if self.confined {
            None
        } else {
            self.bound.clone()
        };
        signals::spawn_handler(move |sig| {
            crate::confine::confine_thread_once(rqemu_sandbox::ThreadKind::Signal);
            tracing::info!("signal {sig}: exiting");
            notify::stopping();
            let code = quiesce();
            if let Some(p) = path {
                let _ = std::fs::remove_file(p);
            }
            std::process::exit(i32::from(code));
        })
        .map_err(StartError::SignalThread)?;
        Ok(())
    }
}

/// The `main` of every daemon binary: parses `A` (a usage error is clap's message, status 2),
/// sets up logging, blocks the termination signals in the still single-threaded process, runs
/// `run`, and turns its error into the one exit style ([`exit_code`]).
pub fn main<A, E>(name: &'static str, run: impl FnOnce(A, Daemon) -> Result<(), E>) -> ExitCode
where
    A: clap::Parser,
    E: Into<Box<dyn Error + Send + Sync>>,
{
    let (args, log_format) = match service_manager() {
        Ok(activated) => parse_args::<A>(activated),
        Err(e) => return exit_code(name, Err(e.into())),
    };
    logging::init_with(log_format);
    let result = match signals::block_termination_signals() {
        Ok(()) => run(
            args,
            Daemon {
                name,
                bound: None,
                confined: false,
            },
        )
        .map_err(Into::into),
        Err(e) => Err(StartError::Signals(e).into()),
    };
    exit_code(name, result)
}

/// Takes what a service manager passed (socket activation, `NOTIFY_SOCKET`) while the process
/// is single-threaded; returns whether a listening socket was passed.
fn service_manager() -> Result<bool, StartError> {
    let activated = activation::init()?.is_some();
    notify::init()?;
    Ok(activated)
}

/// Parses the command line, with `--log-format text|json` added to every daemon's options;
/// under socket activation `--socket`/`--fd` become optional.
fn parse_args<A: clap::Parser>(activated: bool) -> (A, logging::LogFormat) {
    let mut cmd = A::command().arg(
        clap::Arg::new(LOG_FORMAT)
            .long(LOG_FORMAT)
            .value_name("FORMAT")
            .help("Log line format on stderr")
            .value_parser(clap::value_parser!(logging::LogFormat))
            .default_value("text"),
    );
    if activated && cmd.get_groups().any(|g| g.get_id() == "listen") {
        cmd = cmd.mut_group("listen", |g| g.required(false));
    }
    let matches = cmd.get_matches();
    let format = matches
        .get_one::<logging::LogFormat>(LOG_FORMAT)
        .copied()
        .unwrap_or_default();
    (
        A::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()),
        format,
    )
}

const LOG_FORMAT: &str = "log-format";

/// The one error-exit style of every rqemu binary: on error, `NAME: error: <cause chain>`
/// once on stderr and status 1; status 0 otherwise.
pub fn exit_code(name: &str, result: Result<(), Box<dyn Error + Send + Sync>>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {}", chain(&*e));
            ExitCode::FAILURE
        }
    }
}

/// `outer: cause: root cause`, skipping a cause whose text its parent already ends with (an
/// error that prints its source in its own message).
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let part = s.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cur = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    #[command(name = "rqemu-test")]
    struct Cli {
        #[command(flatten)]
        listen: ListenArgs,
        #[arg(long)]
        other: Option<String>,
    }

    fn parse_err(argv: &[&str]) -> String {
        let mut v = vec!["rqemu-test"];
        v.extend_from_slice(argv);
        Cli::try_parse_from(v).unwrap_err().to_string()
    }

    #[test]
    fn exactly_one_of_socket_and_fd() {
        let c = Cli::try_parse_from(["rqemu-test", "--socket", "/s"]).unwrap();
        assert_eq!(c.listen.endpoint().unwrap(), Endpoint::Path("/s".into()));
        let c = Cli::try_parse_from(["rqemu-test", "--fd", "3"]).unwrap();
        assert_eq!(c.listen.endpoint().unwrap(), Endpoint::Fd(3));
        let e = parse_err(&[]);
        assert!(e.contains("--socket <PATH>|--fd <N>"), "{e}");
        let e = parse_err(&["--socket", "/s", "--fd", "3"]);
        assert!(
            e.contains("'--socket <PATH>' cannot be used with '--fd <N>'"),
            "{e}"
        );
        let e = parse_err(&["--fd", "three"]);
        assert!(e.contains("'three'") && e.contains("--fd <N>"), "{e}");
    }

    #[test]
    fn the_error_chain_is_printed_once() {
        let inner = io::Error::other("root cause");
        let outer = StartError::SignalThread(inner);
        assert_eq!(chain(&outer), "starting the signal thread: root cause");
        // A cause the message already shows is not repeated.
        let e = ListenError::Bind {
            path: "/x/s".into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        let text = chain(&e);
        assert!(text.starts_with("cannot listen on /x/s: "), "{text}");
        assert_eq!(text.matches("No such file").count(), 1, "{text}");
        assert_eq!(exit_code("rqemu-test", Ok(())), ExitCode::SUCCESS);
        assert_eq!(
            exit_code("rqemu-test", Err(Box::new(outer))),
            ExitCode::FAILURE
        );
    }

    #[test]
    fn the_bound_path_is_remembered_only_for_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let mut d = Daemon {
            name: "rqemu-test",
            bound: None,
            confined: false,
        };
        let args = ListenArgs {
            socket: Some(p.clone()),
            fd: None,
            allow_uid: Vec::new(),
            sandbox: rqemu_sandbox::SandboxArgs::default(),
        };
        let _l = d.listen_seqpacket(&args).unwrap();
        assert_eq!(d.bound.as_deref(), Some(p.as_path()));
        assert_eq!(d.name(), "rqemu-test");
        // The same path again (served): refused with the path in the message.
        let mut d2 = Daemon {
            name: "rqemu-test",
            bound: None,
            confined: false,
        };
        let e = d2.listen_stream(&args).unwrap_err();
        assert!(chain(&e).contains("is in use by another process"), "{e}");
        assert!(d2.bound.is_none(), "a refused path is not ours to remove");
    }
}
