//! `rqemu-blk`: a vhost-user virtio-blk daemon serving a raw or qcow2 image.
//!
//! It listens on a UNIX socket (or an inherited listening fd), serves one frontend at a time
//! and, when that frontend goes away (guest reboot, VMM restart), flushes and waits for the
//! next. SIGTERM/SIGINT: in-flight requests finish, the image is flushed, exit 0.

mod backend;
mod uring;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use rqemu_block_backend::image::{self, CacheMode, Format, FormatHint, OpenOptions};
use rqemu_block_backend::virtio::{BlkParams, BlockDevice};
use rqemu_daemon::startup::{self, Daemon, ListenArgs};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    Auto,
    Raw,
    Qcow2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CacheArg {
    /// Page cache; guest flushes reach the disk.
    Writeback,
    /// O_DIRECT (raw images); guest flushes reach the disk.
    None,
    /// Page cache; guest flushes ignored.
    Unsafe,
    /// O_DIRECT + O_DSYNC (raw images).
    Directsync,
}

/// vhost-user virtio-blk daemon (raw and qcow2 images).
#[derive(Debug, Parser)]
#[command(name = "rqemu-blk", version)]
struct Args {
    #[command(flatten)]
    listen: ListenArgs,
    /// Disk image file.
    #[arg(long)]
    image: PathBuf,
    /// Image format.
    #[arg(long, value_enum, default_value = "auto")]
    format: FormatArg,
    /// Serve the disk read-only.
    #[arg(long)]
    readonly: bool,
    /// Number of request queues (one worker thread each), 1 to 64.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Disk serial number reported to the guest (at most 20 bytes).
    #[arg(long)]
    serial: Option<String>,
    /// Host cache mode, as QEMU's `cache=`.
    #[arg(long, value_enum, default_value = "writeback")]
    cache: CacheArg,
    /// I/O engine of the queue threads: io_uring (many requests in flight per queue; falls
    /// back to threads when the kernel refuses io_uring), threads or sync (both: one request at
    /// a time per queue thread). Default: io-uring with O_DIRECT (--cache none|directsync),
    /// where requests wait on the disk; sync through the page cache, where a request is a
    /// memory copy and a synchronous `preadv` is cheaper than a trip through a ring.
    #[arg(long, value_enum)]
    aio: Option<backend::Aio>,
    /// Do not take QEMU-compatible image locks (another writer may then corrupt the image).
    #[arg(long)]
    force_share: bool,
}

fn main() -> ExitCode {
    startup::main("rqemu-blk", run)
}

fn run(args: Args, mut daemon: Daemon) -> Result<()> {
    let format = match args.format {
        FormatArg::Auto => FormatHint::Auto,
        FormatArg::Raw => FormatHint::Exact(Format::Raw),
        FormatArg::Qcow2 => FormatHint::Exact(Format::Qcow2),
    };
    let cache = match args.cache {
        CacheArg::Writeback => CacheMode::Writeback,
        CacheArg::None => CacheMode::None,
        CacheArg::Unsafe => CacheMode::Unsafe,
        CacheArg::Directsync => CacheMode::Directsync,
    };
    let opts = OpenOptions {
        format,
        read_only: args.readonly,
        cache,
        force_share: args.force_share,
    };
    let img = image::open(&args.image, &opts)
        .with_context(|| format!("cannot open image {}", args.image.display()))?;
    let img: Arc<dyn image::DiskImage> = Arc::from(img);
    let params = BlkParams {
        num_queues: args.queues,
        read_only: args.readonly,
        serial: args.serial.unwrap_or_default().into_bytes(),
        ignore_flush: !cache.flushes(),
        ..BlkParams::default()
    };
    let dev = BlockDevice::new(img.clone(), params)?;
    let asked = args.aio.unwrap_or(if cache.direct() {
        backend::Aio::IoUring
    } else {
        backend::Aio::Sync
    });
    let aio = backend::Aio::resolve(asked, &*img);
    tracing::info!(
        "serving {} ({}, {} bytes{}) with {} queue(s), cache {:?}, aio {:?}",
        args.image.display(),
        img.format(),
        img.size(),
        if dev.params().read_only {
            ", read-only"
        } else {
            ""
        },
        args.queues,
        args.cache,
        aio
    );
    let backend = Arc::new(backend::new(dev, aio)?);

    let listener = daemon.listen_stream(&args.listen)?;
    // Everything is open: confine before any thread (the signal thread included) starts.
    daemon.confine(rqemu_daemon::confine::policies::blk(), &args.listen.sandbox)?;
    let b = backend.clone();
    daemon.exit_on_signal(move || match backend::shutdown(&b) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("final flush failed: {e}");
            1
        }
    })?;
    let never = rqemu_daemon::vhost::serve_forever(daemon.name(), &listener, &backend)?;
    match never {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error clap gives for `argv` (after the program name).
    fn refused(argv: &[&str]) -> String {
        let mut v = vec!["rqemu-blk"];
        v.extend_from_slice(argv);
        Args::try_parse_from(v).unwrap_err().to_string()
    }

    #[test]
    fn bad_command_lines_name_the_problem() {
        let e = refused(&["--image", "d.raw"]);
        assert!(e.contains("--socket <PATH>|--fd <N>"), "{e}");
        let e = refused(&["--socket", "/s", "--fd", "3", "--image", "d.raw"]);
        assert!(
            e.contains("'--socket <PATH>' cannot be used with '--fd <N>'"),
            "{e}"
        );
        let e = refused(&["--socket", "/s"]);
        assert!(e.contains("--image <IMAGE>"), "{e}");
        for q in ["0", "65", "many"] {
            let e = refused(&["--socket", "/s", "--image", "d", "--queues", q]);
            assert!(
                e.contains(&format!("'{q}'")) && e.contains("--queues"),
                "{e}"
            );
        }
        let e = refused(&["--socket", "/s", "--image", "d", "--format", "vmdk"]);
        assert!(e.contains("'vmdk'") && e.contains("--format"), "{e}");
        let e = refused(&["--fd", "x", "--image", "d"]);
        assert!(e.contains("'x'") && e.contains("--fd <N>"), "{e}");
        let a = Args::try_parse_from(["rqemu-blk", "--fd", "3", "--image", "d", "--queues", "64"])
            .unwrap();
        assert_eq!((a.listen.fd, a.queues), (Some(3), 64));
    }
}
