//! `rqemu-fs`: a vhost-user virtio-fs daemon sharing one host directory.
//!
//! Start-up order matters: the listening socket is bound first (so `--fd` and socket
//! activation work), then [`sandbox::confine_fs`] confines the still single-threaded process
//! (by default: user namespace when unprivileged, mount+pid+net+ipc namespaces, a private
//! procfs for the passthrough's `/proc/self/fd`, `pivot_root` into the share, capabilities,
//! `no_new_privs`, landlock, seccomp on every thread) and creates the FUSE server inside it.
//! It then serves one frontend at a time and, when that frontend goes away (guest reboot, VMM
//! restart), forgets that guest's inodes and waits for the next. SIGTERM/SIGINT: in-flight
//! requests finish, exit 0. With `--state-file` (opened and locked before confinement) the
//! guest's node and handle ids are kept in that file, and a daemon restarted with it resumes
//! the guest's mount (`rqemu_fs_backend::resume`).
//!
//! The command line also takes virtiofsd's, as Kata and libvirt use it ([`compat`]).

mod backend;
mod compat;
mod sandbox;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use rqemu_daemon::listen::Endpoint;
use rqemu_daemon::startup::{self, Daemon, ListenArgs};
use rqemu_fs_backend::{confine, CacheMode, FsParams, Tag};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CacheArg {
    Auto,
    Always,
    Never,
    Metadata,
}

/// vhost-user virtio-fs daemon: shares one host directory with a guest.
#[derive(Debug, Parser)]
#[command(name = "rqemu-fs", version)]
struct Args {
    #[command(flatten)]
    listen: ListenArgs,
    /// virtiofsd's name for `--socket`.
    #[arg(long = "socket-path", value_name = "PATH", group = "listen")]
    socket_path: Option<PathBuf>,
    /// The directory to share; the guest can reach nothing outside it.
    #[arg(long)]
    shared_dir: PathBuf,
    /// Mount tag (`mount -t virtiofs TAG /mnt`), at most 36 bytes.
    #[arg(long, default_value = "rqemu")]
    tag: String,
    /// Share read-only: every write fails with EROFS.
    #[arg(long)]
    readonly: bool,
    /// Guest caching: auto (1 s timeouts), always (host must not change the dir), never,
    /// metadata (no data cache, long metadata timeouts).
    #[arg(long, value_enum, default_value = "auto")]
    cache: CacheArg,
    /// Serve extended attributes.
    #[arg(long)]
    xattr: bool,
    /// Number of request queues (one worker thread each; plus the hiprio queue).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Keep the guest's FUSE state (node and handle ids, INIT) in this file, so that a
    /// daemon restarted with the same file (after a crash or SIGKILL) resumes the guest's
    /// mount: open files keep working. Created if missing; locked while in use.
    #[arg(long, value_name = "PATH")]
    state_file: Option<PathBuf>,
    #[command(flatten)]
    compat: compat::VirtiofsdArgs,
    /// Diagnostic: once confined, try to walk out through the passthrough's /proc fd (the
    /// result goes to stderr), then make a syscall outside the allow-list (the process dies).
    #[arg(long, hide = true)]
    self_check_escape: bool,
}

fn main() -> ExitCode {
    if compat::early(std::env::args()) {
        return ExitCode::SUCCESS;
    }
    startup::main("rqemu-fs", run)
}

fn params(args: &Args) -> Result<FsParams> {
    let params = FsParams {
        tag: Tag::new(&args.tag)?,
        num_request_queues: args.queues,
        cache: match args.cache {
            CacheArg::Auto => CacheMode::Auto,
            CacheArg::Always => CacheMode::Always,
            CacheArg::Never => CacheMode::Never,
            CacheArg::Metadata => CacheMode::Metadata,
        },
        xattr: args.xattr,
        readonly: args.readonly,
        ..FsParams::default()
    };
    params.validate()?;
    Ok(params)
}

/// Raises the soft open-file limit to the hard one: the passthrough keeps an fd per known
/// inode, and locks and copies an fd per owner/handle (as virtiofsd does by default).
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                tracing::warn!(
                    "cannot raise the open-file limit from {}: {}",
                    lim.rlim_cur,
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

fn run(args: Args, daemon: Daemon) -> Result<()> {
    let params = params(&args)?;
    tracing::debug!("options: {args:?}");
    args.compat.check_and_warn()?;
    raise_nofile_limit();
    let shared = confine::canonical_dir(&args.shared_dir)?;
    let listen = match &args.socket_path {
        Some(p) => ListenArgs {
            socket: Some(p.clone()),
            fd: None,
            ..args.listen.clone()
        },
        None => args.listen.clone(),
    };
    // Bound before confinement (the path is out of reach afterwards). Not through
    // `Daemon::listen_stream`: its exit path would remove the socket by path, which inside
    // the confinement names a file of the share. The pid-namespace parent removes it at exit
    // (other sandbox modes leave it; a stale socket is replaced at the next start).
    let endpoint = listen.endpoint()?;
    rqemu_protocol::listen::allow_uids(listen.allow_uid.clone());
    let listener = rqemu_daemon::listen::stream(&endpoint)?;
    tracing::info!("listening on {endpoint}");
    // Opened (and locked) before confinement: its path is out of reach afterwards.
    let state = args
        .state_file
        .as_deref()
        .map(|p| rqemu_fs_backend::StateFile::open(p, &shared))
        .transpose()?;
    let socket = match &endpoint {
        Endpoint::Path(p) => Some(p.as_path()),
        Endpoint::Fd(_) => None,
    };
    let confined = sandbox::confine_fs(
        &args.listen.sandbox,
        &shared,
        &params,
        listener.as_raw_fd(),
        socket,
        state,
    )
    .with_context(|| format!("confining to {}", shared.display()))?;
    let (server, report, filter) = (confined.server, confined.report, confined.queue_filter);
    server.import()?;
    if args.state_file.is_some() && !server.keeps_state() {
        // A sandbox mode that took it failed before the one that serves.
        tracing::warn!("the state file was lost while confining: the guest's state is not kept");
    }
    server.resume();
    // Test hook: the end-to-end test of the exactly-once replies (rqemu_fs_backend::replay).
    if let Some(op) = std::env::var("RQEMU_FS_TEST_EXIT_AFTER_REPLY")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        tracing::warn!(
            "RQEMU_FS_TEST_EXIT_AFTER_REPLY={op}: exiting once a request of opcode {op} is done \
             and its reply saved, before publishing it (test hook)"
        );
        server.exit_after_saved_reply(op);
    }
    if args.self_check_escape {
        sandbox::self_check_escape(&server);
    }
    tracing::info!(
        "sharing {} as tag {:?}{} with {} request queue(s), cache {:?}, sandbox {}",
        shared.display(),
        params.tag.as_str(),
        if params.readonly { " (read-only)" } else { "" },
        params.num_request_queues,
        params.cache,
        report.mode.name()
    );
    let backend = Arc::new(backend::new(server, params, filter));

    let b = backend.clone();
    daemon.exit_on_signal(move || {
        b.shutdown(|_| ());
        0
    })?;
    let never = rqemu_daemon::vhost::serve_forever(daemon.name(), &listener, &backend)?;
    match never {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<FsParams> {
        let mut argv = vec!["rqemu-fs", "--socket", "/tmp/s", "--shared-dir", "/tmp"];
        argv.extend_from_slice(extra);
        params(&Args::try_parse_from(argv)?)
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let get = || {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit into a valid struct.
            assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
            l
        };
        let hard = get().rlim_max;
        let low = libc::rlimit {
            rlim_cur: 256.min(hard),
            rlim_max: hard,
        };
        // SAFETY: setrlimit with a valid struct; lowering the soft limit is always allowed.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        super::raise_nofile_limit();
        assert_eq!(get().rlim_cur, hard);
    }

    #[test]
    fn options_parse_and_validate() {
        let p = parse(&[]).unwrap();
        assert_eq!(p.tag.as_str(), "rqemu");
        assert_eq!(p.num_request_queues, 1);
        assert_eq!(p.cache, CacheMode::Auto);
        let p = parse(&[
            "--tag", "share", "--cache", "never", "--queues", "4", "--xattr",
        ])
        .unwrap();
        assert_eq!(
            (p.tag.as_str(), p.cache, p.num_request_queues, p.xattr),
            ("share", CacheMode::Never, 4, true)
        );
        let e = parse(&["--tag", &"t".repeat(37)]).unwrap_err().to_string();
        assert!(e.contains("the mount tag is 37 bytes"), "{e}");
        let e = parse(&["--queues", "0"]).unwrap_err().to_string();
        assert!(e.contains("request queue count 0 out of range"), "{e}");
        let e = parse(&["--cache", "sometimes"]).unwrap_err().to_string();
        assert!(e.contains("'sometimes'") && e.contains("--cache"), "{e}");
        let refused = |argv: &[&str]| {
            let mut v = vec!["rqemu-fs"];
            v.extend_from_slice(argv);
            Args::try_parse_from(v).unwrap_err().to_string()
        };
        let e = refused(&["--shared-dir", "/tmp"]);
        assert!(e.contains("--socket <PATH>|--fd <N>"), "{e}");
        let e = refused(&["--fd", "3", "--socket", "/s", "--shared-dir", "/"]);
        assert!(e.contains("cannot be used with"), "{e}");
        assert!(
            e.contains("--fd <N>") && e.contains("--socket <PATH>"),
            "{e}"
        );
        let e = refused(&["--socket", "/s"]);
        assert!(e.contains("--shared-dir <SHARED_DIR>"), "{e}");
        let e = refused(&["--fd", "-", "--shared-dir", "/"]);
        assert!(e.contains("'-'") && e.contains("--fd"), "{e}");
        assert!(Args::try_parse_from(["rqemu-fs", "--fd", "3", "--shared-dir", "/"]).is_ok());
        let a = Args::try_parse_from(["rqemu-fs", "--fd", "3", "--shared-dir", "/"]).unwrap();
        assert_eq!(a.state_file, None);
        let a = Args::try_parse_from([
            "rqemu-fs",
            "--fd",
            "3",
            "--shared-dir",
            "/",
            "--state-file",
            "/run/rqemu-fs/vm1/state",
        ])
        .unwrap();
        assert_eq!(
            a.state_file.as_deref(),
            Some(std::path::Path::new("/run/rqemu-fs/vm1/state"))
        );
    }

    #[test]
    fn virtiofsd_command_lines_parse() {
        let args = Args::try_parse_from([
            "rqemu-fs",
            "--socket-path",
            "/run/v.sock",
            "--shared-dir",
            "/srv",
            "--cache",
            "metadata",
            "--sandbox",
            "chroot",
            "--seccomp",
            "log",
            "--thread-pool-size",
            "0",
            "--announce-submounts",
            "--inode-file-handles",
            "--xattr",
            "--log-level",
            "debug",
            "--syslog",
            "--no-readdirplus",
            "--rlimit-nofile",
            "4096",
        ])
        .unwrap();
        assert_eq!(
            args.socket_path.as_deref(),
            Some(std::path::Path::new("/run/v.sock"))
        );
        assert_eq!(
            args.listen.sandbox.sandbox,
            Some(rqemu_sandbox::SandboxMode::Chroot)
        );
        assert_eq!(
            args.listen.sandbox.seccomp,
            rqemu_sandbox::SeccompAction::Log
        );
        assert_eq!(
            args.compat.inode_file_handles,
            Some(compat::InodeFileHandles::Prefer)
        );
        assert_eq!(params(&args).unwrap().cache, CacheMode::Metadata);
        // The socket is given once, by either name.
        let e = Args::try_parse_from([
            "rqemu-fs",
            "--socket-path",
            "/a",
            "--socket",
            "/b",
            "--shared-dir",
            "/srv",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot be used with"), "{e}");
        // Options that would change what the guest sees are refused, not ignored.
        for bad in ["--translate-uid", "--xattrmap", "--posix-acl", "--modcaps"] {
            let r = Args::try_parse_from(["rqemu-fs", "--fd", "3", "--shared-dir", "/", bad, "x"]);
            assert!(r.is_err(), "{bad} was accepted");
        }
    }
}
