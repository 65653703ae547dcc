//! rqemu-vmm's confinement (`rqemu-sandbox`): entered by the main thread once the machine is
//! built and its devices attached (guest RAM mapped, `/dev/kvm` fds open, daemons connected,
//! the kernel read), while it is still the only thread; every thread created afterwards
//! narrows itself to the allow-list of its kind ([`VmmThread`] → [`ThreadKind`]).
//!
//! The VMM keeps reaching its device sockets by path (the forwarding supervisor and the
//! vhost-user control threads reconnect restarted daemons): the directories of the `--device-socket` paths stay reachable
//! ([`socket_dirs`]: bind-mounted read-only at their own path under the empty root; landlock
//! denies every file access there, connecting to a socket is not one).
//!
//! Adding a thread: a [`VmmThread`] variant mapped onto a [`ThreadKind`] (a named allow-list of
//! `rqemu_sandbox::policies::vmm`), and `confine_current(VmmThread::X)` first thing in it.

use std::path::PathBuf;
use std::sync::OnceLock;

use rqemu_sandbox::policies::{self, VmmAccel};
use rqemu_sandbox::{Policy, Report, Sandbox, SandboxArgs, SandboxError, ThreadKind};

use crate::vm::DeviceSocketConfig;

/// The threads of rqemu-vmm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmThread {
    /// The main thread once the guest runs: waits for its end, kicks and joins the vCPUs,
    /// unregisters irqfds, shuts the device connections down.
    Main,
    /// A vCPU thread: `KVM_RUN` (or the software CPU), port/MMIO exits dispatched to the
    /// buses: forwarding rings and doorbells (vhost-user messages are posted to the device's
    /// control thread).
    Vcpu,
    /// The `sigwait` thread (SIGINT/SIGTERM stop the VM).
    Signal,
    /// The forwarding supervisor: snapshots, reconnecting restarted daemons by path (AF_UNIX
    /// `connect`), new rings (`memfd_create`), their irqfds (VM ioctls).
    Supervisor,
    /// The TCG irqfd poller (call eventfds → the software interrupt chips).
    IrqfdPoller,
    /// A vhost-user device's control thread: every vhost-user message (activation, reset,
    /// config writes the vCPUs post), hang-up polls, reconnecting a restarted daemon by path
    /// (AF_UNIX `connect`) and replaying the device state into it.
    VhostControl,
    /// The console input reader (stdin → the in-VMM COM1).
    StdinReader,
    /// A TCG vCPU's JIT compile thread: translates hot guest code, maps the host code.
    JitCompiler,
    /// The management API server (`--api-socket`): accepts, reads and answers requests;
    /// pause/resume (the guest clock: `KVM_GET_CLOCK`/`KVM_SET_CLOCK`), power button
    /// (`KVM_IRQ_LINE`).
    Api,
}

impl VmmThread {
    /// The sandbox thread kind (allow-list) of this thread.
    pub fn kind(self) -> ThreadKind {
        match self {
            VmmThread::Main | VmmThread::Supervisor | VmmThread::Api | VmmThread::VhostControl => {
                ThreadKind::Control
            }
            VmmThread::Vcpu => ThreadKind::Vcpu,
            VmmThread::JitCompiler => ThreadKind::Compiler,
            VmmThread::Signal => ThreadKind::Signal,
            VmmThread::IrqfdPoller | VmmThread::StdinReader => ThreadKind::Helper,
        }
    }
}

/// `_IOW(KVMIO, nr, size)`.
const fn kvm_iow(nr: u32, size: usize) -> u32 {
    (1 << 30) | ((size as u32) << 16) | (0xae << 8) | nr
}

/// `_IOR(KVMIO, nr, size)`.
const fn kvm_ior(nr: u32, size: usize) -> u32 {
    (2 << 30) | ((size as u32) << 16) | (0xae << 8) | nr
}

/// `KVM_IRQFD`: (un)registering irqfds (reattached daemons, the serial line at exit).
pub const KVM_IRQFD: u32 = kvm_iow(0x76, std::mem::size_of::<kvm_bindings::kvm_irqfd>());
/// `KVM_IRQ_LINE`: interrupt line levels.
pub const KVM_IRQ_LINE: u32 = kvm_iow(0x61, std::mem::size_of::<kvm_bindings::kvm_irq_level>());
/// `KVM_IOEVENTFD`: (un)registering ioeventfds.
pub const KVM_IOEVENTFD: u32 = kvm_iow(0x79, std::mem::size_of::<kvm_bindings::kvm_ioeventfd>());
/// `KVM_GET_CLOCK`: the guest clock when the API pauses the VM.
pub const KVM_GET_CLOCK: u32 = kvm_ior(0x7c, std::mem::size_of::<kvm_bindings::kvm_clock_data>());
/// `KVM_SET_CLOCK`: the guest clock held across a pause.
pub const KVM_SET_CLOCK: u32 = kvm_iow(0x7b, std::mem::size_of::<kvm_bindings::kvm_clock_data>());
/// `KVM_GET_REGS`: a vCPU's instruction pointer when it stops (diagnostics).
pub const KVM_GET_REGS: u32 = kvm_ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());

/// The policy of rqemu-vmm on accelerator `accel` ("kvm" or "tcg"), keeping `socket_dirs`.
pub fn policy(accel: &str, socket_dirs: Vec<PathBuf>) -> Policy {
    policy_with(accel, socket_dirs, false)
}

/// [`policy`]; `jit`: the vCPU threads and their compile threads generate code (the TCG
/// JIT), so they may map memory executable (`mmap`/`mprotect` with `PROT_EXEC`).
pub fn policy_with(accel: &str, socket_dirs: Vec<PathBuf>, jit: bool) -> Policy {
    let mut p = policy_inner(accel, socket_dirs);
    if jit {
        for k in [ThreadKind::Vcpu, ThreadKind::Compiler] {
            if let Some(v) = p.threads.get_mut(&k) {
                v.exec = true;
            }
        }
    }
    p
}

fn policy_inner(accel: &str, socket_dirs: Vec<PathBuf>) -> Policy {
    let accel = if accel == "kvm" {
        VmmAccel::Kvm {
            vcpu_ioctls: vec![KVM_GET_REGS],
            vm_ioctls: vec![
                KVM_IRQFD,
                KVM_IRQ_LINE,
                KVM_IOEVENTFD,
                KVM_GET_CLOCK,
                KVM_SET_CLOCK,
            ],
        }
    } else {
        VmmAccel::Tcg
    };
    let mut p = policies::vmm(accel).keep_socket_dirs(socket_dirs);
    // Its fds (RAM memfd, KVM, daemon sockets, eventfds, the console file) are held by the
    // machine's objects and all in use: none is closed behind their back.
    p.close_other_fds = false;
    p
}

/// Makes every device socket path absolute and symlink-free (its directory canonicalised; a
/// directory that does not exist is left to the connect error) and returns the directories,
/// to keep reachable in the sandbox.
pub fn socket_dirs(devices: &mut [DeviceSocketConfig]) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for d in devices {
        let (Some(parent), Some(name)) = (d.socket.parent(), d.socket.file_name()) else {
            continue;
        };
        let parent = if parent.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            parent
        };
        if let Ok(dir) = parent.canonicalize() {
            d.socket = dir.join(name);
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs
}

static SANDBOX: OnceLock<Sandbox> = OnceLock::new();

/// Confines the process (call it once, from the only thread): see the module docs.
/// `jit`: see [`policy_with`].
pub fn enter(
    args: &SandboxArgs,
    accel: &str,
    socket_dirs: Vec<PathBuf>,
    jit: bool,
) -> Result<&'static Report, SandboxError> {
    let sandbox = rqemu_sandbox::enter(&policy_with(accel, socket_dirs, jit), args)?;
    let sandbox = SANDBOX.get_or_init(|| sandbox);
    Ok(&sandbox.report)
}

/// Narrows the calling thread to `thread`'s allow-list (nothing when no sandbox was entered:
/// library tests, `--seccomp none` leaves the kinds without filters).
pub fn confine_current(thread: VmmThread) {
    if let Some(s) = SANDBOX.get() {
        if let Err(e) = s.confine_thread(thread.kind()) {
            tracing::error!(
                "{thread:?} thread: narrowing its seccomp filter: {e}; it keeps the process's"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_IRQ_LINE, 0x4008_ae61);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_CLOCK, 0x8030_ae7c);
        assert_eq!(KVM_SET_CLOCK, 0x4030_ae7b);
    }

    #[test]
    fn vcpu_threads_only_get_the_vcpu_ioctls() {
        let p = policy("kvm", Vec::new());
        let vcpu = &p.threads[&ThreadKind::Vcpu];
        assert!(vcpu.ioctls.contains(&KVM_GET_REGS));
        assert!(vcpu.ioctls.contains(&policies::KVM_RUN));
        assert!(!vcpu.ioctls.contains(&KVM_IRQFD));
        assert!(p.threads[&ThreadKind::Control].ioctls.contains(&KVM_IRQFD));
        assert!(!p.threads[&ThreadKind::Control]
            .ioctls
            .contains(&policies::KVM_RUN));
        let tcg = policy("tcg", Vec::new());
        assert!(!tcg.process_allow_list().ioctls.contains(&policies::KVM_RUN));
        assert!(
            !tcg.process_allow_list().exec,
            "no executable mappings without the JIT"
        );
        let jit = policy_with("tcg", Vec::new(), true);
        assert!(jit.threads[&ThreadKind::Vcpu].exec);
        assert!(jit.threads[&ThreadKind::Compiler].exec);
        assert!(!tcg.threads[&ThreadKind::Compiler].exec);
        assert!(!jit.threads[&ThreadKind::Control].exec);
    }

    #[test]
    fn socket_paths_become_canonical_and_their_dirs_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::fs::create_dir(real.join("sub")).unwrap();
        let mut devs = vec![
            DeviceSocketConfig {
                kind: None,
                socket: real.join("sub/../a.sock"),
            },
            DeviceSocketConfig {
                kind: None,
                socket: real.join("b.sock"),
            },
            DeviceSocketConfig {
                kind: None,
                socket: PathBuf::from("/nonexistent-rqemu-dir/c.sock"),
            },
        ];
        let dirs = socket_dirs(&mut devs);
        assert_eq!(dirs, vec![real.clone()]);
        assert_eq!(devs[0].socket, real.join("a.sock"));
        assert_eq!(devs[1].socket, real.join("b.sock"));
        assert_eq!(
            devs[2].socket,
            PathBuf::from("/nonexistent-rqemu-dir/c.sock")
        );
    }

    #[test]
    fn every_thread_has_a_kind_of_the_policy() {
        let p = policy("tcg", Vec::new());
        for t in [
            VmmThread::Main,
            VmmThread::Vcpu,
            VmmThread::Signal,
            VmmThread::Supervisor,
            VmmThread::IrqfdPoller,
            VmmThread::VhostControl,
            VmmThread::StdinReader,
            VmmThread::Api,
            VmmThread::JitCompiler,
        ] {
            assert!(p.threads.contains_key(&t.kind()), "{t:?}");
        }
    }
}
