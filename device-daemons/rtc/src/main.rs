//! `rqemu-rtc`: a CMOS RTC in its own process.
//!
//! `rqemu-rtc (--socket PATH | --fd N) [--base 0x70]`

mod device;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use rqemu_protocol::Interrupts;

#[derive(Debug, Parser)]
#[command(
    name = "rqemu-rtc",
    about = "CMOS RTC daemon (rqemu forwarding protocol)"
)]
struct Args {
    /// Listen on this UNIX seqpacket socket path.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Use this inherited listening seqpacket socket.
    #[arg(long)]
    fd: Option<RawFd>,
    /// Base I/O port (index register; data is base + 1).
    #[arg(long, default_value = "0x70", value_parser = rqemu_daemon::emulated::parse_port)]
    base: u16,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    rqemu_daemon::logging::init();
    let listener = rqemu_daemon::emulated::listen(args.socket.as_deref(), args.fd)
        .context("listening socket")?;
    let info = device::device_info(args.base);
    let irqs = Interrupts::for_requests(&info.irqs);
    let dev = Arc::new(Mutex::new(device::RtcDevice::default()));
    tracing::info!("rqemu-rtc at port {:#x}", args.base);
    rqemu_protocol::serve(&listener, &info, dev, &irqs).context("accepting connections")?;
    Ok(())
}
