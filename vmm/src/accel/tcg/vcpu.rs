//! A TCG vCPU: an [`rqemu_tcg::Cpu`] run in instruction-budget slices on its own thread.
//!
//! Port/MMIO accesses are dispatched synchronously inside the CPU (see [`TcgPlatform`]), so
//! [`Vcpu::run`] only returns for kicks, shutdown or errors. `HLT` waits on the interrupt
//! chip until an interrupt, a timer deadline or a kick. Secondary vCPUs wait for INIT and
//! STARTUP IPIs from the guest, then start in real mode at the STARTUP vector, as real CPUs
//! do; an INIT stops a running secondary vCPU again.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rqemu_tcg::{Cpu, Exit, ShutdownReason, StopReason};

use super::chip::IrqChip;
use super::platform::TcgPlatform;
use super::{TcgMode, TcgOptions};
use crate::accel::{kick, AccelError, BootState, Result, Vcpu, VcpuExit};
use crate::bus::Bus;
use crate::exit::ExitRequester;
use crate::memory::GuestMemory;

/// Instructions per `Cpu::run` slice (the kick flag is also polled after every I/O).
const SLICE: u64 = 200_000;
/// Longest sleep of a halted or idle vCPU before it re-checks its kick flag.
const IDLE_WAIT: Duration = Duration::from_millis(10);

/// One TCG vCPU.
pub struct TcgVcpu {
    index: u32,
    cpu: Box<Cpu>,
    ram: Arc<rqemu_tcg::GuestRam>,
    /// Keeps the host mappings behind `ram` alive as long as this vCPU.
    _mem: GuestMemory,
    chip: Arc<IrqChip>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: ExitRequester,
    /// Set to 1 by the kick signal handler (see [`kick::arm_thread`]).
    kick: Box<AtomicU8>,
    booted: bool,
    /// The chip's external-interrupt generation last seen.
    external_seen: u64,
    /// The part of the chip's held time already applied to this CPU's TSC.
    held_applied: Duration,
    opts: TcgOptions,
}

impl std::fmt::Debug for TcgVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcgVcpu")
            .field("index", &self.index)
            .field("booted", &self.booted)
            .finish_non_exhaustive()
    }
}

/// What a TCG vCPU is built from.
pub(super) struct TcgVcpuParts {
    pub(super) index: u32,
    /// Number of vCPUs of the machine (the cores of the one package CPUID describes).
    pub(super) count: u32,
    /// The machine's shared code-page masks (SMP only).
    pub(super) shared_code: Option<Arc<rqemu_tcg::memory::SharedCode>>,
    pub(super) ram: Arc<rqemu_tcg::GuestRam>,
    pub(super) mem: GuestMemory,
    pub(super) chip: Arc<IrqChip>,
    pub(super) pio: Arc<Bus>,
    pub(super) mmio: Arc<Bus>,
    pub(super) exit: ExitRequester,
    pub(super) opts: TcgOptions,
}

impl TcgVcpu {
    pub(super) fn new(p: TcgVcpuParts) -> Self {
        let mut cpu = Box::new(Cpu::new());
        cpu.arch.apic_id = p.index as u8;
        cpu.arch.package_cpus = p.count.clamp(1, 255) as u8;
        cpu.set_clock(p.chip.epoch());
        p.chip.add_cpu(p.index as usize);
        #[cfg(feature = "jit")]
        let smp_jit = p.shared_code.is_some();
        if let Some(sc) = p.shared_code {
            cpu.share_code(sc, p.index as u8);
        }
        #[cfg(feature = "jit")]
        if p.opts.mode == TcgMode::Jit {
            let cfg = rqemu_tcg::JitConfig {
                threshold: p.opts.jit_threshold,
                smp: smp_jit,
                background: p.opts.jit_background,
                ..Default::default()
            };
            if let Err(e) = cpu.enable_jit(cfg) {
                tracing::warn!("TCG: the JIT is not available on this host ({e}): interpreting");
            }
        }
        TcgVcpu {
            index: p.index,
            cpu,
            ram: p.ram,
            _mem: p.mem,
            chip: p.chip,
            pio: p.pio,
            mmio: p.mmio,
            exit: p.exit,
            kick: Box::new(AtomicU8::new(0)),
            booted: false,
            external_seen: 0,
            held_applied: Duration::ZERO,
            opts: p.opts,
        }
    }

    /// One line of execution counters (`--tcg-stats`), `key=value` separated by spaces.
    pub fn stats_line(&self) -> String {
        let (decoded, invalidated) = self.cpu.cache_stats();
        let mode = match self.opts.mode {
            TcgMode::Interp => "interp",
            TcgMode::Jit => "jit",
        };
        let mut s = format!(
            "tcg-stats: vcpu={} mode={mode} insns={} blocks_decoded={decoded} \
             code_pages_invalidated={invalidated}",
            self.index, self.cpu.icount
        );
        #[cfg(feature = "jit")]
        if let Some(j) = self.cpu.jit_stats() {
            let per_block = j.compile_ns / j.translated.max(1);
            s += &format!(
                " native_insns={} interp_insns={} native_share={:.3} native_runs={} \
                 translated={} translated_insns={} helper_insns={} untranslatable={} compile_ms={:.1} \
                 codegen_ms={:.1} finalize_ms={:.1} compile_us_per_block={:.1} code_bytes={} \
                 flushes={} chained={} slot_fills={} superblocks={} merged={} loops={} \
                 discarded={}",
                j.native_insns,
                self.cpu.icount.saturating_sub(j.native_insns),
                j.native_insns as f64 / self.cpu.icount.max(1) as f64,
                j.native_runs,
                j.translated,
                j.translated_insns,
                j.helper_insns,
                j.untranslatable,
                j.compile_ns as f64 / 1e6,
                j.codegen_ns as f64 / 1e6,
                j.finalize_ns as f64 / 1e6,
                per_block as f64 / 1e3,
                j.code_bytes,
                j.flushes,
                j.chained,
                j.slot_fills,
                j.superblocks,
                j.merged,
                j.loops,
                j.discarded
            );
            let stops: Vec<String> = self
                .cpu
                .jit_top_stops(24)
                .into_iter()
                .map(|(m, c)| format!("{m}:{c}"))
                .collect();
            s += &format!(
                "\ntcg-stats: vcpu={} interpreter_after={}",
                self.index,
                stops.join(",")
            );
        }
        s
    }

    /// A STARTUP IPI with `vector` arrived: the CPU starts in real mode at `vector << 12`
    /// (Linux's trampoline then takes it to 64-bit code).
    fn start_ap(&mut self, vector: u8) {
        tracing::debug!(vcpu = self.index, vector, "TCG: STARTUP IPI");
        self.cpu.arch.set_sipi_state(vector);
        self.cpu.state_changed();
        self.cpu.note_external_writes();
        self.booted = true;
    }

    fn take_kick(&self) -> bool {
        self.kick.swap(0, Ordering::AcqRel) != 0
    }

    fn guest_err(&self, msg: String) -> AccelError {
        AccelError::Guest {
            vcpu: self.index,
            msg,
        }
    }
}

impl Vcpu for TcgVcpu {
    fn index(&self) -> u32 {
        self.index
    }

    fn set_boot_state(&mut self, st: &BootState) -> Result<()> {
        const EFER_LMA: u64 = 1 << 10;
        if st.efer & EFER_LMA == 0 || !st.cs.l {
            return Err(AccelError::Unavailable(
                "the TCG CPU starts only at the 64-bit Linux entry (bzImage or ELF without a \
                 PVH note); 32-bit PVH entry is not supported"
                    .into(),
            ));
        }
        let a = &mut self.cpu.arch;
        a.set_linux_boot_state(st.rip, st.rsi, st.cr3, st.gdt.base);
        a.cr4 |= st.cr4;
        a.gdtr.limit = st.gdt.limit;
        a.idtr.base = st.idt.base;
        a.idtr.limit = st.idt.limit;
        a.gpr[3] = st.rbx;
        a.gpr[4] = st.rsp;
        a.set_rflags(st.rflags | 2);
        self.cpu.state_changed();
        self.cpu.note_external_writes();
        self.booted = true;
        Ok(())
    }

    fn start_helpers(&mut self) -> Result<()> {
        #[cfg(feature = "jit")]
        if let Err(e) = self.cpu.start_jit(Some(Box::new(|| {
            crate::sandbox::confine_current(crate::sandbox::VmmThread::JitCompiler)
        }))) {
            tracing::warn!(
                "TCG vCPU {}: the JIT compile thread did not start ({e}): interpreting",
                self.index
            );
        }
        Ok(())
    }

    fn bind_to_thread(&mut self) -> Result<()> {
        kick::install_handler()?;
        // SAFETY: the AtomicU8 lives in a Box owned by this vCPU, which stays on this thread
        // and outlives the vCPU loop; `Drop` disarms before it is freed.
        unsafe { kick::arm_thread(self.kick.as_ptr()) };
        Ok(())
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        loop {
            if self.take_kick() {
                return Ok(VcpuExit::Interrupted);
            }
            if self.chip.take_init(self.index as usize) {
                // INIT (never for the BSP: the chip ignores it): stop until the next STARTUP.
                self.booted = false;
            }
            if !self.booted {
                if self.index == 0 {
                    std::thread::sleep(IDLE_WAIT);
                } else if let Some(v) = self.chip.wait_sipi(self.index as usize, IDLE_WAIT) {
                    self.start_ap(v);
                }
                continue;
            }
            if self.chip.take_external(&mut self.external_seen) {
                self.cpu.note_external_writes();
            }
            let held = self.chip.held();
            if held > self.held_applied {
                // The VM was paused: the TSC continues from where it was held.
                self.cpu.hold_clock(held - self.held_applied);
                self.held_applied = held;
            }
            let mut plat = TcgPlatform {
                cpu: self.index as usize,
                chip: &self.chip,
                pio: &self.pio,
                mmio: &self.mmio,
                exit: &self.exit,
                kick: &self.kick,
            };
            match self.cpu.run(&self.ram, &mut plat, SLICE) {
                Exit::BudgetExhausted => {}
                Exit::Halted { .. } => self.chip.wait(self.index as usize, IDLE_WAIT),
                Exit::Stop(StopReason::Reset) => return Ok(VcpuExit::Reset),
                Exit::Stop(StopReason::PowerOff) => return Ok(VcpuExit::PowerOff),
                Exit::Stop(StopReason::Other(_)) => {
                    if self.exit.should_stop() {
                        return Ok(VcpuExit::Interrupted);
                    }
                }
                Exit::Shutdown(ShutdownReason::TripleFault { .. }) => {
                    return Ok(VcpuExit::Shutdown)
                }
                Exit::Shutdown(ShutdownReason::Unsupported(msg)) => {
                    return Err(self.guest_err(format!("TCG: {msg}")))
                }
            }
        }
    }

    fn instruction_pointer(&mut self) -> Option<u64> {
        Some(self.cpu.arch.rip)
    }
}

impl Drop for TcgVcpu {
    fn drop(&mut self) {
        if self.opts.stats && self.booted {
            eprintln!("{}", self.stats_line());
        }
        // Harmless if this thread never armed (it then targets nothing of ours).
        kick::disarm_thread();
    }
}
