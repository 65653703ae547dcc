//! Landlock: no filesystem access at all, or read (and write) beneath the kept directory.
//! A layer that also works unprivileged; best effort (the kernel's ABI decides what is
//! enforced, the outcome is reported).

use std::path::Path;

use landlock::{
    Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, RestrictionStatus, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

/// Errors building or applying the ruleset.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// The ruleset could not be built or applied.
    #[error("landlock")]
    Ruleset(#[from] landlock::RulesetError),
    /// The kept directory could not be opened.
    #[error("landlock: opening the kept directory")]
    Dir(#[from] landlock::PathFdError),
}

/// The newest ABI this code asks for; older kernels get what they have.
const ABI_WANTED: ABI = ABI::V6;

/// What landlock enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforced {
    /// Every requested restriction.
    Fully,
    /// Part of them (an older ABI).
    Partially,
    /// None (no landlock in this kernel).
    Not,
}

impl Enforced {
    /// For logs.
    pub fn name(self) -> &'static str {
        match self {
            Enforced::Fully => "fully enforced",
            Enforced::Partially => "partially enforced",
            Enforced::Not => "not enforced (kernel without landlock)",
        }
    }
}

/// Restricts the calling thread (and threads it creates later): no filesystem access outside
/// `dir` (none at all without it); `writable` allows writes beneath it. With `scope_signals`,
/// signals to processes outside the domain and abstract UNIX sockets outside it are denied
/// (ABI 6).
pub fn restrict(
    dir: Option<&Path>,
    writable: bool,
    scope_signals: bool,
) -> Result<Enforced, LandlockError> {
    let all = AccessFs::from_all(ABI_WANTED);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)?;
    if scope_signals {
        ruleset = ruleset.scope(Scope::from_all(ABI_WANTED))?;
    }
    let mut created = ruleset.create()?;
    if let Some(dir) = dir {
        let access = if writable {
            all
        } else {
            AccessFs::from_read(ABI_WANTED)
        };
        created = created.add_rule(PathBeneath::new(PathFd::new(dir)?, access))?;
    }
    let status: RestrictionStatus = created.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforced::Fully,
        RulesetStatus::PartiallyEnforced => Enforced::Partially,
        RulesetStatus::NotEnforced => Enforced::Not,
    })
}

/// Restricts the calling thread to one filesystem action: removing files directly beneath
/// the directory `dir` is open on (the pid-namespace parent removing the daemon's socket).
pub fn restrict_to_removing_in(
    dir: std::os::fd::BorrowedFd<'_>,
) -> Result<Enforced, LandlockError> {
    let all = AccessFs::from_all(ABI_WANTED);
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)?
        .create()?
        .add_rule(PathBeneath::new(dir, AccessFs::RemoveFile))?
        .restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforced::Fully,
        RulesetStatus::PartiallyEnforced => Enforced::Partially,
        RulesetStatus::NotEnforced => Enforced::Not,
    })
}
