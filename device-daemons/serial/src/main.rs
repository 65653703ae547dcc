//! `rqemu-serial`: a 16550 UART in its own process.
//!
//! `rqemu-serial (--socket PATH | --fd N) [--console stdio|file:PATH|socket:PATH]
//! [--base 0x3f8] [--irq 4]`

mod console;
mod device;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use rqemu_protocol::Interrupts;

use console::ConsoleSpec;
use device::SerialDevice;

#[derive(Debug, Parser)]
#[command(
    name = "rqemu-serial",
    about = "16550 UART daemon (rqemu forwarding protocol)"
)]
struct Args {
    /// Listen on this UNIX seqpacket socket path.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Use this inherited listening seqpacket socket.
    #[arg(long)]
    fd: Option<RawFd>,
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    rqemu_daemon::logging::init();
    let listener = rqemu_daemon::emulated::listen(args.socket.as_deref(), args.fd)
        .context("listening socket")?;

    let info = device::device_info(args.base, args.irq);
    let irqs = Interrupts::for_requests(&info.irqs);
    let (out, console_listener, client) = console::open_console(&args.console)?;
    let dev = Arc::new(Mutex::new(SerialDevice::new(irqs.clone(), out)));
    console::spawn_input(&args.console, dev.clone(), console_listener, client)?;
    tracing::info!(
        "rqemu-serial at port {:#x}, console {:?}",
        args.base,
        args.console
    );
    rqemu_protocol::serve(&listener, &info, dev, &irqs).context("accepting connections")?;
    Ok(())
}
