//! `rqemu-rtc`: a CMOS RTC in its own process.
//!
//! `rqemu-rtc (--socket PATH | --fd N) [--base 0x70]`

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use rqemu_protocol::sys::SeqListener;
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
    #[arg(long, default_value = "0x70", value_parser = parse_u16)]
    base: u16,
}

fn parse_u16(s: &str) -> Result<u16, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u16::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    rqemu_daemon::logging::init();
    rqemu_daemon::signals::block_termination_signals().context("blocking signals")?;
    let listener =
        SeqListener::from_args(args.socket.as_deref(), args.fd).context("listening socket")?;
    let path = args.socket.clone();
    rqemu_daemon::signals::spawn_handler(move |sig| {
        tracing::info!("signal {sig}: exiting");
        if let Some(p) = path {
            let _ = std::fs::remove_file(p);
        }
        std::process::exit(0);
    })?;
    let info = rqemu_rtc::device_info(args.base);
    let irqs = Interrupts::for_requests(&info.irqs);
    let dev = Arc::new(Mutex::new(rqemu_rtc::Rtc::new()));
    tracing::info!("rqemu-rtc at port {:#x}", args.base);
    rqemu_protocol::serve(&listener, &info, dev, &irqs).context("accepting connections")?;
    Ok(())
}
