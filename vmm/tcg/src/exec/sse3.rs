//! SSE3 (but FISTTP, in `x87_stack`): ADDSUBPS/PD, HADDPS/PD, HSUBPS/PD, LDDQU, MOVDDUP,
//! MOVSHDUP, MOVSLDUP.

use super::x87::check_fpu;
use super::{gp, ud, Ctx, R};
use crate::state::cr4;
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

fn xi(r: Register) -> Option<usize> {
    let n = r as usize;
    let b = Register::XMM0 as usize;
    (b..b + 16).contains(&n).then(|| n - b)
}

fn l32(v: u128, i: u32) -> u32 {
    (v >> (32 * i)) as u32
}

fn l64(v: u128, i: u32) -> u64 {
    (v >> (64 * i)) as u64
}

fn from32(l: [u32; 4]) -> u128 {
    (0..4).fold(0u128, |v, i| v | (u128::from(l[i]) << (32 * i)))
}

fn from64(l: [u64; 2]) -> u128 {
    u128::from(l[0]) | (u128::from(l[1]) << 64)
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    check_fpu(cx)?;
    if cx.s.cr4 & cr4::OSFXSR == 0 {
        return ud();
    }
    let m = ins.mnemonic();
    let d = match (ins.op0_kind(), xi(ins.op0_register())) {
        (OpKind::Register, Some(x)) => x,
        _ => return ud(),
    };
    // Source: MOVDDUP reads 8 bytes, LDDQU 16 unaligned, the others 16 aligned.
    let b = if ins.op1_kind() == OpKind::Register {
        match xi(ins.op1_register()) {
            Some(x) => cx.s.xmm[x],
            None => return ud(),
        }
    } else {
        let va = cx.ea(ins);
        let size = if m == M::Movddup { 8 } else { 16 };
        if size == 16 && m != M::Lddqu && va & 15 != 0 {
            return gp(0);
        }
        let mut buf = [0u8; 16];
        cx.read_bytes(va, &mut buf[..size])?;
        u128::from_le_bytes(buf)
    };
    let a = cx.s.xmm[d];
    cx.s.xmm[d] = match m {
        M::Addsubps | M::Addsubpd | M::Haddps | M::Haddpd | M::Hsubps | M::Hsubpd => {
            super::sse_native::exec(cx, m, a, b, 0)?
        }
        M::Lddqu => b,
        M::Movddup => from64([l64(b, 0), l64(b, 0)]),
        M::Movshdup => from32([l32(b, 1), l32(b, 1), l32(b, 3), l32(b, 3)]),
        M::Movsldup => from32([l32(b, 0), l32(b, 0), l32(b, 2), l32(b, 2)]),
        _ => return ud(),
    };
    Ok(())
}
