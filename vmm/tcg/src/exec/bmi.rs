//! BMI1 (ANDN, BEXTR, BLSI, BLSMSK, BLSR; TZCNT is in `bits`) and BMI2 (BZHI, MULX, PDEP,
//! PEXT, RORX, SARX, SHLX, SHRX): VEX-encoded general-purpose instructions.

use super::{Ctx, R};
use crate::flags::{sign_bit, size_mask, CF, SF, ZF};
use iced_x86::{Instruction, Mnemonic as M};

fn zs(v: u64, size: u8) -> u64 {
    (if v == 0 { ZF } else { 0 }) | (if v & sign_bit(size) != 0 { SF } else { 0 })
}

fn pdep(src: u64, mask: u64) -> u64 {
    let (mut r, mut k, mut m) = (0u64, 0u32, mask);
    while m != 0 {
        let bit = m & m.wrapping_neg();
        if (src >> k) & 1 != 0 {
            r |= bit;
        }
        k += 1;
        m &= m - 1;
    }
    r
}

fn pext(src: u64, mask: u64) -> u64 {
    let (mut r, mut k, mut m) = (0u64, 0u32, mask);
    while m != 0 {
        let bit = m & m.wrapping_neg();
        if src & bit != 0 {
            r |= 1 << k;
        }
        k += 1;
        m &= m - 1;
    }
    r
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = cx.op_size(ins, 0);
    let mask = size_mask(size);
    let bits = 8 * u32::from(size);
    let m = ins.mnemonic();
    match m {
        M::Andn => {
            let a = cx.read_op(ins, 1, size)?;
            let b = cx.read_op(ins, 2, size)?;
            let r = !a & b & mask;
            cx.write_op(ins, 0, size, r)?;
            cx.s.flags.set_arith(zs(r, size));
        }
        M::Bextr => {
            let src = cx.read_op(ins, 1, size)?;
            let ctl = cx.read_op(ins, 2, size)?;
            let start = (ctl & 0xFF) as u32;
            let len = ((ctl >> 8) & 0xFF) as u32;
            let shifted = if start < bits { src >> start } else { 0 };
            let r = if len < 64 {
                shifted & ((1u64 << len) - 1)
            } else {
                shifted
            } & mask;
            cx.write_op(ins, 0, size, r)?;
            cx.s.flags.set_arith(if r == 0 { ZF } else { 0 });
        }
        M::Blsi | M::Blsmsk | M::Blsr => {
            let s = cx.read_op(ins, 1, size)?;
            let r = match m {
                M::Blsi => s.wrapping_neg() & s,
                M::Blsmsk => s.wrapping_sub(1) ^ s,
                _ => s.wrapping_sub(1) & s,
            } & mask;
            let cf = match m {
                M::Blsi => s != 0,
                _ => s == 0,
            };
            cx.write_op(ins, 0, size, r)?;
            cx.s.flags.set_arith(zs(r, size) | if cf { CF } else { 0 });
        }
        M::Bzhi => {
            let src = cx.read_op(ins, 1, size)?;
            let n = (cx.read_op(ins, 2, size)? & 0xFF) as u32;
            let r = if n < bits {
                src & ((1u64 << n) - 1)
            } else {
                src
            } & mask;
            cx.write_op(ins, 0, size, r)?;
            cx.s.flags
                .set_arith(zs(r, size) | if n > bits - 1 { CF } else { 0 });
        }
        M::Mulx => {
            let a = cx.s.gpr[2] & mask;
            let b = cx.read_op(ins, 2, size)?;
            let p = u128::from(a) * u128::from(b);
            let (lo, hi) = ((p as u64) & mask, (p >> bits) as u64 & mask);
            // Low half first: if both destinations are the same register, the high half wins.
            cx.write_op(ins, 1, size, lo)?;
            cx.write_op(ins, 0, size, hi)?;
        }
        M::Pdep | M::Pext => {
            let a = cx.read_op(ins, 1, size)?;
            let b = cx.read_op(ins, 2, size)?;
            let r = if m == M::Pdep { pdep(a, b) } else { pext(a, b) } & mask;
            cx.write_op(ins, 0, size, r)?;
        }
        M::Rorx => {
            let a = cx.read_op(ins, 1, size)?;
            let n = (ins.immediate(2) as u32) & (bits - 1);
            let r = if n == 0 {
                a
            } else {
                ((a >> n) | (a << (bits - n))) & mask
            };
            cx.write_op(ins, 0, size, r)?;
        }
        _ => {
            // SARX, SHLX, SHRX
            let a = cx.read_op(ins, 1, size)?;
            let n = (cx.read_op(ins, 2, size)? as u32) & (bits - 1);
            let r = match m {
                M::Sarx => {
                    let sh = 64 - bits;
                    ((((a << sh) as i64) >> sh) >> n) as u64
                }
                M::Shlx => a << n,
                _ => a >> n,
            } & mask;
            cx.write_op(ins, 0, size, r)?;
        }
    }
    Ok(())
}
