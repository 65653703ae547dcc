//! MMX (and the SSE/SSE2 instructions on MM registers): MM0-7 are the low 64 bits of the x87
//! registers R0-7. Every MMX instruction (but EMMS) empties the x87 stack into "MMX state":
//! TOP = 0 and all tags valid (abridged tag word 0xFF, as FXSAVE shows it); a write to MMn
//! also sets the exponent field of Rn to all ones.
//!
//! Lane-wise operations reuse the SSE2 table (`sse::int_binop`) on zero-extended operands:
//! each lane of the low 64 bits only depends on the same lanes of the inputs.

use super::operand::{get_reg, set_reg};
use super::sse::{int_binop, pack16, pshuf16_half, sat_i8, sat_u8, shift_lanes, unpack};
use super::{ud, vec, Ctx, Event, R};
use crate::state::{cr0, cr4};
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

fn mi(r: Register) -> Option<usize> {
    let n = r as usize;
    let b = Register::MM0 as usize;
    (b..b + 8).contains(&n).then(|| n - b)
}

fn xi(r: Register) -> Option<usize> {
    let n = r as usize;
    let b = Register::XMM0 as usize;
    (b..b + 16).contains(&n).then(|| n - b)
}

fn is_mm(ins: &Instruction, i: u32) -> bool {
    ins.op_kind(i) == OpKind::Register && mi(ins.op_register(i)).is_some()
}

/// True if an operand of `ins` is an MM register (selects this module at decode time).
pub fn uses_mm(ins: &Instruction) -> bool {
    (0..ins.op_count()).any(|i| is_mm(ins, i))
}

/// MMn (after [`enter_mmx`]).
pub fn get_mm(cx: &Ctx<'_>, i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&cx.s.fpu.st[i][..8]);
    u64::from_le_bytes(b)
}

/// MMn := v (the exponent of Rn becomes all ones).
pub fn set_mm(cx: &mut Ctx<'_>, i: usize, v: u64) {
    let r = &mut cx.s.fpu.st[i];
    r[..8].copy_from_slice(&v.to_le_bytes());
    r[8] = 0xFF;
    r[9] = 0xFF;
}

/// The x87 → MMX state transition (done before the instruction's operands are accessed).
/// `fpu.st` is in stack order (ST(i), as FXSAVE stores it) while MMi is the physical register
/// Ri = ST((i - TOP) mod 8): with TOP = 0 the two coincide, so the array is rotated once.
pub(super) fn enter_mmx(cx: &mut Ctx<'_>) {
    let top = usize::from((cx.s.fpu.fsw >> 11) & 7);
    let old = cx.s.fpu.st;
    for (i, r) in cx.s.fpu.st.iter_mut().enumerate() {
        *r = old[(i + 8 - top) & 7];
    }
    cx.s.fpu.ftw = 0xFF;
    cx.s.fpu.fsw &= !(7 << 11);
}

/// #UD with CR0.EM, #NM with CR0.TS.
pub(super) fn check_mmx(cx: &Ctx<'_>) -> R<()> {
    if cx.s.cr0 & cr0::EM != 0 {
        return ud();
    }
    if cx.s.cr0 & cr0::TS != 0 {
        return Err(Event::fault(vec::NM, None));
    }
    Ok(())
}

/// Reads operand `i` as 64 bits: MM, XMM (low half), GPR, or 8 bytes of memory.
fn src64(cx: &mut Ctx<'_>, ins: &Instruction, i: u32) -> R<u64> {
    match ins.op_kind(i) {
        OpKind::Register => {
            let r = ins.op_register(i);
            Ok(if let Some(m) = mi(r) {
                get_mm(cx, m)
            } else if let Some(x) = xi(r) {
                cx.s.xmm[x] as u64
            } else {
                get_reg(cx.s, r)
            })
        }
        OpKind::Memory => {
            let va = cx.ea(ins);
            cx.read(va, 8)
        }
        _ => Ok(ins.immediate(i)),
    }
}

/// Reads operand `i` as `size` bytes zero-extended (MM, GPR or memory).
fn src_n(cx: &mut Ctx<'_>, ins: &Instruction, i: u32, size: u8) -> R<u64> {
    let m = crate::flags::size_mask(size);
    if ins.op_kind(i) == OpKind::Memory {
        let va = cx.ea(ins);
        return cx.read(va, size);
    }
    Ok(src64(cx, ins, i)? & m)
}

fn dst_mm(ins: &Instruction) -> R<usize> {
    match (ins.op0_kind(), mi(ins.op0_register())) {
        (OpKind::Register, Some(m)) => Ok(m),
        _ => ud(),
    }
}

fn dst_xmm(ins: &Instruction) -> R<usize> {
    match (ins.op0_kind(), xi(ins.op0_register())) {
        (OpKind::Register, Some(x)) => Ok(x),
        _ => ud(),
    }
}

/// Writes a 64-bit result to operand 0 (MM, GPR or memory).
fn write64(cx: &mut Ctx<'_>, ins: &Instruction, size: u8, v: u64) -> R<()> {
    if let Some(m) = (ins.op0_kind() == OpKind::Register)
        .then(|| mi(ins.op0_register()))
        .flatten()
    {
        set_mm(cx, m, v);
        return Ok(());
    }
    cx.write_op(ins, 0, size, v)
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let m = ins.mnemonic();
    check_mmx(cx)?;
    if is_conversion(m) {
        if cx.s.cr4 & cr4::OSFXSR == 0 {
            return ud();
        }
        if uses_mm(ins) {
            enter_mmx(cx);
        }
        return conversions(cx, ins);
    }
    if !uses_mm(ins) {
        return ud();
    }
    enter_mmx(cx);
    ops(cx, ins)
}

fn ops(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let m = ins.mnemonic();
    match m {
        M::Movd => {
            let v = src_n(cx, ins, 1, 4)?;
            write64(cx, ins, 4, v)
        }
        M::Movq | M::Movntq => {
            let v = src64(cx, ins, 1)?;
            write64(cx, ins, 8, v)
        }
        M::Movdq2q => {
            let v = src64(cx, ins, 1)?;
            set_mm(cx, dst_mm(ins)?, v);
            Ok(())
        }
        M::Movq2dq => {
            let v = src64(cx, ins, 1)?;
            cx.s.xmm[dst_xmm(ins)?] = u128::from(v);
            Ok(())
        }
        M::Maskmovq => maskmovq(cx, ins),
        M::Pmovmskb => {
            let v = src64(cx, ins, 1)?;
            let r = (0..8).fold(0u64, |r, i| r | (((v >> (8 * i + 7)) & 1) << i));
            set_reg(cx.s, ins.op0_register(), r);
            Ok(())
        }
        M::Pextrw => {
            let v = src64(cx, ins, 1)?;
            let w = (v >> (16 * (ins.immediate(2) & 3))) & 0xFFFF;
            set_reg(cx.s, ins.op0_register(), w);
            Ok(())
        }
        M::Pinsrw => {
            let d = dst_mm(ins)?;
            let w = src_n(cx, ins, 1, 2)?;
            let sh = 16 * (ins.immediate(2) & 3);
            let v = (get_mm(cx, d) & !(0xFFFF << sh)) | (w << sh);
            set_mm(cx, d, v);
            Ok(())
        }
        M::Pshufw => {
            let d = dst_mm(ins)?;
            let s = src64(cx, ins, 1)?;
            let v = pshuf16_half(u128::from(s), ins.immediate(2) as u8, false) as u64;
            set_mm(cx, d, v);
            Ok(())
        }
        M::Psllw | M::Pslld | M::Psllq | M::Psrlw | M::Psrld | M::Psrlq | M::Psraw | M::Psrad => {
            let d = dst_mm(ins)?;
            let count = match ins.op1_kind() {
                OpKind::Register | OpKind::Memory => src64(cx, ins, 1)?,
                _ => ins.immediate(1) & 0xFF,
            };
            let (w, kind) = match m {
                M::Psllw => (16, 0),
                M::Pslld => (32, 0),
                M::Psllq => (64, 0),
                M::Psrlw => (16, 1),
                M::Psrld => (32, 1),
                M::Psrlq => (64, 1),
                M::Psraw => (16, 2),
                _ => (32, 2),
            };
            let v = shift_lanes(u128::from(get_mm(cx, d)), w, count, kind) as u64;
            set_mm(cx, d, v);
            Ok(())
        }
        _ => {
            let d = dst_mm(ins)?;
            let a = get_mm(cx, d);
            let b = src64(cx, ins, 1)?;
            let v = binop(m, a, b).map_or_else(ud, Ok)?;
            set_mm(cx, d, v);
            Ok(())
        }
    }
}

/// Two-operand MMX arithmetic; `None` for mnemonics that are not MMX instructions.
fn binop(m: M, a: u64, b: u64) -> Option<u64> {
    let (a, b) = (u128::from(a), u128::from(b));
    // Both inputs side by side: packs take their first half from `a`, the second from `b`.
    let ab = a | (b << 64);
    Some(match m {
        M::Punpckhbw => unpack(a >> 32, b >> 32, 8, false) as u64,
        M::Punpckhwd => unpack(a >> 32, b >> 32, 16, false) as u64,
        M::Punpckhdq => unpack(a >> 32, b >> 32, 32, false) as u64,
        M::Punpcklbw | M::Punpcklwd | M::Punpckldq => int_binop(m)?(a, b) as u64,
        M::Packsswb => pack16(ab, 0, sat_i8) as u64,
        M::Packuswb => pack16(ab, 0, sat_u8) as u64,
        M::Packssdw => int_binop(m)?(ab, 0) as u64,
        M::Paddb
        | M::Paddw
        | M::Paddd
        | M::Paddq
        | M::Psubb
        | M::Psubw
        | M::Psubd
        | M::Psubq
        | M::Paddusb
        | M::Paddusw
        | M::Psubusb
        | M::Psubusw
        | M::Paddsb
        | M::Paddsw
        | M::Psubsb
        | M::Psubsw
        | M::Pcmpeqb
        | M::Pcmpeqw
        | M::Pcmpeqd
        | M::Pcmpgtb
        | M::Pcmpgtw
        | M::Pcmpgtd
        | M::Pand
        | M::Pandn
        | M::Por
        | M::Pxor
        | M::Pmullw
        | M::Pmulhw
        | M::Pmulhuw
        | M::Pmuludq
        | M::Pmaddwd
        | M::Pavgb
        | M::Pavgw
        | M::Pminub
        | M::Pmaxub
        | M::Pminsw
        | M::Pmaxsw
        | M::Psadbw => int_binop(m)?(a, b) as u64,
        _ => return None,
    })
}

/// MASKMOVQ: stores the bytes of the first source selected by the sign bits of the second
/// to DS:[RDI] (EDI with a 32-bit address size).
fn maskmovq(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let mut regs = (0..ins.op_count()).filter(|&i| is_mm(ins, i));
    let (Some(si), Some(mi_)) = (regs.next(), regs.next()) else {
        return ud();
    };
    let data = src64(cx, ins, si)?;
    let mask = src64(cx, ins, mi_)?;
    let a32 = (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::MemorySegEDI);
    let mut addr = cx.s.gpr[7];
    if a32 {
        addr &= 0xFFFF_FFFF;
    }
    let base = cx.seg_base(ins.memory_segment());
    for i in 0..8 {
        if (mask >> (8 * i + 7)) & 1 != 0 {
            let va = base.wrapping_add(addr).wrapping_add(i);
            cx.write(va, 1, (data >> (8 * i)) & 0xFF)?;
        }
    }
    Ok(())
}

fn is_conversion(m: M) -> bool {
    matches!(
        m,
        M::Cvtpi2ps | M::Cvtpi2pd | M::Cvtps2pi | M::Cvttps2pi | M::Cvtpd2pi | M::Cvttpd2pi
    )
}

/// CVTPI2PS/PD, CVT(T)PS2PI, CVT(T)PD2PI.
fn conversions(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let m = ins.mnemonic();
    match m {
        M::Cvtpi2ps | M::Cvtpi2pd => {
            let d = dst_xmm(ins)?;
            let s = src64(cx, ins, 1)?;
            let lo = s as u32 as i32;
            let hi = (s >> 32) as u32 as i32;
            cx.s.xmm[d] = if m == M::Cvtpi2ps {
                // CVTDQ2PS on the two integers (the upper lanes, 0, convert exactly).
                let v = super::sse_native::exec(cx, M::Cvtdq2ps, 0, u128::from(s), 0)?;
                (cx.s.xmm[d] & !u128::from(u64::MAX)) | (v & u128::from(u64::MAX))
            } else {
                u128::from(f64::from(lo).to_bits()) | (u128::from(f64::from(hi).to_bits()) << 64)
            };
        }
        M::Cvtps2pi | M::Cvttps2pi => {
            let d = dst_mm(ins)?;
            let s = src64(cx, ins, 1)?;
            // CVT(T)PS2DQ on the two floats (the upper lanes, +0.0, convert exactly).
            let op = if m == M::Cvttps2pi {
                M::Cvttps2dq
            } else {
                M::Cvtps2dq
            };
            let v = super::sse_native::exec(cx, op, 0, u128::from(s), 0)?;
            set_mm(cx, d, v as u64);
        }
        _ => {
            let d = dst_mm(ins)?;
            let s = match ins.op1_kind() {
                OpKind::Register => match xi(ins.op1_register()) {
                    Some(x) => cx.s.xmm[x],
                    None => return ud(),
                },
                _ => {
                    let va = cx.ea(ins);
                    if va & 15 != 0 {
                        return super::gp(0);
                    }
                    let mut b = [0u8; 16];
                    cx.read_bytes(va, &mut b)?;
                    u128::from_le_bytes(b)
                }
            };
            let op = if m == M::Cvttpd2pi {
                M::Cvttpd2dq
            } else {
                M::Cvtpd2dq
            };
            let v = super::sse_native::exec(cx, op, 0, s, 0)?;
            set_mm(cx, d, v as u64);
        }
    }
    Ok(())
}
