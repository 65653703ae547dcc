//! SSE4.1 (and SSE4.2's PCMPGTQ): blends, PTEST, PMOVSX/ZX, PMULDQ/PMULLD, PCMPEQQ,
//! PACKUSDW, MOVNTDQA, PMIN/PMAX(SB, SD, UW, UD), PHMINPOSUW, ROUND*, PEXTR*/PINSR*,
//! EXTRACTPS/INSERTPS, DPPS/DPPD, MPSADBW.

use super::operand::{get_reg, set_reg};
use super::x87::check_fpu;
use super::{gp, ud, Ctx, R};
use crate::flags::{CF, ZF};
use crate::state::cr4;
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

fn xi(r: Register) -> Option<usize> {
    let n = r as usize;
    let b = Register::XMM0 as usize;
    (b..b + 16).contains(&n).then(|| n - b)
}

/// Operand `i`: XMM register, GPR (zero-extended) or `size` bytes of memory (16 = aligned).
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
        return gp(0);
    }
    let mut b = [0u8; 16];
    cx.read_bytes(va, &mut b[..size])?;
    Ok(u128::from_le_bytes(b))
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

fn map(a: u128, b: u128, w: u32, f: impl Fn(i64, i64, u64, u64) -> u64) -> u128 {
    let mut r = 0u128;
    for i in 0..128 / w {
        put(
            &mut r,
            w,
            i,
            f(slane(a, w, i), slane(b, w, i), lane(a, w, i), lane(b, w, i)),
        );
    }
    r
}

/// Lane-wise blend: lane i from `b` where `sel(i)`.
fn blend(a: u128, b: u128, w: u32, sel: impl Fn(u32) -> bool) -> u128 {
    let mut r = a;
    for i in 0..128 / w {
        if sel(i) {
            put(&mut r, w, i, lane(b, w, i));
        }
    }
    r
}

fn mpsadbw(a: u128, b: u128, imm: u8) -> u128 {
    let ao = 4 * u32::from((imm >> 2) & 1);
    let bo = 4 * u32::from(imm & 3);
    let mut r = 0u128;
    for i in 0..8 {
        let s: u64 = (0..4)
            .map(|k| lane(a, 8, ao + i + k).abs_diff(lane(b, 8, bo + k)))
            .sum();
        put(&mut r, 16, i, s);
    }
    r
}

/// PMOVSX/PMOVZX: (source element width, destination width, signed).
fn pmov(m: M) -> Option<(u32, u32, bool)> {
    Some(match m {
        M::Pmovsxbw => (8, 16, true),
        M::Pmovsxbd => (8, 32, true),
        M::Pmovsxbq => (8, 64, true),
        M::Pmovsxwd => (16, 32, true),
        M::Pmovsxwq => (16, 64, true),
        M::Pmovsxdq => (32, 64, true),
        M::Pmovzxbw => (8, 16, false),
        M::Pmovzxbd => (8, 32, false),
        M::Pmovzxbq => (8, 64, false),
        M::Pmovzxwd => (16, 32, false),
        M::Pmovzxwq => (16, 64, false),
        M::Pmovzxdq => (32, 64, false),
        _ => return None,
    })
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    check_fpu(cx)?;
    if cx.s.cr4 & cr4::OSFXSR == 0 {
        return ud();
    }
    let m = ins.mnemonic();
    let imm = |k: u32| ins.immediate(k) as u8;
    // Extractions: the destination is a GPR or memory.
    if matches!(m, M::Pextrb | M::Pextrd | M::Pextrq | M::Extractps) {
        let s = src(cx, ins, 1, 16)?;
        let (w, n) = match m {
            M::Pextrb => (8, 16),
            M::Pextrq => (64, 2),
            _ => (32, 4),
        };
        let v = lane(s, w, u32::from(imm(2)) % n);
        return if ins.op0_kind() == OpKind::Register {
            set_reg(cx.s, ins.op0_register(), v);
            Ok(())
        } else {
            cx.write_op(ins, 0, (w / 8) as u8, v)
        };
    }
    let d = match (ins.op0_kind(), xi(ins.op0_register())) {
        (OpKind::Register, Some(x)) => x,
        _ => return ud(),
    };
    let a = cx.s.xmm[d];
    if let Some((sw, dw, signed)) = pmov(m) {
        let n = 128 / dw;
        let s = src(cx, ins, 1, (n * sw / 8) as usize)?;
        let mut r = 0u128;
        for i in 0..n {
            let v = if signed {
                slane(s, sw, i) as u64
            } else {
                lane(s, sw, i)
            };
            put(&mut r, dw, i, v);
        }
        cx.s.xmm[d] = r;
        return Ok(());
    }
    let r = match m {
        M::Pinsrb | M::Pinsrd | M::Pinsrq => {
            let (w, n) = match m {
                M::Pinsrb => (8, 16),
                M::Pinsrd => (32, 4),
                _ => (64, 2),
            };
            let v = src(cx, ins, 1, (w / 8) as usize)? as u64;
            let mut r = a;
            put(&mut r, w, u32::from(imm(2)) % n, v);
            r
        }
        M::Insertps => {
            let i = imm(2);
            let v = if ins.op1_kind() == OpKind::Register {
                lane(src(cx, ins, 1, 16)?, 32, u32::from(i >> 6))
            } else {
                src(cx, ins, 1, 4)? as u64
            };
            let mut r = a;
            put(&mut r, 32, u32::from((i >> 4) & 3), v);
            for k in 0..4 {
                if i & (1 << k) != 0 {
                    put(&mut r, 32, k, 0);
                }
            }
            r
        }
        M::Roundss | M::Roundsd => {
            let b = src(cx, ins, 1, if m == M::Roundss { 4 } else { 8 })?;
            super::sse_native::exec(cx, m, a, b, imm(2))?
        }
        _ => {
            let b = src(cx, ins, 1, 16)?;
            let x0 = cx.s.xmm[0];
            match m {
                M::Pblendvb => blend(a, b, 8, |i| lane(x0, 8, i) >> 7 != 0),
                M::Blendvps => blend(a, b, 32, |i| lane(x0, 32, i) >> 31 != 0),
                M::Blendvpd => blend(a, b, 64, |i| lane(x0, 64, i) >> 63 != 0),
                M::Blendps => blend(a, b, 32, |i| imm(2) & (1 << i) != 0),
                M::Blendpd => blend(a, b, 64, |i| imm(2) & (1 << i) != 0),
                M::Pblendw => blend(a, b, 16, |i| imm(2) & (1 << i) != 0),
                M::Ptest => {
                    let z = if a & b == 0 { ZF } else { 0 };
                    let c = if !a & b == 0 { CF } else { 0 };
                    cx.s.flags.set_arith(z | c);
                    return Ok(());
                }
                M::Movntdqa => b,
                M::Pmuldq => map(a, b, 64, |x, y, _, _| {
                    (i64::from(x as i32)).wrapping_mul(i64::from(y as i32)) as u64
                }),
                M::Pmulld => map(a, b, 32, |x, y, _, _| x.wrapping_mul(y) as u64),
                M::Pcmpeqq => map(a, b, 64, |x, y, _, _| if x == y { u64::MAX } else { 0 }),
                M::Pcmpgtq => map(a, b, 64, |x, y, _, _| if x > y { u64::MAX } else { 0 }),
                M::Packusdw => {
                    let mut r = 0u128;
                    for i in 0..8 {
                        let v = if i < 4 {
                            slane(a, 32, i)
                        } else {
                            slane(b, 32, i - 4)
                        };
                        put(&mut r, 16, i, v.clamp(0, 0xFFFF) as u64);
                    }
                    r
                }
                M::Pminsb => map(a, b, 8, |x, y, _, _| x.min(y) as u64),
                M::Pminsd => map(a, b, 32, |x, y, _, _| x.min(y) as u64),
                M::Pminuw | M::Pminud => {
                    let w = if m == M::Pminuw { 16 } else { 32 };
                    map(a, b, w, |_, _, x, y| x.min(y))
                }
                M::Pmaxsb => map(a, b, 8, |x, y, _, _| x.max(y) as u64),
                M::Pmaxsd => map(a, b, 32, |x, y, _, _| x.max(y) as u64),
                M::Pmaxuw | M::Pmaxud => {
                    let w = if m == M::Pmaxuw { 16 } else { 32 };
                    map(a, b, w, |_, _, x, y| x.max(y))
                }
                M::Phminposuw => {
                    let (idx, min) = (0..8)
                        .map(|i| (i, lane(b, 16, i)))
                        .min_by_key(|&(i, v)| (v, i))
                        .unwrap_or((0, 0));
                    u128::from(min) | (u128::from(idx) << 16)
                }
                M::Roundps | M::Roundpd | M::Dpps | M::Dppd => {
                    super::sse_native::exec(cx, m, a, b, imm(2))?
                }
                M::Mpsadbw => mpsadbw(a, b, imm(2)),
                _ => return ud(),
            }
        }
    };
    cx.s.xmm[d] = r;
    Ok(())
}
