//! The syscall groups allow-lists are composed from: data, one small slice per group.
//!
//! A syscall is either allowed whatever its arguments ([`Allow::Any`]) or only when every
//! listed argument matches ([`Allow::If`]: `(arg & mask) == value`). The argument-dependent
//! members that the caller parameterises (`ioctl` request numbers, `PROT_EXEC`) are built in
//! [`super::AllowList`].

use libc::c_long;

/// One comparison on a syscall argument: `(args[arg] & mask) == value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cmp {
    /// Argument index (0..=5).
    pub arg: u8,
    /// Bits compared.
    pub mask: u64,
    /// Their expected value.
    pub value: u64,
    /// Compare all 64 bits (a `long` or a pointer); otherwise only the low 32 bits, as the
    /// kernel reads an `int` argument (the register's upper half is not defined for them).
    pub wide: bool,
}

/// One allowed syscall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allow {
    /// Allowed with any arguments.
    Any(c_long),
    /// Allowed when all the comparisons hold.
    If(c_long, &'static [Cmp]),
}

impl Allow {
    /// The syscall number.
    pub fn nr(self) -> c_long {
        match self {
            Allow::Any(nr) | Allow::If(nr, _) => nr,
        }
    }
}

/// `int` argument `arg` equals `value`.
const fn eq(arg: u8, value: u64) -> Cmp {
    Cmp {
        arg,
        mask: u32::MAX as u64,
        value,
        wide: false,
    }
}

/// `long`/pointer argument `arg` equals `value`.
const fn eq64(arg: u8, value: u64) -> Cmp {
    Cmp {
        arg,
        mask: u64::MAX,
        value,
        wide: true,
    }
}

/// The groups of syscalls a thread kind is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Group {
    /// Exiting a thread or the process.
    Exit,
    /// Heap and mappings: `brk`, `mmap`/`mprotect` (without `PROT_EXEC` unless the list says
    /// so), `munmap`, `mremap`, `madvise`; `mmap` of a received memfd (vhost-user regions).
    Memory,
    /// `futex`, `sched_yield`: locks, condition variables, thread joins.
    Futex,
    /// Clocks and sleeping (the vDSO usually answers, the syscalls are the fallback).
    Clock,
    /// Signal masks, handlers, `sigaltstack`, `sigreturn`, waiting for a blocked signal,
    /// signalling a thread of this process (`tgkill`: `abort()`).
    Signals,
    /// Who am I: `getpid`, `gettid`, `getuid`..., `getrandom` (hash seeds), `sched_getaffinity`,
    /// `prlimit64` (own limits).
    ProcessInfo,
    /// `epoll_*`, `poll`, `ppoll`, `eventfd2` (new kick/call/exit eventfds).
    Epoll,
    /// I/O on held fds: `read`/`write` and the vector and positional variants, `lseek`,
    /// `close`, `dup`, `fcntl`, `fstat`/`statx` (std's `File::metadata`).
    FdIo,
    /// Durability and size of held files: `fsync`, `fdatasync`, `fallocate` (discard, write
    /// zeroes), `ftruncate`.
    FileSync,
    /// Messages on connected sockets: `recvmsg`/`sendmsg` (SCM_RIGHTS), `recvfrom`/`sendto`,
    /// `shutdown`, `getsockopt`, `getsockname`/`getpeername`.
    SocketMsg,
    /// Accepting the next frontend on the held listening socket (`accept4`).
    Accept,
    /// New AF_UNIX sockets only (`socket`/`socketpair` with `AF_UNIX`), `connect`,
    /// `setsockopt` (receive timeouts), `bind`/`listen` (an autobound abstract address).
    UnixSockets,
    /// Creating threads: `clone` with thread flags only (never a new process or namespace),
    /// `clone3` (answered ENOSYS by a second filter so glibc falls back to `clone`, whose flags
    /// can be checked), `set_robust_list`, `rseq`, naming the thread.
    Threads,
    /// Installing a narrower filter on the calling thread (worker threads created later):
    /// `seccomp(SET_MODE_FILTER)` with no flags (no TSYNC; a new filter can only narrow what
    /// the thread may do) and `prctl(PR_SET_NO_NEW_PRIVS)`.
    SeccompSelf,
    /// The passthrough filesystem under the kept directory: `openat`, `getdents64`,
    /// `*at` path operations, xattrs, `copy_file_range`, `flock`, per-thread credential
    /// switches (`setresuid`/`setresgid` as raw syscalls), `umask`, `statfs`.
    FsPassthrough,
    /// Creating shared memory: `memfd_create` (the VMM's forwarding rings; size sealed with
    /// `fcntl` and sized with `ftruncate`, in other groups).
    MemfdCreate,
    /// Removing one's socket path at exit (`unlink`, `unlinkat`): fails harmlessly inside the
    /// sandbox (nothing is reachable), kept so that a clean shutdown is not a SIGSYS death.
    Unlink,
    /// The pid-1 helper's parent: waiting for the child and forwarding signals to it, and
    /// removing the socket file the daemon bound once the child is gone.
    Reaper,
    /// Submitting to and reaping from io_uring instances made at start-up
    /// (`io_uring_enter` only: no new ring, no registration once confined).
    IoUring,
}

use libc::*;

const EXIT: &[Allow] = &[
    Allow::Any(SYS_exit),
    Allow::Any(SYS_exit_group),
    Allow::Any(SYS_restart_syscall),
];

/// `mmap`/`mprotect` are added by [`super::AllowList`] (they depend on `PROT_EXEC`).
const MEMORY: &[Allow] = &[
    Allow::Any(SYS_brk),
    Allow::Any(SYS_munmap),
    Allow::Any(SYS_mremap),
    Allow::Any(SYS_madvise),
];

const FUTEX: &[Allow] = &[Allow::Any(SYS_futex), Allow::Any(SYS_sched_yield)];

const CLOCK: &[Allow] = &[
    Allow::Any(SYS_clock_gettime),
    Allow::Any(SYS_clock_getres),
    Allow::Any(SYS_gettimeofday),
    Allow::Any(SYS_nanosleep),
    Allow::Any(SYS_clock_nanosleep),
];

const SIGNALS: &[Allow] = &[
    Allow::Any(SYS_rt_sigaction),
    Allow::Any(SYS_rt_sigprocmask),
    Allow::Any(SYS_rt_sigreturn),
    Allow::Any(SYS_rt_sigtimedwait),
    Allow::Any(SYS_sigaltstack),
    Allow::Any(SYS_tgkill),
];

const PROCESS_INFO: &[Allow] = &[
    Allow::Any(SYS_getpid),
    Allow::Any(SYS_gettid),
    Allow::Any(SYS_getuid),
    Allow::Any(SYS_geteuid),
    Allow::Any(SYS_getgid),
    Allow::Any(SYS_getegid),
    Allow::Any(SYS_getrandom),
    Allow::Any(SYS_sched_getaffinity),
    // Reading (new_limit == NULL) one's own (pid 0) limits only.
    Allow::If(SYS_prlimit64, &[eq(0, 0), eq64(2, 0)]),
];

const EPOLL: &[Allow] = &[
    Allow::Any(SYS_epoll_create1),
    Allow::Any(SYS_epoll_ctl),
    Allow::Any(SYS_epoll_wait),
    Allow::Any(SYS_epoll_pwait),
    Allow::Any(SYS_epoll_pwait2),
    Allow::Any(SYS_poll),
    Allow::Any(SYS_ppoll),
    Allow::Any(SYS_eventfd2),
];

const FD_IO: &[Allow] = &[
    Allow::Any(SYS_read),
    Allow::Any(SYS_write),
    Allow::Any(SYS_readv),
    Allow::Any(SYS_writev),
    Allow::Any(SYS_pread64),
    Allow::Any(SYS_pwrite64),
    Allow::Any(SYS_preadv),
    Allow::Any(SYS_pwritev),
    Allow::Any(SYS_preadv2),
    Allow::Any(SYS_pwritev2),
    Allow::Any(SYS_lseek),
    Allow::Any(SYS_close),
    Allow::Any(SYS_dup),
    Allow::Any(SYS_fcntl),
    Allow::Any(SYS_fstat),
    // std's File::metadata is statx(fd, "", AT_EMPTY_PATH): path lookups are the
    // filesystem confinement's business (empty root, landlock).
    Allow::Any(SYS_statx),
    Allow::Any(SYS_newfstatat),
];

const FILE_SYNC: &[Allow] = &[
    Allow::Any(SYS_fsync),
    Allow::Any(SYS_fdatasync),
    Allow::Any(SYS_fallocate),
    Allow::Any(SYS_ftruncate),
];

const SOCKET_MSG: &[Allow] = &[
    Allow::Any(SYS_recvmsg),
    Allow::Any(SYS_sendmsg),
    Allow::Any(SYS_recvfrom),
    Allow::Any(SYS_sendto),
    Allow::Any(SYS_shutdown),
    Allow::Any(SYS_getsockopt),
    Allow::Any(SYS_getsockname),
    Allow::Any(SYS_getpeername),
];

const ACCEPT: &[Allow] = &[Allow::Any(SYS_accept4), Allow::Any(SYS_accept)];

const UNIX_SOCKETS: &[Allow] = &[
    Allow::If(SYS_socket, &[eq(0, AF_UNIX as u64)]),
    Allow::If(SYS_socketpair, &[eq(0, AF_UNIX as u64)]),
    Allow::Any(SYS_connect),
    Allow::Any(SYS_setsockopt),
    // rqemu-net's relay: a private abstract socket (autobound: `bind` of the family alone;
    // a path cannot be bound where there is no filesystem) for the vhost handler.
    Allow::Any(SYS_bind),
    Allow::Any(SYS_listen),
];

/// The flags glibc's `pthread_create` passes to `clone`, as far as they decide what is
/// created: a thread sharing memory, files, fs and signal handlers, in no new namespace.
pub(crate) const THREAD_FLAGS_MASK: u64 = (CLONE_VM
    | CLONE_FS
    | CLONE_FILES
    | CLONE_SIGHAND
    | CLONE_THREAD
    | CLONE_NEWNS
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
    | CLONE_NEWIPC
    | CLONE_NEWUTS
    | CLONE_NEWCGROUP) as u64;
pub(crate) const THREAD_FLAGS: u64 =
    (CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD) as u64;

const THREADS: &[Allow] = &[
    Allow::If(
        SYS_clone,
        &[Cmp {
            arg: 0,
            mask: THREAD_FLAGS_MASK,
            value: THREAD_FLAGS,
            wide: true,
        }],
    ),
    Allow::Any(SYS_clone3),
    Allow::Any(SYS_set_robust_list),
    Allow::Any(SYS_rseq),
    Allow::If(SYS_prctl, &[eq(0, PR_SET_NAME as u64)]),
    Allow::If(SYS_prctl, &[eq(0, PR_GET_NAME as u64)]),
];

const SECCOMP_SELF: &[Allow] = &[
    Allow::If(
        SYS_seccomp,
        &[eq(0, SECCOMP_SET_MODE_FILTER as u64), eq(1, 0)],
    ),
    Allow::If(SYS_prctl, &[eq(0, PR_SET_NO_NEW_PRIVS as u64)]),
];

const FS_PASSTHROUGH: &[Allow] = &[
    Allow::Any(SYS_openat),
    Allow::Any(SYS_openat2),
    Allow::Any(SYS_getdents64),
    Allow::Any(SYS_readlinkat),
    Allow::Any(SYS_mkdirat),
    Allow::Any(SYS_mknodat),
    Allow::Any(SYS_symlinkat),
    Allow::Any(SYS_linkat),
    Allow::Any(SYS_unlinkat),
    Allow::Any(SYS_renameat),
    Allow::Any(SYS_renameat2),
    Allow::Any(SYS_fchmod),
    Allow::Any(SYS_fchmodat),
    Allow::Any(SYS_fchown),
    Allow::Any(SYS_fchownat),
    Allow::Any(SYS_utimensat),
    Allow::Any(SYS_fstatfs),
    Allow::Any(SYS_statfs),
    Allow::Any(SYS_fgetxattr),
    Allow::Any(SYS_fsetxattr),
    Allow::Any(SYS_flistxattr),
    Allow::Any(SYS_fremovexattr),
    Allow::Any(SYS_getxattr),
    Allow::Any(SYS_setxattr),
    Allow::Any(SYS_listxattr),
    Allow::Any(SYS_removexattr),
    Allow::Any(SYS_lgetxattr),
    Allow::Any(SYS_lsetxattr),
    Allow::Any(SYS_llistxattr),
    Allow::Any(SYS_lremovexattr),
    Allow::Any(SYS_copy_file_range),
    Allow::Any(SYS_flock),
    Allow::Any(SYS_umask),
    Allow::Any(SYS_fchdir),
    Allow::Any(SYS_setresuid),
    Allow::Any(SYS_setresgid),
    Allow::Any(SYS_dup3),
];

const MEMFD_CREATE: &[Allow] = &[Allow::Any(SYS_memfd_create)];

const IO_URING: &[Allow] = &[Allow::Any(SYS_io_uring_enter)];

const UNLINK: &[Allow] = &[Allow::Any(SYS_unlink), Allow::Any(SYS_unlinkat)];

const REAPER: &[Allow] = &[
    Allow::Any(SYS_wait4),
    Allow::Any(SYS_waitid),
    Allow::Any(SYS_kill),
    Allow::Any(SYS_rt_sigtimedwait),
    Allow::Any(SYS_rt_sigprocmask),
    Allow::Any(SYS_rt_sigaction),
    Allow::Any(SYS_getpid),
    // Removing the daemon's socket file once the child is gone, through the directory fd it
    // holds (landlock allows nothing else): checked first, then unlinked.
    Allow::Any(SYS_newfstatat),
    Allow::Any(SYS_unlinkat),
];

impl Group {
    /// Every group.
    pub const ALL: [Group; 19] = [
        Group::Exit,
        Group::Memory,
        Group::Futex,
        Group::Clock,
        Group::Signals,
        Group::ProcessInfo,
        Group::Epoll,
        Group::FdIo,
        Group::FileSync,
        Group::SocketMsg,
        Group::Accept,
        Group::UnixSockets,
        Group::Threads,
        Group::SeccompSelf,
        Group::FsPassthrough,
        Group::MemfdCreate,
        Group::Unlink,
        Group::Reaper,
        Group::IoUring,
    ];

    /// The syscalls of the group.
    pub fn syscalls(self) -> &'static [Allow] {
        match self {
            Group::Exit => EXIT,
            Group::Memory => MEMORY,
            Group::Futex => FUTEX,
            Group::Clock => CLOCK,
            Group::Signals => SIGNALS,
            Group::ProcessInfo => PROCESS_INFO,
            Group::Epoll => EPOLL,
            Group::FdIo => FD_IO,
            Group::FileSync => FILE_SYNC,
            Group::SocketMsg => SOCKET_MSG,
            Group::Accept => ACCEPT,
            Group::UnixSockets => UNIX_SOCKETS,
            Group::Threads => THREADS,
            Group::SeccompSelf => SECCOMP_SELF,
            Group::FsPassthrough => FS_PASSTHROUGH,
            Group::MemfdCreate => MEMFD_CREATE,
            Group::Unlink => UNLINK,
            Group::Reaper => REAPER,
            Group::IoUring => IO_URING,
        }
    }

    /// A short name, for logs and the architecture table.
    pub fn name(self) -> &'static str {
        match self {
            Group::Exit => "exit",
            Group::Memory => "memory",
            Group::Futex => "futex",
            Group::Clock => "clock",
            Group::Signals => "signals",
            Group::ProcessInfo => "process-info",
            Group::Epoll => "epoll/eventfd",
            Group::FdIo => "fd-io",
            Group::FileSync => "file-sync",
            Group::SocketMsg => "socket-msg",
            Group::Accept => "accept",
            Group::UnixSockets => "unix-sockets",
            Group::Threads => "threads",
            Group::SeccompSelf => "seccomp-self",
            Group::FsPassthrough => "fs-passthrough",
            Group::MemfdCreate => "memfd-create",
            Group::Unlink => "unlink",
            Group::Reaper => "reaper",
            Group::IoUring => "io-uring",
        }
    }
}
