//! MUL, IMUL (all forms), DIV, IDIV (#DE on divide by zero or quotient overflow).

use super::operand::{get_reg, set_reg, sext};
use super::{vec, Ctx, Event, R};
use crate::flags::{size_mask, CF, OF, PF, SF, ZF};
use iced_x86::{Instruction, Mnemonic as M};

/// Flags after a multiply: CF=OF=`overflow`; SF/ZF/PF from the low half (undefined by the SDM).
fn mul_flags(cx: &mut Ctx<'_>, size: u8, lo: u64, overflow: bool) {
    let lo = lo & size_mask(size);
    let mut f = if overflow { CF | OF } else { 0 };
    if lo == 0 {
        f |= ZF;
    }
    if lo >> (8 * u32::from(size) - 1) & 1 != 0 {
        f |= SF;
    }
    if (lo as u8).count_ones() % 2 == 0 {
        f |= PF;
    }
    cx.s.flags.set_arith(f);
}

/// Writes a double-width result to AX or rDX:rAX.
fn write_acc_pair(cx: &mut Ctx<'_>, size: u8, lo: u64, hi: u64) {
    let m = size_mask(size);
    match size {
        1 => cx.s.gpr[0] = (cx.s.gpr[0] & !0xFFFF) | (lo & 0xFF) | ((hi & 0xFF) << 8),
        2 => {
            set_reg(cx.s, iced_x86::Register::AX, lo & m);
            set_reg(cx.s, iced_x86::Register::DX, hi & m);
        }
        _ => {
            cx.s.gpr[0] = lo & m;
            cx.s.gpr[2] = hi & m;
        }
    }
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let m = ins.mnemonic();
    if m == M::Imul && ins.op_count() > 1 {
        let size = cx.op_size(ins, 0);
        let (a, b) = if ins.op_count() == 3 {
            (cx.read_op(ins, 1, size)?, cx.read_op(ins, 2, size)?)
        } else {
            (cx.read_op(ins, 0, size)?, cx.read_op(ins, 1, size)?)
        };
        let p = i128::from(sext(a, size) as i64) * i128::from(sext(b, size) as i64);
        let lo = (p as u64) & size_mask(size);
        let overflow = i128::from(sext(lo, size) as i64) != p;
        set_reg(cx.s, ins.op0_register(), lo);
        mul_flags(cx, size, lo, overflow);
        return Ok(());
    }
    let size = cx.op_size(ins, 0);
    let src = cx.read_op(ins, 0, size)?;
    let mask = size_mask(size);
    let bits = 8 * u32::from(size);
    let (acc_lo, acc_hi) = if size == 1 {
        (cx.s.gpr[0] & 0xFF, (cx.s.gpr[0] >> 8) & 0xFF)
    } else {
        (cx.s.gpr[0] & mask, cx.s.gpr[2] & mask)
    };
    match m {
        M::Mul => {
            let p = u128::from(acc_lo) * u128::from(src);
            let (lo, hi) = ((p as u64) & mask, ((p >> bits) as u64) & mask);
            write_acc_pair(cx, size, lo, hi);
            mul_flags(cx, size, lo, hi != 0);
        }
        M::Imul => {
            let p = i128::from(sext(acc_lo, size) as i64) * i128::from(sext(src, size) as i64);
            let lo = (p as u64) & mask;
            let hi = ((p >> bits) as u64) & mask;
            write_acc_pair(cx, size, lo, hi);
            mul_flags(cx, size, lo, i128::from(sext(lo, size) as i64) != p);
        }
        M::Div => {
            if src == 0 {
                return Err(Event::fault(vec::DE, None));
            }
            let n = (u128::from(acc_hi) << bits) | u128::from(acc_lo);
            let q = n / u128::from(src);
            let r = n % u128::from(src);
            if q > u128::from(mask) {
                return Err(Event::fault(vec::DE, None));
            }
            write_div(cx, size, q as u64, r as u64);
        }
        _ => {
            if src == 0 {
                return Err(Event::fault(vec::DE, None));
            }
            let n = ((u128::from(acc_hi) << bits) | u128::from(acc_lo)) as i128;
            // Sign-extend the 2*bits-wide dividend.
            let sh = 128 - 2 * bits;
            let n = (n << sh) >> sh;
            let d = i128::from(sext(src, size) as i64);
            let q = n.wrapping_div(d);
            let r = n.wrapping_rem(d);
            let min = -(1i128 << (bits - 1));
            let max = (1i128 << (bits - 1)) - 1;
            if q < min || q > max || (n == i128::MIN && d == -1) {
                return Err(Event::fault(vec::DE, None));
            }
            write_div(cx, size, (q as u64) & mask, (r as u64) & mask);
        }
    }
    let _ = get_reg;
    Ok(())
}

fn write_div(cx: &mut Ctx<'_>, size: u8, q: u64, r: u64) {
    write_acc_pair(cx, size, q, r);
}
