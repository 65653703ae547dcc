//! The interpreter: executes one decoded instruction against the architectural state.
//!
//! `step` is the only entry point used by the block runner (`crate::cpu`); a JIT would replace
//! the block runner and call back into these helpers for slow paths.

mod alu;
mod bits;
mod control;
mod muldiv;
pub(crate) mod operand;
mod shift;
mod sse;
mod string;
mod system;
mod x87;

pub(crate) use system::read_descriptor as system_read_descriptor;

use crate::block_cache::CodeBitmap;
use crate::mmu::tlb::Tlb;
use crate::memory::GuestRam;
use crate::platform::{Exit, Platform};
use crate::state::ArchState;
use iced_x86::{Instruction, Mnemonic};

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
    /// Overflow.
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
    /// x87 floating point error.
    pub const MF: u8 = 16;
    /// SIMD floating point exception.
    pub const XM: u8 = 19;
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

/// Executes one instruction. On `Ok`, the caller commits `next_rip` to RIP.
#[inline]
pub(crate) fn step(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    use Mnemonic as M;
    match ins.mnemonic() {
        M::Mov => alu::mov(cx, ins),
        M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor | M::Cmp | M::Test => {
            alu::binop(cx, ins)
        }
        M::Lea => alu::lea(cx, ins),
        M::Movzx | M::Movsx | M::Movsxd => alu::movx(cx, ins),
        M::Inc | M::Dec | M::Not | M::Neg => alu::unop(cx, ins),
        M::Xchg => alu::xchg(cx, ins),
        M::Xadd => alu::xadd(cx, ins),
        M::Cmpxchg => alu::cmpxchg(cx, ins),
        M::Cmpxchg8b | M::Cmpxchg16b => alu::cmpxchg_wide(cx, ins),
        M::Cbw | M::Cwde | M::Cdqe | M::Cwd | M::Cdq | M::Cqo => alu::convert(cx, ins),
        M::Bswap => alu::bswap(cx, ins),
        M::Seto | M::Setno | M::Setb | M::Setae | M::Sete | M::Setne | M::Setbe | M::Seta
        | M::Sets | M::Setns | M::Setp | M::Setnp | M::Setl | M::Setge | M::Setle | M::Setg => {
            alu::setcc(cx, ins)
        }
        M::Cmovo | M::Cmovno | M::Cmovb | M::Cmovae | M::Cmove | M::Cmovne | M::Cmovbe
        | M::Cmova | M::Cmovs | M::Cmovns | M::Cmovp | M::Cmovnp | M::Cmovl | M::Cmovge
        | M::Cmovle | M::Cmovg => alu::cmovcc(cx, ins),
        M::Clc | M::Stc | M::Cmc | M::Cld | M::Std | M::Lahf | M::Sahf => alu::flag_op(cx, ins),
        M::Nop | M::Pause | M::Lfence | M::Mfence | M::Sfence | M::Prefetchnta
        | M::Prefetcht0 | M::Prefetcht1 | M::Prefetcht2 | M::Prefetchw | M::Clflush
        | M::Clflushopt | M::Wbinvd | M::Invd | M::Endbr64 | M::Endbr32 => Ok(()),
        M::Mul | M::Imul | M::Div | M::Idiv => muldiv::exec(cx, ins),
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr => {
            shift::shift(cx, ins)
        }
        M::Shld | M::Shrd => shift::shxd(cx, ins),
        M::Bt | M::Bts | M::Btr | M::Btc => bits::bt(cx, ins),
        M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt | M::Popcnt => bits::scan(cx, ins),
        M::Movsb | M::Movsw | M::Movsq | M::Stosb | M::Stosw | M::Stosd | M::Stosq | M::Lodsb
        | M::Lodsw | M::Lodsd | M::Lodsq | M::Cmpsb | M::Cmpsw | M::Cmpsq | M::Scasb
        | M::Scasw | M::Scasd | M::Scasq | M::Insb | M::Insw | M::Insd | M::Outsb | M::Outsw
        | M::Outsd => string::exec(cx, ins),
        M::Movsd | M::Cmpsd if string::is_string(ins) => string::exec(cx, ins),
        M::Jmp | M::Call | M::Ret | M::Jo | M::Jno | M::Jb | M::Jae | M::Je | M::Jne | M::Jbe
        | M::Ja | M::Js | M::Jns | M::Jp | M::Jnp | M::Jl | M::Jge | M::Jle | M::Jg | M::Loop
        | M::Loope | M::Loopne | M::Jrcxz | M::Jecxz => control::branch(cx, ins),
        M::Push | M::Pop | M::Pushfq | M::Pushf | M::Popfq | M::Popf | M::Enter | M::Leave => {
            control::stack(cx, ins)
        }
        M::Int3 | M::Int | M::Int1 | M::Into | M::Ud2 | M::Ud0 | M::Ud1 | M::Hlt | M::Iretq
        | M::Iretd | M::Iret | M::Retf | M::Syscall | M::Sysretq | M::Sysret | M::Cli
        | M::Sti | M::Swapgs => control::system_flow(cx, ins),
        M::Cpuid | M::Rdmsr | M::Wrmsr | M::Rdtsc | M::Rdtscp | M::Rdpid | M::Lgdt | M::Lidt
        | M::Lldt | M::Ltr | M::Sgdt | M::Sidt | M::Sldt | M::Str | M::Invlpg | M::Smsw
        | M::Lmsw | M::Clts | M::In | M::Out | M::Xgetbv | M::Lar | M::Lsl | M::Verr
        | M::Verw => system::exec(cx, ins),
        M::Movsd | M::Cmpsd => sse::exec(cx, ins),
        M::Fninit | M::Fnstcw | M::Fldcw | M::Fnstsw | M::Wait | M::Fnclex | M::Fxsave
        | M::Fxsave64 | M::Fxrstor | M::Fxrstor64 | M::Ldmxcsr | M::Stmxcsr | M::Emms => {
            x87::exec(cx, ins)
        }
        _ => sse::exec(cx, ins),
    }
}
