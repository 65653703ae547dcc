//! `rqemu-serial`: a 16550 UART in its own process.
//!
//! `rqemu-serial (--socket PATH | --fd N) [--console stdio|file:PATH|socket:PATH]
//! [--base 0x3f8] [--irq 4]`

mod console;
mod device;

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use rqemu_daemon::startup::{self, Daemon, ListenArgs};
use rqemu_protocol::Interrupts;

use console::ConsoleSpec;
use device::SerialDevice;

#[derive(Debug, Parser)]
#[command(
    name = "rqemu-serial",
    about = "16550 UART daemon (rqemu forwarding protocol)"
)]
struct Args {
    #[command(flatten)]
    listen: ListenArgs,
    /// Console: stdio, file:PATH or socket:PATH.
    #[arg(long, default_value = "stdio")]
    console: ConsoleSpec,
    /// Base I/O port.
    #[arg(long, default_value = "0x3f8", value_parser = rqemu_daemon::emulated::parse_port)]
    base: u16,
    /// Preferred GSI.
    #[arg(long, default_value_t = 4)]
    irq: u32,
}

fn main() -> ExitCode {
    startup::main("rqemu-serial", run)
}

/// Emulated devices hold no data to flush (the VMM keeps their state): a signal just ends
/// the process.
fn run(args: Args, mut daemon: Daemon) -> anyhow::Result<()> {
    let listener = daemon.listen_seqpacket(&args.listen)?;
    let (out, console_listener, client) = console::open_console(&args.console)?;
    // Everything is open: confine before any thread (the signal thread included) starts.
    daemon.confine(
        rqemu_daemon::confine::policies::serial(),
        &args.listen.sandbox,
    )?;
    daemon.exit_on_signal(|| 0)?;

    let info = device::device_info(args.base, args.irq);
    let irqs = Interrupts::for_requests(&info.irqs);
    let dev = Arc::new(Mutex::new(SerialDevice::new(irqs.clone(), out)));
    console::spawn_input(&args.console, dev.clone(), console_listener, client)?;
    tracing::info!(
        "rqemu-serial at port {:#x}, console {:?}",
        args.base,
        args.console
    );
    rqemu_daemon::emulated::serve(&listener, &info, dev, &irqs).context("accepting connections")?;
    Ok(())
}
