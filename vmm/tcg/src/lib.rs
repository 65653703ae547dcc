//! rqemu-tcg: a software x86-64 CPU (an interpreter over `iced-x86`-decoded blocks).
//!
//! # Using it from a VMM
//!
//! ```no_run
//! use rqemu_tcg::{Cpu, Exit, GuestRam, Platform, RamRegion};
//! # struct Bus;
//! # impl Platform for Bus {
//! #     fn mmio_read(&mut self, _: u64, d: &mut [u8]) { d.fill(0xFF) }
//! #     fn mmio_write(&mut self, _: u64, _: &[u8]) {}
//! #     fn pio_read(&mut self, _: u16, d: &mut [u8]) { d.fill(0xFF) }
//! #     fn pio_write(&mut self, _: u16, _: &[u8]) {}
//! #     fn interrupt_pending(&mut self) -> bool { false }
//! #     fn acknowledge_interrupt(&mut self) -> Option<u8> { None }
//! # }
//! # fn wait_for_interrupt() {}
//! # let (host_ptr, len) = (std::ptr::null_mut(), 0u64);
//! # let (entry, boot_params, pml4, gdt) = (0, 0, 0, 0);
//! // Guest RAM: the VMM's memfd mappings (GuestMemoryMmap regions), as raw pointers.
//! // SAFETY: the mappings outlive `ram` and every `run` using it.
//! let ram = unsafe { GuestRam::new(vec![RamRegion { gpa: 0, host: host_ptr, len }]) }?;
//! let mut cpu = Cpu::new();
//! // Linux 64-bit boot protocol: long mode, paging on (identity tables built by the VMM in
//! // guest RAM at `pml4`), __BOOT_CS/__BOOT_DS GDT at `gdt`, RSI = boot_params.
//! cpu.arch.set_linux_boot_state(entry, boot_params, pml4, gdt);
//! cpu.state_changed();
//! let mut bus = Bus;
//! loop {
//!     match cpu.run(&ram, &mut bus, 1_000_000) {
//!         Exit::BudgetExhausted => {}            // check pause/stop requests, then continue
//!         Exit::Halted { .. } => wait_for_interrupt(),
//!         Exit::Stop(reason) => break,           // reset / power-off requested by a device
//!         Exit::Shutdown(reason) => break,       // triple fault or unsupported state
//!     }
//!     // After device DMA into guest RAM (e.g. before injecting a virtio interrupt):
//!     cpu.note_external_writes();
//! }
//! # Ok::<(), rqemu_tcg::MemoryError>(())
//! ```
//!
//! # Structure
//! - [`state`]: architectural registers ([`ArchState`]), [`flags`]: lazy RFLAGS.
//! - [`mmu`]: 4-level page walk and software TLB; [`memory`]: guest RAM regions and the
//!   bitmap of pages holding cached code.
//! - `ctx`: what every layer below shares: the execution context `Ctx`, the `Event`s that stop
//!   an instruction, the exception vectors, the instruction `Handler` type.
//! - [`block_cache`]: decoded blocks per guest-physical address with self-modifying-code
//!   detection; the interpreter (`exec`) runs a block's instructions through handlers chosen
//!   at decode time — the seam where a JIT would plug in.
//! - `jit` (feature `jit`): translates hot blocks to host code with Cranelift; the
//!   interpreter stays the reference and runs whatever is not translated.
//! - `interrupt`: IDT delivery (TSS RSP0/IST, privilege changes, #DF, triple fault);
//!   `descriptor`: GDT/LDT descriptor reads.
//! - [`cpuid`]: advertises exactly what is implemented.
//!
//! One vCPU per `Cpu`; several `Cpu`s on several threads share one [`GuestRam`] (SMP):
//! LOCKed read-modify-writes and XCHG are host atomics (`mmu::locked`), page-table A/D bits
//! are set by compare-exchange, [`memory::SharedCode`] carries cross-CPU code invalidation,
//! `ArchState::set_sipi_state` starts an application processor in real mode, and `legacy`
//! runs real, protected and compatibility mode code (Linux's SIPI trampoline).

mod atomic;
pub mod block_cache;
mod cpu;
pub mod cpuid;
mod ctx;
mod descriptor;
mod exec;
pub mod flags;
mod interrupt;
#[cfg(feature = "jit")]
pub mod jit;
mod legacy;
pub mod memory;
pub mod mmu;
pub mod platform;
pub mod state;

pub use cpu::Cpu;

/// Interpreted runs of a block before the JIT translates it. Compilation runs on its own
/// thread (newest block first), so a low threshold costs the vCPU only what waits in the
/// queue behind blocks that are not that hot. Measured with whole runs of
/// `scripts/tcg-bench.sh`'s workloads (3-5 pairs): against 1000, 300 took 1.023 of the
/// compute workload's wall time and 1.084 of the boot's; 100 took 1.106 of 300's; 2500 took
/// 1.036 of 1000's.
pub const DEFAULT_JIT_THRESHOLD: u32 = 1000;
#[cfg(feature = "jit")]
pub use jit::{JitConfig, JitError, JitStats};
pub use memory::{GuestRam, MemoryError, RamRegion};
pub use platform::{Exit, Platform, ShutdownReason, StopReason};
pub use state::{ArchState, DescTable, SegReg, Segment};
