//! SSE4.2: CRC32 (CRC-32C) and the string compares PCMPESTRI/M, PCMPISTRI/M (PCMPGTQ is in
//! `sse41`).

use super::operand::{get_reg, set_reg};
use super::x87::check_fpu;
use super::{ud, Ctx, R};
use crate::flags::{CF, OF, SF, ZF};
use crate::state::cr4;
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of `len` bytes of `data` (little
/// endian) continuing from `crc`, without the pre/post inversion (as the instruction).
fn crc32c(mut crc: u32, data: u64, len: u8) -> u32 {
    for i in 0..len {
        crc ^= u32::from((data >> (8 * i)) as u8);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    crc
}

fn crc32(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = cx.op_size(ins, 1);
    let data = cx.read_op(ins, 1, size)?;
    let r = ins.op0_register();
    let crc = crc32c(get_reg(cx.s, r) as u32, data, size);
    // A 32-bit result; the 64-bit form zero-extends it.
    set_reg(cx.s, r, u64::from(crc));
    Ok(())
}

fn xi(r: Register) -> Option<usize> {
    let n = r as usize;
    let b = Register::XMM0 as usize;
    (b..b + 16).contains(&n).then(|| n - b)
}

/// The string-compare core: `a`, `b` with lengths `la`, `lb` (elements), control `imm`.
/// Returns IntRes2 (one bit per element) and the element count.
pub fn pcmpstr(a: u128, b: u128, la: u32, lb: u32, imm: u8) -> (u32, u32) {
    let words = imm & 1 != 0;
    let signed = imm & 2 != 0;
    let n: u32 = if words { 8 } else { 16 };
    let w = if words { 16 } else { 8 };
    let el = |v: u128, i: u32| -> i64 {
        let x = ((v >> (w * i)) as u64) & ((1u64 << w) - 1);
        if signed {
            let sh = 64 - w;
            ((x << sh) as i64) >> sh
        } else {
            x as i64
        }
    };
    let agg = (imm >> 2) & 3;
    let mut res1 = 0u32;
    for j in 0..n {
        let bit = match agg {
            // Equal any.
            0 => j < lb && (0..la).any(|i| el(a, i) == el(b, j)),
            // Ranges.
            1 => {
                j < lb
                    && (0..la / 2).any(|p| el(a, 2 * p) <= el(b, j) && el(b, j) <= el(a, 2 * p + 1))
            }
            // Equal each.
            2 => match (j < la, j < lb) {
                (true, true) => el(a, j) == el(b, j),
                (false, false) => true,
                _ => false,
            },
            // Equal ordered.
            _ => (0..n - j).all(|i| {
                if i >= la {
                    true
                } else if j + i >= lb {
                    false
                } else {
                    el(a, i) == el(b, j + i)
                }
            }),
        };
        if bit {
            res1 |= 1 << j;
        }
    }
    let all = (1u32 << n) - 1;
    let valid_b = (1u32 << lb) - 1;
    let res2 = match (imm >> 4) & 3 {
        1 => !res1 & all,
        3 => res1 ^ valid_b,
        _ => res1,
    };
    (res2, n)
}

/// Implicit length: index of the first zero element (or `n`).
fn implicit_len(v: u128, words: bool) -> u32 {
    let (n, w) = if words { (8, 16) } else { (16, 8) };
    (0..n)
        .find(|&i| (v >> (w * i)) as u64 & ((1u64 << w) - 1) == 0)
        .unwrap_or(n)
}

/// Explicit length from RAX/RDX (EAX/EDX without REX.W): absolute value, saturated at `n`.
fn explicit_len(v: u64, wide: bool, n: u32) -> u32 {
    let abs = if wide {
        (v as i64).unsigned_abs()
    } else {
        u64::from((v as u32 as i32).unsigned_abs())
    };
    abs.min(u64::from(n)) as u32
}

fn string_compare(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let m = ins.mnemonic();
    let a = match (ins.op0_kind(), xi(ins.op0_register())) {
        (OpKind::Register, Some(x)) => cx.s.xmm[x],
        _ => return ud(),
    };
    let b = if ins.op1_kind() == OpKind::Register {
        match xi(ins.op1_register()) {
            Some(x) => cx.s.xmm[x],
            None => return ud(),
        }
    } else {
        // The string instructions take unaligned memory operands.
        let va = cx.ea(ins);
        let mut buf = [0u8; 16];
        cx.read_bytes(va, &mut buf)?;
        u128::from_le_bytes(buf)
    };
    let imm = ins.immediate(2) as u8;
    let words = imm & 1 != 0;
    let n = if words { 8 } else { 16 };
    let explicit = matches!(
        m,
        M::Pcmpestri | M::Pcmpestri64 | M::Pcmpestrm | M::Pcmpestrm64
    );
    let (la, lb) = if explicit {
        let wide = matches!(m, M::Pcmpestri64 | M::Pcmpestrm64);
        (
            explicit_len(cx.s.gpr[0], wide, n),
            explicit_len(cx.s.gpr[2], wide, n),
        )
    } else {
        (implicit_len(a, words), implicit_len(b, words))
    };
    let (res, n) = pcmpstr(a, b, la, lb, imm);
    if matches!(m, M::Pcmpestrm | M::Pcmpestrm64 | M::Pcmpistrm) {
        cx.s.xmm[0] = if imm & 0x40 != 0 {
            let w = 128 / n;
            let ones = if w == 16 { 0xFFFFu128 } else { 0xFF };
            (0..n)
                .filter(|&j| res & (1 << j) != 0)
                .fold(0u128, |v, j| v | (ones << (w * j)))
        } else {
            u128::from(res)
        };
    } else {
        let idx = if res == 0 {
            n
        } else if imm & 0x40 != 0 {
            31 - res.leading_zeros()
        } else {
            res.trailing_zeros()
        };
        cx.s.gpr[1] = u64::from(idx);
    }
    let mut f = 0;
    if res != 0 {
        f |= CF;
    }
    if lb < n {
        f |= ZF;
    }
    if la < n {
        f |= SF;
    }
    if res & 1 != 0 {
        f |= OF;
    }
    cx.s.flags.set_arith(f);
    Ok(())
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    if ins.mnemonic() == M::Crc32 {
        return crc32(cx, ins);
    }
    check_fpu(cx)?;
    if cx.s.cr4 & cr4::OSFXSR == 0 {
        return ud();
    }
    string_compare(cx, ins)
}
