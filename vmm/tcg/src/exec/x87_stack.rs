//! The x87 register stack, as far as implemented: FLD (m32, m64, m80, ST(i)) and SSE3's
//! FISTTP (m16, m32, m64). Registers are kept in stack order (`fpu.st[i]` = ST(i), the FXSAVE
//! layout); TOP is FSW[13:11]; the abridged tag word has one "valid" bit per physical
//! register. Exceptions are masked-response only (FSW flags; no #MF).

use super::{Ctx, R};
use crate::state::cr0;
use iced_x86::{Instruction, MemorySize, Mnemonic as M, OpKind, Register};

/// FSW bits.
pub(super) const IE: u16 = 1 << 0;
pub(super) const DE: u16 = 1 << 1;
pub(super) const PE: u16 = 1 << 5;
pub(super) const SF: u16 = 1 << 6;
pub(super) const C1: u16 = 1 << 9;

/// The "real indefinite" QNaN.
pub(super) const INDEFINITE: (u16, u64) = (0xFFFF, 0xC000_0000_0000_0000);

pub(super) fn top(cx: &Ctx<'_>) -> usize {
    usize::from((cx.s.fpu.fsw >> 11) & 7)
}

fn set_top(cx: &mut Ctx<'_>, t: usize) {
    cx.s.fpu.fsw = (cx.s.fpu.fsw & !(7 << 11)) | ((t as u16 & 7) << 11);
}

pub(super) fn valid(cx: &Ctx<'_>, phys: usize) -> bool {
    cx.s.fpu.ftw & (1 << phys) != 0
}

pub(super) fn to_bytes(se: u16, mant: u64) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&mant.to_le_bytes());
    r[8..10].copy_from_slice(&se.to_le_bytes());
    r
}

pub(super) fn from_bytes(b: &[u8; 16]) -> (u16, u64) {
    let mut m = [0u8; 8];
    m.copy_from_slice(&b[..8]);
    (u16::from_le_bytes([b[8], b[9]]), u64::from_le_bytes(m))
}

/// Pushes an 80-bit value (sign+exponent, mantissa).
pub(super) fn push(cx: &mut Ctx<'_>, v: (u16, u64)) {
    let t = (top(cx) + 7) & 7;
    let v = if valid(cx, t) {
        // Stack overflow: masked response loads the indefinite.
        cx.s.fpu.fsw |= IE | SF | C1;
        INDEFINITE
    } else {
        cx.s.fpu.fsw &= !C1;
        v
    };
    cx.s.fpu.st.rotate_right(1);
    cx.s.fpu.st[0] = to_bytes(v.0, v.1);
    cx.s.fpu.ftw |= 1 << t;
    set_top(cx, t);
}

pub(super) fn pop(cx: &mut Ctx<'_>) {
    let t = top(cx);
    cx.s.fpu.ftw &= !(1 << t);
    cx.s.fpu.st.rotate_left(1);
    set_top(cx, t + 1);
}

/// Converts a binary32/binary64 (`frac_bits`, `exp_bits`) to 80-bit extended; sets IE for
/// signalling NaNs and DE for denormals.
pub(super) fn widen(cx: &mut Ctx<'_>, bits: u64, frac_bits: u32, exp_bits: u32) -> (u16, u64) {
    let bias = (1i32 << (exp_bits - 1)) - 1;
    let sign = ((bits >> (frac_bits + exp_bits)) & 1) as u16;
    let e = ((bits >> frac_bits) & ((1 << exp_bits) - 1)) as i32;
    let f = bits & ((1u64 << frac_bits) - 1);
    let shift = 63 - frac_bits;
    let (exp, mant) = if e == (1 << exp_bits) - 1 {
        let mut mant = (1 << 63) | (f << shift);
        if f != 0 && mant & (1 << 62) == 0 {
            cx.s.fpu.fsw |= IE;
            mant |= 1 << 62;
        }
        (0x7FFF, mant)
    } else if e == 0 {
        if f == 0 {
            (0, 0)
        } else {
            cx.s.fpu.fsw |= DE;
            let k = f.leading_zeros();
            // f * 2^(1 - bias - frac_bits) = (f << k) * 2^(exp - 16383 - 63)
            let exp = 16383 + 63 + 1 - bias - frac_bits as i32 - k as i32;
            (exp as u16, f << k)
        }
    } else {
        ((e - bias + 16383) as u16, (1 << 63) | (f << shift))
    };
    ((sign << 15) | exp, mant)
}

/// Truncates an 80-bit value to a `bits`-bit integer; `None` if invalid (NaN, infinity,
/// unnormal, out of range). The flag says whether the result is inexact.
fn truncate(v: (u16, u64), bits: u32) -> Option<(u64, bool)> {
    let neg = v.0 & 0x8000 != 0;
    let exp = i32::from(v.0 & 0x7FFF);
    let mant = v.1;
    if exp == 0x7FFF || (exp != 0 && mant >> 63 == 0) {
        return None;
    }
    if mant == 0 {
        return Some((0, false));
    }
    let e = exp - 16383;
    if e < 0 {
        return Some((0, true));
    }
    if e > 63 {
        return None;
    }
    let sh = 63 - e as u32;
    let int = mant >> sh;
    let inexact = sh > 0 && mant & ((1u64 << sh) - 1) != 0;
    let limit = 1u64 << (bits - 1);
    if int > limit || (int == limit && !neg) {
        return None;
    }
    let r = if neg { int.wrapping_neg() } else { int };
    Some((r, inexact))
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    if cx.s.cr0 & (cr0::EM | cr0::TS) != 0 {
        return Err(super::Event::fault(super::vec::NM, None));
    }
    match ins.mnemonic() {
        M::Fld => {
            let v = if ins.op0_kind() == OpKind::Register {
                let i = ins.op0_register() as usize - Register::ST0 as usize;
                if valid(cx, (top(cx) + i) & 7) {
                    from_bytes(&cx.s.fpu.st[i & 7])
                } else {
                    cx.s.fpu.fsw |= IE | SF;
                    INDEFINITE
                }
            } else {
                let va = cx.ea(ins);
                match ins.memory_size() {
                    MemorySize::Float32 => {
                        let b = cx.read(va, 4)?;
                        widen(cx, b, 23, 8)
                    }
                    MemorySize::Float64 => {
                        let b = cx.read(va, 8)?;
                        widen(cx, b, 52, 11)
                    }
                    _ => {
                        let mut b = [0u8; 16];
                        cx.read_bytes(va, &mut b[..10])?;
                        from_bytes(&b)
                    }
                }
            };
            push(cx, v);
        }
        _ => {
            // FISTTP
            let size = cx.op_size(ins, 0);
            let bits = 8 * u32::from(size);
            let indefinite = 1u64 << (bits - 1);
            let t = top(cx);
            let (v, flags) = if !valid(cx, t) {
                (indefinite, IE | SF)
            } else {
                match truncate(from_bytes(&cx.s.fpu.st[0]), bits) {
                    Some((v, inexact)) => (v, if inexact { PE } else { 0 }),
                    None => (indefinite, IE),
                }
            };
            cx.write_op(ins, 0, size, v)?;
            cx.s.fpu.fsw = (cx.s.fpu.fsw & !C1) | flags;
            pop(cx);
        }
    }
    Ok(())
}
