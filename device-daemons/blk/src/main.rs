//! `rqemu-blk`: a vhost-user virtio-blk daemon serving a raw or qcow2 image.
//!
//! It listens on a UNIX socket (or an inherited listening fd), serves one frontend at a time
//! and, when that frontend goes away (guest reboot, VMM restart), flushes and waits for the
//! next. SIGTERM/SIGINT: in-flight requests finish, the image is flushed, exit 0.

mod backend;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use rqemu_block_backend::image::{self, Format, FormatHint, OpenOptions};
use rqemu_block_backend::virtio::{BlkParams, BlockDevice};
use rqemu_daemon::{listen::Endpoint, logging, signals};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    Auto,
    Raw,
    Qcow2,
}

/// vhost-user virtio-blk daemon (raw and qcow2 images).
#[derive(Debug, Parser)]
#[command(name = "rqemu-blk", version)]
struct Args {
    /// UNIX socket path to listen on.
    #[arg(long, conflicts_with = "fd", required_unless_present = "fd")]
    socket: Option<PathBuf>,
    /// Inherited listening UNIX socket fd (socket activation).
    #[arg(long)]
    fd: Option<RawFd>,
    /// Disk image file.
    #[arg(long)]
    image: PathBuf,
    /// Image format.
    #[arg(long, value_enum, default_value = "auto")]
    format: FormatArg,
    /// Serve the disk read-only.
    #[arg(long)]
    readonly: bool,
    /// Number of request queues (one worker thread each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Disk serial number reported to the guest (at most 20 bytes).
    #[arg(long)]
    serial: Option<String>,
}

fn main() {
    logging::init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("rqemu-blk: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if args.queues == 0 || args.queues > 64 {
        bail!("--queues must be between 1 and 64");
    }
    signals::block_termination_signals().context("blocking signals")?;
    let format = match args.format {
        FormatArg::Auto => FormatHint::Auto,
        FormatArg::Raw => FormatHint::Exact(Format::Raw),
        FormatArg::Qcow2 => FormatHint::Exact(Format::Qcow2),
    };
    let opts = OpenOptions {
        format,
        read_only: args.readonly,
    };
    let img = image::open(&args.image, &opts)
        .with_context(|| format!("cannot open image {}", args.image.display()))?;
    let img: Arc<dyn image::DiskImage> = Arc::from(img);
    let params = BlkParams {
        num_queues: args.queues,
        read_only: args.readonly,
        serial: args.serial.unwrap_or_default().into_bytes(),
        ..BlkParams::default()
    };
    let dev = BlockDevice::new(img.clone(), params)?;
    tracing::info!(
        "serving {} ({}, {} bytes{}) with {} queue(s)",
        args.image.display(),
        img.format(),
        img.size(),
        if dev.params().read_only {
            ", read-only"
        } else {
            ""
        },
        args.queues
    );
    let backend = Arc::new(backend::new(dev));

    let endpoint = Endpoint::from_args(args.socket, args.fd)?;
    let listener = endpoint.listen()?;

    let b = backend.clone();
    signals::spawn_handler(move |sig| {
        tracing::info!("signal {sig}: flushing and exiting");
        let code = match backend::shutdown(&b) {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!("final flush failed: {e}");
                1
            }
        };
        std::process::exit(code);
    })?;

    tracing::info!("listening on {endpoint:?}");
    let never = rqemu_daemon::vhost::serve_forever("rqemu-blk", &listener, &backend, || {
        backend.disconnected()
    })?;
    match never {}
}
