//! rqemu-sandbox: confining an rqemu process once its start-up has opened everything it
//! needs (images, tap fds, the shared directory, sockets).
//!
//! [`enter`] applies a [`Policy`] in this order (each step needs what the next one takes
//! away):
//!
//! 0. glibc's one lazy `open` in malloc is done now ([`malloc_quirk`]);
//! 1. **rlimits** (`RLIMIT_CORE` 0, `RLIMIT_NOFILE`, optionally `RLIMIT_NPROC`);
//! 2. **fds**: every fd from 3 up that the policy does not list is closed;
//! 3. **namespaces / root** (`--sandbox`): `namespace` — a user namespace first when not
//!    privileged, then new mount (+ pid, net, ipc) namespaces; with a pid namespace the process
//!    forks and the child continues as PID 1 ([`pidns`]); then `pivot_root` into an empty
//!    read-only tmpfs, or into the kept directory; `chroot` — into an empty (deleted)
//!    directory or the kept directory; `none` — nothing;
//! 4. **capabilities**: bounding set reduced to what the policy keeps, ambient cleared,
//!    effective/permitted = kept, inheritable empty;
//! 5. **no_new_privs**;
//! 6. **landlock**: no filesystem access, or access beneath the kept directory only;
//! 7. **seccomp** (`--seccomp`): the union of the policy's per-thread allow-lists, on every
//!    thread (TSYNC); worker threads created later narrow themselves with
//!    [`Sandbox::confine_thread`].
//!
//! Without `--sandbox`, the strongest mode the privileges allow is taken (`namespace`, through
//! a user namespace if need be; else `chroot`; else `none`), and the [`Report`] (also logged)
//! says what was applied and what the privileges did not allow.
//!
//! `enter` must be called while the process has a single thread: capabilities, landlock and
//! namespaces belong to a thread, and only threads created afterwards inherit them.
//!
//! ```no_run
//! use rqemu_sandbox::{policies, SandboxArgs, ThreadKind};
//! # fn main() -> Result<(), rqemu_sandbox::SandboxError> {
//! # let (image_fd, listener_fd) = (3, 4);
//! // After start-up opened the image and the listening socket, before any thread exists:
//! let policy = policies::blk().keep_fds([image_fd, listener_fd]);
//! let sandbox = rqemu_sandbox::enter(&policy, &SandboxArgs::default())?;
//! // First thing in each queue worker (or its first callback, for a library's thread):
//! sandbox.confine_thread_once(ThreadKind::Queue)?;
//! # Ok(())
//! # }
//! ```

pub mod caps;
pub mod cli;
pub mod landlock_fs;
pub mod malloc_quirk;
pub mod namespaces;
pub mod pidns;
pub mod policies;
pub mod rlimits;
pub mod seccomp;

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::RawFd;
use std::path::PathBuf;

use seccompiler::BpfProgram;

pub use cli::{SandboxArgs, SandboxMode, SeccompAction};
pub use rlimits::Rlimits;
pub use seccomp::{AllowList, Group, ThreadKind};

/// Errors entering the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// `enter` was called with several threads.
    #[error(
        "the sandbox must be entered while the process has one thread (it has {0}): \
         capabilities, landlock and namespaces apply to the calling thread only"
    )]
    MultiThreaded(usize),
    /// Counting threads failed.
    #[error("counting threads")]
    Threads(#[source] std::io::Error),
    /// The explicitly requested mode is not possible.
    #[error("--sandbox {mode} is not possible here")]
    Mode {
        /// The mode.
        mode: &'static str,
        /// Why.
        #[source]
        source: Box<SandboxError>,
    },
    /// `--sandbox chroot` without CAP_SYS_CHROOT.
    #[error("chroot needs CAP_SYS_CHROOT")]
    NoChrootCap,
    /// `--sandbox chroot` for a policy that keeps socket directories.
    #[error("chroot cannot keep the socket directories reachable (use namespace or none)")]
    ChrootSocketDirs,
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("prctl(PR_SET_NO_NEW_PRIVS)")]
    NoNewPrivs(#[source] std::io::Error),
    /// See [`rlimits::RlimitError`].
    #[error(transparent)]
    Rlimit(#[from] rlimits::RlimitError),
    /// See [`namespaces::NsError`].
    #[error(transparent)]
    Ns(#[from] namespaces::NsError),
    /// See [`pidns::PidNsError`].
    #[error(transparent)]
    PidNs(#[from] pidns::PidNsError),
    /// See [`caps::CapsError`].
    #[error(transparent)]
    Caps(#[from] caps::CapsError),
    /// See [`landlock_fs::LandlockError`].
    #[error(transparent)]
    Landlock(#[from] landlock_fs::LandlockError),
    /// See [`seccomp::SeccompError`].
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
}

/// A directory the process keeps access to (rqemu-fs's shared directory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeepDir {
    /// Its path (absolute, symlink-free: the caller canonicalises it).
    pub path: PathBuf,
    /// Whether writes beneath it are allowed.
    pub writable: bool,
}

/// What a process may keep, and what each of its thread kinds may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Process name, for logs.
    pub name: &'static str,
    /// The fds it holds and keeps (0, 1, 2 are always kept).
    pub keep_fds: Vec<RawFd>,
    /// Close every other fd from 3 up.
    pub close_other_fds: bool,
    /// A directory to keep (the new root in `namespace`/`chroot` modes), or none.
    pub keep_dir: Option<KeepDir>,
    /// Directories whose UNIX sockets the process keeps connecting to by path (rqemu-vmm
    /// reattaching restarted daemons): absolute and symlink-free (the caller canonicalises
    /// them); in `namespace` mode bind-mounted read-only at the same path under the empty root
    /// (landlock does not govern connecting to a socket, and denies everything else there);
    /// `chroot` cannot keep them and is then not possible.
    pub keep_socket_dirs: Vec<PathBuf>,
    /// Capabilities kept (numbers, [`caps::cap`]); everything else leaves the bounding set.
    pub keep_caps: Vec<u32>,
    /// A new pid namespace (the process forks, the child is PID 1).
    pub pid_namespace: bool,
    /// A new, empty network namespace.
    pub net_namespace: bool,
    /// A new IPC namespace.
    pub ipc_namespace: bool,
    /// Resource limits.
    pub rlimits: Rlimits,
    /// The allow-list of each thread kind (the process filter is their union).
    pub threads: BTreeMap<ThreadKind, AllowList>,
    /// A socket file the process bound, removed when it exits: with a pid namespace, by the
    /// waiting parent (which holds its directory open for that alone, see [`pidns`]) once
    /// the confined child is gone — the child cannot reach the path any more.
    pub remove_at_exit: Option<PathBuf>,
}

impl Policy {
    /// Sets the socket file removed when the process exits ([`Policy::remove_at_exit`]).
    pub fn remove_at_exit(mut self, path: Option<PathBuf>) -> Self {
        self.remove_at_exit = path;
        self
    }

    /// Sets the fds kept.
    pub fn keep_fds(mut self, fds: impl IntoIterator<Item = RawFd>) -> Self {
        self.keep_fds = fds.into_iter().collect();
        self
    }

    /// Sets the kept directory.
    pub fn keep_dir(mut self, path: impl Into<PathBuf>, writable: bool) -> Self {
        self.keep_dir = Some(KeepDir {
            path: path.into(),
            writable,
        });
        self
    }

    /// Sets the directories whose sockets stay reachable by path.
    pub fn keep_socket_dirs(mut self, dirs: impl IntoIterator<Item = PathBuf>) -> Self {
        self.keep_socket_dirs = dirs.into_iter().collect();
        self
    }

    /// The process-wide allow-list: the union of every thread kind's, plus installing
    /// narrower filters when there are several kinds.
    pub fn process_allow_list(&self) -> AllowList {
        let mut all = self
            .threads
            .values()
            .fold(AllowList::new(&[]), |a, l| a.union(l));
        if self.threads.len() > 1 {
            all = all.with_groups(&[Group::SeccompSelf]);
        }
        all
    }
}

/// What [`enter`] applied, and what the privileges did not allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The filesystem confinement applied.
    pub mode: SandboxMode,
    /// Whether it was chosen automatically (no `--sandbox`).
    pub auto: bool,
    /// A user namespace was created (unprivileged namespace mode).
    pub user_namespace: bool,
    /// The other namespaces created ("mnt", "pid", "net", "ipc").
    pub namespaces: Vec<&'static str>,
    /// The limits set.
    pub rlimits: Vec<String>,
    /// The effective capabilities left.
    pub effective_caps: u64,
    /// Whether the bounding set was reduced.
    pub bounding_reduced: bool,
    /// `no_new_privs` is set.
    pub no_new_privs: bool,
    /// What landlock enforced.
    pub landlock: landlock_fs::Enforced,
    /// The seccomp action (None: no filter).
    pub seccomp: SeccompAction,
    /// Steps the privileges or the kernel did not allow, with why.
    pub not_allowed: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sandbox {}{}",
            self.mode.name(),
            if self.auto {
                " (strongest allowed)"
            } else {
                ""
            }
        )?;
        if self.user_namespace {
            write!(f, " via a user namespace")?;
        }
        if !self.namespaces.is_empty() {
            write!(f, ", namespaces {}", self.namespaces.join("+"))?;
        }
        write!(
            f,
            ", {}, caps {:#x} (bounding set {}), no_new_privs {}, landlock {}, seccomp {}",
            self.rlimits.join(" "),
            self.effective_caps,
            if self.bounding_reduced {
                "reduced"
            } else {
                "unchanged"
            },
            self.no_new_privs,
            self.landlock.name(),
            self.seccomp.name()
        )?;
        for n in &self.not_allowed {
            write!(f, "; not allowed: {n}")?;
        }
        Ok(())
    }
}

/// The confined process: its report, and the narrower filters of its thread kinds.
pub struct Sandbox {
    /// What was applied.
    pub report: Report,
    threads: BTreeMap<ThreadKind, Vec<BpfProgram>>,
}

thread_local! {
    static CONFINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Sandbox {
    /// Narrows the calling thread to `kind`'s allow-list (call it first thing in a worker
    /// thread). A kind the policy does not list keeps the process filter.
    pub fn confine_thread(&self, kind: ThreadKind) -> Result<(), SandboxError> {
        if let Some(progs) = self.threads.get(&kind) {
            seccomp::apply_this_thread(progs)?;
        }
        CONFINED.with(|c| c.set(true));
        Ok(())
    }

    /// [`Sandbox::confine_thread`] unless this thread already did: for threads a library
    /// creates (vhost-user-backend's vring workers), called from the first callback they run.
    pub fn confine_thread_once(&self, kind: ThreadKind) -> Result<(), SandboxError> {
        if CONFINED.with(|c| c.get()) {
            return Ok(());
        }
        self.confine_thread(kind)
    }
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
pub fn set_no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if r != 0 {
        return Err(SandboxError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Confines the calling process by `policy` as `args` say (see the crate docs for the order).
/// With a pid namespace this returns in the forked child (PID 1); the parent never returns.
pub fn enter(policy: &Policy, args: &SandboxArgs) -> Result<Sandbox, SandboxError> {
    let threads = namespaces::thread_count().map_err(SandboxError::Threads)?;
    if threads != 1 {
        return Err(SandboxError::MultiThreaded(threads));
    }
    // Compile every filter first: a bad allow-list fails before anything is changed.
    let process_progs = policy.process_allow_list().compile(args.seccomp)?;
    let mut thread_progs = BTreeMap::new();
    if policy.threads.len() > 1 {
        for (kind, list) in &policy.threads {
            // The clone3 filter is already the process's: only the narrower allow-list. Every
            // kind may narrow itself further (a thread it spawns inherits its filter, then
            // installs its own kind's on top).
            let mut progs = list
                .with_groups_cloned(&[Group::SeccompSelf])
                .compile(args.seccomp)?;
            let main: Vec<BpfProgram> = progs.pop().into_iter().collect();
            thread_progs.insert(*kind, main);
        }
    }
    if args.seccomp != SeccompAction::None {
        malloc_quirk::prewarm();
    }
    let rlimits = rlimits::apply(&policy.rlimits)?;
    if policy.close_other_fds {
        namespaces::close_other_fds(&policy.keep_fds)?;
    }
    let mut not_allowed = Vec::new();
    let fs = confine_fs(policy, args, &mut not_allowed)?;
    let dropped = caps::drop_to(caps::mask(&policy.keep_caps))?;
    if !dropped.bounding_reduced {
        not_allowed.push("reducing the bounding set (no CAP_SETPCAP)".to_string());
    }
    set_no_new_privs()?;
    let dir_view = policy.keep_dir.as_ref().map(|d| match fs.mode {
        SandboxMode::None => d.path.clone(),
        SandboxMode::Namespace | SandboxMode::Chroot => PathBuf::from("/"),
    });
    let writable = policy.keep_dir.as_ref().is_some_and(|d| d.writable);
    let landlock = landlock_fs::restrict(dir_view.as_deref(), writable, true)?;
    if landlock != landlock_fs::Enforced::Fully {
        not_allowed.push(format!("landlock {}", landlock.name()));
    }
    seccomp::apply_all_threads(&process_progs)?;
    let report = Report {
        mode: fs.mode,
        auto: args.sandbox.is_none(),
        user_namespace: fs.user_namespace,
        namespaces: fs.namespaces,
        rlimits,
        effective_caps: dropped.effective,
        bounding_reduced: dropped.bounding_reduced,
        no_new_privs: true,
        landlock,
        seccomp: args.seccomp,
        not_allowed,
    };
    tracing::info!("{}: {report}", policy.name);
    Ok(Sandbox {
        report,
        threads: thread_progs,
    })
}

struct FsOutcome {
    mode: SandboxMode,
    user_namespace: bool,
    namespaces: Vec<&'static str>,
}

/// Step 3: the requested mode, or the strongest that works when none was requested.
fn confine_fs(
    policy: &Policy,
    args: &SandboxArgs,
    not_allowed: &mut Vec<String>,
) -> Result<FsOutcome, SandboxError> {
    let candidates: &[SandboxMode] = match args.sandbox {
        Some(SandboxMode::Namespace) => &[SandboxMode::Namespace],
        Some(SandboxMode::Chroot) => &[SandboxMode::Chroot],
        Some(SandboxMode::None) => &[SandboxMode::None],
        None => &[
            SandboxMode::Namespace,
            SandboxMode::Chroot,
            SandboxMode::None,
        ],
    };
    for &mode in candidates {
        let tried = match mode {
            SandboxMode::Namespace => namespace_mode(policy, args.seccomp),
            SandboxMode::Chroot => chroot_mode(policy),
            SandboxMode::None => Ok(None),
        };
        match tried {
            Ok(Some(outcome)) => return Ok(outcome),
            Ok(None) => {
                return Ok(FsOutcome {
                    mode,
                    user_namespace: false,
                    namespaces: Vec::new(),
                })
            }
            Err(e) if args.sandbox.is_none() && e.untouched => {
                not_allowed.push(format!("--sandbox {}: {}", mode.name(), chain(&e.error)));
            }
            Err(e) => {
                return Err(SandboxError::Mode {
                    mode: mode.name(),
                    source: Box::new(e.error),
                })
            }
        }
    }
    // Only reached when every candidate failed before changing anything: stay unconfined
    // (the loop above always ends at `none` when choosing automatically).
    Ok(FsOutcome {
        mode: SandboxMode::None,
        user_namespace: false,
        namespaces: Vec::new(),
    })
}

/// A failed mode, and whether it failed before changing anything (so another can be tried).
struct ModeError {
    error: SandboxError,
    untouched: bool,
}

fn untouched(error: impl Into<SandboxError>) -> ModeError {
    ModeError {
        error: error.into(),
        untouched: true,
    }
}

fn touched(error: impl Into<SandboxError>) -> ModeError {
    ModeError {
        error: error.into(),
        untouched: false,
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn namespace_mode(policy: &Policy, action: SeccompAction) -> Result<Option<FsOutcome>, ModeError> {
    let mut user_namespace = false;
    if !caps::has(caps::cap::SYS_ADMIN) {
        let (uid, gid) = namespaces::ids();
        namespaces::unshare(libc::CLONE_NEWUSER, "CLONE_NEWUSER").map_err(untouched)?;
        namespaces::map_ids(uid, gid).map_err(touched)?;
        user_namespace = true;
    }
    let mut flags = libc::CLONE_NEWNS;
    let mut names = vec!["mnt"];
    for (on, flag, name) in [
        (policy.pid_namespace, libc::CLONE_NEWPID, "pid"),
        (policy.net_namespace, libc::CLONE_NEWNET, "net"),
        (policy.ipc_namespace, libc::CLONE_NEWIPC, "ipc"),
    ] {
        if on {
            flags |= flag;
            names.push(name);
        }
    }
    namespaces::unshare(flags, &names.join("+")).map_err(|e| {
        if user_namespace {
            touched(e)
        } else {
            untouched(e)
        }
    })?;
    if policy.pid_namespace {
        pidns::fork_into_pid1(action, policy.remove_at_exit.as_deref()).map_err(touched)?;
    }
    namespaces::make_mounts_private().map_err(touched)?;
    match &policy.keep_dir {
        Some(d) => namespaces::pivot_into_dir(&d.path, !d.writable),
        None if policy.keep_socket_dirs.is_empty() => namespaces::pivot_into_empty_root(),
        None => namespaces::pivot_into_root_with_dirs(&policy.keep_socket_dirs),
    }
    .map_err(touched)?;
    Ok(Some(FsOutcome {
        mode: SandboxMode::Namespace,
        user_namespace,
        namespaces: names,
    }))
}

fn chroot_mode(policy: &Policy) -> Result<Option<FsOutcome>, ModeError> {
    if !caps::has(caps::cap::SYS_CHROOT) {
        return Err(untouched(SandboxError::NoChrootCap));
    }
    if !policy.keep_socket_dirs.is_empty() {
        return Err(untouched(SandboxError::ChrootSocketDirs));
    }
    match &policy.keep_dir {
        Some(d) => namespaces::chroot_into(&d.path),
        None => namespaces::chroot_into_empty(),
    }
    .map_err(untouched)?;
    Ok(Some(FsOutcome {
        mode: SandboxMode::Chroot,
        user_namespace: false,
        namespaces: Vec::new(),
    }))
}
