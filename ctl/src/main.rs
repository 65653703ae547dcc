//! `rqemu-ctl`: the command-line client of `rqemu-vmm`'s management API (like Cloud
//! Hypervisor's `ch-remote`): one HTTP/1.1 request over the `--api-socket` UNIX socket, the
//! JSON answer printed on stdout; an error answer prints its message and exits 1.

mod client;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `rqemu-ctl` arguments.
#[derive(Debug, Parser)]
#[command(
    name = "rqemu-ctl",
    version,
    about = "Control a running rqemu-vmm through its API socket"
)]
struct Cli {
    /// The socket given to `rqemu-vmm --api-socket`.
    #[arg(long = "api-socket")]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, Subcommand)]
enum Command {
    /// Is the VMM there? (GET vmm.ping)
    Ping,
    /// State, vCPUs, memory, accelerator, devices (GET vm.info).
    Info,
    /// Per-device counters (GET vm.counters).
    Counters,
    /// Park every vCPU and hold the guest clock (PUT vm.pause).
    Pause,
    /// Run the vCPUs again (PUT vm.resume).
    Resume,
    /// Stop the VM; rqemu-vmm exits 0 (PUT vm.shutdown).
    Shutdown,
    /// End the VM with the reset outcome (PUT vm.reboot).
    Reboot,
    /// Press the ACPI power button (PUT vm.power-button).
    PowerButton,
}

impl Command {
    fn request(self) -> (&'static str, &'static str) {
        match self {
            Command::Ping => ("GET", "vmm.ping"),
            Command::Info => ("GET", "vm.info"),
            Command::Counters => ("GET", "vm.counters"),
            Command::Pause => ("PUT", "vm.pause"),
            Command::Resume => ("PUT", "vm.resume"),
            Command::Shutdown => ("PUT", "vm.shutdown"),
            Command::Reboot => ("PUT", "vm.reboot"),
            Command::PowerButton => ("PUT", "vm.power-button"),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (method, endpoint) = cli.command.request();
    match client::call(&cli.api_socket, method, &format!("/api/v1/{endpoint}")) {
        Ok(answer) if answer.is_success() => {
            if let Some(v) = answer.json() {
                match serde_json::to_string_pretty(&v) {
                    Ok(s) => println!("{s}"),
                    Err(_) => println!("{v}"),
                }
            }
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            eprintln!("rqemu-ctl: {endpoint}: {}", answer.error_message());
            ExitCode::FAILURE
        }
        Err(e) => {
            let e = anyhow::Error::new(e);
            eprintln!("rqemu-ctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
