//! Ready-to-use policies, one per rqemu process: what each thread kind needs once start-up is
//! over (the table in ARCHITECTURE.md "Sandbox" is this file in prose). A daemon adds the fds
//! it holds (`Policy::keep_fds`) and, for rqemu-fs, the shared directory.

use std::collections::BTreeMap;

use crate::caps::cap;
use crate::seccomp::{AllowList, Group, ThreadKind};
use crate::{Policy, Rlimits};

use Group::*;

/// What every thread does: exit, allocate, lock, read clocks, handle signal masks, ask who it
/// is, read and write the fds it holds.
const BASE: [Group; 7] = [Exit, Memory, Futex, Clock, Signals, ProcessInfo, FdIo];

fn list(extra: &[Group]) -> AllowList {
    AllowList::new(&BASE).with_groups(extra)
}

fn policy(name: &'static str, threads: Vec<(ThreadKind, AllowList)>) -> Policy {
    Policy {
        name,
        keep_fds: Vec::new(),
        close_other_fds: true,
        keep_dir: None,
        keep_socket_dirs: Vec::new(),
        keep_caps: Vec::new(),
        pid_namespace: true,
        net_namespace: true,
        ipc_namespace: true,
        rlimits: Rlimits::default(),
        threads: threads.into_iter().collect::<BTreeMap<_, _>>(),
        remove_at_exit: None,
    }
}

/// The vhost-user control thread of a daemon: accept the next frontend, vhost-user messages
/// (recvmsg with SCM_RIGHTS: memfds, eventfds), map the guest memory, start queue workers.
fn vhost_control() -> AllowList {
    list(&[Epoll, SocketMsg, Accept, Threads, FileSync])
}

/// rqemu-blk: the image fds are open; queue workers read and write them (`pread`/`pwrite`/
/// `preadv`/`pwritev`), flush (`fdatasync`), discard and write zeroes (`fallocate`), or
/// submit to the queue's io_uring made at start-up (`--aio io-uring`: `io_uring_enter`; the
/// control and signal threads wait there for I/O in flight before a flush). The frontend's
/// messages go through the relay (in-flight tracking): the control thread makes the relay's
/// private socket pair, the relay threads pass messages with their fds and answer
/// GET_INFLIGHT_FD (a new memfd, sized and mapped shared) and SET_INFLIGHT_FD (mapped).
/// No capabilities; an empty root.
pub fn blk() -> Policy {
    policy(
        "rqemu-blk",
        vec![
            (
                ThreadKind::Control,
                vhost_control().union(&list(&[IoUring, UnixSockets])),
            ),
            (ThreadKind::Queue, list(&[Epoll, FileSync, IoUring])),
            (
                ThreadKind::Helper,
                list(&[Epoll, SocketMsg, MemfdCreate, FileSync]),
            ),
            (ThreadKind::Signal, list(&[FileSync, IoUring])),
        ],
    )
}

/// `TUNSETOFFLOAD` (`_IOW('T', 208, unsigned int)`): offloads follow the guest's features.
pub const TUNSETOFFLOAD: u32 = 0x4004_54d0;
/// `TUNSETVNETHDRSZ` (`_IOW('T', 216, int)`).
pub const TUNSETVNETHDRSZ: u32 = 0x4004_54d8;

/// `TUNSETQUEUE` (`_IOW('T', 217, int)`).
pub const TUNSETQUEUE: u32 = 0x4004_54d9;

/// rqemu-net: the tap queues are open; queue workers read and write frames on them; the
/// control thread sets offloads (`TUNSETOFFLOAD`, no capability needed on an attached queue);
/// the relay threads pass vhost-user messages with their fds between two sockets.
pub fn net() -> Policy {
    let tap = [TUNSETOFFLOAD, TUNSETVNETHDRSZ];
    policy(
        "rqemu-net",
        vec![
            (
                ThreadKind::Control,
                list(&[Epoll, SocketMsg, Accept, Threads, UnixSockets]).with_ioctls(&tap),
            ),
            // A multi-queue tap's queue is attached/detached by its worker as the guest
            // enables the pair (`TUNSETQUEUE`, no capability needed on its own tap).
            (
                ThreadKind::Queue,
                list(&[Epoll]).with_ioctls(&[TUNSETQUEUE]),
            ),
            (ThreadKind::Helper, list(&[Epoll, SocketMsg])),
            (ThreadKind::Signal, list(&[])),
        ],
    )
}

/// rqemu-fs: the shared directory is the whole filesystem (the new root); queue workers run
/// fuse-backend-rs's passthrough (`openat`, `statx`, `getdents64`, the `*at` calls, xattrs,
/// per-thread `setresuid`/`setresgid`), spawn SETLKW waiters (helper threads). Keeps the
/// capabilities a passthrough filesystem of several users needs (virtiofsd's set); many fds.
pub fn fs(shared_dir: impl Into<std::path::PathBuf>, writable: bool) -> Policy {
    let mut p = policy(
        "rqemu-fs",
        vec![
            (ThreadKind::Control, vhost_control()),
            (
                ThreadKind::Queue,
                list(&[Epoll, FileSync, FsPassthrough, Threads]),
            ),
            (ThreadKind::Helper, list(&[Epoll, FsPassthrough])),
            (ThreadKind::Signal, list(&[FileSync])),
        ],
    )
    .keep_dir(shared_dir, writable);
    p.keep_caps = vec![
        cap::CHOWN,
        cap::DAC_OVERRIDE,
        cap::FOWNER,
        cap::FSETID,
        cap::SETGID,
        cap::SETUID,
        cap::MKNOD,
        cap::SETFCAP,
    ];
    p.rlimits.nofile = Some(1_048_576);
    p
}

/// rqemu-vsock: the vhost-user listener and the host-side `PATH` listener are open; the queue
/// worker accepts host connections on `PATH` and connects new AF_UNIX sockets to `PATH_<port>`
/// for guest connections (`socket`/`connect`: the daemon adds the directory of `PATH` as a kept
/// socket directory, bind-mounted at the same path in `--sandbox namespace`), reads and writes
/// them (`recvfrom`/`sendto`, `shutdown`), polls them in its epoll instance. No capabilities.
pub fn vsock() -> Policy {
    policy(
        "rqemu-vsock",
        vec![
            (ThreadKind::Control, vhost_control()),
            (
                ThreadKind::Queue,
                list(&[Epoll, SocketMsg, Accept, UnixSockets]),
            ),
            (ThreadKind::Signal, list(&[])),
        ],
    )
}

/// The forwarding-protocol control thread: accept, the SEQPACKET handshake (recvmsg with the
/// ring memfd and doorbell eventfds), map the rings, start ring workers.
fn forwarding_control() -> AllowList {
    list(&[Epoll, SocketMsg, Accept, Threads])
}

/// rqemu-serial: console output goes to the fds opened at start-up (a file or stdio); ring
/// workers serve register accesses; a helper thread reads console input; the signal thread
/// removes the socket path on the way out (`unlink`, which finds nothing in the sandbox).
pub fn serial() -> Policy {
    policy(
        "rqemu-serial",
        vec![
            (ThreadKind::Control, forwarding_control()),
            (ThreadKind::Ring, list(&[Epoll])),
            (ThreadKind::Helper, list(&[Epoll])),
            (ThreadKind::Signal, list(&[FileSync, Unlink])),
        ],
    )
}

/// rqemu-rtc: ring workers serve CMOS accesses (the host clock), a helper resamples interrupt
/// lines; the signal thread as rqemu-serial's.
pub fn rtc() -> Policy {
    policy(
        "rqemu-rtc",
        vec![
            (ThreadKind::Control, forwarding_control()),
            (ThreadKind::Ring, list(&[Epoll])),
            (ThreadKind::Helper, list(&[Epoll])),
            (ThreadKind::Signal, list(&[Unlink])),
        ],
    )
}

/// `KVM_RUN` (`_IO(KVMIO, 0x80)`).
pub const KVM_RUN: u32 = 0xae80;

/// How rqemu-vmm runs its vCPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmAccel {
    /// KVM: vCPU threads issue `KVM_RUN` and the listed ioctls; the control thread the listed
    /// VM ioctls (irq lines, irqfd/ioeventfd for reattached devices).
    Kvm {
        /// vCPU ioctls besides `KVM_RUN`.
        vcpu_ioctls: Vec<u32>,
        /// VM ioctls of the control thread.
        vm_ioctls: Vec<u32>,
    },
    /// The software CPU: vCPU threads only compute, lock, and write kick eventfds.
    Tcg,
}

/// rqemu-vmm: guest RAM is a memfd mapped at start-up; vCPU threads run the guest and, on MMIO
/// exits, talk to the device daemons (vhost-user frontend messages, forwarding rings and
/// doorbells: `sendmsg`/`recvmsg`, `poll`); the control thread and the forwarding supervisor
/// (reattaching restarted daemons: AF_UNIX `connect`, new memfd rings) take the control list;
/// helpers poll call eventfds (TCG), watch vhost-user sockets and read console input; with
/// the software CPU, each vCPU's JIT compile thread only computes and maps memory. No
/// capabilities; its own mount and ipc namespaces.
pub fn vmm(accel: VmmAccel) -> Policy {
    let tcg = accel == VmmAccel::Tcg;
    let (vcpu, control) = match accel {
        VmmAccel::Kvm {
            mut vcpu_ioctls,
            vm_ioctls,
        } => {
            vcpu_ioctls.push(KVM_RUN);
            (
                list(&[Epoll, SocketMsg]).with_ioctls(&vcpu_ioctls),
                AllowList::new(&[]).with_ioctls(&vm_ioctls),
            )
        }
        VmmAccel::Tcg => (list(&[Epoll, SocketMsg]), AllowList::new(&[])),
    };
    let control = control.union(&list(&[
        Epoll,
        SocketMsg,
        Accept,
        UnixSockets,
        Threads,
        MemfdCreate,
        FileSync,
        // Removing the API socket at exit (finds nothing in the empty root; unconfined, works).
        Unlink,
    ]));
    let mut p = policy(
        "rqemu-vmm",
        vec![
            (ThreadKind::Control, control),
            (ThreadKind::Vcpu, vcpu),
            (ThreadKind::Helper, list(&[Epoll])),
            (ThreadKind::Signal, list(&[])),
        ],
    );
    if tcg {
        // The JIT's compile threads: compute, map code.
        p.threads.insert(ThreadKind::Compiler, list(&[]));
    }
    p.pid_namespace = false;
    p.net_namespace = false;
    p
}

/// Every policy, by name (for tests and the probe).
pub fn by_name(name: &str, shared_dir: Option<&std::path::Path>) -> Option<Policy> {
    Some(match name {
        "blk" => blk(),
        "net" => net(),
        "fs" => fs(shared_dir?, true),
        "serial" => serial(),
        "rtc" => rtc(),
        "vsock" => vsock(),
        "vmm-kvm" => vmm(VmmAccel::Kvm {
            vcpu_ioctls: Vec::new(),
            vm_ioctls: Vec::new(),
        }),
        "vmm-tcg" => vmm(VmmAccel::Tcg),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SeccompAction;

    fn all() -> Vec<Policy> {
        ["blk", "net", "serial", "rtc", "vsock", "vmm-kvm", "vmm-tcg"]
            .iter()
            .map(|n| by_name(n, None).unwrap())
            .chain([fs("/srv", false)])
            .collect()
    }

    #[test]
    fn every_policy_compiles() {
        for p in all() {
            for (kind, l) in &p.threads {
                assert!(
                    !l.compile(SeccompAction::Kill).unwrap().is_empty(),
                    "{} {kind:?}",
                    p.name
                );
            }
            assert_eq!(
                p.process_allow_list()
                    .compile(SeccompAction::Log)
                    .unwrap()
                    .len(),
                2
            );
        }
    }

    #[test]
    fn only_fs_keeps_capabilities_and_only_fs_walks_paths() {
        for p in all() {
            let l = p.process_allow_list();
            let fs = p.name == "rqemu-fs";
            assert_eq!(!p.keep_caps.is_empty(), fs, "{}", p.name);
            assert_eq!(l.mentions(libc::SYS_openat), fs, "{}", p.name);
            assert_eq!(l.mentions(libc::SYS_getdents64), fs, "{}", p.name);
            // Nobody executes, forks (clone is thread-only), or opens a non-UNIX socket.
            assert!(!l.mentions(libc::SYS_execve), "{}", p.name);
            assert!(!l.mentions(libc::SYS_fork), "{}", p.name);
            assert!(!l.mentions(libc::SYS_ptrace), "{}", p.name);
            assert!(!l.mentions(libc::SYS_mount), "{}", p.name);
        }
    }

    #[test]
    fn vcpu_threads_get_kvm_run_and_little_more() {
        let p = vmm(VmmAccel::Kvm {
            vcpu_ioctls: vec![],
            vm_ioctls: vec![0x4020_ae76],
        });
        let vcpu = &p.threads[&ThreadKind::Vcpu];
        assert!(vcpu.ioctls.contains(&KVM_RUN));
        assert!(!vcpu.ioctls.contains(&0x4020_ae76));
        assert!(!vcpu.mentions(libc::SYS_accept4));
        assert!(!vcpu.mentions(libc::SYS_socket));
        assert!(!vcpu.mentions(libc::SYS_clone));
        assert!(p.process_allow_list().ioctls.contains(&0x4020_ae76));
        let tcg = vmm(VmmAccel::Tcg);
        assert!(!tcg.threads[&ThreadKind::Vcpu].ioctls.contains(&KVM_RUN));
    }

    #[test]
    fn queue_workers_are_narrower_than_the_process() {
        let p = blk();
        let q = &p.threads[&ThreadKind::Queue];
        assert!(!q.mentions(libc::SYS_accept4));
        assert!(!q.mentions(libc::SYS_recvmsg));
        assert!(q.mentions(libc::SYS_fdatasync));
        assert!(p.process_allow_list().mentions(libc::SYS_accept4));
        assert!(p.process_allow_list().mentions(libc::SYS_seccomp));
    }
}
