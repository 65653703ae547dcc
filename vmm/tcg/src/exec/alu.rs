//! Data movement, integer arithmetic/logic, exchanges, conversions, SETcc/CMOVcc, flag ops.

use super::operand::{get_reg, set_reg, sext};
use super::{gp, Ctx, R};
use crate::flags::{size_mask, FlagOp, AF, CF, DF, PF, SF, ZF};
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

/// Condition nibble (0..=15) of a Jcc/SETcc/CMOVcc instruction.
#[inline(always)]
pub fn cc(ins: &Instruction) -> u8 {
    (ins.condition_code() as u8).wrapping_sub(1)
}

fn is_special(r: Register) -> bool {
    r.is_segment_register() || r.is_cr() || r.is_dr()
}

pub fn mov(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    if ins.op0_kind() == OpKind::Register && is_special(ins.op0_register())
        || ins.op1_kind() == OpKind::Register
            && (ins.op1_register().is_cr() || ins.op1_register().is_dr())
    {
        return super::system::mov_special(cx, ins);
    }
    let size = cx.op_size(ins, 0);
    let v = cx.read_op(ins, 1, size)?;
    cx.write_op(ins, 0, size, v)
}

/// Operand form of a two-operand instruction, used to pick specialised handlers at decode time.
pub enum Form {
    /// GPR, GPR.
    RegReg,
    /// GPR, immediate.
    RegImm,
    /// GPR, memory.
    RegMem,
    /// Memory, GPR.
    MemReg,
    /// Anything else (memory, special registers).
    Other,
}

fn is_gpr(r: Register) -> bool {
    (1..=68).contains(&(r as usize))
}

/// Classifies operands 0 and 1.
pub fn form(ins: &Instruction) -> Form {
    if ins.op_count() != 2 {
        return Form::Other;
    }
    if ins.op0_kind() == OpKind::Memory {
        return if ins.op1_kind() == OpKind::Register && is_gpr(ins.op1_register()) {
            Form::MemReg
        } else {
            Form::Other
        };
    }
    if ins.op0_kind() != OpKind::Register || !is_gpr(ins.op0_register()) {
        return Form::Other;
    }
    match ins.op1_kind() {
        OpKind::Register if is_gpr(ins.op1_register()) => Form::RegReg,
        OpKind::Memory => Form::RegMem,
        OpKind::Immediate8
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => Form::RegImm,
        _ => Form::Other,
    }
}

/// MOV GPR, GPR.
pub fn mov_rr(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let v = get_reg(cx.s, ins.op1_register());
    set_reg(cx.s, ins.op0_register(), v);
    Ok(())
}

/// MOV GPR, [mem].
pub fn mov_load(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let r = ins.op0_register();
    let va = cx.ea(ins);
    let v = cx.read(va, super::operand::reg_size(r))?;
    set_reg(cx.s, r, v);
    Ok(())
}

/// MOV [mem], GPR.
pub fn mov_store(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let r = ins.op1_register();
    let va = cx.ea(ins);
    cx.write(va, super::operand::reg_size(r), get_reg(cx.s, r))
}

/// MOV GPR, imm.
pub fn mov_ri(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    set_reg(cx.s, ins.op0_register(), ins.immediate(1));
    Ok(())
}

/// ALU op with a GPR destination and a GPR or immediate source.
pub fn binop_reg(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let r0 = ins.op0_register();
    let size = super::operand::reg_size(r0);
    let mask = size_mask(size);
    let b = if ins.op1_kind() == OpKind::Register {
        get_reg(cx.s, ins.op1_register())
    } else {
        ins.immediate(1) & mask
    };
    let a = get_reg(cx.s, r0);
    let m = ins.mnemonic();
    let (res, op, carry) = match m {
        M::Add => (a.wrapping_add(b), FlagOp::Add, 0),
        M::Adc => {
            let c = u64::from(cx.s.flags.cf());
            (a.wrapping_add(b).wrapping_add(c), FlagOp::Adc, c)
        }
        M::Sub | M::Cmp => (a.wrapping_sub(b), FlagOp::Sub, 0),
        M::Sbb => {
            let c = u64::from(cx.s.flags.cf());
            (a.wrapping_sub(b).wrapping_sub(c), FlagOp::Sbb, c)
        }
        M::And | M::Test => (a & b, FlagOp::Logic, 0),
        M::Or => (a | b, FlagOp::Logic, 0),
        _ => (a ^ b, FlagOp::Logic, 0),
    };
    let res = res & mask;
    if !matches!(m, M::Cmp | M::Test) {
        set_reg(cx.s, r0, res);
    }
    cx.s.flags.set_lazy(op, size, res, a, b, carry);
    Ok(())
}

/// Whether `ins` is a LOCKed read-modify-write of memory operand 0 (made atomic against the
/// other vCPUs through [`Ctx::atomic_rmw`]).
#[inline(always)]
pub fn locked(ins: &Instruction) -> bool {
    ins.has_lock_prefix() && ins.op0_kind() == OpKind::Memory
}

/// The result, flag operation and carry-in of a two-operand ALU op on `a`, `b`.
#[inline(always)]
fn alu2(m: M, a: u64, b: u64, cf: bool) -> (u64, FlagOp, u64) {
    match m {
        M::Add => (a.wrapping_add(b), FlagOp::Add, 0),
        M::Adc => {
            let c = u64::from(cf);
            (a.wrapping_add(b).wrapping_add(c), FlagOp::Adc, c)
        }
        M::Sub | M::Cmp => (a.wrapping_sub(b), FlagOp::Sub, 0),
        M::Sbb => {
            let c = u64::from(cf);
            (a.wrapping_sub(b).wrapping_sub(c), FlagOp::Sbb, c)
        }
        M::And | M::Test => (a & b, FlagOp::Logic, 0),
        M::Or => (a | b, FlagOp::Logic, 0),
        _ => (a ^ b, FlagOp::Logic, 0),
    }
}

pub fn binop(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = cx.op_size(ins, 0);
    let b = cx.read_op(ins, 1, size)?;
    let m = ins.mnemonic();
    let writes = !matches!(m, M::Cmp | M::Test);
    let cf = cx.s.flags.cf();
    let mask = size_mask(size);
    if writes && locked(ins) {
        let va = cx.ea(ins);
        let a = cx.atomic_rmw(va, size, |a| Some(alu2(m, a, b, cf).0 & mask))?;
        let (res, op, carry) = alu2(m, a, b, cf);
        cx.s.flags.set_lazy(op, size, res & mask, a, b, carry);
        return Ok(());
    }
    let a = if writes {
        cx.read_rmw(ins, size)?
    } else {
        cx.read_op(ins, 0, size)?
    };
    let (res, op, carry) = alu2(m, a, b, cf);
    let res = res & mask;
    if writes {
        cx.write_op(ins, 0, size, res)?;
    }
    cx.s.flags.set_lazy(op, size, res, a, b, carry);
    Ok(())
}

pub fn unop(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = cx.op_size(ins, 0);
    let m = size_mask(size);
    if locked(ins) {
        let va = cx.ea(ins);
        let mn = ins.mnemonic();
        let a = cx.atomic_rmw(va, size, |a| {
            Some(
                match mn {
                    M::Inc => a.wrapping_add(1),
                    M::Dec => a.wrapping_sub(1),
                    M::Not => !a,
                    _ => a.wrapping_neg(),
                } & m,
            )
        })?;
        let cf = if cx.s.flags.cf() { CF } else { 0 };
        match mn {
            M::Inc => {
                cx.s.flags
                    .set_lazy(FlagOp::Inc, size, a.wrapping_add(1) & m, a, 1, cf)
            }
            M::Dec => {
                cx.s.flags
                    .set_lazy(FlagOp::Dec, size, a.wrapping_sub(1) & m, a, 1, cf)
            }
            M::Not => {}
            _ => {
                cx.s.flags
                    .set_lazy(FlagOp::Sub, size, a.wrapping_neg() & m, 0, a, 0)
            }
        }
        return Ok(());
    }
    let a = cx.read_rmw(ins, size)?;
    match ins.mnemonic() {
        M::Inc | M::Dec => {
            let inc = ins.mnemonic() == M::Inc;
            let res = if inc {
                a.wrapping_add(1)
            } else {
                a.wrapping_sub(1)
            } & m;
            cx.write_op(ins, 0, size, res)?;
            let cf = if cx.s.flags.cf() { CF } else { 0 };
            let op = if inc { FlagOp::Inc } else { FlagOp::Dec };
            cx.s.flags.set_lazy(op, size, res, a, 1, cf);
        }
        M::Not => cx.write_op(ins, 0, size, !a & m)?,
        _ => {
            let res = a.wrapping_neg() & m;
            cx.write_op(ins, 0, size, res)?;
            cx.s.flags.set_lazy(FlagOp::Sub, size, res, 0, a, 0);
        }
    }
    Ok(())
}

pub fn lea(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    if cx.legacy {
        set_reg(cx.s, ins.op0_register(), crate::legacy::offset(cx, ins));
        return Ok(());
    }
    let a = cx.ea(ins).wrapping_sub(cx.seg_base(ins.memory_segment()));
    set_reg(cx.s, ins.op0_register(), a);
    Ok(())
}

pub fn movx(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let dsize = cx.op_size(ins, 0);
    let ssize = match ins.op1_kind() {
        OpKind::Register => super::operand::reg_size(ins.op1_register()),
        _ => ins.memory_size().size() as u8,
    };
    let v = cx.read_op(ins, 1, ssize)?;
    let v = if ins.mnemonic() == M::Movzx {
        v
    } else {
        sext(v, ssize) & size_mask(dsize)
    };
    set_reg(cx.s, ins.op0_register(), v);
    Ok(())
}

pub fn xchg(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = cx.op_size(ins, 0);
    if ins.op0_kind() == OpKind::Register && ins.op1_kind() == OpKind::Register {
        let (r0, r1) = (ins.op0_register(), ins.op1_register());
        let (a, b) = (get_reg(cx.s, r0), get_reg(cx.s, r1));
        set_reg(cx.s, r0, b);
        set_reg(cx.s, r1, a);
        return Ok(());
    }
    let (mem_i, reg) = if ins.op0_kind() == OpKind::Memory {
        (0, ins.op1_register())
    } else {
        (1, ins.op0_register())
    };
    let _ = mem_i;
    // XCHG with memory is always locked.
    let va = cx.ea(ins);
    let r = get_reg(cx.s, reg) & size_mask(size);
    let m = cx.atomic_rmw(va, size, |_| Some(r))?;
    set_reg(cx.s, reg, m);
    Ok(())
}

pub fn xadd(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = cx.op_size(ins, 0);
    let b = cx.read_op(ins, 1, size)?;
    let mask = size_mask(size);
    if locked(ins) {
        let va = cx.ea(ins);
        let a = cx.atomic_rmw(va, size, |a| Some(a.wrapping_add(b) & mask))?;
        set_reg(cx.s, ins.op1_register(), a);
        let res = a.wrapping_add(b) & mask;
        cx.s.flags.set_lazy(FlagOp::Add, size, res, a, b, 0);
        return Ok(());
    }
    let a = cx.read_rmw(ins, size)?;
    let res = a.wrapping_add(b) & mask;
    if ins.op0_kind() == OpKind::Register {
        // XADD r, r: the destination is written last (the same register ends with the sum).
        set_reg(cx.s, ins.op1_register(), a);
        cx.write_op(ins, 0, size, res)?;
    } else {
        // Memory first: the source register may be part of the address (XADD [rbx], bh).
        cx.write_op(ins, 0, size, res)?;
        set_reg(cx.s, ins.op1_register(), a);
    }
    cx.s.flags.set_lazy(FlagOp::Add, size, res, a, b, 0);
    Ok(())
}

/// Register holding the accumulator of `size` bytes.
fn acc_reg(size: u8) -> Register {
    match size {
        1 => Register::AL,
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    }
}

pub fn cmpxchg(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = cx.op_size(ins, 0);
    let src = cx.read_op(ins, 1, size)?;
    if locked(ins) {
        let va = cx.ea(ins);
        let acc = get_reg(cx.s, acc_reg(size)) & size_mask(size);
        let dst = cx.atomic_rmw(va, size, |d| (d == acc).then_some(src))?;
        if acc != dst {
            set_reg(cx.s, acc_reg(size), dst);
        }
        let res = acc.wrapping_sub(dst) & size_mask(size);
        cx.s.flags.set_lazy(FlagOp::Sub, size, res, acc, dst, 0);
        return Ok(());
    }
    let dst = cx.read_rmw(ins, size)?;
    let acc = get_reg(cx.s, acc_reg(size)) & size_mask(size);
    let res = acc.wrapping_sub(dst) & size_mask(size);
    if acc == dst {
        cx.write_op(ins, 0, size, src)?;
    } else {
        if ins.op0_kind() == OpKind::Memory {
            cx.write_op(ins, 0, size, dst)?;
        }
        set_reg(cx.s, acc_reg(size), dst);
    }
    cx.s.flags.set_lazy(FlagOp::Sub, size, res, acc, dst, 0);
    Ok(())
}

pub fn cmpxchg_wide(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let va = cx.ea(ins);
    let wide = ins.mnemonic() == M::Cmpxchg16b;
    let half: u8 = if wide { 8 } else { 4 };
    if wide && va & 15 != 0 {
        return gp(0);
    }
    let m = size_mask(half);
    if ins.has_lock_prefix() {
        let (rax, rdx) = (cx.s.gpr[0] & m, cx.s.gpr[2] & m);
        let (rbx, rcx) = (cx.s.gpr[3] & m, cx.s.gpr[1] & m);
        let (lo, hi) = if wide {
            cx.atomic_cas16(va, (rax, rdx), (rbx, rcx))?
        } else {
            let old = rax | rdx << 32;
            let cur = cx.atomic_rmw(va, 8, |c| (c == old).then_some(rbx | rcx << 32))?;
            (cur & m, cur >> 32)
        };
        let equal = lo == rax && hi == rdx;
        if !equal {
            cx.s.gpr[0] = lo;
            cx.s.gpr[2] = hi;
        }
        cx.s.flags.update_arith(ZF, if equal { ZF } else { 0 });
        return Ok(());
    }
    cx.check_write(va, 2 * half as usize)?;
    let lo = cx.read(va, half)?;
    let hi = cx.read(va.wrapping_add(u64::from(half)), half)?;
    let (rax, rdx) = (cx.s.gpr[0] & m, cx.s.gpr[2] & m);
    let equal = lo == rax && hi == rdx;
    if equal {
        let (rbx, rcx) = (cx.s.gpr[3] & m, cx.s.gpr[1] & m);
        cx.write(va, half, rbx)?;
        cx.write(va.wrapping_add(u64::from(half)), half, rcx)?;
    } else {
        cx.write(va, half, lo)?;
        cx.write(va.wrapping_add(u64::from(half)), half, hi)?;
        cx.s.gpr[0] = lo;
        cx.s.gpr[2] = hi;
    }
    cx.s.flags.update_arith(ZF, if equal { ZF } else { 0 });
    Ok(())
}

pub fn convert(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let g = &mut cx.s.gpr;
    match ins.mnemonic() {
        M::Cbw => g[0] = (g[0] & !0xFFFF) | (sext(g[0], 1) & 0xFFFF),
        M::Cwde => g[0] = sext(g[0], 2) & 0xFFFF_FFFF,
        M::Cdqe => g[0] = sext(g[0], 4),
        M::Cwd => g[2] = (g[2] & !0xFFFF) | ((sext(g[0], 2) >> 16) & 0xFFFF),
        M::Cdq => g[2] = (sext(g[0], 4) >> 32) & 0xFFFF_FFFF,
        _ => g[2] = ((g[0] as i64) >> 63) as u64,
    }
    Ok(())
}

pub fn bswap(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let r = ins.op0_register();
    let v = get_reg(cx.s, r);
    let out = match super::operand::reg_size(r) {
        8 => v.swap_bytes(),
        4 => u64::from((v as u32).swap_bytes()),
        _ => 0,
    };
    set_reg(cx.s, r, out);
    Ok(())
}

pub fn xlat(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let amask = crate::flags::size_mask(super::operand::reg_size(ins.memory_base()));
    let off = cx.s.gpr[3].wrapping_add(cx.s.gpr[0] & 0xFF) & amask;
    let va = cx.seg_base(ins.memory_segment()).wrapping_add(off);
    let v = cx.read(va, 1)?;
    cx.s.gpr[0] = (cx.s.gpr[0] & !0xFF) | v;
    Ok(())
}

pub fn setcc(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let v = u64::from(cx.s.flags.cond(cc(ins)));
    cx.write_op(ins, 0, 1, v)
}

pub fn cmovcc(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = cx.op_size(ins, 0);
    let v = cx.read_op(ins, 1, size)?;
    let r = ins.op0_register();
    if cx.s.flags.cond(cc(ins)) {
        set_reg(cx.s, r, v);
    } else if size == 4 {
        let old = get_reg(cx.s, r);
        set_reg(cx.s, r, old);
    }
    Ok(())
}

pub fn flag_op(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let f = &mut cx.s.flags;
    match ins.mnemonic() {
        M::Clc => f.update_arith(CF, 0),
        M::Stc => f.update_arith(CF, CF),
        M::Cmc => {
            let c = f.cf();
            f.update_arith(CF, if c { 0 } else { CF })
        }
        M::Cld => f.set_bit(DF, false),
        M::Std => f.set_bit(DF, true),
        M::Lahf => {
            let v = (f.arith() & (SF | ZF | AF | PF | CF)) | 2;
            cx.s.gpr[0] = (cx.s.gpr[0] & !0xFF00) | (v << 8);
        }
        _ => {
            let ah = (cx.s.gpr[0] >> 8) & 0xFF;
            f.update_arith(SF | ZF | AF | PF | CF, ah);
        }
    }
    Ok(())
}
