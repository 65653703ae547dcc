//! `rqemu-vmm`: boot a guest on KVM (TCG later) and exit with the guest's outcome:
//! 0 on ACPI power-off, non-zero with a message on reset, triple fault or error.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use rqemu_vmm::cli::Cli;
use rqemu_vmm::exit::GuestExit;
use rqemu_vmm::vm::{create_accelerator, Vm};

fn run(cli: &Cli) -> anyhow::Result<GuestExit> {
    if let Some(d) = cli.device_sockets.first() {
        bail!(
            "--device-socket {}: vhost-user devices are not supported yet (the virtio-mmio \
             frontend is the next milestone)",
            d.path.display()
        );
    }
    let accel = create_accelerator(cli.accel_choice()).context("choosing the accelerator")?;
    let vm = Vm::new(&cli.vm_config(), accel).context("building the VM")?;
    tracing::debug!(?vm, mode = ?vm.kernel().mode, "starting guest");
    Ok(vm.run()?)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(GuestExit::PowerOff) => ExitCode::SUCCESS,
        Ok(other) => {
            eprintln!("rqemu-vmm: {other}");
            ExitCode::from(other.exit_code() as u8)
        }
        Err(e) => {
            // Print the context chain, skipping causes already included in a message.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("rqemu-vmm: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
