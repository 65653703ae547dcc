//! Bit test and scan instructions: BT/BTS/BTR/BTC, BSF/BSR, TZCNT/LZCNT/POPCNT.

use super::operand::{get_reg, set_reg, sext};
use super::{Ctx, R};
use crate::flags::{size_mask, CF, ZF};
use iced_x86::{Instruction, Mnemonic as M, OpKind};

pub fn bt(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = cx.op_size(ins, 0);
    let bits = 8 * u64::from(size);
    let off = cx.read_op(ins, 1, size)?;
    let m = ins.mnemonic();
    let modify = m != M::Bt;
    let (val, bit, va) = match ins.op0_kind() {
        OpKind::Register => (get_reg(cx.s, ins.op0_register()), off & (bits - 1), None),
        _ => {
            let mut va = cx.ea(ins);
            let bit = if ins.op1_kind() == OpKind::Register {
                // Register bit offsets are signed and may address beyond the operand.
                let soff = sext(off, size) as i64;
                let words = soff.div_euclid(bits as i64);
                va = va.wrapping_add((words * (bits as i64 / 8)) as u64);
                soff.rem_euclid(bits as i64) as u64
            } else {
                off & (bits - 1)
            };
            if modify && ins.has_lock_prefix() {
                let old = cx.atomic_rmw(va, size, |v| {
                    Some(match m {
                        M::Bts => v | (1 << bit),
                        M::Btr => v & !(1 << bit),
                        _ => v ^ (1 << bit),
                    })
                })?;
                let cf = (old >> bit) & 1 != 0;
                cx.s.flags.update_arith(CF, if cf { CF } else { 0 });
                return Ok(());
            }
            if modify {
                cx.check_write(va, size as usize)?;
            }
            (cx.read(va, size)?, bit, Some(va))
        }
    };
    let cf = (val >> bit) & 1 != 0;
    if modify {
        let new = match m {
            M::Bts => val | (1 << bit),
            M::Btr => val & !(1 << bit),
            _ => val ^ (1 << bit),
        } & size_mask(size);
        match va {
            Some(va) => cx.write(va, size, new)?,
            None => set_reg(cx.s, ins.op0_register(), new),
        }
    }
    cx.s.flags.update_arith(CF, if cf { CF } else { 0 });
    Ok(())
}

pub fn scan(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = cx.op_size(ins, 0);
    let bits = 8 * u32::from(size);
    let src = cx.read_op(ins, 1, size)?;
    let r = ins.op0_register();
    match ins.mnemonic() {
        M::Bsf | M::Bsr => {
            if src == 0 {
                // Destination unchanged (AMD-documented, Intel-observed behaviour).
                cx.s.flags.update_arith(ZF | CF, ZF);
                return Ok(());
            }
            let v = if ins.mnemonic() == M::Bsf {
                src.trailing_zeros()
            } else {
                63 - src.leading_zeros()
            };
            set_reg(cx.s, r, u64::from(v));
            cx.s.flags.update_arith(ZF | CF, 0);
        }
        M::Tzcnt | M::Lzcnt => {
            let v = if src == 0 {
                bits
            } else if ins.mnemonic() == M::Tzcnt {
                src.trailing_zeros()
            } else {
                src.leading_zeros() - (64 - bits)
            };
            set_reg(cx.s, r, u64::from(v));
            let f = (if src == 0 { CF } else { 0 }) | (if v == 0 { ZF } else { 0 });
            cx.s.flags.update_arith(ZF | CF, f);
        }
        _ => {
            set_reg(cx.s, r, u64::from(src.count_ones()));
            cx.s.flags.set_arith(if src == 0 { ZF } else { 0 });
        }
    }
    Ok(())
}
