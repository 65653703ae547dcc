//! SSE/SSE2 subset: data movement, integer SIMD (logic, add/sub, compares, min/max, multiply,
//! shifts, shuffles, unpack/pack, masks), and scalar/packed float basics (add/sub/mul/div/
//! sqrt/min/max, conversions, (U)COMIS). Float ops run on the host SSE unit under the guest
//! MXCSR (`sse_fp`, `sse_native`).

use super::operand::{get_reg, set_reg};
use super::x87::check_fpu;
use super::{gp, ud, Ctx, R};
use crate::state::cr4;
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

fn xi(r: Register) -> Option<usize> {
    let n = r as usize;
    let b = Register::XMM0 as usize;
    (b..b + 16).contains(&n).then(|| n - b)
}

fn is_xmm(ins: &Instruction, i: u32) -> bool {
    ins.op_kind(i) == OpKind::Register && xi(ins.op_register(i)).is_some()
}

/// Reads a 128-bit operand (register or memory; `aligned` enforces 16-byte alignment).
fn rx(cx: &mut Ctx<'_>, ins: &Instruction, i: u32, aligned: bool) -> R<u128> {
    if ins.op_kind(i) == OpKind::Register {
        return match xi(ins.op_register(i)) {
            Some(x) => Ok(cx.s.xmm[x]),
            None => ud(),
        };
    }
    let va = cx.ea(ins);
    if aligned && va & 15 != 0 {
        return gp(0);
    }
    let mut b = [0u8; 16];
    cx.read_bytes(va, &mut b)?;
    Ok(u128::from_le_bytes(b))
}

/// Reads the low `size` bytes of an XMM register, a GPR or memory.
fn rlow(cx: &mut Ctx<'_>, ins: &Instruction, i: u32, size: u8) -> R<u64> {
    let m = crate::flags::size_mask(size);
    match ins.op_kind(i) {
        OpKind::Register => {
            let r = ins.op_register(i);
            Ok(match xi(r) {
                Some(x) => cx.s.xmm[x] as u64 & m,
                None => get_reg(cx.s, r) & m,
            })
        }
        OpKind::Memory => {
            let va = cx.ea(ins);
            cx.read(va, size)
        }
        _ => Ok(ins.immediate(i) & m),
    }
}

fn wx(cx: &mut Ctx<'_>, ins: &Instruction, i: u32, v: u128, aligned: bool) -> R<()> {
    if ins.op_kind(i) == OpKind::Register {
        return match xi(ins.op_register(i)) {
            Some(x) => {
                cx.s.xmm[x] = v;
                Ok(())
            }
            None => ud(),
        };
    }
    let va = cx.ea(ins);
    if aligned && va & 15 != 0 {
        return gp(0);
    }
    cx.write_bytes(va, &v.to_le_bytes())
}

fn dst(ins: &Instruction) -> R<usize> {
    match (ins.op0_kind(), xi(ins.op0_register())) {
        (OpKind::Register, Some(x)) => Ok(x),
        _ => ud(),
    }
}

macro_rules! lanes {
    ($name:ident, $t:ty, $n:expr) => {
        fn $name(a: u128, b: u128, f: impl Fn($t, $t) -> $t) -> u128 {
            const W: u32 = <$t>::BITS;
            let mut r = 0u128;
            for i in 0..$n {
                let x = (a >> (W * i)) as $t;
                let y = (b >> (W * i)) as $t;
                r |= u128::from(f(x, y)) << (W * i);
            }
            r
        }
    };
}
lanes!(l8, u8, 16);
lanes!(l16, u16, 8);
lanes!(l32, u32, 4);
lanes!(l64, u64, 2);

fn get16(v: u128, i: u32) -> u16 {
    (v >> (16 * i)) as u16
}
fn get32(v: u128, i: u32) -> u32 {
    (v >> (32 * i)) as u32
}

/// Interleaves the low (`high == false`) or high halves of `a` and `b` in `w`-bit elements.
pub(super) fn unpack(a: u128, b: u128, w: u32, high: bool) -> u128 {
    let n = 64 / w;
    let m = if w == 64 {
        u128::from(u64::MAX)
    } else {
        (1u128 << w) - 1
    };
    let base = if high { 64 } else { 0 };
    let mut r = 0u128;
    for i in 0..n {
        let x = (a >> (base + w * i)) & m;
        let y = (b >> (base + w * i)) & m;
        r |= x << (2 * w * i);
        r |= y << (2 * w * i + w);
    }
    r
}

pub(super) fn sat_i8(v: i32) -> u8 {
    v.clamp(-128, 127) as i8 as u8
}
pub(super) fn sat_u8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}
fn sat_i16(v: i32) -> u16 {
    v.clamp(-32768, 32767) as i16 as u16
}

pub(super) fn shift_lanes(a: u128, w: u32, count: u64, kind: u8) -> u128 {
    // kind: 0 = left logical, 1 = right logical, 2 = right arithmetic
    let mut r = 0u128;
    let n = 128 / w;
    let m = if w == 64 {
        u128::from(u64::MAX)
    } else {
        (1u128 << w) - 1
    };
    for i in 0..n {
        let x = ((a >> (w * i)) & m) as u64;
        let y = match kind {
            0 if count < u64::from(w) => x << count,
            1 if count < u64::from(w) => x >> count,
            2 => {
                let sh = 64 - w;
                let sx = ((x << sh) as i64) >> sh;
                (sx >> count.min(u64::from(w) - 1)) as u64
            }
            _ => 0,
        };
        r |= (u128::from(y) & m) << (w * i);
    }
    r
}

fn pshuf32(v: u128, imm: u8) -> u128 {
    let mut r = 0u128;
    for i in 0..4 {
        r |= u128::from(get32(v, u32::from((imm >> (2 * i)) & 3))) << (32 * i);
    }
    r
}

pub(super) fn pshuf16_half(v: u128, imm: u8, high: bool) -> u128 {
    let base = if high { 4 } else { 0 };
    let mut r = v;
    for i in 0..4u32 {
        let src = base + u32::from((imm >> (2 * i)) & 3);
        let sh = 16 * (base + i);
        r = (r & !(0xFFFFu128 << sh)) | (u128::from(get16(v, src)) << sh);
    }
    r
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let m = ins.mnemonic();
    if m == M::Movnti {
        let size = cx.op_size(ins, 0);
        let v = cx.read_op(ins, 1, size)?;
        return cx.write_op(ins, 0, size, v);
    }
    // CVT(T)SS2SI/CVT(T)SD2SI r, m have no XMM operand but are SSE instructions.
    let any_xmm = (0..ins.op_count()).any(|i| is_xmm(ins, i))
        || matches!(m, M::Cvtss2si | M::Cvttss2si | M::Cvtsd2si | M::Cvttsd2si);
    if !any_xmm {
        return ud();
    }
    check_fpu(cx)?;
    if cx.s.cr4 & cr4::OSFXSR == 0 {
        return ud();
    }
    if int_ops(cx, ins)?
        || move_ops(cx, ins)?
        || super::sse_fp::fp_ops(cx, ins)?
        || super::sse_native::sse2_ops(cx, ins)?
    {
        return Ok(());
    }
    ud()
}

/// Data movement. Returns Ok(false) if `ins` is not handled here.
fn move_ops(cx: &mut Ctx<'_>, ins: &Instruction) -> R<bool> {
    let m = ins.mnemonic();
    match m {
        M::Movdqa | M::Movaps | M::Movapd | M::Movntdq | M::Movntps | M::Movntpd => {
            let v = rx(cx, ins, 1, true)?;
            wx(cx, ins, 0, v, true)?;
        }
        M::Movdqu | M::Movups | M::Movupd => {
            let v = rx(cx, ins, 1, false)?;
            wx(cx, ins, 0, v, false)?;
        }
        M::Movq | M::Movd => {
            let size = if m == M::Movq { 8 } else { 4 };
            if is_xmm(ins, 0) {
                let v = rlow(cx, ins, 1, size)?;
                cx.s.xmm[dst(ins)?] = u128::from(v);
            } else {
                let v = rlow(cx, ins, 1, size)?;
                cx.write_op(ins, 0, size, v)?;
            }
        }
        M::Movss | M::Movsd => {
            let size: u8 = if m == M::Movss { 4 } else { 8 };
            let lm = if size == 4 {
                u128::from(u32::MAX)
            } else {
                u128::from(u64::MAX)
            };
            if is_xmm(ins, 0) {
                let d = dst(ins)?;
                if is_xmm(ins, 1) {
                    let s = rx(cx, ins, 1, false)?;
                    cx.s.xmm[d] = (cx.s.xmm[d] & !lm) | (s & lm);
                } else {
                    cx.s.xmm[d] = u128::from(rlow(cx, ins, 1, size)?);
                }
            } else {
                let v = rlow(cx, ins, 1, size)?;
                cx.write_op(ins, 0, size, v)?;
            }
        }
        M::Movlps | M::Movlpd | M::Movhps | M::Movhpd => {
            let high = matches!(m, M::Movhps | M::Movhpd);
            if is_xmm(ins, 0) {
                let d = dst(ins)?;
                let v = u128::from(rlow(cx, ins, 1, 8)?);
                let lo = u128::from(u64::MAX);
                cx.s.xmm[d] = if high {
                    (cx.s.xmm[d] & lo) | (v << 64)
                } else {
                    (cx.s.xmm[d] & !lo) | v
                };
            } else {
                let s = rx(cx, ins, 1, false)?;
                let v = if high { (s >> 64) as u64 } else { s as u64 };
                cx.write_op(ins, 0, 8, v)?;
            }
        }
        M::Movhlps | M::Movlhps => {
            let d = dst(ins)?;
            let s = rx(cx, ins, 1, false)?;
            let lo = u128::from(u64::MAX);
            cx.s.xmm[d] = if m == M::Movhlps {
                (cx.s.xmm[d] & !lo) | (s >> 64)
            } else {
                (cx.s.xmm[d] & lo) | (s << 64)
            };
        }
        M::Pmovmskb | M::Movmskps | M::Movmskpd => {
            let s = rx(cx, ins, 1, false)?;
            let (w, n) = match m {
                M::Pmovmskb => (8, 16),
                M::Movmskps => (32, 4),
                _ => (64, 2),
            };
            let mut r = 0u64;
            for i in 0..n {
                r |= (((s >> (w * i + w - 1)) & 1) as u64) << i;
            }
            set_reg(cx.s, ins.op0_register(), r);
        }
        M::Pextrw => {
            let s = rx(cx, ins, 1, false)?;
            let i = (ins.immediate(2) & 7) as u32;
            let v = u64::from(get16(s, i));
            if ins.op0_kind() == OpKind::Register {
                set_reg(cx.s, ins.op0_register(), v);
            } else {
                cx.write_op(ins, 0, 2, v)?;
            }
        }
        M::Pinsrw => {
            let d = dst(ins)?;
            let v = rlow(cx, ins, 1, 2)? as u128;
            let sh = 16 * (ins.immediate(2) & 7) as u32;
            cx.s.xmm[d] = (cx.s.xmm[d] & !(0xFFFFu128 << sh)) | (v << sh);
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Integer SIMD. Returns Ok(false) if `ins` is not handled here.
fn int_ops(cx: &mut Ctx<'_>, ins: &Instruction) -> R<bool> {
    let m = ins.mnemonic();
    // Shifts by immediate have an immediate second operand.
    if matches!(
        m,
        M::Psllw | M::Pslld | M::Psllq | M::Psrlw | M::Psrld | M::Psrlq | M::Psraw | M::Psrad
    ) {
        let d = dst(ins)?;
        let count = if ins.op1_kind() == OpKind::Register || ins.op1_kind() == OpKind::Memory {
            rx(cx, ins, 1, true)? as u64
        } else {
            ins.immediate(1) & 0xFF
        };
        let (w, kind) = match m {
            M::Psllw => (16, 0),
            M::Pslld => (32, 0),
            M::Psllq => (64, 0),
            M::Psrlw => (16, 1),
            M::Psrld => (32, 1),
            M::Psrlq => (64, 1),
            M::Psraw => (16, 2),
            _ => (32, 2),
        };
        cx.s.xmm[d] = shift_lanes(cx.s.xmm[d], w, count, kind);
        return Ok(true);
    }
    if matches!(m, M::Pslldq | M::Psrldq) {
        let d = dst(ins)?;
        let n = (ins.immediate(1) & 0xFF).min(16) as u32 * 8;
        let v = cx.s.xmm[d];
        cx.s.xmm[d] = match (m, n) {
            (_, 128) => 0,
            (M::Pslldq, _) => v << n,
            _ => v >> n,
        };
        return Ok(true);
    }
    if matches!(m, M::Pshufd | M::Pshuflw | M::Pshufhw) {
        let d = dst(ins)?;
        let s = rx(cx, ins, 1, true)?;
        let imm = ins.immediate(2) as u8;
        cx.s.xmm[d] = match m {
            M::Pshufd => pshuf32(s, imm),
            M::Pshuflw => pshuf16_half(s, imm, false),
            _ => pshuf16_half(s, imm, true),
        };
        return Ok(true);
    }
    if matches!(m, M::Shufps | M::Shufpd) {
        let d = dst(ins)?;
        let a = cx.s.xmm[d];
        let b = rx(cx, ins, 1, true)?;
        let imm = ins.immediate(2) as u8;
        cx.s.xmm[d] = if m == M::Shufps {
            let p = |v: u128, k: u8| u128::from(get32(v, u32::from(k & 3)));
            p(a, imm) | (p(a, imm >> 2) << 32) | (p(b, imm >> 4) << 64) | (p(b, imm >> 6) << 96)
        } else {
            let lo = if imm & 1 != 0 {
                a >> 64
            } else {
                a & u128::from(u64::MAX)
            };
            let hi = if imm & 2 != 0 {
                b >> 64
            } else {
                b & u128::from(u64::MAX)
            };
            lo | (hi << 64)
        };
        return Ok(true);
    }
    let Some(f) = int_binop(m) else {
        return Ok(false);
    };
    let d = dst(ins)?;
    let b = rx(cx, ins, 1, true)?;
    cx.s.xmm[d] = f(cx.s.xmm[d], b);
    Ok(true)
}

/// The lane-wise integer operation of mnemonic `m` on 128-bit values (also used by MMX on
/// zero-extended 64-bit values: every lane stays within its half).
pub(super) fn int_binop(m: M) -> Option<fn(u128, u128) -> u128> {
    let f: fn(u128, u128) -> u128 = match m {
        M::Pxor | M::Xorps | M::Xorpd => |a, b| a ^ b,
        M::Por | M::Orps | M::Orpd => |a, b| a | b,
        M::Pand | M::Andps | M::Andpd => |a, b| a & b,
        M::Pandn | M::Andnps | M::Andnpd => |a, b| !a & b,
        M::Paddb => |a, b| l8(a, b, u8::wrapping_add),
        M::Paddw => |a, b| l16(a, b, u16::wrapping_add),
        M::Paddd => |a, b| l32(a, b, u32::wrapping_add),
        M::Paddq => |a, b| l64(a, b, u64::wrapping_add),
        M::Psubb => |a, b| l8(a, b, u8::wrapping_sub),
        M::Psubw => |a, b| l16(a, b, u16::wrapping_sub),
        M::Psubd => |a, b| l32(a, b, u32::wrapping_sub),
        M::Psubq => |a, b| l64(a, b, u64::wrapping_sub),
        M::Paddusb => |a, b| l8(a, b, u8::saturating_add),
        M::Paddusw => |a, b| l16(a, b, u16::saturating_add),
        M::Psubusb => |a, b| l8(a, b, u8::saturating_sub),
        M::Psubusw => |a, b| l16(a, b, u16::saturating_sub),
        M::Paddsb => |a, b| l8(a, b, |x, y| sat_i8(i32::from(x as i8) + i32::from(y as i8))),
        M::Psubsb => |a, b| l8(a, b, |x, y| sat_i8(i32::from(x as i8) - i32::from(y as i8))),
        M::Paddsw => |a, b| {
            l16(a, b, |x, y| {
                sat_i16(i32::from(x as i16) + i32::from(y as i16))
            })
        },
        M::Psubsw => |a, b| {
            l16(a, b, |x, y| {
                sat_i16(i32::from(x as i16) - i32::from(y as i16))
            })
        },
        M::Pcmpeqb => |a, b| l8(a, b, |x, y| if x == y { !0 } else { 0 }),
        M::Pcmpeqw => |a, b| l16(a, b, |x, y| if x == y { !0 } else { 0 }),
        M::Pcmpeqd => |a, b| l32(a, b, |x, y| if x == y { !0 } else { 0 }),
        M::Pcmpgtb => |a, b| l8(a, b, |x, y| if x as i8 > y as i8 { !0 } else { 0 }),
        M::Pcmpgtw => |a, b| l16(a, b, |x, y| if x as i16 > y as i16 { !0 } else { 0 }),
        M::Pcmpgtd => |a, b| l32(a, b, |x, y| if x as i32 > y as i32 { !0 } else { 0 }),
        M::Pminub => |a, b| l8(a, b, u8::min),
        M::Pmaxub => |a, b| l8(a, b, u8::max),
        M::Pminsw => |a, b| l16(a, b, |x, y| (x as i16).min(y as i16) as u16),
        M::Pmaxsw => |a, b| l16(a, b, |x, y| (x as i16).max(y as i16) as u16),
        M::Pavgb => |a, b| l8(a, b, |x, y| ((u16::from(x) + u16::from(y) + 1) >> 1) as u8),
        M::Pavgw => |a, b| l16(a, b, |x, y| ((u32::from(x) + u32::from(y) + 1) >> 1) as u16),
        M::Pmullw => |a, b| l16(a, b, u16::wrapping_mul),
        M::Pmulhw => |a, b| {
            l16(a, b, |x, y| {
                ((i32::from(x as i16) * i32::from(y as i16)) >> 16) as u16
            })
        },
        M::Pmulhuw => |a, b| l16(a, b, |x, y| ((u32::from(x) * u32::from(y)) >> 16) as u16),
        M::Pmuludq => |a, b| l64(a, b, |x, y| u64::from(x as u32) * u64::from(y as u32)),
        M::Pmaddwd => |a, b| {
            let mut r = 0u128;
            for i in 0..4 {
                let p = |k: u32| i32::from(get16(a, k) as i16) * i32::from(get16(b, k) as i16);
                let s = p(2 * i).wrapping_add(p(2 * i + 1)) as u32;
                r |= u128::from(s) << (32 * i);
            }
            r
        },
        M::Psadbw => |a, b| {
            let mut r = 0u128;
            for h in 0..2 {
                let mut s = 0u64;
                for i in 0..8 {
                    let x = (a >> (64 * h + 8 * i)) as u8;
                    let y = (b >> (64 * h + 8 * i)) as u8;
                    s += u64::from(x.abs_diff(y));
                }
                r |= u128::from(s) << (64 * h);
            }
            r
        },
        M::Punpcklbw => |a, b| unpack(a, b, 8, false),
        M::Punpcklwd => |a, b| unpack(a, b, 16, false),
        M::Punpckldq | M::Unpcklps => |a, b| unpack(a, b, 32, false),
        M::Punpcklqdq | M::Unpcklpd => |a, b| unpack(a, b, 64, false),
        M::Punpckhbw => |a, b| unpack(a, b, 8, true),
        M::Punpckhwd => |a, b| unpack(a, b, 16, true),
        M::Punpckhdq | M::Unpckhps => |a, b| unpack(a, b, 32, true),
        M::Punpckhqdq | M::Unpckhpd => |a, b| unpack(a, b, 64, true),
        M::Packsswb | M::Packuswb => {
            if m == M::Packsswb {
                |a, b| pack16(a, b, sat_i8)
            } else {
                |a, b| pack16(a, b, sat_u8)
            }
        }
        M::Packssdw => |a, b| {
            let mut r = 0u128;
            for i in 0..8u32 {
                let src = if i < 4 { a } else { b };
                let v = get32(src, i % 4) as i32;
                r |= u128::from(v.clamp(-32768, 32767) as i16 as u16) << (16 * i);
            }
            r
        },
        _ => return None,
    };
    Some(f)
}

pub(super) fn pack16(a: u128, b: u128, sat: impl Fn(i32) -> u8) -> u128 {
    let mut r = 0u128;
    for i in 0..16u32 {
        let src = if i < 8 { a } else { b };
        let v = i32::from(get16(src, i % 8) as i16);
        r |= u128::from(sat(v)) << (8 * i);
    }
    r
}
