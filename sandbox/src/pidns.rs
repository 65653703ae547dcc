//! The pid-namespace helper: after `unshare(CLONE_NEWPID)` only children enter the new
//! namespace, so the process forks; the child continues as PID 1 of the namespace, the parent
//! confines itself to waiting (no fds, no capabilities, a tiny seccomp list), forwards
//! termination signals to the child and leaves with the child's exit status — or re-raises the
//! signal that killed it — as virtiofsd does.

use std::io;

use crate::seccomp::{AllowList, Group};
use crate::SeccompAction;

/// Errors of the fork.
#[derive(Debug, thiserror::Error)]
pub enum PidNsError {
    /// fork failed.
    #[error("fork into the new pid namespace")]
    Fork(#[source] io::Error),
}

/// Signals forwarded to the child.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Forks; returns in the child (PID 1 of the new pid namespace), never in the parent.
/// Call it single-threaded, right after `unshare(CLONE_NEWPID)`.
pub fn fork_into_pid1(action: SeccompAction) -> Result<(), PidNsError> {
    // SAFETY: the process is single-threaded (checked by `enter`), so the child is a full
    // copy with no lock held by a vanished thread.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(PidNsError::Fork(io::Error::last_os_error()));
    }
    if pid == 0 {
        // The parent only waits and forwards signals: if it is killed outright (SIGKILL, which
        // it cannot forward), the child must not stay behind, serving, unsupervised.
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
            return Err(PidNsError::Fork(io::Error::last_os_error()));
        }
        return Ok(());
    }
    reap(pid, action)
}

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid set pointer and signal numbers.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// The parent: confine, then wait for the child and forward signals to it.
fn reap(child: libc::pid_t, action: SeccompAction) -> ! {
    let mut waited = FORWARDED.to_vec();
    waited.push(libc::SIGCHLD);
    let set = sigset(&waited);
    // SAFETY: valid set; blocks them in this (only) thread so sigtimedwait takes them.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if let Err(e) = confine_reaper(action) {
        tracing::warn!("sandbox: pid-1 parent not fully confined: {e}");
    }
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status we pass.
        let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if r == child {
            leave_like(status);
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(1) };
        }
        // SAFETY: valid set; a null info pointer is allowed.
        let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if sig > 0 && sig != libc::SIGCHLD {
            // SAFETY: kill with a valid pid and signal.
            unsafe { libc::kill(child, sig) };
        }
    }
}

/// Leaves with the child's exit code, or dies of the signal that killed it.
fn leave_like(status: libc::c_int) -> ! {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let set = sigset(&[sig]);
        // SAFETY: resetting a handler to the default, unblocking it and raising it on
        // ourselves; plain syscalls.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig)
        }
    }
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(libc::WEXITSTATUS(status)) }
}

/// The parent holds nothing: no fds beyond stdio, no capabilities, no filesystem access,
/// seccomp: wait, kill, signal masks, exit.
fn confine_reaper(action: SeccompAction) -> Result<(), crate::SandboxError> {
    crate::namespaces::close_other_fds(&[])?;
    crate::caps::drop_to(0)?;
    crate::set_no_new_privs()?;
    crate::landlock_fs::restrict(None, false, false)?;
    let progs = AllowList::new(&[Group::Exit, Group::Reaper]).compile(action)?;
    crate::seccomp::apply_all_threads(&progs)?;
    Ok(())
}
