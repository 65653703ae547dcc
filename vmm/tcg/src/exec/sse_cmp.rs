//! SSE/SSE2 float compares into masks: CMPPS, CMPPD, CMPSS, CMPSD (predicates 0-7).

use super::x87::check_fpu;
use super::{gp, ud, Ctx, R};
use crate::state::cr4;
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

fn xi(r: Register) -> Option<usize> {
    let n = r as usize;
    let b = Register::XMM0 as usize;
    (b..b + 16).contains(&n).then(|| n - b)
}

/// Operand `i`: an XMM register, or `size` bytes of memory (16 must be aligned).
fn src(cx: &mut Ctx<'_>, ins: &Instruction, i: u32, size: usize) -> R<u128> {
    if ins.op_kind(i) == OpKind::Register {
        return match xi(ins.op_register(i)) {
            Some(x) => Ok(cx.s.xmm[x]),
            None => ud(),
        };
    }
    let va = cx.ea(ins);
    if size == 16 && va & 15 != 0 {
        return gp(0);
    }
    let mut b = [0u8; 16];
    cx.read_bytes(va, &mut b[..size])?;
    Ok(u128::from_le_bytes(b))
}

/// Compare predicate `p` (0-7) on two values (NaN-aware: "unordered" if either is NaN).
pub fn predicate(p: u8, ord: Option<std::cmp::Ordering>) -> bool {
    use std::cmp::Ordering::*;
    match p & 7 {
        0 => ord == Some(Equal),
        1 => ord == Some(Less),
        2 => matches!(ord, Some(Less | Equal)),
        3 => ord.is_none(),
        4 => ord != Some(Equal),
        5 => !matches!(ord, Some(Less)),
        6 => !matches!(ord, Some(Less | Equal)),
        _ => ord.is_some(),
    }
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    check_fpu(cx)?;
    if cx.s.cr4 & cr4::OSFXSR == 0 {
        return ud();
    }
    let d = match (ins.op0_kind(), xi(ins.op0_register())) {
        (OpKind::Register, Some(x)) => x,
        _ => return ud(),
    };
    let m = ins.mnemonic();
    let p = ins.immediate(2) as u8;
    let (w, lanes, size) = match m {
        M::Cmpps => (32, 4, 16),
        M::Cmppd => (64, 2, 16),
        M::Cmpss => (32, 1, 4),
        _ => (64, 1, 8),
    };
    let a = cx.s.xmm[d];
    let b = src(cx, ins, 1, size)?;
    let mask = if w == 32 {
        u128::from(u32::MAX)
    } else {
        u128::from(u64::MAX)
    };
    let mut r = a;
    for i in 0..lanes {
        let sh = w * i;
        let ord = if w == 32 {
            let x = f32::from_bits((a >> sh) as u32);
            let y = f32::from_bits((b >> sh) as u32);
            x.partial_cmp(&y)
        } else {
            let x = f64::from_bits((a >> sh) as u64);
            let y = f64::from_bits((b >> sh) as u64);
            x.partial_cmp(&y)
        };
        let v = if predicate(p, ord) { mask } else { 0 };
        r = (r & !(mask << sh)) | (v << sh);
    }
    cx.s.xmm[d] = r;
    Ok(())
}
