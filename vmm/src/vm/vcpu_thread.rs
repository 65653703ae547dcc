//! The body of a vCPU thread: run the guest, dispatch port/MMIO exits on the buses, report
//! how the guest ended, park on pause.

use std::sync::Arc;

use crate::accel::{Vcpu, VcpuExit};
use crate::bus::Bus;
use crate::exit::{ExitRequester, GuestExit};

use super::control::VcpuSync;

/// What a vCPU thread shares with the rest of the VMM.
pub(super) struct VcpuContext {
    pub(super) pio: Arc<Bus>,
    pub(super) mmio: Arc<Bus>,
    pub(super) exit: ExitRequester,
    pub(super) sync: Arc<VcpuSync>,
}

/// Requests an error exit if the vCPU thread ends without one (including by panic), and
/// unregisters it from kicks.
struct ThreadGuard<'a> {
    ctx: &'a VcpuContext,
    index: u32,
}

impl Drop for ThreadGuard<'_> {
    fn drop(&mut self) {
        self.ctx.sync.unregister(self.index);
        self.ctx.exit.request(GuestExit::Error(format!(
            "vCPU {} thread ended unexpectedly",
            self.index
        )));
    }
}

pub(super) fn run_vcpu(mut vcpu: Box<dyn Vcpu>, ctx: &VcpuContext) {
    let index = vcpu.index();
    let exit = &ctx.exit;
    if let Err(e) = vcpu.bind_to_thread() {
        exit.request(GuestExit::Error(e.to_string()));
        return;
    }
    ctx.sync.register(index);
    crate::forwarded::set_current_vcpu(index as usize);
    let _guard = ThreadGuard { ctx, index };
    while !exit.should_stop() {
        let mut shutdown = false;
        match vcpu.run() {
            Ok(VcpuExit::IoIn { port, size, data }) => {
                for chunk in data.chunks_mut(usize::from(size.max(1))) {
                    ctx.pio.read(u64::from(port), chunk);
                }
            }
            Ok(VcpuExit::IoOut { port, size, data }) => {
                for chunk in data.chunks(usize::from(size.max(1))) {
                    if !ctx.pio.write(u64::from(port), chunk) {
                        tracing::trace!(port, ?chunk, "unhandled port write");
                    }
                }
            }
            Ok(VcpuExit::MmioRead { addr, data }) => {
                ctx.mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite { addr, data }) => {
                if !ctx.mmio.write(addr, data) {
                    tracing::trace!(addr, ?data, "unhandled MMIO write");
                }
            }
            Ok(VcpuExit::Interrupted) | Ok(VcpuExit::Halted) => ctx.sync.maybe_park(exit),
            Ok(VcpuExit::Shutdown) => shutdown = true,
            Ok(VcpuExit::Reset) => exit.request(GuestExit::Reset("platform reset")),
            Ok(VcpuExit::PowerOff) => {
                tracing::debug!(vcpu = index, "platform power-off event");
                exit.request(GuestExit::PowerOff)
            }
            Err(e) => exit.request(GuestExit::Error(e.to_string())),
        }
        if shutdown {
            let rip = vcpu.instruction_pointer().unwrap_or(0);
            exit.request(GuestExit::TripleFault { vcpu: index, rip });
        }
    }
    let rip = vcpu.instruction_pointer().unwrap_or(0);
    tracing::debug!(vcpu = index, rip = format_args!("{rip:#x}"), "vCPU stopped");
}
