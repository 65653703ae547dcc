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
    let size = match m {
        M::Cmpps | M::Cmppd => 16,
        M::Cmpss => 4,
        _ => 8,
    };
    let a = cx.s.xmm[d];
    let b = src(cx, ins, 1, size)?;
    let r = super::sse_native::exec(cx, m, a, b, p)?;
    cx.s.xmm[d] = r;
    Ok(())
}
