//! More instruction translations: rotates, unsigned division, compare-exchange, bit tests
//! (each with
//! the interpreter's exact semantics: flags, faults left to the interpreter).

use super::{is_imm, write_op, Em};
use crate::flags::FlagOp;
use crate::jit::emit::{mask, ty};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::InstBuilder;
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

/// ROL/ROR by 1, an immediate or CL. As the interpreter: the count is masked to 5 (6) bits;
/// a masked count of 0 writes the operand back unchanged (a 32-bit register is zero-extended)
/// and keeps the flags (by CL: the result and flags are selected); otherwise only CF
/// and OF change (CF = the bit rotated in, OF = MSB ^ CF for ROL, MSB ^ MSB-1 for ROR,
/// whatever the count), the other arithmetic flags are kept.
pub(super) fn rotate(e: &mut Em<'_>, ins: &Instruction, m: M) -> Option<()> {
    let size = Em::op_size(ins, 0)?;
    let cmask = if size == 8 { 0x3F } else { 0x1F };
    let count = match ins.op_count() {
        1 => Some(1),
        2 if is_imm(ins.op1_kind()) => Some(ins.immediate(1) as u32 & cmask),
        2 if ins.op1_register() == Register::CL => None,
        _ => return None,
    };
    if count == Some(0) {
        // No flags change; a 32-bit register destination is still zero-extended.
        let v = e.read_op(ins, 0, size)?;
        return write_op(e, ins, size, v);
    }
    let (c, zero_count) = match count {
        Some(c) => (e.c(i64::from(c)), None),
        None => {
            let cl = e.gpr(1);
            let c = e.b.ins().band_imm_s(cl, i64::from(cmask));
            let zero_count = e.b.ins().icmp_imm_s(IntCC::Equal, c, 0);
            (c, Some(zero_count))
        }
    };
    let (a, va) = e.read_rmw(ins, size)?;
    let t = ty(size);
    let n = if size < 8 { e.b.ins().ireduce(t, a) } else { a };
    let r = if m == M::Rol {
        e.b.ins().rotl(n, c)
    } else {
        e.b.ins().rotr(n, c)
    };
    let res = if size < 8 {
        e.b.ins().uextend(I64, r)
    } else {
        r
    };
    let bits = 8 * i64::from(size);
    let msb = e.b.ins().ushr_imm_s(res, bits - 1);
    let msb = e.b.ins().band_imm_s(msb, 1);
    let (cf, other) = if m == M::Rol {
        (e.b.ins().band_imm_s(res, 1), msb)
    } else {
        let m2 = e.b.ins().ushr_imm_s(res, bits - 2);
        (msb, e.b.ins().band_imm_s(m2, 1))
    };
    let of = e.b.ins().bxor(other, cf);
    let of = e.b.ins().ishl_imm_s(of, 11);
    // Flags overwritten before they are observed: the ones kept need not be computed.
    let old = if e.flags_dead && zero_count.is_none() {
        e.c(0)
    } else {
        e.arith()
    };
    let keep =
        e.b.ins()
            .band_imm_s(old, !((crate::flags::CF | crate::flags::OF) as i64));
    let f = e.b.ins().bor(keep, cf);
    let f = e.b.ins().bor(f, of);
    let (res, f) = match zero_count {
        Some(z) => (e.b.ins().select(z, a, res), e.b.ins().select(z, old, f)),
        None => (res, f),
    };
    match va {
        Some(va) => e.store(va, size, res),
        None => e.set_reg(ins.op0_register(), res),
    }
    let zero = e.c(0);
    e.set_flags(FlagOp::Eager, size, res, a, zero, f);
    Some(())
}

/// DIV r/m. A zero divisor or a quotient that does not fit (#DE) is left to the interpreter,
/// which faults. A 64-bit divide with RDX != 0 divides the 128-bit RDX:RAX
/// ([`Em::udiv128`]). Flags are unchanged (as the interpreter leaves them).
pub(super) fn div(e: &mut Em<'_>, ins: &Instruction) -> Option<()> {
    if ins.op_count() != 1 {
        return None;
    }
    let size = Em::op_size(ins, 0)?;
    let src = e.read_op(ins, 0, size)?;
    let rax = e.gpr(0);
    let bits = 8 * i64::from(size);
    // The dividend as one 64-bit value (AX, DX:AX, EDX:EAX; RAX when RDX is 0).
    let (n, hi) = match size {
        1 => (e.b.ins().band_imm_s(rax, 0xFFFF), None),
        8 => (rax, Some(e.gpr(2))),
        _ => {
            let rdx = e.gpr(2);
            let hi = e.and_mask(rdx, size);
            let hi = e.b.ins().ishl_imm_s(hi, bits);
            let lo = e.and_mask(rax, size);
            (e.b.ins().bor(hi, lo), None)
        }
    };
    // #DE: a zero divisor, or (64-bit) RDX >= divisor: the quotient would not fit.
    let bad = match hi {
        Some(h) => e.b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, h, src),
        None => e.b.ins().icmp_imm_s(IntCC::Equal, src, 0),
    };
    e.exit_here_if(bad);
    let (q, r) = match hi {
        Some(h) => e.udiv128(h, n, src),
        None => (e.b.ins().udiv(n, src), e.b.ins().urem(n, src)),
    };
    if size < 8 {
        let over =
            e.b.ins()
                .icmp_imm_s(IntCC::UnsignedGreaterThan, q, mask(size));
        e.exit_here_if(over);
    }
    match size {
        1 => {
            let keep = e.b.ins().band_imm_s(rax, !0xFFFF);
            let hi = e.b.ins().ishl_imm_s(r, 8);
            let v = e.b.ins().bor(keep, hi);
            let v = e.b.ins().bor(v, q);
            e.set_gpr(0, v);
        }
        2 => {
            e.set_reg(Register::AX, q);
            e.set_reg(Register::DX, r);
        }
        4 => {
            e.set_reg(Register::EAX, q);
            e.set_reg(Register::EDX, r);
        }
        _ => {
            e.set_gpr(0, q);
            e.set_gpr(2, r);
        }
    }
    Some(())
}

/// CMPXCHG m, r (with LOCK only on a one-CPU machine: with SMP the interpreter runs those
/// as host atomics).
/// The destination is always written (its old value when the compare fails), the
/// accumulator loads the old value on a mismatch, flags as SUB acc, dst.
pub(super) fn cmpxchg(e: &mut Em<'_>, ins: &Instruction) -> Option<()> {
    if ins.op_count() != 2 || ins.op0_kind() != OpKind::Memory {
        return None;
    }
    let size = Em::op_size(ins, 0)?;
    let src = e.read_op(ins, 1, size)?;
    let va = e.ea(ins)?;
    let dst = e.load(va, size, true);
    let old = e.gpr(0);
    let acc = if size < 8 { e.and_mask(old, size) } else { old };
    let eq = e.b.ins().icmp(IntCC::Equal, acc, dst);
    let new_dst = e.b.ins().select(eq, src, dst);
    e.store(va, size, new_dst);
    // On a mismatch the accumulator gets `dst` with its size's semantics (EAX zero-extends);
    // on a match RAX is untouched.
    let merged = match size {
        8 | 4 => dst,
        _ => {
            let keep = e.b.ins().band_imm_s(old, !mask(size));
            e.b.ins().bor(keep, dst)
        }
    };
    let v = e.b.ins().select(eq, old, merged);
    e.set_gpr(0, v);
    let res = e.b.ins().isub(acc, dst);
    let res = e.and_mask(res, size);
    let zero = e.c(0);
    e.set_flags(FlagOp::Sub, size, res, acc, dst, zero);
    Some(())
}

/// BT/BTS/BTR/BTC r/m, r/imm8 (16/32/64-bit). As the interpreter: a register or immediate
/// offset picks a bit of a register operand modulo its size; a register offset into memory
/// is signed and addresses beyond the operand (`ea + floor(off / bits) * bytes`). Only CF
/// changes (the bit's old value); the other arithmetic flags are kept.
pub(super) fn bt(e: &mut Em<'_>, ins: &Instruction, m: M) -> Option<()> {
    if ins.op_count() != 2 {
        return None;
    }
    let size = Em::op_size(ins, 0)?;
    if size < 2 {
        return None;
    }
    let bits = 8 * i64::from(size);
    let lg = i64::from(bits.trailing_zeros());
    let modify = m != M::Bt;
    let off = e.read_op(ins, 1, size)?;
    let (val, bit, va) = match ins.op0_kind() {
        OpKind::Register => {
            let v = e.read_op(ins, 0, size)?;
            (v, e.b.ins().band_imm_s(off, bits - 1), None)
        }
        OpKind::Memory => {
            let mut va = e.ea(ins)?;
            let bit = if ins.op1_kind() == OpKind::Register {
                let sh = 64 - bits;
                let l = e.b.ins().ishl_imm_s(off, sh);
                let soff = e.b.ins().sshr_imm_s(l, sh);
                let words = e.b.ins().sshr_imm_s(soff, lg);
                let bytes = e.b.ins().ishl_imm_s(words, lg - 3);
                va = e.b.ins().iadd(va, bytes);
                e.b.ins().band_imm_s(soff, bits - 1)
            } else {
                e.b.ins().band_imm_s(off, bits - 1)
            };
            (e.load(va, size, modify), bit, Some(va))
        }
        _ => return None,
    };
    let sh = e.b.ins().ushr(val, bit);
    let cf = e.b.ins().band_imm_s(sh, 1);
    let f = update_arith(e, crate::flags::CF, cf);
    if modify {
        let one = e.c(1);
        let b = e.b.ins().ishl(one, bit);
        let new = match m {
            M::Bts => e.b.ins().bor(val, b),
            M::Btr => {
                let nb = e.b.ins().bnot(b);
                e.b.ins().band(val, nb)
            }
            _ => e.b.ins().bxor(val, b),
        };
        let new = e.and_mask(new, size);
        match va {
            Some(va) => e.store(va, size, new),
            None => e.set_reg(ins.op0_register(), new),
        }
    }
    let zero = e.c(0);
    e.set_flags(FlagOp::Eager, size, val, val, zero, f);
    Some(())
}

/// The current arithmetic flags with the bits of `mask` replaced by `f` (which has no other
/// bits set), as `LazyFlags::update_arith` does.
fn update_arith(
    e: &mut Em<'_>,
    mask: u64,
    f: cranelift_codegen::ir::Value,
) -> cranelift_codegen::ir::Value {
    if e.flags_dead {
        // Overwritten before they are observed: the kept flags need not be computed.
        return f;
    }
    let old = e.arith();
    let keep = e.b.ins().band_imm_s(old, !(mask as i64));
    e.b.ins().bor(keep, f)
}

/// BSF/BSR/TZCNT/LZCNT/POPCNT with a register destination, as the interpreter: BSF/BSR of 0
/// leave the destination (all 64 bits) unchanged and set ZF (CF clear), else write the index
/// with ZF = CF = 0; TZCNT/LZCNT write the count (the operand width for 0) with CF = source
/// is 0 and ZF = count is 0; those keep the other arithmetic flags. POPCNT clears every
/// arithmetic flag but ZF (source is 0).
pub(super) fn scan(e: &mut Em<'_>, ins: &Instruction, m: M) -> Option<()> {
    use crate::flags::{CF, ZF};
    if ins.op_count() != 2 || ins.op0_kind() != OpKind::Register {
        return None;
    }
    let size = Em::op_size(ins, 0)?;
    let (i, _, _) = super::reg_info(ins.op0_register())?;
    if size < 2 {
        return None;
    }
    let bits = 8 * i64::from(size);
    let src = e.read_op(ins, 1, size)?;
    let is_zero = e.b.ins().icmp_imm_s(IntCC::Equal, src, 0);
    let zf_if = |e: &mut Em<'_>, c| {
        let z = e.b.ins().uextend(I64, c);
        e.b.ins().imul_imm_s(z, ZF as i64)
    };
    let r = ins.op0_register();
    let zero = e.c(0);
    let f = match m {
        M::Popcnt => {
            let n = e.b.ins().popcnt(src);
            e.set_reg(r, n);
            zf_if(e, is_zero)
        }
        M::Tzcnt | M::Lzcnt => {
            let n = if m == M::Tzcnt {
                // A bit above the operand makes a zero source count its width.
                let src = if size == 8 {
                    src
                } else {
                    e.b.ins().bor_imm_s(src, 1 << bits)
                };
                e.b.ins().ctz(src)
            } else {
                let n = e.b.ins().clz(src);
                e.b.ins().iadd_imm_s(n, bits - 64)
            };
            e.set_reg(r, n);
            let nz = e.b.ins().icmp_imm_s(IntCC::Equal, n, 0);
            let zf = zf_if(e, nz);
            let cf = e.b.ins().uextend(I64, is_zero);
            let f = e.b.ins().bor(zf, cf);
            update_arith(e, CF | ZF, f)
        }
        _ => {
            let n = if m == M::Bsf {
                e.b.ins().ctz(src)
            } else {
                let l = e.b.ins().clz(src);
                let c = e.c(63);
                e.b.ins().isub(c, l)
            };
            let old_full = e.gpr(i);
            let new_full = if size == 2 {
                let keep = e.b.ins().band_imm_s(old_full, !0xFFFF);
                e.b.ins().bor(keep, n)
            } else {
                n
            };
            let v = e.b.ins().select(is_zero, old_full, new_full);
            e.set_gpr(i, v);
            let zf = zf_if(e, is_zero);
            update_arith(e, CF | ZF, zf)
        }
    };
    e.set_flags(FlagOp::Eager, size, src, src, zero, f);
    Some(())
}

/// One-operand MUL of 32 or 64 bits: EDX:EAX (RDX:RAX) = EAX (RAX) * operand, with the
/// interpreter's flags: CF = OF = high half non-zero, SF/ZF/PF of the low half, AF clear.
pub(super) fn mul(e: &mut Em<'_>, ins: &Instruction) -> Option<()> {
    if ins.op_count() != 1 {
        return None;
    }
    let size = Em::op_size(ins, 0)?;
    if size < 4 {
        return None;
    }
    let src = e.read_op(ins, 0, size)?;
    let acc = e.gpr(0);
    let acc = e.and_mask(acc, size);
    let (lo, hi) = if size == 8 {
        (e.b.ins().imul(acc, src), e.b.ins().umulhi(acc, src))
    } else {
        let p = e.b.ins().imul(acc, src);
        let hi = e.b.ins().ushr_imm_s(p, 32);
        (e.and_mask(p, 4), hi)
    };
    e.set_gpr(0, lo);
    e.set_gpr(2, hi);
    let over = e.b.ins().icmp_imm_s(IntCC::NotEqual, hi, 0);
    super::mul_flags(e, size, lo, acc, over);
    Some(())
}

/// SHLX/SHRX/SARX (BMI2, 32/64-bit): the count masked to the operand width, no flags.
pub(super) fn shiftx(e: &mut Em<'_>, ins: &Instruction, m: M) -> Option<()> {
    if ins.op_count() != 3 || ins.op0_kind() != OpKind::Register {
        return None;
    }
    let size = Em::op_size(ins, 0)?;
    if size < 4 {
        return None;
    }
    let bits = 8 * i64::from(size);
    let a = e.read_op(ins, 1, size)?;
    let n = e.read_op(ins, 2, size)?;
    let n = e.b.ins().band_imm_s(n, bits - 1);
    let r = match m {
        M::Shlx => e.b.ins().ishl(a, n),
        M::Shrx => e.b.ins().ushr(a, n),
        _ => {
            let sh = 64 - bits;
            let l = e.b.ins().ishl_imm_s(a, sh);
            let s = e.b.ins().sshr_imm_s(l, sh);
            e.b.ins().sshr(s, n)
        }
    };
    let r = e.and_mask(r, size);
    e.set_reg(ins.op0_register(), r);
    Some(())
}
