//! Confining a daemon once its start-up has opened everything ([`Daemon::confine`]): the one
//! call between "start-up is over" and "threads start" of every daemon.
//!
//! `--sandbox`/`--seccomp` come with [`ListenArgs`](crate::startup::ListenArgs) (flattened
//! [`SandboxArgs`]); the policy is the daemon's from `rqemu_sandbox::policies`. Every fd the
//! process holds at that point is kept (start-up opened exactly what the daemon serves with:
//! images, tap queues, console, the listening socket); nothing is opened by path afterwards.
//! The [`Sandbox`] is kept process-wide so that threads a library creates (vhost-user-backend's
//! vring workers) can narrow themselves from their first callback ([`confine_thread_once`]).

use std::os::fd::RawFd;
use std::sync::OnceLock;

pub use rqemu_sandbox::{policies, Policy, SandboxArgs, ThreadKind};
use rqemu_sandbox::{Sandbox, SandboxError, SandboxMode, SeccompAction};

use crate::startup::Daemon;

/// Errors confining a daemon.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// Listing the open fds failed.
    #[error("listing the open fds in /proc/self/fd")]
    Fds(#[source] std::io::Error),
    /// The sandbox could not be entered.
    #[error("entering the sandbox")]
    Enter(#[source] SandboxError),
    /// `confine` was called twice.
    #[error("the daemon is already confined")]
    Twice,
}

static SANDBOX: OnceLock<Sandbox> = OnceLock::new();

/// The fds open in this process from 3 up.
pub fn open_fds() -> Result<Vec<RawFd>, ConfineError> {
    let dir = std::fs::read_dir("/proc/self/fd").map_err(ConfineError::Fds)?;
    let mut fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    // The directory's own fd was listed too: keep only what is still open now.
    // SAFETY: F_GETFD on an integer fd only queries it.
    fds.retain(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
    fds.sort_unstable();
    Ok(fds)
}

impl Daemon {
    /// Confines the process by `policy` as `--sandbox`/`--seccomp` say, keeping every fd open
    /// now. Call it once start-up has opened everything and **before any thread is started**
    /// (the signal thread included: [`Daemon::exit_on_signal`] comes after). With a pid
    /// namespace this returns in the forked child (PID 1 of the namespace).
    pub fn confine(&mut self, policy: Policy, args: &SandboxArgs) -> Result<(), ConfineError> {
        if SANDBOX.get().is_some() {
            return Err(ConfineError::Twice);
        }
        // The socket path it bound is removed at exit by the pid-namespace parent (the
        // confined child cannot reach it).
        let policy = policy
            .keep_fds(open_fds()?)
            .remove_at_exit(self.bound_path().map(Into::into));
        let sandbox = rqemu_sandbox::enter(&policy, args).map_err(ConfineError::Enter)?;
        self.set_confined(
            args.seccomp != SeccompAction::None || sandbox.report.mode != SandboxMode::None,
        );
        SANDBOX.set(sandbox).map_err(|_| ConfineError::Twice)
    }
}

/// Narrows the calling thread to `kind`'s allow-list unless it already did (or the daemon is
/// not confined): first thing in a thread's first callback. A failure kills nothing: the
/// process filter still applies; it is logged.
pub fn confine_thread_once(kind: ThreadKind) {
    if let Some(s) = SANDBOX.get() {
        if let Err(e) = s.confine_thread_once(kind) {
            tracing::warn!("narrowing a {kind:?} thread: {e}");
        }
    }
}

/// Whether [`Daemon::confine`] ran.
pub fn is_confined() -> bool {
    SANDBOX.get().is_some()
}
