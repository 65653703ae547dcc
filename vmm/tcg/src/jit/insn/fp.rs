//! Scalar double-precision arithmetic translated to host floating point: ADDSD/SUBSD/MULSD/
//! DIVSD and their VEX forms, the scalar double FMA3 forms (VFMADD/VFMSUB/VFNMADD/VFNMSUB
//! 132/213/231 SD), UCOMISD/COMISD (and VEX), CVTSI2SD (and VEX) — what libm and
//! floating-point programs spend their time in.
//!
//! The host instruction computes exactly what the guest's would, with the same exception
//! flags, because translated code runs under the guest's MXCSR control bits (rounding, DAZ,
//! FTZ) with every exception masked (`jit::fpenv`, set around every run of host code); the
//! sticky flags it raises are merged into the guest's MXCSR when the run ends. Three cases
//! take the interpreter handler on the side path instead (`Em::vstart_fp`): a guest exception
//! unmasked (the handler raises #XM/#UD precisely), the unit disabled or the memory operand
//! not a plain RAM access (as for the vector moves), and a NaN among the inputs of an
//! operation whose result is a NaN operand (which one the hardware returns depends on the
//! operand order of the exact instruction, which Cranelift may choose differently: it swaps
//! commutative operands to fold a load) or of COMISD (which raises #I for quiet NaNs, where
//! the host compare raises it for signalling ones only).
//!
//! As the interpreter: the legacy forms keep bits 127:64 (and 255:128) of the destination;
//! the VEX forms take bits 127:64 from the first source (FMA: keep the destination's) and
//! clear bits 255:128.

use super::vector::{addr, gmem, opd, Opd};
use super::{reg_info, Em};
use crate::flags::{FlagOp, CF, PF, ZF};
use crate::jit::emit::Unit;
use crate::mmu::walk::Access;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F64, I32, I64};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value};
use iced_x86::{EncodingKind, Instruction, Mnemonic as M};

#[derive(Clone, Copy)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Clone, Copy)]
enum Kind {
    /// `d = a op b`.
    Arith(Op),
    /// Operand order 132/213/231, product negated, addend negated.
    Fma(u16, bool, bool),
    /// COMISD (`true`: #I on quiet NaNs too) or UCOMISD.
    Comi(bool),
    /// CVTSI2SD from a 32- or 64-bit integer.
    Cvtsi,
}

/// The kind of `m` and whether it is a VEX form.
fn kind(m: M) -> Option<(Kind, bool)> {
    use Kind::*;
    Some(match m {
        M::Addsd => (Arith(Op::Add), false),
        M::Subsd => (Arith(Op::Sub), false),
        M::Mulsd => (Arith(Op::Mul), false),
        M::Divsd => (Arith(Op::Div), false),
        M::Vaddsd => (Arith(Op::Add), true),
        M::Vsubsd => (Arith(Op::Sub), true),
        M::Vmulsd => (Arith(Op::Mul), true),
        M::Vdivsd => (Arith(Op::Div), true),
        M::Vfmadd132sd => (Fma(132, false, false), true),
        M::Vfmadd213sd => (Fma(213, false, false), true),
        M::Vfmadd231sd => (Fma(231, false, false), true),
        M::Vfmsub132sd => (Fma(132, false, true), true),
        M::Vfmsub213sd => (Fma(213, false, true), true),
        M::Vfmsub231sd => (Fma(231, false, true), true),
        M::Vfnmadd132sd => (Fma(132, true, false), true),
        M::Vfnmadd213sd => (Fma(213, true, false), true),
        M::Vfnmadd231sd => (Fma(231, true, false), true),
        M::Vfnmsub132sd => (Fma(132, true, true), true),
        M::Vfnmsub213sd => (Fma(213, true, true), true),
        M::Vfnmsub231sd => (Fma(231, true, true), true),
        M::Ucomisd => (Comi(false), false),
        M::Comisd => (Comi(true), false),
        M::Vucomisd => (Comi(false), true),
        M::Vcomisd => (Comi(true), true),
        M::Cvtsi2sd => (Cvtsi, false),
        M::Vcvtsi2sd => (Cvtsi, true),
        _ => return None,
    })
}

/// The mnemonics translated here.
pub(super) fn handles(m: M) -> bool {
    kind(m).is_some()
}

/// Low 64 bits of XMM `n` (I64).
fn lo(e: &mut Em<'_>, n: usize) -> Value {
    e.sload(I64, Em::xmm_off(n, false, 0))
}

/// Bits 127:64 of XMM `n` (I64).
fn hi(e: &mut Em<'_>, n: usize) -> Value {
    e.sload(I64, Em::xmm_off(n, false, 8))
}

/// Whether the double with bits `v` is a NaN (I8 boolean; integer compare: no flags).
fn is_nan(e: &mut Em<'_>, v: Value) -> Value {
    let a = e.b.ins().band_imm_s(v, 0x7FFF_FFFF_FFFF_FFFF);
    e.b.ins()
        .icmp_imm_s(IntCC::UnsignedGreaterThan, a, 0x7FF0_0000_0000_0000)
}

/// Leaves for the side path `slow` when any of `vals` is a NaN.
fn nan_exit(e: &mut Em<'_>, vals: &[Value], slow: cranelift_codegen::ir::Block) {
    let mut any = None;
    for &v in vals {
        let n = is_nan(e, v);
        any = Some(match any {
            Some(a) => e.b.ins().bor(a, n),
            None => n,
        });
    }
    let Some(any) = any else { return };
    let cont = e.b.create_block();
    e.b.ins().brif(any, slow, &[], cont, &[]);
    e.b.switch_to_block(cont);
}

fn f64_of(e: &mut Em<'_>, v: Value) -> Value {
    e.b.ins().bitcast(F64, MemFlagsData::new(), v)
}

fn bits_of(e: &mut Em<'_>, v: Value) -> Value {
    e.b.ins().bitcast(I64, MemFlagsData::new(), v)
}

/// Translates `ins` (a mnemonic [`handles`] accepts) with `op` (its interpreter handler for
/// the side path). `None` before anything was emitted when the form is not translated here.
pub(super) fn translate(e: &mut Em<'_>, ins: &Instruction, m: M, op: usize) -> Option<()> {
    let (k, vex) = kind(m)?;
    let want = if vex {
        EncodingKind::VEX
    } else {
        EncodingKind::Legacy
    };
    if ins.encoding() != want {
        return None;
    }
    if matches!(k, Kind::Fma(..)) && !std::arch::is_x86_feature_detected!("fma") {
        // Cranelift would call a software fma, whose exception flags are not the hardware's.
        return None;
    }
    let unit = if vex { Unit::Avx } else { Unit::Sse };
    let ops: Vec<Opd> = (0..ins.op_count())
        .map(|i| opd(ins, i))
        .collect::<Option<_>>()?;
    // The destination and the register sources: XMM (not YMM) registers.
    let x = |o: &Opd| match o {
        Opd::V(n, false) => Some(*n),
        _ => None,
    };
    match k {
        Kind::Arith(o) => {
            let (d, s1, s2) = match (vex, &ops[..]) {
                (false, [d, s]) => (x(d)?, x(d)?, *s),
                (true, [d, s1, s2]) => (x(d)?, x(s1)?, *s2),
                _ => return None,
            };
            let va = addr(e, ins, &ops)?;
            let (m, slow) = e.vstart_fp(unit, va.map(|v| (v, 8, Access::Read, 0)));
            let a = lo(e, s1);
            let b = src64(e, s2, m.as_ref().map(|m| m.host))?;
            nan_exit(e, &[a, b], slow);
            let (fa, fb) = (f64_of(e, a), f64_of(e, b));
            let r = match o {
                Op::Add => e.b.ins().fadd(fa, fb),
                Op::Sub => e.b.ins().fsub(fa, fb),
                Op::Mul => e.b.ins().fmul(fa, fb),
                Op::Div => e.b.ins().fdiv(fa, fb),
            };
            let r = bits_of(e, r);
            write(e, d, r, vex.then_some(s1));
            e.vfinish(slow, op, None);
        }
        Kind::Fma(order, neg_mul, neg_add) => {
            let [d, s2, s3] = &ops[..] else { return None };
            let (d, s2) = (x(d)?, x(s2)?);
            let va = addr(e, ins, &ops)?;
            let (m, slow) = e.vstart_fp(unit, va.map(|v| (v, 8, Access::Read, 0)));
            let (vd, v2) = (lo(e, d), lo(e, s2));
            let v3 = src64(e, *s3, m.as_ref().map(|m| m.host))?;
            nan_exit(e, &[vd, v2, v3], slow);
            // (multiplicand, multiplier, addend) of each operand order.
            let (p, q, c) = match order {
                132 => (vd, v3, v2),
                213 => (v2, vd, v3),
                _ => (v2, v3, vd),
            };
            let (mut p, q, mut c) = (f64_of(e, p), f64_of(e, q), f64_of(e, c));
            if neg_mul {
                p = e.b.ins().fneg(p);
            }
            if neg_add {
                c = e.b.ins().fneg(c);
            }
            let r = e.b.ins().fma(p, q, c);
            let r = bits_of(e, r);
            e.sstore(r, Em::xmm_off(d, false, 0));
            e.yzero(d);
            e.vfinish(slow, op, None);
        }
        Kind::Comi(signal) => {
            let [a, b] = &ops[..] else { return None };
            let a = x(a)?;
            let va = addr(e, ins, &ops)?;
            let (m, slow) = e.vstart_fp(unit, va.map(|v| (v, 8, Access::Read, 0)));
            let va_ = lo(e, a);
            let vb = src64(e, *b, m.as_ref().map(|m| m.host))?;
            if signal {
                nan_exit(e, &[va_, vb], slow);
            }
            let (fa, fb) = (f64_of(e, va_), f64_of(e, vb));
            // UCOMISD semantics (the host's compares are UCOMISD): unordered ZF PF CF, less
            // CF, equal ZF, greater none; OF SF AF clear.
            let uno = e.b.ins().fcmp(FloatCC::Unordered, fa, fb);
            let eq = e.b.ins().fcmp(FloatCC::Equal, fa, fb);
            let lt = e.b.ins().fcmp(FloatCC::LessThan, fa, fb);
            let zf = e.b.ins().bor(uno, eq);
            let cf = e.b.ins().bor(uno, lt);
            let bit = |e: &mut Em<'_>, c: Value, f: u64| {
                let w = e.b.ins().uextend(I64, c);
                e.b.ins().imul_imm_s(w, f as i64)
            };
            let (z, p, c) = (bit(e, zf, ZF), bit(e, uno, PF), bit(e, cf, CF));
            let zp = e.b.ins().bor(z, p);
            let f = e.b.ins().bor(zp, c);
            let var = e.b.declare_var(I64);
            e.b.def_var(var, f);
            e.vfinish_flags(slow, op, var);
            let f = e.b.use_var(var);
            let zero = e.c(0);
            e.set_flags(FlagOp::Eager, 8, zero, zero, zero, f);
        }
        Kind::Cvtsi => {
            let (d, s1, s) = match (vex, &ops[..]) {
                (false, [d, s]) => (x(d)?, x(d)?, *s),
                (true, [d, s1, s]) => (x(d)?, x(s1)?, *s),
                _ => return None,
            };
            // A general-register source is read before the split (both paths must have it
            // loaded alike); its size is the instruction's operand size.
            let (gv, size) = match s {
                Opd::G(r) => {
                    let (n, size, _) = reg_info(r)?;
                    (Some(e.gpr(n)), size)
                }
                Opd::Mem => (None, ins.memory_size().size() as u8),
                Opd::V(..) => return None,
            };
            if size != 4 && size != 8 {
                return None;
            }
            let va = addr(e, ins, &ops)?;
            let (m, slow) = e.vstart_fp(unit, va.map(|v| (v, size, Access::Read, 0)));
            let v = match (gv, &m) {
                (Some(v), _) => v,
                (None, Some(m)) if size == 4 => e.b.ins().uload32(gmem(), m.host, 0),
                (None, Some(m)) => e.b.ins().load(I64, gmem(), m.host, 0),
                _ => return None,
            };
            let v = if size == 4 {
                e.b.ins().ireduce(I32, v)
            } else {
                v
            };
            let r = e.b.ins().fcvt_from_sint(F64, v);
            let r = bits_of(e, r);
            write(e, d, r, vex.then_some(s1));
            e.vfinish(slow, op, None);
        }
    }
    Some(())
}

/// The 64-bit source operand: XMM register's low half or memory at `host`.
fn src64(e: &mut Em<'_>, s: Opd, host: Option<Value>) -> Option<Value> {
    match (s, host) {
        (Opd::V(n, false), _) => Some(lo(e, n)),
        (Opd::Mem, Some(h)) => Some(e.b.ins().load(I64, gmem(), h, 0)),
        _ => None,
    }
}

/// Writes result `r` to the low half of `d`: legacy keeps the rest; VEX (`vex_src1`) takes
/// bits 127:64 from the first source and clears bits 255:128.
fn write(e: &mut Em<'_>, d: usize, r: Value, vex_src1: Option<usize>) {
    match vex_src1 {
        Some(s1) => {
            let h = hi(e, s1);
            e.sstore(r, Em::xmm_off(d, false, 0));
            e.sstore(h, Em::xmm_off(d, false, 8));
            e.yzero(d);
        }
        None => e.sstore(r, Em::xmm_off(d, false, 0)),
    }
}
