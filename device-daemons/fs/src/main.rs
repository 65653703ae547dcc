//! `rqemu-fs`: a vhost-user virtio-fs daemon sharing one host directory.
//!
//! Start-up order matters (see `rqemu_fs_backend::confine`): the listening socket is bound and
//! the passthrough opens `/proc/self/fd` first, then the process confines itself to the shared
//! directory (mount namespace + `pivot_root`; needs root) before any thread exists. It then
//! serves one frontend at a time and, when that frontend goes away (guest reboot, VMM restart),
//! forgets that guest's inodes and waits for the next. SIGTERM/SIGINT: in-flight requests
//! finish, exit 0.

mod backend;

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use rqemu_daemon::{listen::Endpoint, logging, signals};
use rqemu_fs_backend::{confine, CacheMode, FsParams, FsServer, Tag};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CacheArg {
    Auto,
    Always,
    Never,
}

/// vhost-user virtio-fs daemon: shares one host directory with a guest.
#[derive(Debug, Parser)]
#[command(name = "rqemu-fs", version)]
struct Args {
    /// UNIX socket path to listen on.
    #[arg(long, conflicts_with = "fd", required_unless_present = "fd")]
    socket: Option<PathBuf>,
    /// Inherited listening UNIX socket fd (socket activation).
    #[arg(long)]
    fd: Option<RawFd>,
    /// The directory to share; the guest can reach nothing outside it.
    #[arg(long)]
    shared_dir: PathBuf,
    /// Mount tag (`mount -t virtiofs TAG /mnt`), at most 36 bytes.
    #[arg(long, default_value = "rqemu")]
    tag: String,
    /// Share read-only: every write fails with EROFS.
    #[arg(long)]
    readonly: bool,
    /// Guest caching: auto (1 s timeouts), always (host must not change the dir), never.
    #[arg(long, value_enum, default_value = "auto")]
    cache: CacheArg,
    /// Serve extended attributes.
    #[arg(long)]
    xattr: bool,
    /// Number of request queues (one worker thread each; plus the hiprio queue).
    #[arg(long, default_value_t = 1)]
    queues: u16,
}

fn main() {
    logging::init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("rqemu-fs: error: {e:#}");
        std::process::exit(1);
    }
}

fn params(args: &Args) -> Result<FsParams> {
    let params = FsParams {
        tag: Tag::new(&args.tag)?,
        num_request_queues: args.queues,
        cache: match args.cache {
            CacheArg::Auto => CacheMode::Auto,
            CacheArg::Always => CacheMode::Always,
            CacheArg::Never => CacheMode::Never,
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

fn run(args: Args) -> Result<()> {
    let params = params(&args)?;
    raise_nofile_limit();
    let shared = confine::canonical_dir(&args.shared_dir)?;
    if !confine::is_root() {
        // Checked before binding the socket, so a refused start leaves nothing behind.
        return Err(confine::ConfineError::NotRoot.into());
    }
    // Everything that needs the host's filesystem view happens before confinement.
    let endpoint = Endpoint::from_args(args.socket, args.fd)?;
    let listener = endpoint.listen()?;
    let server = FsServer::new(&params, Path::new("/"))?;
    confine::enter(&shared, params.readonly)
        .with_context(|| format!("confining to {}", shared.display()))?;
    server.import()?;
    signals::block_termination_signals().context("blocking signals")?;
    tracing::info!(
        "sharing {} as tag {:?}{} with {} request queue(s), cache {:?}",
        shared.display(),
        params.tag.as_str(),
        if params.readonly { " (read-only)" } else { "" },
        params.num_request_queues,
        params.cache
    );
    let backend = Arc::new(backend::new(server, params));

    let b = backend.clone();
    signals::spawn_handler(move |sig| {
        tracing::info!("signal {sig}: exiting");
        b.shutdown(|_| ());
        std::process::exit(0);
    })?;

    tracing::info!("listening on {endpoint:?}");
    let never = rqemu_daemon::vhost::serve_forever("rqemu-fs", &listener, &backend, || {
        backend.disconnected()
    })?;
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
        assert!(parse(&["--tag", &"t".repeat(37)]).is_err());
        assert!(parse(&["--queues", "0"]).is_err());
        assert!(parse(&["--cache", "sometimes"]).is_err());
        assert!(Args::try_parse_from(["rqemu-fs", "--shared-dir", "/tmp"]).is_err());
        assert!(Args::try_parse_from([
            "rqemu-fs",
            "--fd",
            "3",
            "--socket",
            "/s",
            "--shared-dir",
            "/"
        ])
        .is_err());
        assert!(Args::try_parse_from(["rqemu-fs", "--fd", "3", "--shared-dir", "/"]).is_ok());
    }
}
