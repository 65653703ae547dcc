//! `rqemu-vsock`: a vhost-user virtio-vsock daemon whose host side is UNIX sockets in
//! Firecracker's hybrid-vsock convention.
//!
//! ```text
//! rqemu-vsock --socket /run/vm1/vsock.vhost --guest-cid 3 --uds-path /run/vm1/vsock
//! ```
//!
//! * host → guest: connect to `--uds-path PATH`, write `CONNECT <port>\n`; once the guest
//!   accepted, `OK <host_port>\n` comes back and the socket is the connection (closed if the
//!   guest refuses);
//! * guest → host port `P`: the daemon connects to `PATH_P`, where a host program listens.
//!
//! Start-up order: both listening sockets are bound, the directory of `PATH` is resolved, then
//! the process is confined (`policies::vsock()`): in `--sandbox namespace` that directory is
//! bind-mounted at the same path under the empty root, so `PATH_P` sockets created later stay
//! reachable (connecting is all the daemon does there).

mod backend;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use rqemu_daemon::listen::Endpoint;
use rqemu_daemon::startup::{self, Daemon, ListenArgs};
use rqemu_vsock_backend::{check_cid, Muxer};

/// vhost-user virtio-vsock daemon (host side: UNIX sockets, Firecracker's hybrid vsock).
#[derive(Debug, Parser)]
#[command(name = "rqemu-vsock", version)]
struct Args {
    #[command(flatten)]
    listen: ListenArgs,
    /// The guest's context ID (3 and up).
    #[arg(long, value_name = "N")]
    guest_cid: u64,
    /// Host side: host programs connect here (`CONNECT <port>\n`); guest connections to host
    /// port P go to the socket `PATH_P`.
    #[arg(long, value_name = "PATH")]
    uds_path: PathBuf,
}

fn main() -> ExitCode {
    startup::main("rqemu-vsock", run)
}

/// The directory of `path`, absolute and symlink-free (what the sandbox keeps reachable).
fn socket_dir(path: &std::path::Path) -> Result<PathBuf> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parent.canonicalize().with_context(|| {
        format!(
            "--uds-path {}: directory {}",
            path.display(),
            parent.display()
        )
    })
}

fn run(args: Args, mut daemon: Daemon) -> Result<()> {
    let cid = check_cid(args.guest_cid).context("--guest-cid")?;
    let dir = socket_dir(&args.uds_path)?;
    let name = args
        .uds_path
        .file_name()
        .with_context(|| format!("--uds-path {} names no file", args.uds_path.display()))?;
    // The canonical path: the one that stays valid inside the sandbox.
    let uds_path = dir.join(name);
    let host =
        rqemu_daemon::listen::stream(&Endpoint::Path(uds_path.clone())).context("--uds-path")?;
    let mux = Muxer::new(
        cid,
        uds_path.clone(),
        host,
        Box::new(rqemu_protocol::listen::peer_allowed),
    )?;
    let listener = daemon.listen_stream(&args.listen)?;
    tracing::info!(
        "guest CID {cid}; host side {} (guest port P: {}_P)",
        uds_path.display(),
        uds_path.display()
    );
    let backend = Arc::new(backend::new(mux));
    // Everything is open: confine before any thread (the signal thread included) starts.
    let policy = rqemu_daemon::confine::policies::vsock().keep_socket_dirs([dir]);
    daemon.confine(policy, &args.listen.sandbox)?;
    let b = backend.clone();
    daemon.exit_on_signal(move || {
        b.shutdown(|q| tracing::info!("stats: {:?}", q.stats()));
        0
    })?;
    let never = rqemu_daemon::vhost::serve_forever(daemon.name(), &listener, &backend)?;
    match never {}
}
