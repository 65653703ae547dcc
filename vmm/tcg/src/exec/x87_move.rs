//! x87 data movement without arithmetic: FST/FSTP (m32/m64 rounded per FCW.RC, m80, ST(i)),
//! FILD (m16/m32/m64), FIST/FISTP (rounded per FCW.RC), FXCH, FCHS, FABS, FLDZ, FLD1,
//! FINCSTP, FDECSTP, FFREE. Masked-response exceptions only (FSW flags, no #MF).

use super::x87_stack::{from_bytes, pop, push, to_bytes, top, valid, C1, IE, INDEFINITE, PE, SF};
use super::{Ctx, Event, R};
use crate::state::cr0;
use iced_x86::{Instruction, MemorySize, Mnemonic as M, OpKind, Register};

const OE: u16 = 1 << 3;
const UE: u16 = 1 << 4;

fn rc(cx: &Ctx<'_>) -> u8 {
    ((cx.s.fpu.fcw >> 10) & 3) as u8
}

/// Whether to round `kept` up given the discarded bits (`half` = the discarded part's
/// midpoint, `rem` the discarded value) under rounding control `rc` for sign `neg`.
fn round_up(kept: u128, rem: u128, half: u128, rc: u8, neg: bool) -> bool {
    if rem == 0 {
        return false;
    }
    match rc {
        0 => rem > half || (rem == half && kept & 1 != 0),
        1 => neg,
        2 => !neg,
        _ => false,
    }
}

/// Rounds the finite 80-bit value to a binary float with `frac` fraction bits and exponent
/// bias `bias`; returns the bits and the FSW flags (PE, UE, OE, C1 = rounded up).
fn narrow(v: (u16, u64), frac: u32, bias: i32, rc: u8) -> (u64, u16) {
    let neg = v.0 & 0x8000 != 0;
    let sign = u64::from(neg) << (frac + if frac == 52 { 11 } else { 8 });
    let exp_max = 2 * bias + 1; // all-ones exponent
    let mut flags = 0;
    if v.0 & 0x7FFF == 0 && v.1 == 0 {
        return (sign, 0);
    }
    // Value = mant * 2^(e - 63).
    // (An 80-bit denormal source does not raise DE here, as the hardware shows.)
    let e = if v.0 & 0x7FFF == 0 {
        -16382
    } else {
        i32::from(v.0 & 0x7FFF) - 16383
    };
    let lz = v.1.leading_zeros() as i32;
    let mant = u128::from(v.1) << lz;
    let e = e - lz;
    // Keep frac+1 bits (normal) or fewer (denormal).
    let emin = 1 - bias;
    let keep = if e >= emin {
        frac as i32 + 1
    } else {
        frac as i32 + 1 - (emin - e)
    };
    let (mut kept, rem, half) = if keep <= 0 {
        // Everything is discarded: the value is below half the smallest denormal or not.
        let rem = if keep == 0 { mant } else { 1 };
        let half = if keep == 0 { 1u128 << 63 } else { 2 };
        (0u128, rem, half)
    } else {
        let sh = 64 - keep as u32;
        (mant >> sh, mant & ((1u128 << sh) - 1), 1u128 << (sh - 1))
    };
    if rem != 0 {
        flags |= PE;
    }
    if round_up(kept, rem, half, rc, neg) {
        kept += 1;
        flags |= C1;
    }
    let tiny = e < emin;
    if tiny && rem != 0 {
        flags |= UE;
    }
    let mut be = if tiny { 0 } else { e + bias };
    let norm_bit = 1u128 << frac;
    if kept >= norm_bit << 1 {
        kept >>= 1;
        be += 1;
    } else if tiny && kept >= norm_bit {
        be = 1;
    }
    if be >= exp_max {
        flags |= OE | PE;
        let to_inf = match rc {
            0 => true,
            1 => neg,
            2 => !neg,
            _ => false,
        };
        let bits = if to_inf {
            (exp_max as u64) << frac
        } else {
            ((exp_max as u64 - 1) << frac) | ((1u64 << frac) - 1)
        };
        return (sign | bits, flags | if to_inf { C1 } else { 0 });
    }
    let bits = ((be as u64) << frac) | ((kept as u64) & ((1u64 << frac) - 1));
    (sign | bits, flags)
}

/// Rounds to a `bits`-bit integer per RC; `None` if invalid.
fn to_int(v: (u16, u64), bits: u32, rc: u8) -> Option<(u64, u16)> {
    let neg = v.0 & 0x8000 != 0;
    let exp = i32::from(v.0 & 0x7FFF);
    if exp == 0x7FFF || (exp != 0 && v.1 >> 63 == 0) {
        return None;
    }
    if v.1 == 0 {
        return Some((0, 0));
    }
    let e = if exp == 0 { -16382 } else { exp - 16383 };
    if e > 63 {
        return None;
    }
    // int = mant * 2^(e - 63), with 64 extra bits for the fraction.
    let full = u128::from(v.1) << 64;
    let sh = (63 - e) as u32;
    let (kept, rem, half) = if sh >= 128 {
        // Below 2^-64: nonzero, far under one half.
        (0, 1, 2)
    } else {
        (
            full >> sh >> 64,
            (full >> sh) & u128::from(u64::MAX),
            1u128 << 63,
        )
    };
    let mut kept = kept;
    let mut flags = if rem != 0 { PE } else { 0 };
    if round_up(kept, rem, half, rc, neg) {
        kept += 1;
        flags |= C1;
    }
    let limit = 1u128 << (bits - 1);
    if kept > limit || (kept == limit && !neg) {
        return None;
    }
    let r = if neg {
        (kept as u64).wrapping_neg()
    } else {
        kept as u64
    };
    Some((r & (u64::MAX >> (64 - bits)), flags))
}

fn st_index(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::ST0 as usize) & 7
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    if cx.s.cr0 & (cr0::EM | cr0::TS) != 0 {
        return Err(Event::fault(super::vec::NM, None));
    }
    let m = ins.mnemonic();
    let t = top(cx);
    let st0_valid = valid(cx, t);
    cx.s.fpu.fsw &= !C1;
    match m {
        M::Fst | M::Fstp => {
            let v = if st0_valid {
                from_bytes(&cx.s.fpu.st[0])
            } else {
                cx.s.fpu.fsw |= IE | SF;
                INDEFINITE
            };
            if ins.op0_kind() == OpKind::Register {
                let i = st_index(ins.op0_register());
                cx.s.fpu.st[i] = to_bytes(v.0, v.1);
                cx.s.fpu.ftw |= 1 << ((t + i) & 7);
            } else {
                let va = cx.ea(ins);
                match ins.memory_size() {
                    MemorySize::Float32 | MemorySize::Float64 => {
                        let double = ins.memory_size() == MemorySize::Float64;
                        let (frac, bias, size) = if double { (52, 1023, 8) } else { (23, 127, 4) };
                        let unsupported = v.0 & 0x7FFF != 0 && v.1 >> 63 == 0;
                        let (bits, flags) = if v.0 & 0x7FFF == 0x7FFF && !unsupported {
                            // Infinity or NaN: the fraction's top bits, quietened.
                            let nan = v.1 << 1 != 0;
                            let mut f = (v.1 << 1) >> (64 - frac);
                            let mut fl = 0;
                            if nan {
                                if v.1 & (1 << 62) == 0 {
                                    fl |= IE;
                                }
                                f |= 1 << (frac - 1);
                            }
                            let sign = u64::from(v.0 >> 15) << (size * 8 - 1);
                            let e = if double { 0x7FFu64 } else { 0xFF };
                            (sign | (e << frac) | f, fl)
                        } else if unsupported {
                            // Unnormal, pseudo-NaN, pseudo-infinity: invalid, default NaN.
                            let bits = if double {
                                0xFFF8_0000_0000_0000
                            } else {
                                0xFFC0_0000
                            };
                            (bits, IE)
                        } else {
                            narrow(v, frac, bias, rc(cx))
                        };
                        cx.write(va, size as u8, bits)?;
                        cx.s.fpu.fsw |= flags;
                    }
                    _ => {
                        let b = to_bytes(v.0, v.1);
                        cx.write_bytes(va, &b[..10])?;
                    }
                }
            }
            if m == M::Fstp {
                pop(cx);
            }
        }
        M::Fist | M::Fistp => {
            let size = cx.op_size(ins, 0);
            let bits = 8 * u32::from(size);
            let indefinite = 1u64 << (bits - 1);
            let (v, flags) = if !st0_valid {
                (indefinite, IE | SF)
            } else {
                to_int(from_bytes(&cx.s.fpu.st[0]), bits, rc(cx)).unwrap_or((indefinite, IE))
            };
            cx.write_op(ins, 0, size, v)?;
            cx.s.fpu.fsw |= flags;
            if m == M::Fistp {
                pop(cx);
            }
        }
        M::Fild => {
            let size = cx.op_size(ins, 0);
            let raw = cx.read_op(ins, 0, size)?;
            let sh = 64 - 8 * u32::from(size);
            let v = ((raw << sh) as i64) >> sh;
            let mag = v.unsigned_abs();
            let val = if mag == 0 {
                (0, 0)
            } else {
                let lz = mag.leading_zeros();
                let sign = if v < 0 { 0x8000 } else { 0 };
                (sign | (16383 + 63 - lz) as u16, mag << lz)
            };
            push(cx, val);
        }
        M::Fldz => push(cx, (0, 0)),
        M::Fld1 => push(cx, (16383, 1 << 63)),
        M::Fchs | M::Fabs => {
            if st0_valid {
                let r = &mut cx.s.fpu.st[0];
                if m == M::Fchs {
                    r[9] ^= 0x80;
                } else {
                    r[9] &= 0x7F;
                }
            } else {
                cx.s.fpu.fsw |= IE | SF;
                cx.s.fpu.st[0] = to_bytes(INDEFINITE.0, INDEFINITE.1);
                cx.s.fpu.ftw |= 1 << t;
            }
        }
        M::Fxch => {
            let i = if ins.op_count() == 0 {
                1
            } else {
                st_index(ins.op_register(ins.op_count() - 1))
            };
            let pi = (t + i) & 7;
            if !st0_valid || !valid(cx, pi) {
                cx.s.fpu.fsw |= IE | SF;
                for (k, p) in [(0, t), (i, pi)] {
                    if !valid(cx, p) {
                        cx.s.fpu.st[k] = to_bytes(INDEFINITE.0, INDEFINITE.1);
                        cx.s.fpu.ftw |= 1 << p;
                    }
                }
            }
            cx.s.fpu.st.swap(0, i);
        }
        M::Fincstp => {
            cx.s.fpu.st.rotate_left(1);
            set_top(cx, t + 1);
        }
        M::Fdecstp => {
            cx.s.fpu.st.rotate_right(1);
            set_top(cx, t + 7);
        }
        _ => {
            // FFREE ST(i)
            let i = st_index(ins.op0_register());
            cx.s.fpu.ftw &= !(1 << ((t + i) & 7));
        }
    }
    Ok(())
}

fn set_top(cx: &mut Ctx<'_>, t: usize) {
    cx.s.fpu.fsw = (cx.s.fpu.fsw & !(7 << 11)) | ((t as u16 & 7) << 11);
}
