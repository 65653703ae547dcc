//! Seccomp allow-lists as data ([`AllowList`]: groups + the caller's `ioctl` numbers), built
//! into BPF with `seccompiler` at start-up, applied to every thread (TSYNC) or to the calling
//! thread only (a narrower filter for a worker thread created later: filters stack, the
//! strictest answer wins).

pub mod groups;

use std::collections::{BTreeMap, BTreeSet};

use seccompiler::{
    BpfProgram, SeccompAction as Action, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

pub use groups::{Allow, Cmp, Group};

use crate::SeccompAction;

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// This architecture has no seccompiler back-end.
    #[error("seccomp: unsupported architecture {0}")]
    Arch(&'static str),
    /// seccompiler refused the rules (a bug in an allow-list).
    #[error("seccomp: building the {what} filter")]
    Build {
        /// Which filter.
        what: String,
        /// The error.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("seccomp: installing the filter")]
    Install(#[source] seccompiler::Error),
}

/// The kinds of threads whose needs differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// The thread that calls [`crate::enter`] and serves the control connection (vhost-user
    /// messages, the forwarding handshake, the VMM's main loop).
    Control,
    /// A virtqueue worker (one per queue): epoll on kick/exit eventfds, the device's I/O.
    Queue,
    /// The `sigwait` thread: waits for SIGTERM/SIGINT/SIGHUP, flushes, exits.
    Signal,
    /// A forwarding-protocol ring thread (serial, rtc): shared-memory ring, doorbell eventfds.
    Ring,
    /// A helper thread (rqemu-net's vhost-user relay, rqemu-fs's lock waiters, console
    /// output).
    Helper,
    /// A vCPU thread of rqemu-vmm (KVM_RUN, or the software CPU loop).
    Vcpu,
    /// rqemu-vmm's JIT compile thread: computes and maps the code it made (executable only
    /// where the policy allows it).
    Compiler,
}

impl ThreadKind {
    /// Lower-case name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Control => "control",
            ThreadKind::Queue => "queue",
            ThreadKind::Signal => "signal",
            ThreadKind::Ring => "ring",
            ThreadKind::Helper => "helper",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Compiler => "compiler",
        }
    }
}

/// An allow-list: groups, the `ioctl` request numbers allowed, and whether mappings may be
/// executable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    /// The groups.
    pub groups: BTreeSet<Group>,
    /// `ioctl` is allowed with these request numbers only (compared on 32 bits, the kernel's
    /// `unsigned int cmd`).
    pub ioctls: BTreeSet<u32>,
    /// `mmap`/`mprotect` with `PROT_EXEC` (only the Memory group's own calls are concerned).
    pub exec: bool,
}

/// The ioctls every thread may issue: `FIONBIO`, `FIOCLEX` (std's non-blocking and close-on-exec
/// helpers) and `TCGETS` (isatty, for log colours).
pub const BASE_IOCTLS: [u32; 3] = [
    libc::FIONBIO as u32,
    libc::FIOCLEX as u32,
    libc::TCGETS as u32,
];

impl AllowList {
    /// A list of these groups (plus the base ioctls).
    pub fn new(groups: &[Group]) -> Self {
        AllowList {
            groups: groups.iter().copied().collect(),
            ioctls: BASE_IOCTLS.into_iter().collect(),
            exec: false,
        }
    }

    /// Adds `ioctl` request numbers.
    pub fn with_ioctls(mut self, ioctls: &[u32]) -> Self {
        self.ioctls.extend(ioctls.iter().copied());
        self
    }

    /// Adds groups.
    pub fn with_groups(mut self, groups: &[Group]) -> Self {
        self.groups.extend(groups.iter().copied());
        self
    }

    /// A copy with more groups.
    pub fn with_groups_cloned(&self, groups: &[Group]) -> Self {
        self.clone().with_groups(groups)
    }

    /// The union of two lists (what a process whose threads have either needs).
    pub fn union(&self, other: &AllowList) -> AllowList {
        AllowList {
            groups: self.groups.union(&other.groups).copied().collect(),
            ioctls: self.ioctls.union(&other.ioctls).copied().collect(),
            exec: self.exec || other.exec,
        }
    }

    /// Whether the list allows syscall `nr` in some form (with some arguments).
    pub fn mentions(&self, nr: libc::c_long) -> bool {
        self.rules().contains_key(&nr)
    }

    /// Syscall number → `None` (any arguments) or the alternatives of argument comparisons.
    pub fn rules(&self) -> BTreeMap<libc::c_long, Option<Vec<Vec<Cond>>>> {
        let mut rules: BTreeMap<libc::c_long, Option<Vec<Vec<Cond>>>> = BTreeMap::new();
        let mut add = |nr: libc::c_long, conds: Option<Vec<Cond>>| {
            let entry = rules.entry(nr).or_insert_with(|| Some(Vec::new()));
            match (entry.as_mut(), conds) {
                (None, _) => {}
                (Some(_), None) => *entry = None,
                (Some(alts), Some(c)) => alts.push(c),
            }
        };
        for g in &self.groups {
            for a in g.syscalls() {
                match *a {
                    Allow::Any(nr) => add(nr, None),
                    Allow::If(nr, cmps) => {
                        add(nr, Some(cmps.iter().map(|c| Cond::Arg(*c)).collect()))
                    }
                }
            }
            if *g == Group::Memory {
                for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
                    if self.exec {
                        add(nr, None);
                    } else {
                        let no_exec = Cmp {
                            arg: 2,
                            mask: libc::PROT_EXEC as u64,
                            value: 0,
                            wide: false,
                        };
                        add(nr, Some(vec![Cond::Arg(no_exec)]));
                    }
                }
            }
        }
        for req in &self.ioctls {
            add(libc::SYS_ioctl, Some(vec![Cond::Ioctl(*req)]));
        }
        rules
    }

    /// Builds the BPF programs for `action` (empty for [`SeccompAction::None`]), in the order
    /// they must be installed: a filter answering `clone3` with ENOSYS (its flags sit in memory
    /// where BPF cannot check them; glibc then falls back to `clone`, whose flags are checked),
    /// then the allow-list itself (last, so installing the first needs nothing it forbids).
    pub fn compile(&self, action: SeccompAction) -> Result<Vec<BpfProgram>, SeccompError> {
        let mismatch = match action {
            SeccompAction::None => return Ok(Vec::new()),
            SeccompAction::Kill => Action::KillProcess,
            SeccompAction::Log => Action::Log,
            SeccompAction::Trap => Action::Trap,
        };
        let arch: TargetArch = std::env::consts::ARCH
            .try_into()
            .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))?;
        let build = |what: &str, e| SeccompError::Build {
            what: what.to_string(),
            source: e,
        };
        let mut map = BTreeMap::new();
        for (nr, alts) in self.rules() {
            let rules = match alts {
                None => Vec::new(),
                Some(alts) => alts
                    .iter()
                    .map(|conds| {
                        let conds = conds
                            .iter()
                            .map(|c| c.to_seccompiler())
                            .collect::<Result<Vec<_>, _>>()?;
                        SeccompRule::new(conds)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| build("allow-list", e))?,
            };
            map.insert(nr, rules);
        }
        let main = SeccompFilter::new(map, mismatch, Action::Allow, arch)
            .and_then(BpfProgram::try_from)
            .map_err(|e| build("allow-list", e))?;
        let mut clone3 = BTreeMap::new();
        clone3.insert(libc::SYS_clone3, Vec::new());
        let clone3 = SeccompFilter::new(
            clone3,
            Action::Allow,
            Action::Errno(libc::ENOSYS as u32),
            arch,
        )
        .and_then(BpfProgram::try_from)
        .map_err(|e| build("clone3", e))?;
        Ok(vec![clone3, main])
    }
}

/// One condition of an alternative.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cond {
    /// A 64-bit masked comparison.
    Arg(Cmp),
    /// `ioctl`'s request (argument 1) equals this, on 32 bits.
    Ioctl(u32),
}

impl Cond {
    fn to_seccompiler(self) -> Result<SeccompCondition, seccompiler::BackendError> {
        match self {
            Cond::Arg(c) => {
                let (len, full) = if c.wide {
                    (SeccompCmpArgLen::Qword, u64::MAX)
                } else {
                    (SeccompCmpArgLen::Dword, u64::from(u32::MAX))
                };
                let op = if c.mask == full {
                    SeccompCmpOp::Eq
                } else {
                    SeccompCmpOp::MaskedEq(c.mask)
                };
                SeccompCondition::new(c.arg, len, op, c.value)
            }
            Cond::Ioctl(req) => {
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, u64::from(req))
            }
        }
    }
}

/// Installs `programs` on every thread of the process (TSYNC; the kernel also sets
/// `no_new_privs` on every thread).
pub fn apply_all_threads(programs: &[BpfProgram]) -> Result<(), SeccompError> {
    for p in programs {
        seccompiler::apply_filter_all_threads(p).map_err(SeccompError::Install)?;
    }
    Ok(())
}

/// Installs `programs` on the calling thread only (a narrower filter on top of the process's).
pub fn apply_this_thread(programs: &[BpfProgram]) -> Result<(), SeccompError> {
    for p in programs {
        seccompiler::apply_filter(p).map_err(SeccompError::Install)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_wins_over_conditions_and_conditions_accumulate() {
        let l = AllowList::new(&[Group::Threads, Group::SeccompSelf]);
        let rules = l.rules();
        // prctl: PR_SET_NAME, PR_GET_NAME (threads), PR_SET_NO_NEW_PRIVS (seccomp-self).
        assert_eq!(rules[&libc::SYS_prctl].as_ref().unwrap().len(), 3);
        assert_eq!(rules[&libc::SYS_clone3], None);
        let l = AllowList::new(&[Group::Reaper, Group::Signals]);
        assert_eq!(l.rules()[&libc::SYS_rt_sigtimedwait], None);
    }

    #[test]
    fn exec_mappings_only_when_asked() {
        let l = AllowList::new(&[Group::Memory]);
        assert!(l.rules()[&libc::SYS_mmap].is_some());
        let mut x = l.clone();
        x.exec = true;
        assert_eq!(x.rules()[&libc::SYS_mmap], None);
        assert_eq!(l.union(&x).rules()[&libc::SYS_mprotect], None);
    }

    #[test]
    fn ioctls_are_listed_one_by_one() {
        let l = AllowList::new(&[]).with_ioctls(&[0xAE80]);
        let alts = l.rules()[&libc::SYS_ioctl].clone().unwrap();
        assert_eq!(alts.len(), BASE_IOCTLS.len() + 1);
        assert!(alts.contains(&vec![Cond::Ioctl(0xAE80)]));
        assert!(!l.mentions(libc::SYS_socket));
    }

    #[test]
    fn every_group_compiles_for_every_action() {
        let all = AllowList::new(&Group::ALL).with_ioctls(&[0xAE80]);
        for a in [SeccompAction::Kill, SeccompAction::Log, SeccompAction::Trap] {
            let p = all.compile(a).unwrap();
            assert_eq!(p.len(), 2);
            assert!(!p[0].is_empty());
        }
        assert!(all.compile(SeccompAction::None).unwrap().is_empty());
    }
}
