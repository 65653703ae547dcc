//! The execution context every layer of the interpreter shares: [`Ctx`] (one run of
//! instructions against the architectural state), the [`Event`]s that stop an instruction and
//! their result type [`R`], the exception vectors, and the instruction [`Handler`] type.
//!
//! It sits below the soft MMU (`crate::mmu` implements guest accesses on `Ctx`), interrupt
//! delivery (`crate::interrupt`), the block cache and the instruction handlers (`crate::exec`).

use crate::memory::{CodeBitmap, GuestRam};
use crate::mmu::tlb::Tlb;
use crate::platform::{Exit, Platform};
use crate::state::ArchState;
use iced_x86::Instruction;

/// Exception vectors.
pub mod vec {
    /// Divide error.
    pub const DE: u8 = 0;
    /// Debug.
    pub const DB: u8 = 1;
    /// NMI.
    pub const NMI: u8 = 2;
    /// Breakpoint.
    pub const BP: u8 = 3;
    /// Overflow (INTO).
    pub const OF: u8 = 4;
    /// Invalid opcode.
    pub const UD: u8 = 6;
    /// Device not available.
    pub const NM: u8 = 7;
    /// Double fault.
    pub const DF: u8 = 8;
    /// Invalid TSS.
    pub const TS: u8 = 10;
    /// Segment not present.
    pub const NP: u8 = 11;
    /// Stack fault.
    pub const SS: u8 = 12;
    /// General protection.
    pub const GP: u8 = 13;
    /// Page fault.
    pub const PF: u8 = 14;
}

/// Something that stops the current instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// An exception to deliver through the IDT (instruction not committed).
    Fault {
        /// Vector.
        vector: u8,
        /// Error code, if the vector has one.
        error: Option<u32>,
    },
    /// Leave `run` (the instruction completed; RIP already advanced when appropriate).
    Exit(Exit),
}

impl Event {
    /// Shorthand for a fault.
    #[inline]
    pub fn fault(vector: u8, error: Option<u32>) -> Event {
        Event::Fault { vector, error }
    }
}

/// Result of executing (part of) an instruction.
pub(crate) type R<T> = Result<T, Event>;

/// #UD.
#[inline]
pub(crate) fn ud<T>() -> R<T> {
    Err(Event::fault(vec::UD, None))
}

/// #GP(code).
#[inline]
pub(crate) fn gp<T>(code: u32) -> R<T> {
    Err(Event::fault(vec::GP, Some(code)))
}

/// Execution context for one run of instructions.
pub(crate) struct Ctx<'a> {
    pub s: &'a mut ArchState,
    pub tlb: &'a mut Tlb,
    pub ram: &'a GuestRam,
    pub plat: &'a mut dyn Platform,
    pub code: &'a CodeBitmap,
    /// Virtual-time base for RDTSC.
    pub clock: &'a std::time::Instant,
    /// RIP of the next instruction (branches overwrite it).
    pub next_rip: u64,
    /// Added to decoded absolute addresses (RIP-relative operands, branch targets).
    pub delta: u64,
    /// Stop executing the current block after this instruction.
    pub end_block: bool,
    /// Block IRQ delivery until after the next instruction (STI, MOV SS).
    pub irq_shadow: bool,
    /// Accesses are implicit supervisor accesses (descriptor tables, TSS).
    pub implicit_sup: bool,
    /// Code pages written during this run (self-modifying code).
    pub smc: [u64; 4],
    pub smc_len: usize,
    pub smc_overflow: bool,
    /// A device asked to stop.
    pub stop: Option<crate::platform::StopReason>,
    /// Not in 64-bit mode (real, protected or compatibility mode): every segment base
    /// applies and addresses wrap at the address size (see `crate::legacy`).
    pub legacy: bool,
}

impl Ctx<'_> {
    /// Polls the platform for a stop request after an I/O access.
    pub fn poll_stop(&mut self) {
        if let Some(r) = self.plat.stop_requested() {
            self.stop = Some(r);
            self.end_block = true;
        }
    }

    /// Branch target of a near branch, adjusted for where the block runs.
    #[inline(always)]
    pub fn branch_target(&self, ins: &Instruction) -> u64 {
        ins.near_branch64().wrapping_add(self.delta)
    }
}

/// An instruction handler. On `Ok`, the caller commits `next_rip` to RIP.
pub(crate) type Handler = fn(&mut Ctx<'_>, &Instruction) -> R<()>;
