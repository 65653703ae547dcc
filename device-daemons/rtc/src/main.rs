//! `rqemu-rtc`: a CMOS RTC in its own process.
//!
//! `rqemu-rtc (--socket PATH | --fd N) [--base 0x70]`

mod device;

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use rqemu_daemon::startup::{self, Daemon, ListenArgs};
use rqemu_protocol::Interrupts;

#[derive(Debug, Parser)]
#[command(
    name = "rqemu-rtc",
    about = "CMOS RTC daemon (rqemu forwarding protocol)"
)]
struct Args {
    #[command(flatten)]
    listen: ListenArgs,
    /// Base I/O port (index register; data is base + 1).
    #[arg(long, default_value = "0x70", value_parser = rqemu_daemon::emulated::parse_port)]
    base: u16,
}

fn main() -> ExitCode {
    startup::main("rqemu-rtc", run)
}

/// Emulated devices hold no data to flush (the VMM keeps their state): a signal just ends
/// the process.
fn run(args: Args, mut daemon: Daemon) -> anyhow::Result<()> {
    let listener = daemon.listen_seqpacket(&args.listen)?;
    // Everything is open: confine before any thread (the signal thread included) starts.
    daemon.confine(rqemu_daemon::confine::policies::rtc(), &args.listen.sandbox)?;
    daemon.exit_on_signal(|| 0)?;
    let info = device::device_info(args.base);
    let irqs = Interrupts::for_requests(&info.irqs);
    let dev = Arc::new(Mutex::new(device::RtcDevice::default()));
    tracing::info!("rqemu-rtc at port {:#x}", args.base);
    rqemu_daemon::emulated::serve(&listener, &info, dev, &irqs).context("accepting connections")?;
    Ok(())
}
