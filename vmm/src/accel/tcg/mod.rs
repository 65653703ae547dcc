//! The software-CPU accelerator: [`rqemu_tcg`] behind the [`Accelerator`]/[`Vcpu`] seam.
//!
//! * RAM: the VMM's memfd mappings are handed to the CPU as raw host ranges (`map_ram`).
//! * Interrupts: a userspace [`chip::IrqChip`] (8259 pair, 8254 PIT, IOAPIC, LAPIC — see
//!   [`chips`]) replaces KVM's in-kernel irqchip; `set_irq_line` and irqfds (a poller
//!   thread, [`irqfd`]) raise its GSIs.
//! * ioevents: [`IoEventBinding::ViaBus`] — the VMM registers them on its bus, which signals
//!   the kick eventfd on a matching write.
//! * vCPUs ([`vcpu::TcgVcpu`]) call the buses directly from inside the CPU, so they need them
//!   before creation: [`Accelerator::attach_buses`].
//!
//! SMP: every vCPU is a [`rqemu_tcg::Cpu`] on its own thread over the shared guest RAM, with
//! its own LAPIC in the chip; secondary vCPUs start on the guest's INIT/STARTUP IPIs.

mod chip;
pub mod chips;
mod irqfd;
mod platform;
pub mod vcpu;

use std::sync::{Arc, Mutex, OnceLock};

use vm_memory::{GuestAddress, GuestMemory as _};
use vmm_sys_util::eventfd::EventFd;

use super::{AccelError, Accelerator, CpuTopology, IoEventAddress, IoEventBinding, Result, Vcpu};
use crate::bus::Bus;
use crate::exit::ExitRequester;
use crate::memory::{GuestMemory, GuestRam};
use chip::IrqChip;
use irqfd::Irqfds;
use vcpu::{TcgVcpu, TcgVcpuParts};

/// Most vCPUs of a TCG machine (Linux's flat logical APIC mode addresses 8 CPUs; the
/// shared code-page masks have one bit per vCPU).
pub const MAX_VCPUS: u32 = 8;

/// How the software CPU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcgMode {
    /// The interpreter only.
    Interp,
    /// Hot blocks translated to host code (needs the `jit` feature).
    Jit,
}

/// Options of the software CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcgOptions {
    /// Execution mode.
    pub mode: TcgMode,
    /// Interpreted runs of a block before it is translated.
    pub jit_threshold: u32,
    /// Translate on the JIT's compile thread while the vCPU goes on interpreting (off: the
    /// vCPU waits for each translation).
    pub jit_background: bool,
    /// Print execution counters to stderr when a vCPU ends.
    pub stats: bool,
}

impl Default for TcgOptions {
    /// JIT when built with it; counters when `RQEMU_TCG_STATS=1`.
    fn default() -> Self {
        TcgOptions {
            mode: if cfg!(feature = "jit") {
                TcgMode::Jit
            } else {
                TcgMode::Interp
            },
            jit_threshold: rqemu_tcg::DEFAULT_JIT_THRESHOLD,
            jit_background: true,
            stats: std::env::var("RQEMU_TCG_STATS").is_ok_and(|v| v == "1"),
        }
    }
}

/// The TCG accelerator.
pub struct TcgAccel {
    opts: TcgOptions,
    chip: Arc<IrqChip>,
    irqfds: Irqfds,
    ram: Mutex<Option<(Arc<rqemu_tcg::GuestRam>, GuestMemory)>>,
    buses: OnceLock<(Arc<Bus>, Arc<Bus>, ExitRequester)>,
    /// Code-page masks shared by the vCPUs (only with more than one).
    shared_code: OnceLock<Arc<rqemu_tcg::memory::SharedCode>>,
}

impl std::fmt::Debug for TcgAccel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcgAccel").finish_non_exhaustive()
    }
}

impl TcgAccel {
    /// A TCG accelerator with its interrupt platform and default options.
    pub fn new() -> Result<Self> {
        Self::with_options(TcgOptions::default())
    }

    /// A TCG accelerator with its interrupt platform.
    pub fn with_options(opts: TcgOptions) -> Result<Self> {
        if opts.mode == TcgMode::Jit && !cfg!(feature = "jit") {
            return Err(AccelError::Unavailable(
                "--tcg-mode jit: this rqemu-vmm was built without the `jit` feature".into(),
            ));
        }
        let chip = Arc::new(IrqChip::new());
        Ok(TcgAccel {
            opts,
            irqfds: Irqfds::new(chip.clone())?,
            chip,
            ram: Mutex::new(None),
            buses: OnceLock::new(),
            shared_code: OnceLock::new(),
        })
    }
}

impl Accelerator for TcgAccel {
    fn name(&self) -> &'static str {
        "tcg"
    }

    /// Up to [`MAX_VCPUS`] vCPUs, each on its own thread.
    fn max_vcpus(&self) -> u32 {
        MAX_VCPUS
    }

    /// The chips' timers and every vCPU's TSC run on [`IrqChip::now`], which leaves out the
    /// time spent paused.
    fn hold_clock(&self, paused: std::time::Duration) {
        self.chip.hold(paused);
    }

    fn map_ram(&self, ram: &GuestRam) -> Result<()> {
        let mem = ram.memory().clone();
        let mut regions = Vec::with_capacity(ram.regions().len());
        for r in ram.regions() {
            let host = mem
                .get_host_address(GuestAddress(r.guest_base))
                .map_err(|e| AccelError::Unavailable(format!("TCG: RAM region: {e}")))?;
            regions.push(rqemu_tcg::RamRegion {
                gpa: r.guest_base,
                host,
                len: r.size,
            });
        }
        // SAFETY: the regions are the mmaps of `mem`; a clone of `mem` (sharing the
        // mappings) is stored next to the `GuestRam` and in every vCPU using it, so the
        // mappings outlive every `Cpu::run`. Concurrent access from device daemons is the
        // shared-memory contract of guest RAM.
        let tcg_ram = unsafe { rqemu_tcg::GuestRam::new(regions) }
            .map_err(|e| AccelError::Unavailable(format!("TCG: guest RAM layout: {e}")))?;
        *self.ram.lock().unwrap_or_else(|e| e.into_inner()) = Some((Arc::new(tcg_ram), mem));
        Ok(())
    }

    fn attach_buses(&self, pio: &Arc<Bus>, mmio: &Arc<Bus>, exit: &ExitRequester) -> Result<()> {
        self.buses
            .set((pio.clone(), mmio.clone(), exit.clone()))
            .map_err(|_| AccelError::Unavailable("TCG: buses attached twice".into()))
    }

    fn create_vcpu(&self, index: u32, topology: &CpuTopology) -> Result<Box<dyn Vcpu>> {
        let (ram, mem) = self
            .ram
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| AccelError::Unavailable("TCG: map_ram must come first".into()))?;
        let (pio, mmio, exit) =
            self.buses.get().cloned().ok_or_else(|| {
                AccelError::Unavailable("TCG: attach_buses must come first".into())
            })?;
        let shared_code = (topology.count > 1).then(|| {
            self.shared_code
                .get_or_init(|| {
                    Arc::new(rqemu_tcg::memory::SharedCode::new(
                        ram.end(),
                        topology.count as usize,
                    ))
                })
                .clone()
        });
        Ok(Box::new(TcgVcpu::new(TcgVcpuParts {
            index,
            count: topology.count,
            shared_code,
            ram,
            mem,
            chip: self.chip.clone(),
            pio,
            mmio,
            exit,
            opts: self.opts,
        })))
    }

    fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()> {
        self.chip.set_gsi(gsi, level);
        Ok(())
    }

    fn start_threads(&self) -> Result<()> {
        self.irqfds.start()
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.irqfds.register(fd, gsi)
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.irqfds.unregister(fd, gsi)
    }

    fn register_ioevent(
        &self,
        _fd: &EventFd,
        _addr: IoEventAddress,
        _datamatch: Option<u32>,
    ) -> Result<IoEventBinding> {
        Ok(IoEventBinding::ViaBus)
    }

    fn unregister_ioevent(
        &self,
        _fd: &EventFd,
        _addr: IoEventAddress,
        _datamatch: Option<u32>,
    ) -> Result<()> {
        Ok(())
    }
}
