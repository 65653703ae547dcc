//! `rqemu-net`: a vhost-user virtio-net daemon over a Linux tap.
//!
//! It creates (or attaches, or inherits with `--tap-fd`) a tap with a virtio vnet header,
//! listens on a UNIX socket (or an inherited listening fd), serves one frontend at a time and,
//! when that frontend goes away (guest reboot, VMM restart), waits for the next with the same
//! tap. SIGTERM/SIGINT: log the counters, exit 0.

mod backend;

use std::os::fd::RawFd;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use rqemu_daemon::startup::{self, Daemon, ListenArgs};
use rqemu_net_backend::config::parse_mac;
use rqemu_net_backend::{NetDevice, NetParams, TapQueue};

/// vhost-user virtio-net daemon over a tap.
#[derive(Debug, Parser)]
#[command(name = "rqemu-net", version)]
struct Args {
    #[command(flatten)]
    listen: ListenArgs,
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
    /// Link MTU reported to the guest (and set on the tap it creates or attaches with
    /// `--tap`; an inherited `--tap-fd` tap is the parent's to size: it may live in another
    /// network namespace, where this process cannot name it).
    #[arg(long)]
    mtu: Option<u16>,
}

fn main() -> ExitCode {
    startup::main("rqemu-net", run)
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

fn run(args: Args, mut daemon: Daemon) -> Result<()> {
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
    if let (Some(mtu), Some(tap), Some(_)) = (args.mtu, taps.first(), &args.tap) {
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
    let backend = Arc::new(backend::new(dev, taps));

    let listener = daemon.listen_stream(&args.listen)?;
    // Everything is open: confine before any thread (the signal thread included) starts.
    daemon.confine(rqemu_daemon::confine::policies::net(), &args.listen.sandbox)?;
    let b = backend.clone();
    daemon.exit_on_signal(move || {
        b.shutdown(|q| tracing::info!("stats: {:?}", q.stats()));
        0
    })?;
    let never = rqemu_daemon::vhost::serve_forever(daemon.name(), &listener, &backend)?;
    match never {}
}
