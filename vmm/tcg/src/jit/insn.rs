//! Translation of single instructions: data movement, integer ALU, stack, branches,
//! SETcc/CMOVcc. Anything else returns [`Step::Unknown`] and is left to the interpreter.
//!
//! Each translation performs its memory accesses (which may fault) before it changes any
//! register or the flag record, like the interpreter's handlers, so a fault leaves the state
//! as it was before the instruction.

mod fp;
mod more;
mod vector;

/// Whether `ins` may run its interpreter handler on a side path of its translation (the
/// caller then provides it in `Em::side_op`).
pub(crate) fn wants_side_op(ins: &Instruction) -> bool {
    vector::handles(ins.mnemonic()) || fp::handles(ins.mnemonic())
}

/// Whether the arithmetic flags left by an instruction are overwritten before anything can
/// observe them: among the next instructions of its block `rest`, one writes all six without
/// reading them (ADD/SUB/CMP/AND/OR/XOR/TEST on registers and immediates) before any that
/// reads flags, accesses memory, may fault, calls a helper or ends the block. Only register
/// moves, LEA, NOT, BSWAP and rotates (whose own flags are then dead too) may come between.
/// A rotate, bit test or bit scan, which merges its flags into the current ones, then skips
/// computing the current ones ([`Em::flags_dead`]).
pub(crate) fn flags_dead_after(rest: &[Instruction]) -> bool {
    for ins in rest.iter().take(8) {
        let regs_only = regs_only(ins);
        match ins.mnemonic() {
            M::Add | M::Sub | M::Cmp | M::And | M::Or | M::Xor | M::Test if regs_only => {
                return true
            }
            M::Mov | M::Movzx | M::Movsx | M::Movsxd | M::Not | M::Bswap | M::Rol | M::Ror
                if regs_only => {}
            M::Lea => {}
            _ => return false,
        }
    }
    false
}

/// Whether every operand of `ins` is a general register or an immediate (it cannot fault,
/// call a helper or end the block).
pub(crate) fn regs_only(ins: &Instruction) -> bool {
    (0..ins.op_count()).all(|i| match ins.op_kind(i) {
        OpKind::Register => reg_info(ins.op_register(i)).is_some(),
        k => is_imm(k),
    })
}

use super::emit::{mask, Em};
use crate::flags::FlagOp;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::{InstBuilder, Value};
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

/// What the translation of one instruction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Translated; continue with the next instruction.
    Next,
    /// Translated a control transfer: the function has returned.
    End,
    /// Not translated: the interpreter runs it.
    Unknown,
}

/// GPR index, size in bytes and whether it is AH/CH/DH/BH.
fn reg_info(r: Register) -> Option<(usize, u8, bool)> {
    let n = r as usize;
    Some(match n {
        1..=4 => (n - 1, 1, false),
        5..=8 => (n - 5, 1, true),
        9..=20 => (n - 5, 1, false),
        21..=36 => (n - 21, 2, false),
        37..=52 => (n - 37, 4, false),
        53..=68 => (n - 53, 8, false),
        _ => return None,
    })
}

fn is_gpr(ins: &Instruction, i: u32) -> bool {
    ins.op_kind(i) == OpKind::Register && reg_info(ins.op_register(i)).is_some()
}

pub(super) fn is_imm(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

impl Em<'_> {
    /// Register value zero-extended from its size.
    fn get_reg(&mut self, r: Register) -> Value {
        let (i, size, high) = reg_info(r).unwrap_or((0, 8, false));
        let full = self.gpr(i);
        if high {
            let s = self.b.ins().ushr_imm_s(full, 8);
            self.b.ins().band_imm_s(s, 0xFF)
        } else if size < 8 {
            self.and_mask(full, size)
        } else {
            full
        }
    }

    /// Register write with x86-64 semantics (32-bit zero-extends, 8/16-bit merge).
    fn set_reg(&mut self, r: Register, v: Value) {
        let Some((i, size, high)) = reg_info(r) else {
            return;
        };
        let v = match (size, high) {
            (8, _) => v,
            (4, _) => self.and_mask(v, 4),
            (_, true) => {
                let old = self.gpr(i);
                let keep = self.b.ins().band_imm_s(old, !0xFF00);
                let lo = self.b.ins().band_imm_s(v, 0xFF);
                let hi = self.b.ins().ishl_imm_s(lo, 8);
                self.b.ins().bor(keep, hi)
            }
            _ => {
                let old = self.gpr(i);
                let keep = self.b.ins().band_imm_s(old, !mask(size));
                let lo = self.and_mask(v, size);
                self.b.ins().bor(keep, lo)
            }
        };
        self.set_gpr(i, v);
    }

    /// Effective address without the segment base.
    fn ea_raw(&mut self, ins: &Instruction) -> Option<Value> {
        let mut a = self.c(ins.memory_displacement64() as i64);
        let mut a32 = false;
        match ins.memory_base() {
            Register::None => {}
            Register::RIP | Register::EIP => {
                a32 = ins.memory_base() == Register::EIP;
                let d = self.rip_of(0);
                a = self.b.ins().iadd(a, d);
            }
            r => {
                let (_, size, high) = reg_info(r)?;
                if high || size < 4 {
                    return None;
                }
                a32 = size == 4;
                let v = self.get_reg(r);
                a = self.b.ins().iadd(a, v);
            }
        }
        let idx = ins.memory_index();
        if idx != Register::None {
            let (_, size, high) = reg_info(idx)?;
            if high || size < 4 {
                return None;
            }
            a32 |= size == 4;
            let v = self.get_reg(idx);
            let v = self
                .b
                .ins()
                .ishl_imm_s(v, i64::from(ins.memory_index_scale().trailing_zeros()));
            a = self.b.ins().iadd(a, v);
        }
        if a32 {
            a = self.and_mask(a, 4);
        }
        Some(a)
    }

    /// Linear address of the memory operand.
    fn ea(&mut self, ins: &Instruction) -> Option<Value> {
        let a = self.ea_raw(ins)?;
        Some(match self.seg_base(ins.memory_segment()) {
            Some(base) => self.b.ins().iadd(a, base),
            None => a,
        })
    }

    /// Size of operand `i` (GPR or memory).
    fn op_size(ins: &Instruction, i: u32) -> Option<u8> {
        match ins.op_kind(i) {
            OpKind::Register => reg_info(ins.op_register(i)).map(|r| r.1),
            OpKind::Memory => match ins.memory_size().size() {
                s @ (1 | 2 | 4 | 8) => Some(s as u8),
                _ => None,
            },
            _ => None,
        }
    }

    /// Reads operand 0 of a read-modify-write instruction, and its address when it is in
    /// memory (the load checks write access, so a read-only page faults before anything
    /// changes).
    fn read_rmw(&mut self, ins: &Instruction, size: u8) -> Option<(Value, Option<Value>)> {
        if ins.op0_kind() == OpKind::Memory {
            let va = self.ea(ins)?;
            Some((self.load(va, size, true), Some(va)))
        } else {
            Some((self.read_op(ins, 0, size)?, None))
        }
    }

    /// Reads operand `i` (GPR, memory or immediate), masked to `size`.
    fn read_op(&mut self, ins: &Instruction, i: u32, size: u8) -> Option<Value> {
        let k = ins.op_kind(i);
        Some(match k {
            OpKind::Register => {
                let v = self.get_reg(ins.op_register(i));
                self.and_mask(v, size)
            }
            OpKind::Memory => {
                let va = self.ea(ins)?;
                self.load(va, size, false)
            }
            k if is_imm(k) => self.c((ins.immediate(i) & mask(size) as u64) as i64),
            _ => return None,
        })
    }
}

/// Translates `ins` (index `e.idx` of the block).
pub(crate) fn translate(e: &mut Em<'_>, ins: &Instruction) -> Step {
    match insn(e, ins) {
        Some(s) => s,
        None => Step::Unknown,
    }
}

/// Checks, before emitting anything, that the operands are of supported kinds.
fn operands_ok(ins: &Instruction) -> bool {
    (0..ins.op_count()).all(|i| match ins.op_kind(i) {
        OpKind::Register => reg_info(ins.op_register(i)).is_some(),
        OpKind::Memory => {
            let ok = |r: Register| {
                r == Register::None
                    || r == Register::RIP
                    || reg_info(r).is_some_and(|(_, s, h)| !h && s >= 4)
            };
            ok(ins.memory_base()) && ok(ins.memory_index())
        }
        k => is_imm(k) || matches!(k, OpKind::NearBranch64),
    })
}

fn insn(e: &mut Em<'_>, ins: &Instruction) -> Option<Step> {
    let m = ins.mnemonic();
    // With other CPUs, LOCKed read-modify-writes go to the interpreter, which makes them
    // host atomics.
    if e.smp && ins.has_lock_prefix() {
        return None;
    }
    if m == M::Mfence {
        e.b.ins().fence();
        return Some(Step::Next);
    }
    if matches!(
        m,
        M::Nop
            | M::Endbr64
            | M::Pause
            | M::Prefetchw
            | M::Prefetcht0
            | M::Prefetcht1
            | M::Prefetcht2
            | M::Prefetchnta
            | M::Lfence
            | M::Sfence
    ) {
        return Some(Step::Next);
    }
    if vector::handles(m) {
        let op = e.side_op?;
        vector::translate(e, ins, m, op)?;
        e.side_op_used = true;
        return Some(Step::Next);
    }
    if fp::handles(m) {
        let op = e.side_op?;
        fp::translate(e, ins, m, op)?;
        e.side_op_used = true;
        return Some(Step::Next);
    }
    if !operands_ok(ins) {
        return None;
    }
    match m {
        M::Mov => {
            let size = Em::op_size(ins, 0)?;
            if ins.op_count() != 2
                || (ins.op0_kind() == OpKind::Memory && ins.op1_kind() == OpKind::Memory)
            {
                return None;
            }
            let v = if ins.op1_kind() == OpKind::Immediate64 {
                e.c(ins.immediate(1) as i64)
            } else {
                e.read_op(ins, 1, size)?
            };
            write_op(e, ins, size, v)?;
        }
        M::Lea => {
            if !is_gpr(ins, 0) {
                return None;
            }
            let a = e.ea_raw(ins)?;
            e.set_reg(ins.op0_register(), a);
        }
        M::Movzx | M::Movsx | M::Movsxd => {
            if !is_gpr(ins, 0) {
                return None;
            }
            let dsize = Em::op_size(ins, 0)?;
            let ssize = Em::op_size(ins, 1)?;
            let v = e.read_op(ins, 1, ssize)?;
            let v = if m == M::Movzx || ssize >= 8 {
                v
            } else {
                let sh = i64::from(64 - 8 * u32::from(ssize));
                let l = e.b.ins().ishl_imm_s(v, sh);
                let s = e.b.ins().sshr_imm_s(l, sh);
                e.and_mask(s, dsize)
            };
            e.set_reg(ins.op0_register(), v);
        }
        M::Add | M::Or | M::And | M::Sub | M::Xor | M::Cmp | M::Test | M::Adc | M::Sbb => {
            binop(e, ins, m)?
        }
        M::Shl | M::Sal | M::Shr | M::Sar => {
            if ins.op_count() == 2 && ins.op1_kind() == OpKind::Register {
                shift_cl(e, ins, m)?
            } else {
                shift(e, ins, m)?
            }
        }
        M::Rol | M::Ror => more::rotate(e, ins, m)?,
        M::Div => more::div(e, ins)?,
        M::Cmpxchg => more::cmpxchg(e, ins)?,
        M::Bt | M::Bts | M::Btr | M::Btc => more::bt(e, ins, m)?,
        M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt | M::Popcnt => more::scan(e, ins, m)?,
        M::Mul => more::mul(e, ins)?,
        M::Shlx | M::Shrx | M::Sarx => more::shiftx(e, ins, m)?,
        M::Imul if ins.op_count() > 1 => imul(e, ins)?,
        M::Cdqe | M::Cwde | M::Cdq | M::Cqo => {
            let (src, dst, bits) = match m {
                M::Cdqe => (0, 0, 32),
                M::Cwde => (0, 0, 16),
                M::Cdq => (0, 2, 32),
                _ => (0, 2, 64),
            };
            let a = e.gpr(src);
            let sh = 64 - bits;
            let l = e.b.ins().ishl_imm_s(a, sh);
            let v = e.b.ins().sshr_imm_s(l, sh);
            let v = if dst == 0 {
                if bits == 16 {
                    e.and_mask(v, 4)
                } else {
                    v
                }
            } else if bits == 32 {
                let hi = e.b.ins().sshr_imm_s(v, 32);
                e.and_mask(hi, 4)
            } else {
                e.b.ins().sshr_imm_s(v, 63)
            };
            e.set_gpr(dst, v);
        }
        M::Bswap => {
            if !is_gpr(ins, 0) {
                return None;
            }
            let size = Em::op_size(ins, 0)?;
            if size < 4 {
                return None;
            }
            let v = e.get_reg(ins.op0_register());
            let v = if size == 4 {
                let n = e.b.ins().ireduce(cranelift_codegen::ir::types::I32, v);
                let n = e.b.ins().bswap(n);
                e.b.ins().uextend(I64, n)
            } else {
                e.b.ins().bswap(v)
            };
            e.set_reg(ins.op0_register(), v);
        }
        M::Inc | M::Dec | M::Not | M::Neg => unop(e, ins, m)?,
        M::Push => {
            if ins.stack_pointer_increment() != -8 {
                return None;
            }
            let v = match ins.op0_kind() {
                OpKind::Register => e.get_reg(ins.op0_register()),
                k if is_imm(k) => e.c(ins.immediate(0) as i64),
                _ => return None,
            };
            let sp = e.gpr(4);
            let sp = e.b.ins().iadd_imm_s(sp, -8);
            e.store(sp, 8, v);
            e.set_gpr(4, sp);
        }
        M::Pop => {
            if ins.stack_pointer_increment() != 8 || !is_gpr(ins, 0) {
                return None;
            }
            let sp = e.gpr(4);
            let v = e.load(sp, 8, false);
            let nsp = e.b.ins().iadd_imm_s(sp, 8);
            e.set_gpr(4, nsp);
            e.set_reg(ins.op0_register(), v);
        }
        M::Setb
        | M::Setae
        | M::Sete
        | M::Setne
        | M::Setbe
        | M::Seta
        | M::Sets
        | M::Setns
        | M::Setp
        | M::Setnp
        | M::Setl
        | M::Setge
        | M::Setle
        | M::Setg
        | M::Seto
        | M::Setno => {
            let c = e.cond(cc(ins));
            let v = e.b.ins().uextend(I64, c);
            write_op(e, ins, 1, v)?;
        }
        M::Cmovb
        | M::Cmovae
        | M::Cmove
        | M::Cmovne
        | M::Cmovbe
        | M::Cmova
        | M::Cmovs
        | M::Cmovns
        | M::Cmovp
        | M::Cmovnp
        | M::Cmovl
        | M::Cmovge
        | M::Cmovle
        | M::Cmovg
        | M::Cmovo
        | M::Cmovno => {
            if !is_gpr(ins, 0) {
                return None;
            }
            let size = Em::op_size(ins, 0)?;
            let v = e.read_op(ins, 1, size)?;
            let c = e.cond(cc(ins));
            let old = e.get_reg(ins.op0_register());
            let r = e.b.ins().select(c, v, old);
            e.set_reg(ins.op0_register(), r);
        }
        _ => return branch(e, ins, m),
    }
    e.end_check();
    Some(Step::Next)
}

/// Condition nibble of a Jcc/SETcc/CMOVcc.
fn cc(ins: &Instruction) -> u8 {
    (ins.condition_code() as u8).wrapping_sub(1)
}

/// Writes operand 0 (GPR or memory).
fn write_op(e: &mut Em<'_>, ins: &Instruction, size: u8, v: Value) -> Option<()> {
    match ins.op0_kind() {
        OpKind::Register => e.set_reg(ins.op0_register(), v),
        OpKind::Memory => {
            let va = e.ea(ins)?;
            e.store(va, size, v);
        }
        _ => return None,
    }
    Some(())
}

fn binop(e: &mut Em<'_>, ins: &Instruction, m: M) -> Option<()> {
    if ins.op_count() != 2 {
        return None;
    }
    let size = Em::op_size(ins, 0)?;
    let writes = !matches!(m, M::Cmp | M::Test);
    let b = e.read_op(ins, 1, size)?;
    let (a, va) = if ins.op0_kind() == OpKind::Memory {
        let va = e.ea(ins)?;
        (e.load(va, size, writes), Some(va))
    } else {
        (e.read_op(ins, 0, size)?, None)
    };
    let carry = if matches!(m, M::Adc | M::Sbb) {
        e.carry()
    } else {
        e.c(0)
    };
    let (res, op) = match m {
        M::Add => (e.b.ins().iadd(a, b), FlagOp::Add),
        M::Adc => {
            let s = e.b.ins().iadd(a, b);
            (e.b.ins().iadd(s, carry), FlagOp::Adc)
        }
        M::Sbb => {
            let s = e.b.ins().isub(a, b);
            (e.b.ins().isub(s, carry), FlagOp::Sbb)
        }
        M::Sub | M::Cmp => (e.b.ins().isub(a, b), FlagOp::Sub),
        M::And | M::Test => (e.b.ins().band(a, b), FlagOp::Logic),
        M::Or => (e.b.ins().bor(a, b), FlagOp::Logic),
        _ => (e.b.ins().bxor(a, b), FlagOp::Logic),
    };
    let res = if size < 8 && matches!(op, FlagOp::Add | FlagOp::Sub | FlagOp::Adc | FlagOp::Sbb) {
        e.and_mask(res, size)
    } else {
        res
    };
    if writes {
        match va {
            Some(va) => e.store(va, size, res),
            None => e.set_reg(ins.op0_register(), res),
        }
    }
    e.set_flags(op, size, res, a, b, carry);
    Some(())
}

/// IMUL r, r/m (, imm): CF=OF=overflow, SF/ZF/PF from the low half (eager, as the
/// interpreter sets them).
fn imul(e: &mut Em<'_>, ins: &Instruction) -> Option<()> {
    if !is_gpr(ins, 0) {
        return None;
    }
    let size = Em::op_size(ins, 0)?;
    if size < 2 {
        return None;
    }
    let (a, b) = if ins.op_count() == 3 {
        (e.read_op(ins, 1, size)?, e.read_op(ins, 2, size)?)
    } else {
        (e.read_op(ins, 0, size)?, e.read_op(ins, 1, size)?)
    };
    let (lo, overflow) = if size == 8 {
        let lo = e.b.ins().imul(a, b);
        let hi = e.b.ins().smulhi(a, b);
        let sign = e.b.ins().sshr_imm_s(lo, 63);
        (lo, e.b.ins().icmp(IntCC::NotEqual, hi, sign))
    } else {
        let sh = i64::from(64 - 8 * u32::from(size));
        let sx = |e: &mut Em<'_>, v: Value| {
            let l = e.b.ins().ishl_imm_s(v, sh);
            e.b.ins().sshr_imm_s(l, sh)
        };
        let (sa, sb) = (sx(e, a), sx(e, b));
        let p = e.b.ins().imul(sa, sb);
        let lo = e.and_mask(p, size);
        let back = sx(e, lo);
        (lo, e.b.ins().icmp(IntCC::NotEqual, back, p))
    };
    e.set_reg(ins.op0_register(), lo);
    mul_flags(e, size, lo, a, overflow);
    Some(())
}

/// The flags of a multiply, as the interpreter sets them: CF = OF = `overflow` (I8), SF/ZF/PF
/// of the low half `lo` (`size` bytes, masked), AF clear.
fn mul_flags(e: &mut Em<'_>, size: u8, lo: Value, a: Value, overflow: Value) {
    let szp = e.szp(lo, size);
    let o = e.b.ins().uextend(I64, overflow);
    let o =
        e.b.ins()
            .imul_imm_s(o, (crate::flags::CF | crate::flags::OF) as i64);
    let f = e.b.ins().bor(szp, o);
    let zero = e.c(0);
    e.set_flags(FlagOp::Eager, size, lo, a, zero, f);
}

/// SHL/SHR/SAR by CL. A masked count of 0 writes the operand back unchanged (a 32-bit register
/// is zero-extended) and leaves the flags alone, as the interpreter does: the result is
/// selected, and the flags of that case come from a side block that takes the current ones.
fn shift_cl(e: &mut Em<'_>, ins: &Instruction, m: M) -> Option<()> {
    if ins.op1_register() != Register::CL {
        return None;
    }
    let size = Em::op_size(ins, 0)?;
    let cl = e.gpr(1);
    let c =
        e.b.ins()
            .band_imm_s(cl, if size == 8 { 0x3F } else { 0x1F });
    let zero_count = e.b.ins().icmp_imm_s(IntCC::Equal, c, 0);
    let (a, va) = e.read_rmw(ins, size)?;
    let bits = i64::from(8 * u32::from(size));
    let zero = e.c(0);
    let bit = |e: &mut Em<'_>, v: Value, n: Value| {
        let s = e.b.ins().ushr(v, n);
        e.b.ins().band_imm_s(s, 1)
    };
    let big =
        e.b.ins()
            .icmp_imm_s(IntCC::SignedGreaterThanOrEqual, c, bits);
    let fits = e.b.ins().icmp_imm_s(IntCC::SignedLessThanOrEqual, c, bits);
    let c1 = e.b.ins().iadd_imm_s(c, -1);
    let (res, cf, of) = match m {
        M::Shl | M::Sal => {
            let l = e.b.ins().ishl(a, c);
            let l = e.and_mask(l, size);
            let r = e.b.ins().select(big, zero, l);
            let bc = e.c(bits);
            let n = e.b.ins().isub(bc, c);
            let cf = bit(e, a, n);
            let cf = e.b.ins().select(fits, cf, zero);
            let msb = e.b.ins().ushr_imm_s(r, bits - 1);
            let msb = e.b.ins().band_imm_s(msb, 1);
            let of = e.b.ins().bxor(msb, cf);
            (r, cf, of)
        }
        M::Shr => {
            let l = e.b.ins().ushr(a, c);
            let r = e.b.ins().select(big, zero, l);
            let cf = bit(e, a, c1);
            let cf = e.b.ins().select(fits, cf, zero);
            let one = e.b.ins().icmp_imm_s(IntCC::Equal, c, 1);
            let msb = e.b.ins().ushr_imm_s(a, bits - 1);
            let msb = e.b.ins().band_imm_s(msb, 1);
            let of = e.b.ins().select(one, msb, zero);
            (r, cf, of)
        }
        _ => {
            let sh = 64 - bits;
            let l = e.b.ins().ishl_imm_s(a, sh);
            let sa = e.b.ins().sshr_imm_s(l, sh);
            let r = e.b.ins().sshr(sa, c);
            let r = e.and_mask(r, size);
            let cf = bit(e, sa, c1);
            (r, cf, zero)
        }
    };
    let szp = e.szp(res, size);
    let of = e.b.ins().ishl_imm_s(of, 11);
    let f = e.b.ins().bor(szp, cf);
    let f = e.b.ins().bor(f, of);
    let res = e.b.ins().select(zero_count, a, res);
    match va {
        Some(va) => e.store(va, size, res),
        None => e.set_reg(ins.op0_register(), res),
    }
    let f = e.keep_flags_if(zero_count, f);
    e.set_flags(FlagOp::Eager, size, res, a, zero, f);
    Some(())
}

/// SHL/SHR/SAR by an immediate count (flags set eagerly, as the interpreter does).
fn shift(e: &mut Em<'_>, ins: &Instruction, m: M) -> Option<()> {
    let size = Em::op_size(ins, 0)?;
    let c = match ins.op_count() {
        1 => 1,
        2 if is_imm(ins.op1_kind()) => ins.immediate(1) as u32,
        _ => return None,
    } & if size == 8 { 0x3F } else { 0x1F };
    let (a, va) = e.read_rmw(ins, size)?;
    let bits = 8 * u32::from(size);
    let bit = |e: &mut Em<'_>, v: Value, n: u32| {
        let s = e.b.ins().ushr_imm_s(v, i64::from(n));
        e.b.ins().band_imm_s(s, 1)
    };
    let res;
    let mut flags = None;
    if c == 0 {
        res = a;
    } else {
        let zero = e.c(0);
        let (r, cf, of) = match m {
            M::Shl | M::Sal => {
                let r = if c >= bits {
                    zero
                } else {
                    let l = e.b.ins().ishl_imm_s(a, i64::from(c));
                    e.and_mask(l, size)
                };
                let cf = if c <= bits { bit(e, a, bits - c) } else { zero };
                let msb = bit(e, r, bits - 1);
                let of = e.b.ins().bxor(msb, cf);
                (r, cf, of)
            }
            M::Shr => {
                let r = if c >= bits {
                    zero
                } else {
                    e.b.ins().ushr_imm_s(a, i64::from(c))
                };
                let cf = if c <= bits { bit(e, a, c - 1) } else { zero };
                let of = if c == 1 { bit(e, a, bits - 1) } else { zero };
                (r, cf, of)
            }
            _ => {
                let sh = i64::from(64 - bits);
                let l = e.b.ins().ishl_imm_s(a, sh);
                let sa = e.b.ins().sshr_imm_s(l, sh);
                let r = e.b.ins().sshr_imm_s(sa, i64::from(c.min(63)));
                let r = e.and_mask(r, size);
                let cf = bit(e, sa, (c - 1).min(63));
                (r, cf, zero)
            }
        };
        res = r;
        let szp = e.szp(r, size);
        let of = e.b.ins().ishl_imm_s(of, 11);
        let f = e.b.ins().bor(szp, cf);
        flags = Some(e.b.ins().bor(f, of));
    }
    match va {
        Some(va) => e.store(va, size, res),
        None => e.set_reg(ins.op0_register(), res),
    }
    if let Some(f) = flags {
        let zero = e.c(0);
        e.set_flags(FlagOp::Eager, size, res, a, zero, f);
    }
    Some(())
}

fn unop(e: &mut Em<'_>, ins: &Instruction, m: M) -> Option<()> {
    let size = Em::op_size(ins, 0)?;
    let (a, va) = e.read_rmw(ins, size)?;
    let res = match m {
        M::Inc => e.b.ins().iadd_imm_s(a, 1),
        M::Dec => e.b.ins().iadd_imm_s(a, -1),
        M::Not => e.b.ins().bnot(a),
        _ => e.b.ins().ineg(a),
    };
    let res = e.and_mask(res, size);
    // Flags of INC/DEC keep CF: read it before anything is written.
    let carry = matches!(m, M::Inc | M::Dec).then(|| e.carry());
    match va {
        Some(va) => e.store(va, size, res),
        None => e.set_reg(ins.op0_register(), res),
    }
    match m {
        M::Inc | M::Dec => {
            let op = if m == M::Inc {
                FlagOp::Inc
            } else {
                FlagOp::Dec
            };
            let one = e.c(1);
            let carry = carry.unwrap_or(one);
            e.set_flags(op, size, res, a, one, carry);
        }
        M::Neg => {
            let zero = e.c(0);
            e.set_flags(FlagOp::Sub, size, res, zero, a, zero);
        }
        _ => {}
    }
    Some(())
}

/// Branch target operand of a near JMP/CALL (relative or register/memory).
fn target(e: &mut Em<'_>, ins: &Instruction) -> Option<Value> {
    match ins.op0_kind() {
        OpKind::NearBranch64 => Some(e.rip_of(ins.near_branch64())),
        OpKind::Register | OpKind::Memory if Em::op_size(ins, 0) == Some(8) => e.read_op(ins, 0, 8),
        _ => None,
    }
}

/// Block exit of a JMP/CALL: through the exit's slot for a fixed target, the jump cache
/// for a computed one.
/// (a JMP to the function's first instruction loops: [`Em::back_edge`]).
fn exit_to(e: &mut Em<'_>, ins: &Instruction, n: usize, t: Value) {
    if ins.op0_kind() == OpKind::NearBranch64 {
        if ins.mnemonic() == M::Jmp && ins.near_branch64() == e.head_ip {
            e.back_edge(n, t);
        } else {
            e.exit_chain(n, t);
        }
    } else {
        e.exit_indirect(n, t);
    }
}

fn branch(e: &mut Em<'_>, ins: &Instruction, m: M) -> Option<Step> {
    let n = e.idx + 1;
    match m {
        M::Jmp => {
            let t = target(e, ins)?;
            exit_to(e, ins, n, t);
        }
        M::Call => {
            let t = target(e, ins)?;
            let ret = e.rip_of(e.next_ip);
            let sp = e.gpr(4);
            let sp = e.b.ins().iadd_imm_s(sp, -8);
            e.store(sp, 8, ret);
            e.set_gpr(4, sp);
            exit_to(e, ins, n, t);
        }
        M::Ret => {
            if ins.op_count() != 0 {
                return None;
            }
            let sp = e.gpr(4);
            let t = e.load(sp, 8, false);
            let nsp = e.b.ins().iadd_imm_s(sp, 8);
            e.set_gpr(4, nsp);
            e.exit_indirect(n, t);
        }
        M::Jo
        | M::Jno
        | M::Jb
        | M::Jae
        | M::Je
        | M::Jne
        | M::Jbe
        | M::Ja
        | M::Js
        | M::Jns
        | M::Jp
        | M::Jnp
        | M::Jl
        | M::Jge
        | M::Jle
        | M::Jg => {
            if ins.op0_kind() != OpKind::NearBranch64 {
                return None;
            }
            let c = e.cond(cc(ins));
            let (taken, not) = (e.b.create_block(), e.b.create_block());
            e.b.ins().brif(c, taken, &[], not, &[]);
            e.b.switch_to_block(taken);
            let t = e.rip_of(ins.near_branch64());
            if ins.near_branch64() == e.head_ip {
                e.back_edge(n, t);
            } else {
                e.exit_chain(n, t);
            }
            e.b.switch_to_block(not);
            if e.merge {
                // Not taken: on into the fall-through block translated with this one.
                return Some(Step::Next);
            }
            let f = e.rip_of(e.next_ip);
            e.exit_chain(n, f);
        }
        _ => return None,
    }
    Some(Step::End)
}
