//! virtiofsd's command line, as Kata and libvirt use it: rqemu-fs as a drop-in.
//!
//! Same meaning: `--socket-path` (= `--socket`), `--fd`, `--shared-dir`, `--tag`, `--readonly`,
//! `--cache auto|always|never|metadata`, `--xattr`, `--sandbox`, `--seccomp`,
//! `--print-capabilities`, `--log-level`. Accepted with a warning saying what rqemu-fs does
//! instead (never silently): `--thread-pool-size N` (N > 0; one worker thread per queue),
//! `--announce-submounts`, `--inode-file-handles[=prefer]` (served through fds),
//! `--syslog` (the log goes to stderr), and the harmless tuning flags in [`VirtiofsdArgs`].
//! Refused: `--inode-file-handles=mandatory`, and every flag that would change what the guest
//! sees of the host (uid/gid maps, xattr maps, security labels, ACLs, capability edits) —
//! clap rejects them as unknown.

use clap::ValueEnum;

/// Errors of the virtiofsd options.
#[derive(Debug, thiserror::Error)]
pub enum CompatError {
    /// `--inode-file-handles=mandatory`: file handles are not used.
    #[error(
        "--inode-file-handles=mandatory is not supported: rqemu-fs keeps an O_PATH fd per \
         inode (file handles need CAP_DAC_READ_SEARCH, which the sandbox drops)"
    )]
    FileHandlesMandatory,
}

/// virtiofsd's `--inode-file-handles` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InodeFileHandles {
    /// fds only (what rqemu-fs does).
    Never,
    /// File handles when possible (rqemu-fs: fds, with a warning).
    Prefer,
    /// File handles or fail (refused).
    Mandatory,
}

/// virtiofsd's `--log-level` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// The default.
    Info,
    /// Debugging.
    Debug,
    /// Everything.
    Trace,
    /// Nothing.
    Off,
}

/// The virtiofsd options rqemu-fs has no own name for (flattened into its `Args`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct VirtiofsdArgs {
    /// Print the vhost-user backend capabilities (JSON, as virtiofsd) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// virtiofsd's request thread pool: 0 (no pool) is what rqemu-fs does; other values are
    /// accepted with a warning (one worker thread per queue, see --queues).
    #[arg(long, value_name = "N")]
    pub thread_pool_size: Option<usize>,
    /// Accepted with a warning: submounts are not announced to the guest.
    #[arg(long)]
    pub announce_submounts: bool,
    /// never; prefer (accepted with a warning: fds are used); mandatory (refused).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "prefer")]
    pub inode_file_handles: Option<InodeFileHandles>,
    /// Log level (when neither RQEMU_LOG nor RUST_LOG is set).
    #[arg(long, value_enum)]
    pub log_level: Option<LogLevel>,
    /// Accepted with a warning: the log goes to stderr (the journal, under systemd).
    #[arg(long)]
    pub syslog: bool,
    /// Harmless virtiofsd tuning flags, accepted and ignored with a warning.
    #[command(flatten)]
    pub ignored: IgnoredArgs,
}

/// virtiofsd flags that change nothing the guest could rely on; ignored with a warning.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct IgnoredArgs {
    #[arg(long, hide = true)]
    no_xattr: bool,
    #[arg(long, hide = true)]
    no_announce_submounts: bool,
    #[arg(long, hide = true)]
    writeback: bool,
    #[arg(long, hide = true)]
    no_readdirplus: bool,
    #[arg(long, hide = true)]
    allow_direct_io: bool,
    #[arg(long, hide = true)]
    killpriv_v2: bool,
    #[arg(long, hide = true)]
    no_killpriv_v2: bool,
    #[arg(long, hide = true)]
    allow_mmap: bool,
    #[arg(long, hide = true)]
    preserve_noatime: bool,
    #[arg(long, hide = true, value_name = "N")]
    rlimit_nofile: Option<u64>,
    #[arg(long, hide = true, value_name = "GROUP")]
    socket_group: Option<String>,
}

impl IgnoredArgs {
    fn given(&self) -> Vec<&'static str> {
        let flags = [
            (self.no_xattr, "--no-xattr (xattrs are off unless --xattr)"),
            (self.no_announce_submounts, "--no-announce-submounts"),
            (self.writeback, "--writeback (no writeback cache)"),
            (self.no_readdirplus, "--no-readdirplus"),
            (self.allow_direct_io, "--allow-direct-io"),
            (self.killpriv_v2, "--killpriv-v2"),
            (self.no_killpriv_v2, "--no-killpriv-v2"),
            (self.allow_mmap, "--allow-mmap (no DAX window)"),
            (self.preserve_noatime, "--preserve-noatime"),
            (
                self.rlimit_nofile.is_some(),
                "--rlimit-nofile (the limit is raised to 1048576 or the hard limit)",
            ),
            (
                self.socket_group.is_some(),
                "--socket-group (the socket keeps the daemon's group)",
            ),
        ];
        flags
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| *n)
            .collect()
    }
}

impl VirtiofsdArgs {
    /// Refuses what rqemu-fs cannot honour and warns about what it does differently.
    pub fn check_and_warn(&self) -> Result<(), CompatError> {
        for w in self.warnings()? {
            tracing::warn!("virtiofsd option {w}");
        }
        Ok(())
    }

    fn warnings(&self) -> Result<Vec<String>, CompatError> {
        let mut w = Vec::new();
        match self.thread_pool_size {
            Some(n) if n > 0 => w.push(format!(
                "--thread-pool-size {n} ignored: one worker thread per request queue (--queues)"
            )),
            _ => {}
        }
        if self.announce_submounts {
            w.push("--announce-submounts ignored: submounts are not announced".into());
        }
        match self.inode_file_handles {
            Some(InodeFileHandles::Mandatory) => return Err(CompatError::FileHandlesMandatory),
            Some(InodeFileHandles::Prefer) => {
                w.push("--inode-file-handles=prefer: an O_PATH fd per inode is used".into());
            }
            _ => {}
        }
        if self.syslog {
            w.push("--syslog ignored: the log goes to stderr".into());
        }
        w.extend(
            self.ignored
                .given()
                .into_iter()
                .map(|f| format!("{f} ignored")),
        );
        Ok(w)
    }
}

/// What `--print-capabilities` prints (virtiofsd's format; `separate-options`: the options
/// are `--shared-dir` & co., not `-o`; no migration).
pub const CAPABILITIES: &str =
    "{\n  \"type\": \"fs\",\n  \"features\": [\n    \"separate-options\"\n  ]\n}";

/// Handles what must happen before the normal start-up: `--print-capabilities` (printed;
/// returns true: exit now, whatever else is on the line, as virtiofsd) and `--log-level`
/// (becomes `RQEMU_LOG` unless a filter is already set in the environment).
pub fn early(args: impl Iterator<Item = String>) -> bool {
    let args: Vec<String> = args.collect();
    if args.iter().skip(1).any(|a| a == "--print-capabilities") {
        println!("{CAPABILITIES}");
        return true;
    }
    if let Some(level) = log_level(&args) {
        if std::env::var_os("RQEMU_LOG").is_none() && std::env::var_os("RUST_LOG").is_none() {
            // Still single-threaded: nothing reads the environment concurrently.
            std::env::set_var("RQEMU_LOG", level);
        }
    }
    false
}

/// The value of `--log-level X` / `--log-level=X`, if valid.
fn log_level(args: &[String]) -> Option<String> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let v = if a == "--log-level" {
            it.next().cloned()
        } else {
            a.strip_prefix("--log-level=").map(str::to_string)
        };
        if let Some(v) = v {
            return LogLevel::from_str(&v, false)
                .ok()
                .map(|l| format!("{l:?}").to_lowercase());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn log_level_is_read_in_both_spellings() {
        assert_eq!(
            log_level(&argv(&["x", "--log-level", "debug"])).as_deref(),
            Some("debug")
        );
        assert_eq!(
            log_level(&argv(&["x", "--log-level=off"])).as_deref(),
            Some("off")
        );
        assert_eq!(log_level(&argv(&["x", "--log-level", "loud"])), None);
        assert_eq!(log_level(&argv(&["x"])), None);
    }

    #[test]
    fn capabilities_are_virtiofsd_json() {
        let c = CAPABILITIES;
        assert!(c.starts_with('{') && c.ends_with('}'));
        assert!(c.contains("\"type\": \"fs\""), "{c}");
        assert!(c.contains("\"separate-options\""), "{c}");
        assert!(!c.contains("migrate"), "{c}");
    }

    #[test]
    fn differences_warn_and_mandatory_handles_are_refused() {
        let mut a = VirtiofsdArgs {
            thread_pool_size: Some(0),
            ..Default::default()
        };
        assert!(a.warnings().unwrap().is_empty());
        a.thread_pool_size = Some(8);
        a.announce_submounts = true;
        a.syslog = true;
        a.ignored.writeback = true;
        let w = a.warnings().unwrap();
        assert_eq!(w.len(), 4, "{w:?}");
        assert!(w.iter().any(|w| w.contains("--writeback")), "{w:?}");
        a.inode_file_handles = Some(InodeFileHandles::Mandatory);
        assert!(a.warnings().is_err());
    }
}
