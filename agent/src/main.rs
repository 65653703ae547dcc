//! `rqemu-agent`: PID 1 of the container microVM that `rqemu-run` boots.
//!
//! Mounts `/proc`, `/sys`, `/dev`; loads the modules of `/etc/rqemu-modules` (virtio, virtiofs,
//! vsock) from `/lib/modules`; connects to the host over vsock (CID 2, port
//! [`rqemu_agent_protocol::CONTROL_PORT`]), sends `Ready`, then serves the control channel
//! (`session`): `Create` sets the container up (`container`, `network`), `Start` runs its process
//! (`process`), stdio/signals/resizes are relayed, `Exited` is sent once the process ended and
//! its output is drained; then the VM powers off. A broken channel powers it off too.
//! Everything is logged on the console as `rqemu-agent: ...`.

mod boot;
mod container;
mod log;
mod mounts;
mod network;
mod process;
mod root;
mod session;
mod sys;

use std::path::Path;

use anyhow::Context;
use rqemu_agent_protocol::{AgentMsg, CONTROL_PORT, VERSION};

fn run() -> anyhow::Result<()> {
    boot::early_mounts().context("early mounts")?;
    log::init();
    boot::ensure_stdio();
    let kernel = sys::kernel_release();
    alog!("starting (protocol {VERSION}, kernel {kernel})");
    // SAFETY: umask has no preconditions; modes given by the spec are then exact.
    unsafe { libc::umask(0) };
    let sigfd = session::sigchld_fd().context("SIGCHLD signalfd")?;
    boot::load_modules(Path::new("/etc/rqemu-modules"), Path::new("/lib/modules"));
    let chan = boot::connect_host(CONTROL_PORT)?;
    alog!("connected to the host");
    let mut session = session::Session::new(chan, sigfd);
    session.send(&AgentMsg::Ready {
        version: VERSION,
        kernel,
    })?;
    session.run()?;
    Ok(())
}

fn main() {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        eprintln!("rqemu-agent: must run as PID 1 of the container VM (it powers the machine off)");
        std::process::exit(2);
    }
    match std::panic::catch_unwind(run) {
        Ok(Ok(())) => alog!("done: powering off"),
        Ok(Err(e)) => alog!("fatal: {e:#}; powering off"),
        Err(_) => alog!("panic; powering off"),
    }
    boot::power_off()
}
