//! rqemu-tcg: a software x86-64 CPU (interpreter over `iced-x86`-decoded blocks).
//!
//! The VMM hands the CPU its guest RAM as host-mapped regions ([`GuestRam`]) and implements
//! [`Platform`] for MMIO, port I/O and interrupts; [`Cpu::run`] executes until an [`Exit`].

pub mod block_cache;
mod cpu;
pub mod cpuid;
mod exec;
pub mod flags;
mod interrupt;
pub mod memory;
pub mod mmu;
pub mod platform;
pub mod state;

pub use cpu::Cpu;
pub use memory::{GuestRam, MemoryError, RamRegion};
pub use platform::{Exit, Platform, ShutdownReason, StopReason};
pub use state::{ArchState, DescTable, SegReg, Segment};
