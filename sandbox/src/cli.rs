//! The command-line face of the sandbox: `--sandbox` and `--seccomp`, with virtiofsd's names,
//! as a [`clap::Args`] struct every daemon flattens into its own options.

/// How the filesystem view is taken away (`--sandbox`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// New mount (+ pid, net, ipc as the policy says) namespaces, through a user namespace when
    /// not privileged, and `pivot_root` into an empty tmpfs (or the kept directory).
    Namespace,
    /// `chroot` into an empty directory (or the kept directory); no namespaces.
    Chroot,
    /// No filesystem confinement beyond landlock (which also works unprivileged).
    None,
}

impl SandboxMode {
    /// The virtiofsd-style name.
    pub fn name(self) -> &'static str {
        match self {
            SandboxMode::Namespace => "namespace",
            SandboxMode::Chroot => "chroot",
            SandboxMode::None => "none",
        }
    }
}

/// What the seccomp filter does with a syscall outside the allow-list (`--seccomp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompAction {
    /// Kill the whole process (SIGSYS): the default.
    Kill,
    /// Allow it, but have the kernel log it (audit): to find what a policy misses.
    Log,
    /// Send SIGSYS to the thread (a debugger or a handler can see the syscall).
    Trap,
    /// No seccomp filter at all.
    None,
}

impl SeccompAction {
    /// The virtiofsd-style name.
    pub fn name(self) -> &'static str {
        match self {
            SeccompAction::Kill => "kill",
            SeccompAction::Log => "log",
            SeccompAction::Trap => "trap",
            SeccompAction::None => "none",
        }
    }
}

/// `--sandbox` and `--seccomp`, to `#[command(flatten)]` into a daemon's options.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct SandboxArgs {
    /// Filesystem confinement: namespace, chroot or none (default: the strongest the
    /// privileges allow, said in the log at start-up).
    #[arg(long = "sandbox", value_enum)]
    pub sandbox: Option<SandboxMode>,
    /// What a syscall outside the allow-list does: kill (default), log, trap, or none (no
    /// filter).
    #[arg(long = "seccomp", value_enum, default_value = "kill")]
    pub seccomp: SeccompAction,
}

impl Default for SandboxArgs {
    fn default() -> Self {
        SandboxArgs {
            sandbox: None,
            seccomp: SeccompAction::Kill,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sandbox: SandboxArgs,
    }

    #[test]
    fn defaults_are_auto_and_kill() {
        let cli = Cli::try_parse_from(["d"]).unwrap();
        assert_eq!(cli.sandbox, SandboxArgs::default());
    }

    #[test]
    fn virtiofsd_names_parse() {
        let cli = Cli::try_parse_from(["d", "--sandbox", "chroot", "--seccomp", "log"]).unwrap();
        assert_eq!(cli.sandbox.sandbox, Some(SandboxMode::Chroot));
        assert_eq!(cli.sandbox.seccomp, SeccompAction::Log);
        for (name, mode) in [
            ("namespace", SandboxMode::Namespace),
            ("none", SandboxMode::None),
        ] {
            let cli = Cli::try_parse_from(["d", "--sandbox", name]).unwrap();
            assert_eq!(cli.sandbox.sandbox, Some(mode));
            assert_eq!(mode.name(), name);
        }
        for a in [
            SeccompAction::Kill,
            SeccompAction::Trap,
            SeccompAction::None,
        ] {
            let cli = Cli::try_parse_from(["d", "--seccomp", a.name()]).unwrap();
            assert_eq!(cli.sandbox.seccomp, a);
        }
        assert!(Cli::try_parse_from(["d", "--seccomp", "allow"]).is_err());
    }
}
