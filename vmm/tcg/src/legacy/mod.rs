//! Real, protected (32/16-bit) and compatibility mode: what an application processor runs
//! between its STARTUP IPI and 64-bit code, and what any other pre-long-mode code needs.
//!
//! A STARTUP IPI starts a CPU in real mode at `vector << 12`; Linux's trampoline
//! (`arch/x86/realmode/rm/trampoline_64.S`) goes from there through protected mode into
//! long mode. This CPU runs it instruction by instruction: the instruction at CS:IP is
//! decoded at the code segment's bitness (16 or 32) and never cached (the block cache and
//! the JIT hold 64-bit code only). Most instructions run through the 64-bit handlers
//! unchanged — iced-x86 already decodes the operand and address sizes, and `Ctx::ea` applies
//! every segment base and wraps at the address size when `Ctx::legacy` is set. What differs
//! by mode is here: near and far branches, the stack (SP or ESP by SS.B), segment loads in
//! real mode, IRET/RETF, LDS/LES/LSS/LFS/LGS and interrupt delivery (the real-mode vector
//! table or a 32-bit IDT).
//!
//! Not modelled (an exit names them when a guest needs them): segment limit checks, virtual-
//! 8086 mode, task switches and task gates, call gates, 16-bit interrupt gates, the BCD
//! adjust instructions, BOUND and ARPL (#UD), 32-bit paging without PAE.

mod deliver;
mod flow;

pub(crate) use deliver::deliver;

use crate::ctx::{Ctx, Handler};
use crate::exec::operand::{get_reg, reg_size};
use crate::state::{ArchState, SegReg, Segment};
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

/// The segment register `r` (DS for anything that is not one).
#[inline]
pub(crate) fn seg(s: &ArchState, r: Register) -> &Segment {
    let i = (r as usize).wrapping_sub(Register::ES as usize);
    &s.seg[if i < 6 { i } else { SegReg::Ds as usize }]
}

/// Effective address (offset in the segment) of the instruction's memory operand, wrapped at
/// the address size (16 or 32 bits).
pub(crate) fn offset(cx: &Ctx<'_>, ins: &Instruction) -> u64 {
    let (base, index) = (ins.memory_base(), ins.memory_index());
    let mut a = ins.memory_displacement64();
    // 16-bit addressing uses 16-bit base/index registers, or a 16-bit displacement alone.
    let mut a16 = base == Register::None && index == Register::None && ins.memory_displ_size() == 2;
    if base != Register::None {
        a16 |= reg_size(base) == 2;
        a = a.wrapping_add(get_reg(cx.s, base));
    }
    if index != Register::None {
        a16 |= reg_size(index) == 2;
        a = a.wrapping_add(get_reg(cx.s, index) << ins.memory_index_scale().trailing_zeros());
    }
    a & if a16 { 0xFFFF } else { 0xFFFF_FFFF }
}

/// Linear address of `off` in segment `r` (32 bits outside 64-bit mode).
#[inline]
pub(crate) fn linear(cx: &Ctx<'_>, r: Register, off: u64) -> u64 {
    seg(cx.s, r).base.wrapping_add(off) & 0xFFFF_FFFF
}

/// Mask of an instruction pointer in a code segment with attributes `attr`.
fn ip_mask(s: &ArchState, cs_attr: u16) -> u64 {
    if cs_attr & Segment::L != 0 && s.efer & crate::state::efer::LMA != 0 {
        u64::MAX
    } else if cs_attr & Segment::DB != 0 {
        0xFFFF_FFFF
    } else {
        0xFFFF
    }
}

/// Selects the handler for an instruction decoded outside 64-bit mode.
pub(crate) fn select(ins: &Instruction) -> Handler {
    match ins.mnemonic() {
        M::Jmp => match ins.op0_kind() {
            OpKind::FarBranch16 | OpKind::FarBranch32 => flow::jmp_far,
            OpKind::Memory if is_far_memory(ins) => flow::jmp_far,
            _ => flow::jmp_near,
        },
        M::Call => flow::call,
        M::Ret => flow::ret,
        M::Retf => flow::retf,
        M::Iret | M::Iretd => flow::iret,
        M::Push
        | M::Pop
        | M::Pushf
        | M::Pushfd
        | M::Popf
        | M::Popfd
        | M::Pusha
        | M::Pushad
        | M::Popa
        | M::Popad
        | M::Enter
        | M::Leave => flow::stack,
        M::Into => flow::into,
        M::Lds | M::Les | M::Lss | M::Lfs | M::Lgs => flow::load_far_pointer,
        M::Iretq
        | M::Syscall
        | M::Sysret
        | M::Sysretq
        | M::Sysenter
        | M::Sysexit
        | M::Sysexitq
        | M::Swapgs
        | M::Aaa
        | M::Aas
        | M::Daa
        | M::Das
        | M::Aam
        | M::Aad
        | M::Bound
        | M::Arpl => flow::unsupported,
        _ => crate::exec::select(ins),
    }
}

/// A far JMP/CALL through memory (`m16:16`/`m16:32`), as opposed to a near indirect one.
fn is_far_memory(ins: &Instruction) -> bool {
    matches!(
        ins.memory_size(),
        iced_x86::MemorySize::SegPtr16 | iced_x86::MemorySize::SegPtr32
    )
}
