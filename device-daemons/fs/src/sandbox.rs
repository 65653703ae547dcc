//! rqemu-fs's confinement: `rqemu_sandbox`'s steps, with the filesystem step done here because
//! the passthrough needs a `/proc/self/fd` directory fd that must not lead outside the share.
//!
//! fuse-backend-rs's passthrough opens `/proc/self/fd` by path when it is created and keeps the
//! fd (it re-opens `O_PATH` inodes through it). An fd on the *host's* procfs would let a
//! compromised daemon `openat(procfd, "../../<pid>/root")` and walk any host process's root.
//! So in `namespace` mode (the default when possible) [`confine_fs`]:
//!
//! 1. closes every inherited fd but stdio, the listening socket (bound before, so
//!    `--fd`/socket activation keep working) and `NOTIFY_SOCKET`'s (READY=1 comes after);
//! 2. enters a user namespace when it lacks CAP_SYS_ADMIN (uid/gid mapped onto themselves, as
//!    virtiofsd does unprivileged), then new mount, pid, net and ipc namespaces;
//! 3. forks ([`rqemu_sandbox::pidns`]): the parent stays a thin waiter (no fds, no
//!    capabilities, a wait/kill-only seccomp filter) that forwards signals and leaves with the
//!    child's status; the child goes on as PID 1 of the new pid namespace;
//! 4. makes every mount private and mounts a **private procfs of the new pid namespace** on
//!    `/proc` (`subset=pid` where the kernel has it: no `/proc/sys`, no `/proc/sysrq-trigger`;
//!    read-only, nosuid, nodev, noexec), and only then creates the passthrough: its
//!    `/proc/self/fd` fd is on that procfs, where the only process is the daemon itself
//!    (`../../1/root` is the daemon's own root: the share);
//! 5. bind-mounts the share and `pivot_root`s into it; the old root (with the procfs mount
//!    point) is detached — the procfs is reachable through the kept fd only;
//! 6. applies the rest of [`rqemu_sandbox::enter`]'s steps with the crate's pieces (`enter`
//!    itself counts threads in `/proc`, gone by then): rlimits, capabilities with the bounding
//!    set, `no_new_privs`, landlock beneath the new root, seccomp on every thread (TSYNC).
//!
//! `chroot` mode has no pid namespace and no CAP_SYS_ADMIN to mount a procfs: the passthrough
//! keeps an fd on the host's procfs, and landlock (access beneath the share only) is what
//! stops a walk out of it; the log says so. `none` keeps the host view (landlock beneath the
//! share still applies where the kernel has it).

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use rqemu_fs_backend::{FsParams, FsServer, ServerError, StateFile};
use rqemu_sandbox::namespaces::{self, NsError};
use rqemu_sandbox::{caps, pidns, policies, Group, Report, SandboxArgs, SandboxMode, ThreadKind};

/// Errors confining rqemu-fs.
#[derive(Debug, thiserror::Error)]
pub enum FsSandboxError {
    /// A namespace or root step failed.
    #[error(transparent)]
    Ns(#[from] NsError),
    /// The fork into the pid namespace failed.
    #[error(transparent)]
    PidNs(#[from] pidns::PidNsError),
    /// Mounting the private procfs failed.
    #[error("mounting a private procfs in the new pid namespace")]
    Proc(#[source] std::io::Error),
    /// `--sandbox chroot` without CAP_SYS_CHROOT.
    #[error("chroot needs CAP_SYS_CHROOT")]
    NoChrootCap,
    /// The explicitly requested mode is not possible.
    #[error("--sandbox {mode} is not possible here")]
    Mode {
        /// The mode.
        mode: &'static str,
        /// Why.
        #[source]
        source: Box<FsSandboxError>,
    },
    /// Creating the passthrough failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The remaining sandbox steps failed.
    #[error(transparent)]
    Sandbox(#[from] rqemu_sandbox::SandboxError),
    /// See [`rqemu_sandbox::rlimits::RlimitError`].
    #[error(transparent)]
    Rlimit(#[from] rqemu_sandbox::rlimits::RlimitError),
    /// See [`rqemu_sandbox::caps::CapsError`].
    #[error(transparent)]
    Caps(#[from] rqemu_sandbox::caps::CapsError),
    /// See [`rqemu_sandbox::landlock_fs::LandlockError`].
    #[error(transparent)]
    Landlock(#[from] rqemu_sandbox::landlock_fs::LandlockError),
    /// See [`rqemu_sandbox::seccomp::SeccompError`].
    #[error(transparent)]
    Seccomp(#[from] rqemu_sandbox::seccomp::SeccompError),
}

/// The confined daemon: its server (created inside the confinement) and sandbox.
pub struct Confined {
    /// The FUSE server over the share (`/` in `namespace` and `chroot` modes).
    pub server: FsServer,
    /// What was applied (also logged).
    pub report: Report,
    /// The queue workers' narrower filter.
    pub queue_filter: QueueFilter,
}

/// The queue workers' allow-list (narrower than the process's: no accept, no `recvmsg` of
/// fds, no socket calls), installed by each worker on itself ([`QueueFilter::confine_once`]).
#[derive(Default)]
pub struct QueueFilter {
    progs: Vec<seccompiler::BpfProgram>,
}

thread_local! {
    static NARROWED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl QueueFilter {
    fn new(policy: &rqemu_sandbox::Policy, args: &SandboxArgs) -> Result<Self, FsSandboxError> {
        let Some(list) = policy.threads.get(&ThreadKind::Queue) else {
            return Ok(Self::default());
        };
        // The process filter (with its clone3 part) is already on every thread: only the
        // narrower allow-list, which may install a further filter (SETLKW waiters inherit it).
        let mut progs = list
            .with_groups_cloned(&[Group::SeccompSelf])
            .compile(args.seccomp)?;
        Ok(QueueFilter {
            progs: progs.pop().into_iter().collect(),
        })
    }

    /// Installs the filter on the calling thread the first time it runs here.
    pub fn confine_once(&self) {
        if self.progs.is_empty() || NARROWED.with(|n| n.get()) {
            return;
        }
        if let Err(e) = rqemu_sandbox::seccomp::apply_this_thread(&self.progs) {
            tracing::warn!("queue worker keeps the process filter: {e}");
        }
        NARROWED.with(|n| n.set(true));
    }
}

/// What the filesystem step did.
struct FsStep {
    mode: SandboxMode,
    user_namespace: bool,
    namespaces: Vec<&'static str>,
    server: FsServer,
    /// The share as seen from inside (`/` once it is the root).
    view: PathBuf,
}

/// A failed mode, and whether it failed before changing anything (another can be tried).
struct ModeError {
    error: FsSandboxError,
    untouched: bool,
}

fn untouched(e: impl Into<FsSandboxError>) -> ModeError {
    ModeError {
        error: e.into(),
        untouched: true,
    }
}

fn touched(e: impl Into<FsSandboxError>) -> ModeError {
    ModeError {
        error: e.into(),
        untouched: false,
    }
}

/// Confines rqemu-fs to `shared` (canonical) as `args` say, creating its server on the way.
/// Call it single-threaded, after binding the listening socket `listener` (at path `socket`,
/// removed at exit by the pid-namespace parent). In `namespace` mode this returns in the
/// forked child (PID 1 of the new pid namespace) only.
pub fn confine_fs(
    args: &SandboxArgs,
    shared: &Path,
    params: &FsParams,
    listener: RawFd,
    socket: Option<&Path>,
    state: Option<StateFile>,
) -> Result<Confined, FsSandboxError> {
    let threads = namespaces::thread_count().map_err(rqemu_sandbox::SandboxError::Threads)?;
    if threads != 1 {
        return Err(rqemu_sandbox::SandboxError::MultiThreaded(threads).into());
    }
    // The listening socket and the service manager's notification socket stay open.
    let mut keep = vec![listener];
    keep.extend(rqemu_daemon::notify::fd());
    // The state file (`--state-file`) stays open and mapped: its path is out of reach inside.
    keep.extend(state.as_ref().map(StateFile::raw_fd));
    let mut state = state;
    namespaces::close_other_fds(&keep)?;
    if args.seccomp != rqemu_sandbox::SeccompAction::None {
        // glibc's malloc opens /proc/sys/vm/overcommit_memory once: now, while /proc is there.
        rqemu_sandbox::malloc_quirk::prewarm();
    }
    let candidates: &[SandboxMode] = match args.sandbox {
        Some(m) => match m {
            SandboxMode::Namespace => &[SandboxMode::Namespace],
            SandboxMode::Chroot => &[SandboxMode::Chroot],
            SandboxMode::None => &[SandboxMode::None],
        },
        None => &[
            SandboxMode::Namespace,
            SandboxMode::Chroot,
            SandboxMode::None,
        ],
    };
    let mut not_allowed = Vec::new();
    let mut step = None;
    for &mode in candidates {
        let tried = match mode {
            SandboxMode::Namespace => namespace_mode(args, shared, params, socket, &mut state),
            SandboxMode::Chroot => chroot_mode(shared, params, &mut state),
            SandboxMode::None => FsServer::with_state(params, shared, state.take())
                .map(|server| FsStep {
                    mode,
                    user_namespace: false,
                    namespaces: Vec::new(),
                    server,
                    view: shared.to_path_buf(),
                })
                .map_err(touched),
        };
        match tried {
            Ok(s) => {
                step = Some(s);
                break;
            }
            Err(e) if args.sandbox.is_none() && e.untouched => {
                not_allowed.push(format!(
                    "--sandbox {}: {}",
                    mode.name(),
                    rqemu_daemon::startup::chain(&e.error)
                ));
            }
            Err(e) => {
                return Err(FsSandboxError::Mode {
                    mode: mode.name(),
                    source: Box::new(e.error),
                })
            }
        }
    }
    // `none` is always the last candidate and only fails "touched".
    let Some(step) = step else {
        return Err(FsSandboxError::Mode {
            mode: "none",
            source: Box::new(FsSandboxError::NoChrootCap),
        });
    };
    if step.mode != SandboxMode::Namespace {
        tracing::warn!(
            "--sandbox {}: the passthrough's /proc/self/fd is the host's procfs; only landlock \
             keeps a compromised daemon from walking out of it",
            step.mode.name()
        );
    }
    let mut policy = policies::fs(&step.view, !params.readonly);
    policy.keep_dir = Some(rqemu_sandbox::KeepDir {
        path: step.view.clone(),
        writable: !params.readonly,
    });
    let queue_filter = QueueFilter::new(&policy, args)?;
    let report = rest_of_sandbox(&policy, args, &step, not_allowed)?;
    tracing::info!("rqemu-fs: {report}");
    Ok(Confined {
        server: step.server,
        report,
        queue_filter,
    })
}

/// `rqemu_sandbox::enter`'s steps after the filesystem one, with the crate's pieces (`enter`
/// itself needs `/proc`, gone by now): rlimits, capabilities (bounding set too),
/// `no_new_privs`, landlock beneath the share, the seccomp filter on every thread (TSYNC).
fn rest_of_sandbox(
    policy: &rqemu_sandbox::Policy,
    args: &SandboxArgs,
    step: &FsStep,
    mut not_allowed: Vec<String>,
) -> Result<Report, FsSandboxError> {
    let progs = policy.process_allow_list().compile(args.seccomp)?;
    let rlimits = rqemu_sandbox::rlimits::apply(&policy.rlimits)?;
    let dropped = caps::drop_to(caps::mask(&policy.keep_caps))?;
    if !dropped.bounding_reduced {
        not_allowed.push("reducing the bounding set (no CAP_SETPCAP)".to_string());
    }
    rqemu_sandbox::set_no_new_privs()?;
    let writable = !params_readonly(policy);
    let landlock = rqemu_sandbox::landlock_fs::restrict(Some(&step.view), writable, true)?;
    if landlock != rqemu_sandbox::landlock_fs::Enforced::Fully {
        not_allowed.push(format!("landlock {}", landlock.name()));
    }
    rqemu_sandbox::seccomp::apply_all_threads(&progs)?;
    Ok(Report {
        mode: step.mode,
        auto: args.sandbox.is_none(),
        user_namespace: step.user_namespace,
        namespaces: step.namespaces.clone(),
        rlimits,
        effective_caps: dropped.effective,
        bounding_reduced: dropped.bounding_reduced,
        no_new_privs: true,
        landlock,
        seccomp: args.seccomp,
        not_allowed,
    })
}

fn params_readonly(policy: &rqemu_sandbox::Policy) -> bool {
    policy.keep_dir.as_ref().is_some_and(|d| !d.writable)
}

fn namespace_mode(
    args: &SandboxArgs,
    shared: &Path,
    params: &FsParams,
    socket: Option<&Path>,
    state: &mut Option<StateFile>,
) -> Result<FsStep, ModeError> {
    let mut user_namespace = false;
    if !caps::has(caps::cap::SYS_ADMIN) {
        let (uid, gid) = namespaces::ids();
        namespaces::unshare(libc::CLONE_NEWUSER, "CLONE_NEWUSER").map_err(untouched)?;
        namespaces::map_ids(uid, gid).map_err(touched)?;
        user_namespace = true;
    }
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWNET | libc::CLONE_NEWIPC;
    namespaces::unshare(flags, "mnt+pid+net+ipc").map_err(|e| {
        if user_namespace {
            touched(e)
        } else {
            untouched(e)
        }
    })?;
    // The parent outside removes the socket file the child can no longer reach, at exit.
    pidns::fork_into_pid1(args.seccomp, socket).map_err(touched)?;
    namespaces::make_mounts_private().map_err(touched)?;
    mount_private_proc().map_err(touched)?;
    // The passthrough opens /proc/self/fd (and /proc/self/mountinfo) now: the private procfs.
    let server = FsServer::with_state(params, Path::new("/"), state.take()).map_err(touched)?;
    namespaces::pivot_into_dir(shared, params.readonly).map_err(touched)?;
    Ok(FsStep {
        mode: SandboxMode::Namespace,
        user_namespace,
        namespaces: vec!["mnt", "pid", "net", "ipc"],
        server,
        view: PathBuf::from("/"),
    })
}

fn chroot_mode(
    shared: &Path,
    params: &FsParams,
    state: &mut Option<StateFile>,
) -> Result<FsStep, ModeError> {
    if !caps::has(caps::cap::SYS_CHROOT) {
        return Err(untouched(FsSandboxError::NoChrootCap));
    }
    let server = FsServer::with_state(params, Path::new("/"), state.take()).map_err(untouched)?;
    // Nothing of the process changed yet (the server is dropped, with the state file: the
    // `none` mode tried next runs without it): another mode may be tried.
    namespaces::chroot_into(shared).map_err(untouched)?;
    Ok(FsStep {
        mode: SandboxMode::Chroot,
        user_namespace: false,
        namespaces: Vec::new(),
        server,
        view: PathBuf::from("/"),
    })
}

/// Mounts a procfs of the current pid namespace on `/proc` (in the private mount namespace):
/// `subset=pid` (no `/proc/sys` & co.) where the kernel knows it (5.8+), read-only.
fn mount_private_proc() -> Result<(), FsSandboxError> {
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY;
    let mount = |data: &std::ffi::CStr| {
        // SAFETY: valid NUL-terminated strings.
        let r = unsafe {
            libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    match mount(c"subset=pid") {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!("procfs has no subset=pid (kernel < 5.8): /proc/sys stays visible");
            mount(c"").map_err(FsSandboxError::Proc)
        }
        Err(e) => Err(FsSandboxError::Proc(e)),
    }
}

/// Lists the directory `path` relative to `dirfd` (names sorted), or the error.
fn list_at(dirfd: RawFd, path: &std::ffi::CStr) -> Result<Vec<String>, std::io::Error> {
    // SAFETY: a valid NUL-terminated path; the fd returned is owned below.
    let fd = unsafe {
        libc::openat(
            dirfd,
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let dir = unsafe { libc::fdopendir(fd) };
    if dir.is_null() {
        let e = std::io::Error::last_os_error();
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: dir is a valid DIR stream.
        let ent = unsafe { libc::readdir(dir) };
        if ent.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated within the dirent readdir returned.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
        let name = name.to_string_lossy().into_owned();
        if name != "." && name != ".." {
            names.push(name);
        }
    }
    // SAFETY: dir is valid; closes fd too.
    unsafe { libc::closedir(dir) };
    names.sort();
    Ok(names)
}

/// The `--self-check-escape` diagnostic, run in the confined process: tries the `/proc` fd
/// escape (list the procfs root through the passthrough's `/proc/self/fd` fd, then the root of
/// every process it shows, then `..` above it), printing what it reached on stderr as
/// `self-check: ...` lines; then makes a syscall outside the allow-list (`mount` of a new
/// procfs), which must kill the process. Never returns normally.
pub fn self_check_escape(server: &FsServer) -> ! {
    let fds = server.passthrough().keep_fds();
    let Some(&procfd) = fds.first() else {
        eprintln!("self-check: the passthrough holds no /proc fd");
        std::process::exit(3);
    };
    let show = |what: &str, r: Result<Vec<String>, std::io::Error>| match r {
        Ok(names) => eprintln!("self-check: {what}: [{}]", names.join(",")),
        Err(e) => eprintln!(
            "self-check: {what}: error {}",
            e.raw_os_error().unwrap_or(0)
        ),
    };
    let top = list_at(procfd, c"../..");
    show(
        "proc-root",
        top.as_ref().map(Clone::clone).map_err(clone_err),
    );
    for pid in top.unwrap_or_default() {
        if pid.bytes().all(|b| b.is_ascii_digit()) {
            let Ok(root) = std::ffi::CString::new(format!("../../{pid}/root")) else {
                continue;
            };
            show(&format!("root-of-{pid}"), list_at(procfd, &root));
            let Ok(up) = std::ffi::CString::new(format!("../../{pid}/root/../..")) else {
                continue;
            };
            show(&format!("above-root-of-{pid}"), list_at(procfd, &up));
        }
    }
    eprintln!("self-check: mounting a new procfs (outside the allow-list)");
    // SAFETY: valid NUL-terminated strings; the call is expected to be refused or fatal.
    let r = unsafe {
        libc::mount(
            c"proc".as_ptr(),
            c"/".as_ptr(),
            c"proc".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    eprintln!(
        "self-check: mount returned {r} ({}): still alive",
        std::io::Error::last_os_error()
    );
    std::process::exit(3);
}

fn clone_err(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(n) => std::io::Error::from_raw_os_error(n),
        None => std::io::Error::other(e.to_string()),
    }
}
