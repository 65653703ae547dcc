//! x87 arithmetic on 80-bit values in software: FADD/FSUB/FSUBR/FMUL/FDIV/FDIVR and their
//! popping,
//! memory (m32/m64) and integer (m16/m32) forms, rounded under FCW.PC and FCW.RC.
//! Masked-response exceptions only.

use super::x87_stack::{from_bytes, pop, to_bytes, top, valid, C1, DE, IE, INDEFINITE, PE, SF};
use super::{Ctx, Event, R};
use crate::state::cr0;
use iced_x86::{Instruction, MemorySize, Mnemonic as M, OpKind, Register};

const OE: u16 = 1 << 3;
const UE: u16 = 1 << 4;

/// An unpacked finite nonzero value: sign, unbiased exponent of bit 63, normalised mantissa.
#[derive(Clone, Copy)]
enum Val {
    Zero(bool),
    Inf(bool),
    NaN(u16, u64),
    Fin(bool, i32, u64),
    Invalid,
}

fn unpack(v: (u16, u64), flags: &mut u16) -> Val {
    let neg = v.0 & 0x8000 != 0;
    let exp = i32::from(v.0 & 0x7FFF);
    let m = v.1;
    if exp == 0x7FFF {
        if m >> 63 == 0 {
            Val::Invalid
        } else if m << 1 == 0 {
            Val::Inf(neg)
        } else {
            Val::NaN(v.0, m)
        }
    } else if exp == 0 {
        if m == 0 {
            Val::Zero(neg)
        } else {
            *flags |= DE;
            let lz = m.leading_zeros() as i32;
            Val::Fin(neg, -16382 - lz, m << lz)
        }
    } else if m >> 63 == 0 {
        Val::Invalid
    } else {
        Val::Fin(neg, exp - 16383, m)
    }
}

/// Rounds `sig` (bit 127 set; value = sig * 2^(e - 127)) to the precision of FCW.PC under
/// FCW.RC; `sticky` says nonzero bits were lost below `sig`.
fn round(neg: bool, e: i32, sig: u128, sticky: bool, fcw: u16) -> ((u16, u64), u16) {
    let prec: u32 = match (fcw >> 8) & 3 {
        0 => 24,
        2 => 53,
        _ => 64,
    };
    let rc = (fcw >> 10) & 3;
    let sign = if neg { 0x8000 } else { 0 };
    let mut flags = 0;
    let mut biased = e + 16383;
    let mut sig = sig;
    let mut sticky = sticky;
    let tiny = biased <= 0;
    // Masked underflow is signalled for inexact results that are tiny *after* rounding to
    // the precision with an unbounded exponent (as the hardware shows).
    let tiny_after = tiny && {
        let drop = 128 - prec;
        let kept = sig >> drop;
        let rem = (sig & ((1u128 << drop) - 1)) | u128::from(sticky);
        let half = 1u128 << (drop - 1);
        let up = rem != 0
            && match rc {
                0 => rem > half || (rem == half && kept & 1 != 0),
                1 => neg,
                2 => !neg,
                _ => false,
            };
        let carry = up && (kept + 1) >> prec != 0;
        biased + i32::from(carry) <= 0
    };
    if tiny {
        let sh = (1 - biased) as u32;
        if sh >= 128 {
            sticky |= sig != 0;
            sig = 0;
        } else {
            sticky |= sig & ((1u128 << sh) - 1) != 0;
            sig >>= sh;
        }
        biased = 1;
    }
    let drop = 128 - prec;
    let mut kept = sig >> drop;
    let mut rem = sig & ((1u128 << drop) - 1);
    if sticky {
        rem |= 1;
    }
    let half = 1u128 << (drop - 1);
    if rem != 0 {
        flags |= PE;
        if tiny_after {
            flags |= UE;
        }
        let up = match rc {
            0 => rem > half || (rem == half && kept & 1 != 0),
            1 => neg,
            2 => !neg,
            _ => false,
        };
        if up {
            kept += 1;
            flags |= C1;
        }
    }
    if kept >> prec != 0 {
        kept >>= 1;
        biased += 1;
    }
    if kept >> (prec - 1) == 0 {
        // Still denormal (or zero).
        biased = 0;
    }
    if biased >= 0x7FFF {
        flags |= OE | PE;
        let to_inf = match rc {
            0 => true,
            1 => neg,
            2 => !neg,
            _ => false,
        };
        return if to_inf {
            ((sign | 0x7FFF, 1 << 63), flags | C1)
        } else {
            let max = (u64::MAX >> (64 - prec)) << (64 - prec);
            ((sign | 0x7FFE, max), flags & !C1)
        };
    }
    let mant = (kept as u64) << (64 - prec);
    ((sign | biased as u16, mant), flags)
}

/// The NaN result of an operation with NaN operands (x87: the larger significand, quiet).
fn nan_result(a: Val, b: Val, flags: &mut u16) -> Option<(u16, u64)> {
    // Unsupported encodings (pseudo-NaN, unnormal...) win over NaNs: IE and the indefinite.
    if matches!(a, Val::Invalid) || matches!(b, Val::Invalid) {
        *flags |= IE;
        return Some(INDEFINITE);
    }
    let q = |se: u16, m: u64, f: &mut u16| {
        if m & (1 << 62) == 0 {
            *f |= IE;
        }
        (se, m | (1 << 62))
    };
    match (a, b) {
        (Val::NaN(sa, ma), Val::NaN(sb, mb)) => {
            let ra = q(sa, ma, flags);
            let rb = q(sb, mb, flags);
            Some(
                if (ma << 1) > (mb << 1) || ((ma << 1) == (mb << 1) && sa < sb) {
                    ra
                } else {
                    rb
                },
            )
        }
        (Val::NaN(s, m), _) | (_, Val::NaN(s, m)) => Some(q(s, m, flags)),
        _ => None,
    }
}

fn mul(a: Val, b: Val, fcw: u16, flags: &mut u16) -> (u16, u64) {
    if let Some(n) = nan_result(a, b, flags) {
        return n;
    }
    let neg = |v: Val| match v {
        Val::Zero(s) | Val::Inf(s) | Val::Fin(s, _, _) => s,
        _ => false,
    };
    let s = neg(a) != neg(b);
    let sign = if s { 0x8000 } else { 0 };
    match (a, b) {
        (Val::Invalid, _) | (_, Val::Invalid) => {
            *flags |= IE;
            INDEFINITE
        }
        (Val::Inf(_), Val::Zero(_)) | (Val::Zero(_), Val::Inf(_)) => {
            *flags |= IE;
            INDEFINITE
        }
        (Val::Inf(_), _) | (_, Val::Inf(_)) => (sign | 0x7FFF, 1 << 63),
        (Val::Zero(_), _) | (_, Val::Zero(_)) => (sign, 0),
        (Val::Fin(_, ea, ma), Val::Fin(_, eb, mb)) => {
            let p = u128::from(ma) * u128::from(mb);
            let (sig, e) = if p >> 127 != 0 {
                (p, ea + eb + 1)
            } else {
                (p << 1, ea + eb)
            };
            let (r, f) = round(s, e, sig, false, fcw);
            *flags |= f;
            r
        }
        _ => INDEFINITE,
    }
}

/// Zero-divide (FSW.ZE).
const ZE: u16 = 1 << 2;

fn div(a: Val, b: Val, fcw: u16, flags: &mut u16) -> (u16, u64) {
    if let Some(n) = nan_result(a, b, flags) {
        return n;
    }
    let sg = |v: Val| match v {
        Val::Zero(s) | Val::Inf(s) | Val::Fin(s, _, _) => s,
        _ => false,
    };
    let s = sg(a) != sg(b);
    let sign = if s { 0x8000 } else { 0 };
    match (a, b) {
        (Val::Inf(_), Val::Inf(_)) | (Val::Zero(_), Val::Zero(_)) => {
            *flags |= IE;
            INDEFINITE
        }
        (Val::Inf(_), _) => (sign | 0x7FFF, 1 << 63),
        (_, Val::Inf(_)) | (Val::Zero(_), _) => (sign, 0),
        (_, Val::Zero(_)) => {
            *flags |= ZE;
            (sign | 0x7FFF, 1 << 63)
        }
        (Val::Fin(_, ea, ma), Val::Fin(_, eb, mb)) => {
            // 128 quotient bits by long division; the remainder is the sticky bit.
            let (mut rem, mut q) = (u128::from(ma), 0u128);
            let d = u128::from(mb);
            for _ in 0..128 {
                q <<= 1;
                if rem >= d {
                    rem -= d;
                    q |= 1;
                }
                rem <<= 1;
            }
            let (sig, e) = if q >> 127 != 0 {
                (q, ea - eb)
            } else {
                (q << 1, ea - eb - 1)
            };
            let (r, f) = round(s, e, sig, rem != 0, fcw);
            *flags |= f;
            r
        }
        _ => INDEFINITE,
    }
}

fn add(a: Val, b: Val, fcw: u16, flags: &mut u16) -> (u16, u64) {
    if let Some(n) = nan_result(a, b, flags) {
        return n;
    }
    let rc = (fcw >> 10) & 3;
    match (a, b) {
        (Val::Invalid, _) | (_, Val::Invalid) => {
            *flags |= IE;
            INDEFINITE
        }
        (Val::Inf(x), Val::Inf(y)) if x != y => {
            *flags |= IE;
            INDEFINITE
        }
        (Val::Inf(x), _) | (_, Val::Inf(x)) => (if x { 0xFFFF } else { 0x7FFF }, 1 << 63),
        (Val::Zero(x), Val::Zero(y)) => {
            let neg = if x == y { x } else { rc == 1 };
            (if neg { 0x8000 } else { 0 }, 0)
        }
        (Val::Zero(_), Val::Fin(s, e, m)) | (Val::Fin(s, e, m), Val::Zero(_)) => {
            let (r, f) = round(s, e, u128::from(m) << 64, false, fcw);
            *flags |= f;
            r
        }
        (Val::Fin(sa, ea, ma), Val::Fin(sb, eb, mb)) => {
            // Larger magnitude first.
            let ((sx, ex, mx), (sy, ey, my)) = if (ea, ma) >= (eb, mb) {
                ((sa, ea, ma), (sb, eb, mb))
            } else {
                ((sb, eb, mb), (sa, ea, ma))
            };
            // Two guard bits of headroom for the carry: bit 126 holds the leading one.
            let x = u128::from(mx) << 63;
            let d = (ex - ey) as u32;
            let y0 = u128::from(my) << 63;
            let (mut y, sticky) = if d >= 127 {
                (0, y0 != 0)
            } else {
                (y0 >> d, y0 & ((1u128 << d) - 1) != 0)
            };
            if sticky {
                y |= 1; // jam: below every rounding position
            }
            let (sum, neg) = if sx == sy { (x + y, sx) } else { (x - y, sx) };
            if sum == 0 {
                return (if rc == 1 { 0x8000 } else { 0 }, 0);
            }
            let lz = sum.leading_zeros() as i32;
            // sum * 2^(ex - 126) with the leading one at bit 127 - lz.
            let sig = sum << lz;
            let e = ex + 1 - lz;
            let (r, f) = round(neg, e, sig, false, fcw);
            *flags |= f;
            r
        }
        _ => INDEFINITE,
    }
}

fn st_index(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::ST0 as usize) & 7
}

/// Converts a memory operand (m32/m64 float, m16/m32 integer) to 80 bits.
fn mem_operand(cx: &mut Ctx<'_>, ins: &Instruction, flags: &mut u16) -> R<(u16, u64)> {
    let va = cx.ea(ins);
    Ok(match ins.memory_size() {
        MemorySize::Float32 | MemorySize::Float64 => {
            let double = ins.memory_size() == MemorySize::Float64;
            let (size, frac, ebits) = if double { (8, 52, 11) } else { (4, 23, 8) };
            let bits = cx.read(va, size)?;
            // widen() records IE (signalling NaN) and DE in FSW: move them into `flags`.
            let before = cx.s.fpu.fsw;
            let v = super::x87_stack::widen(cx, bits, frac, ebits);
            *flags |= cx.s.fpu.fsw & !before;
            cx.s.fpu.fsw = before;
            v
        }
        _ => {
            let size = (ins.memory_size().size() as u8).clamp(2, 4);
            let raw = cx.read(va, size)?;
            let sh = 64 - 8 * u32::from(size);
            let v = ((raw << sh) as i64) >> sh;
            let mag = v.unsigned_abs();
            if mag == 0 {
                (0, 0)
            } else {
                let lz = mag.leading_zeros();
                (
                    (if v < 0 { 0x8000 } else { 0 }) | (16383 + 63 - lz) as u16,
                    mag << lz,
                )
            }
        }
    })
}

/// Orders two values (None = unordered); zeros of either sign are equal.
fn compare(a: Val, b: Val) -> Option<std::cmp::Ordering> {
    use std::cmp::Ordering;
    let key = |v: Val| -> Option<(i8, i32, u64)> {
        // (sign class, exponent, mantissa) with infinities at the ends.
        Some(match v {
            Val::Zero(_) => (0, 0, 0),
            Val::Inf(s) => (if s { -2 } else { 2 }, 0, 0),
            Val::Fin(s, e, m) => (if s { -1 } else { 1 }, e, m),
            _ => return None,
        })
    };
    let (x, y) = (key(a)?, key(b)?);
    Some(match x.0.cmp(&y.0) {
        Ordering::Equal if x.0 == 1 => (x.1, x.2).cmp(&(y.1, y.2)),
        Ordering::Equal if x.0 == -1 => (y.1, y.2).cmp(&(x.1, x.2)),
        o => o,
    })
}

/// FCOMI/FCOMIP/FUCOMI/FUCOMIP: ST(0) against ST(i) into ZF/PF/CF.
fn comi(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    use crate::flags::{CF, PF, ZF};
    let m = ins.mnemonic();
    let t = top(cx);
    let i = st_index(ins.op1_register());
    let mut flags = 0u16;
    let ord = if !valid(cx, t) || !valid(cx, (t + i) & 7) {
        flags |= IE | SF;
        None
    } else {
        let mut de = 0;
        let a = unpack(from_bytes(&cx.s.fpu.st[0]), &mut de);
        let b = unpack(from_bytes(&cx.s.fpu.st[i]), &mut de);
        let signalling = |v: Val| match v {
            Val::NaN(_, mm) => mm & (1 << 62) == 0,
            Val::Invalid => true,
            _ => false,
        };
        let nan = |v: Val| matches!(v, Val::NaN(..) | Val::Invalid);
        if signalling(a)
            || signalling(b)
            || (matches!(m, M::Fcomi | M::Fcomip) && (nan(a) || nan(b)))
        {
            flags |= IE;
        } else if !nan(a) && !nan(b) {
            flags |= de;
        }
        compare(a, b)
    };
    use std::cmp::Ordering::*;
    let f = match ord {
        None => ZF | PF | CF,
        Some(Less) => CF,
        Some(Equal) => ZF,
        Some(Greater) => 0,
    };
    cx.s.flags.set_arith(f);
    cx.s.fpu.fsw = (cx.s.fpu.fsw & !C1) | flags;
    if matches!(m, M::Fcomip | M::Fucomip) {
        pop(cx);
    }
    Ok(())
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    if cx.s.cr0 & (cr0::EM | cr0::TS) != 0 {
        return Err(Event::fault(super::vec::NM, None));
    }
    let m = ins.mnemonic();
    if matches!(m, M::Fcomi | M::Fcomip | M::Fucomi | M::Fucomip) {
        return comi(cx, ins);
    }
    let t = top(cx);
    let mut flags = 0u16;
    let mut mem_de = 0u16;
    // Destination ST index and the two operands.
    let (di, a, b) = if ins.op0_kind() == OpKind::Register {
        let (di, si) = if ins.op_count() >= 2 {
            (st_index(ins.op0_register()), st_index(ins.op1_register()))
        } else {
            // FxxP with no operands: ST(1) op= ST(0).
            (1, 0)
        };
        let (vd, vs) = (valid(cx, (t + di) & 7), valid(cx, (t + si) & 7));
        if !vd || !vs {
            flags |= IE | SF;
            cx.s.fpu.st[di] = to_bytes(INDEFINITE.0, INDEFINITE.1);
            cx.s.fpu.ftw |= 1 << ((t + di) & 7);
            cx.s.fpu.fsw = (cx.s.fpu.fsw & !C1) | flags;
            if matches!(
                m,
                M::Faddp | M::Fsubp | M::Fsubrp | M::Fmulp | M::Fdivp | M::Fdivrp
            ) {
                pop(cx);
            }
            return Ok(());
        }
        (
            di,
            from_bytes(&cx.s.fpu.st[di]),
            from_bytes(&cx.s.fpu.st[si]),
        )
    } else {
        let mut load = 0u16;
        let src = mem_operand(cx, ins, &mut load)?;
        flags |= load & !DE;
        mem_de = load & DE;
        if !valid(cx, t) {
            cx.s.fpu.st[0] = to_bytes(INDEFINITE.0, INDEFINITE.1);
            cx.s.fpu.ftw |= 1 << t;
            cx.s.fpu.fsw = (cx.s.fpu.fsw & !C1) | IE | SF;
            return Ok(());
        }
        (0, from_bytes(&cx.s.fpu.st[0]), src)
    };
    let fcw = cx.s.fpu.fcw;
    let mut de = mem_de;
    let (x, y) = (unpack(a, &mut de), unpack(b, &mut de));
    // Invalid operands and NaNs take precedence over the denormal-operand exception, and so
    // does division by zero.
    let divisor = if matches!(m, M::Fdivr | M::Fdivrp | M::Fidivr) {
        x
    } else {
        y
    };
    let by_zero = matches!(
        m,
        M::Fdiv | M::Fdivp | M::Fidiv | M::Fdivr | M::Fdivrp | M::Fidivr
    ) && matches!(divisor, Val::Zero(_));
    if !by_zero
        && !matches!(x, Val::NaN(..) | Val::Invalid)
        && !matches!(y, Val::NaN(..) | Val::Invalid)
    {
        flags |= de;
    }
    let flip = |v: Val| match v {
        Val::Zero(s) => Val::Zero(!s),
        Val::Inf(s) => Val::Inf(!s),
        Val::Fin(s, e, mm) => Val::Fin(!s, e, mm),
        other => other,
    };
    let r = match m {
        M::Fmul | M::Fmulp | M::Fimul => mul(x, y, fcw, &mut flags),
        M::Fadd | M::Faddp | M::Fiadd => add(x, y, fcw, &mut flags),
        M::Fsub | M::Fsubp | M::Fisub => add(x, flip(y), fcw, &mut flags),
        M::Fdiv | M::Fdivp | M::Fidiv => div(x, y, fcw, &mut flags),
        M::Fdivr | M::Fdivrp | M::Fidivr => div(y, x, fcw, &mut flags),
        _ => add(flip(x), y, fcw, &mut flags),
    };
    cx.s.fpu.st[di] = to_bytes(r.0, r.1);
    cx.s.fpu.fsw = (cx.s.fpu.fsw & !C1) | flags;
    if matches!(
        m,
        M::Faddp | M::Fsubp | M::Fsubrp | M::Fmulp | M::Fdivp | M::Fdivrp
    ) {
        pop(cx);
    }
    Ok(())
}
