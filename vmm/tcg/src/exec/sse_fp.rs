//! SSE/SSE2 floating point basics on the host FPU (round-to-nearest, no MXCSR flags).

use super::operand::{get_reg, set_reg};
use super::{Ctx, R};
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

fn xi(r: Register) -> Option<usize> {
    let n = r as usize;
    let b = Register::XMM0 as usize;
    (b..b + 16).contains(&n).then(|| n - b)
}

/// Sets ZF/PF/CF for (U)COMISS/SD: unordered → all three, less → CF, equal → ZF.
fn comi_flags(cx: &mut Ctx<'_>, ord: Option<std::cmp::Ordering>) {
    use crate::flags::{CF, PF, ZF};
    use std::cmp::Ordering::*;
    let f = match ord {
        None => ZF | PF | CF,
        Some(Less) => CF,
        Some(Equal) => ZF,
        Some(Greater) => 0,
    };
    cx.s.flags.set_arith(f);
}

/// Reads operand `i` as 128 bits (register) or `size` bytes zero-extended (memory).
fn src(cx: &mut Ctx<'_>, ins: &Instruction, i: u32, size: usize) -> R<u128> {
    if ins.op_kind(i) == OpKind::Register {
        let r = ins.op_register(i);
        return Ok(match xi(r) {
            Some(x) => cx.s.xmm[x],
            None => u128::from(get_reg(cx.s, r)),
        });
    }
    let va = cx.ea(ins);
    if size == 16 && va & 15 != 0 {
        return super::gp(0);
    }
    let mut b = [0u8; 16];
    cx.read_bytes(va, &mut b[..size])?;
    Ok(u128::from_le_bytes(b))
}

fn f64s(v: u128, i: u32) -> f64 {
    f64::from_bits((v >> (64 * i)) as u64)
}
fn f32s(v: u128, i: u32) -> f32 {
    f32::from_bits((v >> (32 * i)) as u32)
}

/// x86 NaN rules for SSE arithmetic (SDM vol. 1, 4.8.3.5): a NaN operand propagates,
/// quietened — the first source's if both are NaN; an invalid operation on non-NaN operands
/// (inf - inf, 0 * inf, 0 / 0, sqrt of a negative) gives the "real indefinite" QNaN. Rust's
/// own float operations leave the choice of NaN to the compiler (it may swap operands).
fn arith64(a: f64, b: f64, f: impl Fn(f64, f64) -> f64) -> f64 {
    const QUIET: u64 = 1 << 51;
    const INDEFINITE: u64 = 0xfff8_0000_0000_0000;
    if a.is_nan() {
        f64::from_bits(a.to_bits() | QUIET)
    } else if b.is_nan() {
        f64::from_bits(b.to_bits() | QUIET)
    } else {
        let r = f(a, b);
        if r.is_nan() {
            f64::from_bits(INDEFINITE)
        } else {
            r
        }
    }
}

/// [`arith64`] for single precision.
fn arith32(a: f32, b: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    const QUIET: u32 = 1 << 22;
    const INDEFINITE: u32 = 0xffc0_0000;
    if a.is_nan() {
        f32::from_bits(a.to_bits() | QUIET)
    } else if b.is_nan() {
        f32::from_bits(b.to_bits() | QUIET)
    } else {
        let r = f(a, b);
        if r.is_nan() {
            f32::from_bits(INDEFINITE)
        } else {
            r
        }
    }
}

fn op64(m: M, a: f64, b: f64) -> f64 {
    match m {
        M::Addsd | M::Addpd => arith64(a, b, |a, b| a + b),
        M::Subsd | M::Subpd => arith64(a, b, |a, b| a - b),
        M::Mulsd | M::Mulpd => arith64(a, b, |a, b| a * b),
        M::Divsd | M::Divpd => arith64(a, b, |a, b| a / b),
        // x86 MIN/MAX return the second operand when unordered or both zero.
        M::Minsd | M::Minpd => {
            if a < b {
                a
            } else {
                b
            }
        }
        M::Maxsd | M::Maxpd => {
            if a > b {
                a
            } else {
                b
            }
        }
        // SQRT: only the source operand counts.
        _ => arith64(b, b, |_, b| b.sqrt()),
    }
}

fn op32(m: M, a: f32, b: f32) -> f32 {
    match m {
        M::Addss | M::Addps => arith32(a, b, |a, b| a + b),
        M::Subss | M::Subps => arith32(a, b, |a, b| a - b),
        M::Mulss | M::Mulps => arith32(a, b, |a, b| a * b),
        M::Divss | M::Divps => arith32(a, b, |a, b| a / b),
        M::Minss | M::Minps => {
            if a < b {
                a
            } else {
                b
            }
        }
        M::Maxss | M::Maxps => {
            if a > b {
                a
            } else {
                b
            }
        }
        _ => arith32(b, b, |_, b| b.sqrt()),
    }
}

/// Float conversion to integer with x86 semantics (NaN/overflow → "integer indefinite").
fn to_int(v: f64, size: u8, truncate: bool) -> u64 {
    let r = if truncate {
        v.trunc()
    } else {
        v.round_ties_even()
    };
    if size == 8 {
        if r.is_nan() || !(-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&r) {
            1 << 63
        } else {
            r as i64 as u64
        }
    } else if r.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&r) {
        0x8000_0000
    } else {
        u64::from(r as i32 as u32)
    }
}

/// Returns Ok(false) if `ins` is not a float instruction handled here.
pub fn fp_ops(cx: &mut Ctx<'_>, ins: &Instruction) -> R<bool> {
    let m = ins.mnemonic();
    let d = match (ins.op0_kind(), xi(ins.op0_register())) {
        (OpKind::Register, Some(x)) => Some(x),
        _ => None,
    };
    let lo64 = u128::from(u64::MAX);
    let lo32 = u128::from(u32::MAX);
    match m {
        M::Addsd | M::Subsd | M::Mulsd | M::Divsd | M::Minsd | M::Maxsd | M::Sqrtsd => {
            let Some(d) = d else { return Ok(false) };
            let b = f64s(src(cx, ins, 1, 8)?, 0);
            let a = f64s(cx.s.xmm[d], 0);
            cx.s.xmm[d] = (cx.s.xmm[d] & !lo64) | u128::from(op64(m, a, b).to_bits());
        }
        M::Addss | M::Subss | M::Mulss | M::Divss | M::Minss | M::Maxss | M::Sqrtss => {
            let Some(d) = d else { return Ok(false) };
            let b = f32s(src(cx, ins, 1, 4)?, 0);
            let a = f32s(cx.s.xmm[d], 0);
            cx.s.xmm[d] = (cx.s.xmm[d] & !lo32) | u128::from(op32(m, a, b).to_bits());
        }
        M::Addpd | M::Subpd | M::Mulpd | M::Divpd | M::Minpd | M::Maxpd | M::Sqrtpd => {
            let Some(d) = d else { return Ok(false) };
            let b = src(cx, ins, 1, 16)?;
            let a = cx.s.xmm[d];
            let mut r = 0u128;
            for i in 0..2 {
                r |= u128::from(op64(m, f64s(a, i), f64s(b, i)).to_bits()) << (64 * i);
            }
            cx.s.xmm[d] = r;
        }
        M::Addps | M::Subps | M::Mulps | M::Divps | M::Minps | M::Maxps | M::Sqrtps => {
            let Some(d) = d else { return Ok(false) };
            let b = src(cx, ins, 1, 16)?;
            let a = cx.s.xmm[d];
            let mut r = 0u128;
            for i in 0..4 {
                r |= u128::from(op32(m, f32s(a, i), f32s(b, i)).to_bits()) << (32 * i);
            }
            cx.s.xmm[d] = r;
        }
        M::Ucomisd | M::Comisd | M::Ucomiss | M::Comiss => {
            let Some(d) = d else { return Ok(false) };
            let ord = if matches!(m, M::Ucomisd | M::Comisd) {
                let b = f64s(src(cx, ins, 1, 8)?, 0);
                f64s(cx.s.xmm[d], 0).partial_cmp(&b)
            } else {
                let b = f32s(src(cx, ins, 1, 4)?, 0);
                f32s(cx.s.xmm[d], 0).partial_cmp(&b)
            };
            comi_flags(cx, ord);
        }
        M::Cvtsi2sd | M::Cvtsi2ss => {
            let Some(d) = d else { return Ok(false) };
            let size = cx.op_size(ins, 1);
            let v = cx.read_op(ins, 1, size)?;
            let v = super::operand::sext(v, size) as i64;
            cx.s.xmm[d] = if m == M::Cvtsi2sd {
                (cx.s.xmm[d] & !lo64) | u128::from((v as f64).to_bits())
            } else {
                (cx.s.xmm[d] & !lo32) | u128::from((v as f32).to_bits())
            };
        }
        M::Cvttsd2si | M::Cvtsd2si | M::Cvttss2si | M::Cvtss2si => {
            let r = ins.op0_register();
            let size = super::operand::reg_size(r);
            let v = if matches!(m, M::Cvttsd2si | M::Cvtsd2si) {
                f64s(src(cx, ins, 1, 8)?, 0)
            } else {
                f64::from(f32s(src(cx, ins, 1, 4)?, 0))
            };
            set_reg(
                cx.s,
                r,
                to_int(v, size, matches!(m, M::Cvttsd2si | M::Cvttss2si)),
            );
        }
        M::Cvtss2sd => {
            let Some(d) = d else { return Ok(false) };
            let v = f64::from(f32s(src(cx, ins, 1, 4)?, 0));
            cx.s.xmm[d] = (cx.s.xmm[d] & !lo64) | u128::from(v.to_bits());
        }
        M::Cvtsd2ss => {
            let Some(d) = d else { return Ok(false) };
            let v = f64s(src(cx, ins, 1, 8)?, 0) as f32;
            cx.s.xmm[d] = (cx.s.xmm[d] & !lo32) | u128::from(v.to_bits());
        }
        _ => return Ok(false),
    }
    Ok(true)
}
