//! SSSE3 on XMM and MM registers: PSHUFB, PHADD/PHSUB(W, D, SW), PMADDUBSW, PMULHRSW,
//! PSIGN(B, W, D), PABS(B, W, D), PALIGNR. Vectors are `n`-byte values held in a `u128`
//! (n = 16 for XMM, 8 for MM).

use super::mmx::{check_mmx, enter_mmx, get_mm, set_mm};
use super::x87::check_fpu;
use super::{gp, ud, Ctx, R};
use crate::state::cr4;
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

/// A vector register operand.
#[derive(Clone, Copy)]
enum V {
    X(usize),
    Mm(usize),
}

fn reg(r: Register) -> Option<V> {
    let n = r as usize;
    let x = Register::XMM0 as usize;
    let m = Register::MM0 as usize;
    if (x..x + 16).contains(&n) {
        Some(V::X(n - x))
    } else if (m..m + 8).contains(&n) {
        Some(V::Mm(n - m))
    } else {
        None
    }
}

fn get(cx: &Ctx<'_>, v: V) -> u128 {
    match v {
        V::X(i) => cx.s.xmm[i],
        V::Mm(i) => u128::from(get_mm(cx, i)),
    }
}

fn set(cx: &mut Ctx<'_>, v: V, val: u128) {
    match v {
        V::X(i) => cx.s.xmm[i] = val,
        V::Mm(i) => set_mm(cx, i, val as u64),
    }
}

fn lane(v: u128, w: u32, i: u32) -> u64 {
    ((v >> (w * i)) as u64) & (u64::MAX >> (64 - w))
}

fn slane(v: u128, w: u32, i: u32) -> i64 {
    let sh = 64 - w;
    ((lane(v, w, i) << sh) as i64) >> sh
}

fn put(r: &mut u128, w: u32, i: u32, x: u64) {
    let m = u128::from(u64::MAX >> (64 - w)) << (w * i);
    *r = (*r & !m) | ((u128::from(x) << (w * i)) & m);
}

fn sat16(x: i64) -> u64 {
    x.clamp(-32768, 32767) as u64
}

/// Horizontal add/sub of adjacent pairs: `a`'s pairs fill the low half, `b`'s the high.
fn horizontal(a: u128, b: u128, n: u32, w: u32, f: impl Fn(i64, i64) -> u64) -> u128 {
    let lanes = 8 * n / w;
    let half = lanes / 2;
    let mut r = 0u128;
    for i in 0..half {
        put(&mut r, w, i, f(slane(a, w, 2 * i), slane(a, w, 2 * i + 1)));
        put(
            &mut r,
            w,
            half + i,
            f(slane(b, w, 2 * i), slane(b, w, 2 * i + 1)),
        );
    }
    r
}

/// The SSSE3 operation `m` on `n`-byte vectors `a` (destination) and `b` (source).
pub fn op(m: M, a: u128, b: u128, n: u32, imm: u8) -> Option<u128> {
    let lanes = |w: u32| 8 * n / w;
    let map = |w: u32, f: &dyn Fn(i64, i64) -> u64| {
        let mut r = 0u128;
        for i in 0..lanes(w) {
            put(&mut r, w, i, f(slane(a, w, i), slane(b, w, i)));
        }
        r
    };
    let sign = |x: i64, y: i64| {
        if y < 0 {
            x.wrapping_neg() as u64
        } else if y == 0 {
            0
        } else {
            x as u64
        }
    };
    Some(match m {
        M::Pshufb => {
            let mut r = 0u128;
            for i in 0..n {
                let s = lane(b, 8, i);
                if s & 0x80 == 0 {
                    put(&mut r, 8, i, lane(a, 8, (s as u32) & (n - 1)));
                }
            }
            r
        }
        M::Phaddw => horizontal(a, b, n, 16, |x, y| (x + y) as u64),
        M::Phaddd => horizontal(a, b, n, 32, |x, y| (x + y) as u64),
        M::Phaddsw => horizontal(a, b, n, 16, |x, y| sat16(x + y)),
        M::Phsubw => horizontal(a, b, n, 16, |x, y| (x - y) as u64),
        M::Phsubd => horizontal(a, b, n, 32, |x, y| (x - y) as u64),
        M::Phsubsw => horizontal(a, b, n, 16, |x, y| sat16(x - y)),
        M::Pmaddubsw => {
            let mut r = 0u128;
            for i in 0..lanes(16) {
                let p = |k: u32| lane(a, 8, k) as i64 * slane(b, 8, k);
                put(&mut r, 16, i, sat16(p(2 * i) + p(2 * i + 1)));
            }
            r
        }
        M::Pmulhrsw => map(16, &|x, y| ((((x * y) >> 14) + 1) >> 1) as u64),
        M::Psignb => map(8, &sign),
        M::Psignw => map(16, &sign),
        M::Psignd => map(32, &sign),
        M::Pabsb => map(8, &|_, y| y.unsigned_abs()),
        M::Pabsw => map(16, &|_, y| y.unsigned_abs()),
        M::Pabsd => map(32, &|_, y| y.unsigned_abs()),
        M::Palignr => {
            // (a:b) >> 8*imm, low n bytes.
            let sh = u32::from(imm) * 8;
            if n == 16 {
                let lo = if sh >= 128 { 0 } else { b >> sh };
                let hi = match sh {
                    0 => 0,
                    s if s < 128 => a << (128 - s),
                    s if s < 256 => a >> (s - 128),
                    _ => 0,
                };
                lo | hi
            } else {
                let cat = (a << 64) | b;
                if sh >= 128 {
                    0
                } else {
                    (cat >> sh) & u128::from(u64::MAX)
                }
            }
        }
        _ => return None,
    })
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let d = match (ins.op0_kind(), reg(ins.op0_register())) {
        (OpKind::Register, Some(d)) => d,
        _ => return ud(),
    };
    let n = match d {
        V::X(_) => {
            check_fpu(cx)?;
            if cx.s.cr4 & cr4::OSFXSR == 0 {
                return ud();
            }
            16
        }
        V::Mm(_) => {
            check_mmx(cx)?;
            enter_mmx(cx);
            8
        }
    };
    let b = match ins.op1_kind() {
        OpKind::Register => match reg(ins.op1_register()) {
            Some(s) => get(cx, s),
            None => return ud(),
        },
        _ => {
            let va = cx.ea(ins);
            if n == 16 && va & 15 != 0 {
                return gp(0);
            }
            let mut buf = [0u8; 16];
            cx.read_bytes(va, &mut buf[..n as usize])?;
            u128::from_le_bytes(buf)
        }
    };
    let imm = if ins.op_count() > 2 {
        ins.immediate(2) as u8
    } else {
        0
    };
    let a = get(cx, d);
    let Some(r) = op(ins.mnemonic(), a, b, n, imm) else {
        return ud();
    };
    set(cx, d, r);
    Ok(())
}
