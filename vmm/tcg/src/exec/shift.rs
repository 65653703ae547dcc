//! Shifts and rotates (SHL/SHR/SAR/ROL/ROR/RCL/RCR, SHLD/SHRD) with SDM flag semantics:
//! count masked to 5 (6 for 64-bit) bits, flags untouched for a masked count of 0, OF defined
//! only for a count of 1 (computed with the count-1 formula otherwise), AF cleared.

use super::operand::sext;
use super::{Ctx, R};
use crate::flags::{size_mask, CF, OF, PF, SF, ZF};
use iced_x86::{Instruction, Mnemonic as M};

fn szp(res: u64, size: u8) -> u64 {
    let mut f = 0;
    if res & size_mask(size) == 0 {
        f |= ZF;
    }
    if res >> (8 * u32::from(size) - 1) & 1 != 0 {
        f |= SF;
    }
    if (res as u8).count_ones() % 2 == 0 {
        f |= PF;
    }
    f
}

fn count(cx: &mut Ctx<'_>, ins: &Instruction, i: u32, size: u8) -> R<u32> {
    let c = if ins.op_count() > i {
        cx.read_op(ins, i, 1)?
    } else {
        1
    };
    Ok((c as u32) & if size == 8 { 0x3F } else { 0x1F })
}

pub fn shift(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = cx.op_size(ins, 0);
    let c = count(cx, ins, 1, size)?;
    let a = cx.read_rmw(ins, size)?;
    if c == 0 {
        // Flags untouched, but a 32-bit register destination is still zero-extended.
        return cx.write_op(ins, 0, size, a);
    }
    let bits = 8 * u32::from(size);
    let mask = size_mask(size);
    let msb = |v: u64| (v >> (bits - 1)) & 1 != 0;
    let cf_in = cx.s.flags.cf();
    let (res, flags, fmask) = match ins.mnemonic() {
        M::Shl | M::Sal => {
            let res = if c >= bits { 0 } else { (a << c) & mask };
            let cf = c <= bits && (a >> (bits - c)) & 1 != 0;
            let of = msb(res) ^ cf;
            (
                res,
                szp(res, size) | fl(cf, CF) | fl(of, OF),
                CF | OF | SF | ZF | PF,
            )
        }
        M::Shr => {
            let res = if c >= bits { 0 } else { a >> c };
            let cf = c <= bits && (a >> (c - 1)) & 1 != 0;
            let of = msb(a) && c == 1;
            (
                res,
                szp(res, size) | fl(cf, CF) | fl(of, OF),
                CF | OF | SF | ZF | PF,
            )
        }
        M::Sar => {
            let sa = sext(a, size) as i64;
            let res = (sa >> c.min(63)) as u64 & mask;
            let cf = (sa >> (c - 1).min(63)) & 1 != 0;
            (res, szp(res, size) | fl(cf, CF), CF | OF | SF | ZF | PF)
        }
        M::Rol => {
            let n = c % bits;
            let res = if n == 0 {
                a
            } else {
                ((a << n) | (a >> (bits - n))) & mask
            };
            let cf = res & 1 != 0;
            let of = msb(res) ^ cf;
            (res, fl(cf, CF) | fl(of, OF), CF | OF)
        }
        M::Ror => {
            let n = c % bits;
            let res = if n == 0 {
                a
            } else {
                ((a >> n) | (a << (bits - n))) & mask
            };
            let cf = msb(res);
            let of = msb(res) ^ ((res >> (bits - 2)) & 1 != 0);
            (res, fl(cf, CF) | fl(of, OF), CF | OF)
        }
        M::Rcl => {
            let w = bits + 1;
            let n = c % w;
            let x = (u128::from(cf_in) << bits) | u128::from(a);
            let wm = (1u128 << w) - 1;
            let x = if n == 0 {
                x
            } else {
                ((x << n) | (x >> (w - n))) & wm
            };
            let res = (x as u64) & mask;
            let cf = (x >> bits) & 1 != 0;
            let of = msb(res) ^ cf;
            (res, fl(cf, CF) | fl(of, OF), CF | OF)
        }
        _ => {
            // RCR
            let w = bits + 1;
            let n = c % w;
            let of = msb(a) ^ cf_in;
            let x = (u128::from(cf_in) << bits) | u128::from(a);
            let wm = (1u128 << w) - 1;
            let x = if n == 0 {
                x
            } else {
                ((x >> n) | (x << (w - n))) & wm
            };
            let res = (x as u64) & mask;
            let cf = (x >> bits) & 1 != 0;
            (res, fl(cf, CF) | fl(of, OF), CF | OF)
        }
    };
    cx.write_op(ins, 0, size, res)?;
    // Shifts define SF/ZF/PF/CF and clear AF (undefined by the SDM).
    let fmask = if fmask & ZF != 0 {
        fmask | crate::flags::AF
    } else {
        fmask
    };
    cx.s.flags.update_arith(fmask, flags);
    Ok(())
}

#[inline]
fn fl(b: bool, f: u64) -> u64 {
    if b {
        f
    } else {
        0
    }
}

pub fn shxd(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = cx.op_size(ins, 0);
    let c = count(cx, ins, 2, size)?;
    let src = cx.read_op(ins, 1, size)?;
    let a = cx.read_rmw(ins, size)?;
    if c == 0 {
        // Flags untouched, but a 32-bit register destination is still zero-extended.
        return cx.write_op(ins, 0, size, a);
    }
    let bits = 8 * u32::from(size);
    let mask = size_mask(size);
    // 128-bit concatenation; 16-bit counts above 16 (undefined by the SDM) shift in zeros.
    let (res, cf) = if ins.mnemonic() == M::Shld {
        let x = (u128::from(a) << (128 - bits)) | (u128::from(src) << (128 - 2 * bits));
        let r = (x << c) >> (128 - bits);
        let cf = (x >> (128 - c)) & 1 != 0;
        (r as u64 & mask, cf)
    } else {
        let x = (u128::from(src) << bits) | u128::from(a);
        let cf = (x >> (c - 1)) & 1 != 0;
        ((x >> c) as u64 & mask, cf)
    };
    let of = ((res ^ a) >> (bits - 1)) & 1 != 0;
    cx.write_op(ins, 0, size, res)?;
    cx.s.flags.update_arith(
        CF | OF | SF | ZF | PF | crate::flags::AF,
        szp(res, size) | fl(cf, CF) | fl(of, OF),
    );
    Ok(())
}
