//! `rqemu-vmm`: boot a guest on KVM or on rqemu's software CPU (TCG) and exit with the guest's
//! outcome: 0 on ACPI power-off, non-zero with a message on reset, triple fault or error.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use rqemu_vmm::cli::Cli;
use rqemu_vmm::exit::GuestExit;
use rqemu_vmm::sandbox;
use rqemu_vmm::vm::{create_accelerator_with, Vm, VmController};

fn run(cli: &Cli) -> anyhow::Result<GuestExit> {
    let mut cfg = match cli.vm_config() {
        Ok(c) => c,
        Err(e) => bail!(e),
    };
    let socket_dirs = sandbox::socket_dirs(&mut cfg.devices);
    let tcg = cli.tcg_options();
    let accel =
        create_accelerator_with(cli.accel_choice(), tcg).context("choosing the accelerator")?;
    let accel_name = accel.name();
    let vm = Vm::new(&cfg, accel).context("building the VM")?;
    let api = match &cli.api_socket {
        Some(path) => Some(rqemu_vmm::api::bind(path)?),
        None => None,
    };
    tracing::debug!(?vm, mode = ?vm.kernel().mode, "starting guest");
    // Everything is open and the VMM still has one thread: confine it (threads started from
    // now on narrow themselves to their kind's allow-list).
    let jit = accel_name == "tcg" && tcg.mode == rqemu_vmm::accel::tcg::TcgMode::Jit;
    sandbox::enter(&cli.sandbox, accel_name, socket_dirs, jit).context("entering the sandbox")?;
    if cli.sandbox_selftest {
        // SAFETY: openat with a valid NUL-terminated path; the fd, if any, is closed.
        let fd = unsafe { libc::openat(libc::AT_FDCWD, c"/".as_ptr(), libc::O_RDONLY) };
        eprintln!("rqemu-vmm: sandbox self-test: openat survived (fd {fd})");
        if fd >= 0 {
            // SAFETY: closing the fd just opened.
            unsafe { libc::close(fd) };
        }
    }
    stop_on_signals(vm.controller()).context("installing SIGINT/SIGTERM handling")?;
    if let Some(listener) = api {
        rqemu_vmm::api::spawn(listener, std::sync::Arc::new(vm.controller()))?;
    }
    // Built, devices attached: the guest starts now (a Type=notify unit is active from here).
    rqemu_daemon::notify::ready("guest running");
    let outcome = vm.run();
    // An answer being written (to vm.shutdown, say) reaches its client before the exit.
    rqemu_vmm::api::quiesce(std::time::Duration::from_secs(1));
    // Unconfined, the socket file is removed; confined, the VMM cannot reach it (an empty
    // root) and the next `rqemu-vmm` on that path replaces a socket nobody answers on.
    if let Some(path) = &cli.api_socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(outcome?)
}

/// SIGINT/SIGTERM stop the VM cleanly (all vCPU threads joined, exit status 4): the signals
/// are blocked in every thread and a dedicated thread waits for them with `sigwait`.
fn stop_on_signals(ctl: VmController) -> anyhow::Result<()> {
    // SAFETY: an all-zero sigset_t is a valid value to initialise with sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t; signal numbers are valid.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(rc));
    }
    // Threads spawned from now on (vCPUs, stdin) inherit the blocked mask.
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            sandbox::confine_current(sandbox::VmmThread::Signal);
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                eprintln!("rqemu-vmm: received signal {sig}, stopping the VM");
                ctl.stop();
            }
        })?;
    Ok(())
}

/// Colour codes only on a terminal, and never with `NO_COLOR` set (no-color.org): a log in a
/// file, a pipe or the journal stays plain text.
fn colour_wanted() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The `tracing` filter from the user's directives (default `warn`). Cranelift logs every
/// function it defines, with its whole IR, at `info`: that is kept at `warn` unless the user
/// names a Cranelift target (it cost tens of MB of log a minute and slowed the JIT).
fn log_filter(user: Option<String>) -> String {
    let user = user.unwrap_or_else(|| "warn".to_string());
    if user.contains("cranelift") {
        user
    } else {
        format!("{user},cranelift_jit=warn,cranelift_codegen=warn")
    }
}

fn main() -> ExitCode {
    // RQEMU_LOG, then RUST_LOG; by default warnings (a device daemon lost or reattached,
    // ...) and errors, so that the guest console on stdio stays readable.
    let filter = log_filter(
        std::env::var("RQEMU_LOG")
            .or_else(|_| std::env::var("RUST_LOG"))
            .ok(),
    );
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(colour_wanted())
        .init();
    let cli = Cli::parse();
    // Under `perf record` (which sets PERF_BUILDID_DIR) cranelift-jit appends every function
    // it defines to /tmp/perf-<pid>.map and panics when it cannot open the file — which the
    // sandbox forbids (landlock; no /tmp in its namespace): the vCPU thread died. Unset while
    // the process is single-threaded; perf then shows translated code as `[JIT]`.
    if std::env::var_os("PERF_BUILDID_DIR").is_some() {
        std::env::remove_var("PERF_BUILDID_DIR");
        tracing::info!("PERF_BUILDID_DIR unset: no perf map of translated code inside the sandbox");
    }
    // NOTIFY_SOCKET is connected now, while the process is single-threaded.
    if let Err(e) = rqemu_daemon::notify::init() {
        eprintln!("rqemu-vmm: error: {}", rqemu_daemon::startup::chain(&e));
        return ExitCode::FAILURE;
    }
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

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    fn enabled(filter: &str, target_is_cranelift: bool, level: Level) -> bool {
        let sub = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::sink)
            .finish();
        tracing::subscriber::with_default(sub, || match (target_is_cranelift, level) {
            (true, Level::INFO) => tracing::enabled!(target: "cranelift_jit::backend", Level::INFO),
            (true, _) => tracing::enabled!(target: "cranelift_jit::backend", Level::WARN),
            (false, _) => tracing::enabled!(target: "rqemu_vmm::vm", Level::INFO),
        })
    }

    #[test]
    fn cranelift_info_is_off_unless_named() {
        let info = log_filter(Some("info".into()));
        assert!(enabled(&info, false, Level::INFO));
        assert!(!enabled(&info, true, Level::INFO));
        assert!(enabled(&info, true, Level::WARN));
        let named = log_filter(Some("info,cranelift_jit=info".into()));
        assert!(enabled(&named, true, Level::INFO));
        let default = log_filter(None);
        assert!(!enabled(&default, false, Level::INFO));
        assert!(enabled(&default, true, Level::WARN));
    }
}
