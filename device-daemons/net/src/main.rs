//! `rqemu-net`: a vhost-user virtio-net daemon over a Linux tap.
//!
//! It creates (or attaches, or inherits with `--tap-fd`) a tap with a virtio vnet header,
//! listens on a UNIX socket (or an inherited listening fd), serves one frontend at a time and,
//! when that frontend goes away (guest reboot, VMM restart), waits for the next with the same
//! tap. SIGTERM/SIGINT: log the counters, exit 0.

mod backend;
mod proxy;

use std::os::fd::RawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use rqemu_daemon::{listen::Endpoint, logging, signals};
use rqemu_net_backend::config::parse_mac;
use rqemu_net_backend::{NetDevice, NetParams, TapQueue};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use backend::NetBackend;

/// vhost-user virtio-net daemon over a tap.
#[derive(Debug, Parser)]
#[command(name = "rqemu-net", version)]
struct Args {
    /// UNIX socket path to listen on.
    #[arg(long, conflicts_with = "fd", required_unless_present = "fd")]
    socket: Option<PathBuf>,
    /// Inherited listening UNIX socket fd (socket activation).
    #[arg(long)]
    fd: Option<RawFd>,
    /// Tap interface to create or attach.
    #[arg(long, conflicts_with = "tap_fd", required_unless_present = "tap_fd")]
    tap: Option<String>,
    /// Inherited tap fd(s), opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR by a privileged
    /// parent; one per queue pair, comma-separated.
    #[arg(long, value_delimiter = ',')]
    tap_fd: Vec<RawFd>,
    /// Guest MAC address (default: 52:54:00 + 3 bytes derived from the tap name).
    #[arg(long)]
    mac: Option<String>,
    /// Number of queue pairs (multi-queue tap when more than one).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Link MTU reported to the guest (and set on the tap when given).
    #[arg(long)]
    mtu: Option<u16>,
}

fn main() {
    logging::init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("rqemu-net: error: {e:#}");
        std::process::exit(1);
    }
}

fn default_mac(seed: &str) -> [u8; 6] {
    // FNV-1a of the tap name: stable across restarts, distinct between taps.
    let h = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let b = h.to_le_bytes();
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

fn open_taps(args: &Args) -> Result<Vec<TapQueue>> {
    if let Some(name) = &args.tap {
        return TapQueue::open(name, usize::from(args.queues))
            .with_context(|| format!("cannot create or attach tap {name}"));
    }
    if args.tap_fd.len() != usize::from(args.queues) {
        bail!(
            "--tap-fd needs one fd per queue pair ({} given, --queues {})",
            args.tap_fd.len(),
            args.queues
        );
    }
    let mut seen = args.tap_fd.clone();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != args.tap_fd.len() {
        bail!("--tap-fd lists an fd twice");
    }
    let taps = args
        .tap_fd
        .iter()
        .map(|&fd| {
            // SAFETY: the parent hands these fds over to us by passing them on the command
            // line (each once, checked above); nothing else in this process uses them.
            unsafe { TapQueue::from_raw_fd(fd) }.context("--tap-fd")
        })
        .collect::<Result<Vec<_>>>()?;
    if taps
        .iter()
        .any(|t| Some(t.name()) != taps.first().map(TapQueue::name))
    {
        bail!("--tap-fd fds belong to different taps");
    }
    Ok(taps)
}

fn run(args: Args) -> Result<()> {
    signals::block_termination_signals().context("blocking signals")?;
    // Check the parameters before touching any tap.
    let requested_mac = args.mac.as_deref().map(parse_mac).transpose()?;
    NetParams {
        queue_pairs: args.queues,
        mtu: args.mtu.unwrap_or(1500),
        ..NetParams::default()
    }
    .validate()?;
    let taps = open_taps(&args)?;
    let name = taps
        .first()
        .map(|t| t.name().to_string())
        .unwrap_or_default();
    let mac = requested_mac.unwrap_or_else(|| default_mac(&name));
    let params = NetParams {
        mac,
        queue_pairs: args.queues,
        mtu: args.mtu.unwrap_or(1500),
        ..NetParams::default()
    };
    let dev = NetDevice::new(params)?;
    if let (Some(mtu), Some(tap)) = (args.mtu, taps.first()) {
        tap.set_mtu(mtu)
            .with_context(|| format!("setting MTU {mtu} on {name}"))?;
    }
    tracing::info!(
        "tap {name} with {} queue pair(s), mac {}, mtu {}",
        args.queues,
        mac.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
        dev.params().mtu
    );
    let backend = Arc::new(NetBackend::new(dev, taps));

    let endpoint = Endpoint::from_args(args.socket, args.fd)?;
    let listener = endpoint.listen()?;

    let b = backend.clone();
    signals::spawn_handler(move |sig| {
        tracing::info!("signal {sig}: exiting; stats: {:?}", b.stats());
        std::process::exit(0);
    })?;

    tracing::info!("listening on {endpoint:?}");
    loop {
        let mut daemon = VhostUserDaemon::new(
            "rqemu-net".to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| anyhow::anyhow!("creating the vhost-user daemon: {e}"))?;
        for (i, h) in daemon.get_epoll_handlers().iter().enumerate() {
            let fd = backend.tap_fd(i).context("a worker without a tap queue")?;
            h.register_listener(
                fd,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                backend.tap_event(),
            )
            .with_context(|| format!("polling tap queue {i}"))?;
        }
        let (front, _) = accept(&listener)?;
        // The vhost crate's handler is reached through a relay (see `proxy`).
        let (inner, back) = relay_socket()?;
        let relay = proxy::spawn(front, back, backend.rings()).context("starting the relay")?;
        let mut l = Listener::from(inner);
        daemon
            .start(&mut l)
            .map_err(|e| anyhow::anyhow!("accepting the relay: {e}"))?;
        tracing::info!("frontend connected");
        match daemon.wait() {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => tracing::info!("frontend disconnected"),
            Err(e) => tracing::warn!("frontend connection ended: {e}"),
        }
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        for t in relay {
            let _ = t.join();
        }
        backend.disconnected();
    }
}

fn accept(listener: &UnixListener) -> Result<(UnixStream, std::os::unix::net::SocketAddr)> {
    loop {
        match listener.accept() {
            Ok(c) => return Ok(c),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e).context("accepting a frontend"),
        }
    }
}

/// A listening socket with one pending connection, for the relay to reach the vhost crate's
/// handler (which only accepts from a `Listener`). It is bound in a fresh 0700 directory, and
/// the path is removed as soon as the connection is made, so nothing else can connect and
/// nothing is left behind.
fn relay_socket() -> Result<(UnixListener, UnixStream)> {
    static N: AtomicU32 = AtomicU32::new(0);
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!(
        "rqemu-net.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("vhost.sock");
    let pair = UnixListener::bind(&path).and_then(|l| Ok((UnixStream::connect(&path)?, l)));
    let _ = std::fs::remove_dir_all(&dir);
    let (stream, listener) = pair.with_context(|| format!("relay socket {}", path.display()))?;
    Ok((listener, stream))
}
