//! The pid-namespace helper: after `unshare(CLONE_NEWPID)` only children enter the new
//! namespace, so the process forks; the child continues as PID 1 of the namespace, the parent
//! confines itself to waiting (no fds, no capabilities, a tiny seccomp list), forwards
//! termination signals to the child and leaves with the child's exit status — or re-raises the
//! signal that killed it — as virtiofsd does. Given the socket file the daemon bound, the parent
//! removes it once the child is gone (the child, pivoted into an empty root, cannot reach it):
//! through the socket directory's fd, opened before the fork and the only thing landlock lets
//! it touch, and only if the file there is still the one bound (same device and inode).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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

/// A socket file to remove at exit: its directory (held open), name and identity.
struct Removal {
    dir: OwnedFd,
    name: CString,
    dev_ino: (u64, u64),
}

impl Removal {
    /// Opens the directory of `path` and records the socket's identity; `None` (logged) when
    /// either is not there: nothing is removed then.
    fn open(path: &Path) -> Option<Removal> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return None;
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let dir_c = CString::new(parent.as_os_str().as_bytes()).ok()?;
        let name = CString::new(name.as_bytes()).ok()?;
        // SAFETY: a valid NUL-terminated path; the fd, if any, is owned below.
        let fd = unsafe {
            libc::open(
                dir_c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            tracing::warn!(
                "sandbox: {} will stay at exit: opening its directory: {}",
                path.display(),
                io::Error::last_os_error()
            );
            return None;
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        let dev_ino = stat_at(dir.as_fd(), &name)?;
        Some(Removal { dir, name, dev_ino })
    }

    /// Removes the file if it is still the socket recorded (a newer daemon's is left alone).
    fn remove(&self) {
        if stat_at(self.dir.as_fd(), &self.name) == Some(self.dev_ino) {
            // SAFETY: a valid directory fd and NUL-terminated name.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) };
        }
    }
}

/// Device and inode of `name` in `dir`, not following a symlink.
fn stat_at(dir: BorrowedFd<'_>, name: &CString) -> Option<(u64, u64)> {
    // SAFETY: stat is plain data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated name and a stat buffer we own.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    (r == 0).then_some((st.st_dev, st.st_ino))
}

/// Forks; returns in the child (PID 1 of the new pid namespace), never in the parent.
/// Call it single-threaded, right after `unshare(CLONE_NEWPID)`. `remove_at_exit`: the socket
/// file the parent removes once the child has exited.
pub fn fork_into_pid1(
    action: SeccompAction,
    remove_at_exit: Option<&Path>,
) -> Result<(), PidNsError> {
    // Opened before the fork: the child pivots the shared mount namespace's root right after.
    let removal = remove_at_exit.and_then(Removal::open);
    // SAFETY: the process is single-threaded (checked by `enter`), so the child is a full
    // copy with no lock held by a vanished thread.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(PidNsError::Fork(io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(removal);
        // The parent only waits and forwards signals: if it is killed outright (SIGKILL, which
        // it cannot forward), the child must not stay behind, serving, unsupervised.
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
            return Err(PidNsError::Fork(io::Error::last_os_error()));
        }
        return Ok(());
    }
    reap(pid, action, removal)
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
fn reap(child: libc::pid_t, action: SeccompAction, removal: Option<Removal>) -> ! {
    let mut waited = FORWARDED.to_vec();
    waited.push(libc::SIGCHLD);
    let set = sigset(&waited);
    // SAFETY: valid set; blocks them in this (only) thread so sigtimedwait takes them.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if let Err(e) = confine_reaper(action, removal.as_ref().map(|r| r.dir.as_fd())) {
        tracing::warn!("sandbox: pid-1 parent not fully confined: {e}");
    }
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status we pass.
        let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if r == child {
            if let Some(r) = &removal {
                r.remove();
            }
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

/// The parent holds nothing: no fds beyond stdio (and the socket's directory, when it removes
/// the socket at exit), no capabilities, no filesystem access (but removing files in that
/// directory), seccomp: wait, kill, signal masks, stat/unlink at a directory fd, exit.
fn confine_reaper(
    action: SeccompAction,
    socket_dir: Option<BorrowedFd<'_>>,
) -> Result<(), crate::SandboxError> {
    let keep: Vec<i32> = socket_dir.iter().map(|d| d.as_raw_fd()).collect();
    crate::namespaces::close_other_fds(&keep)?;
    crate::caps::drop_to(0)?;
    crate::set_no_new_privs()?;
    match socket_dir {
        Some(dir) => crate::landlock_fs::restrict_to_removing_in(dir)?,
        None => crate::landlock_fs::restrict(None, false, false)?,
    };
    let progs = AllowList::new(&[Group::Exit, Group::Reaper]).compile(action)?;
    crate::seccomp::apply_all_threads(&progs)?;
    Ok(())
}
