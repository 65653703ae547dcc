//! Minimal x87/MXCSR state handling: FNINIT, FNSTCW/FLDCW, FNSTSW, FNCLEX, FWAIT, EMMS,
//! LDMXCSR/STMXCSR, FXSAVE/FXRSTOR. No x87 arithmetic.

use super::{gp, vec, Ctx, Event, R};
use crate::state::{cr0, cr4, Fpu};
use iced_x86::{Instruction, Mnemonic as M, OpKind};

/// MXCSR bits this CPU accepts.
pub const MXCSR_MASK: u32 = 0xFFFF;

/// #NM / #UD checks for x87 and SSE state instructions.
pub fn check_fpu(cx: &Ctx<'_>) -> R<()> {
    if cx.s.cr0 & (cr0::TS | cr0::EM) != 0 {
        return Err(Event::fault(vec::NM, None));
    }
    Ok(())
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    check_fpu(cx)?;
    match ins.mnemonic() {
        M::Fninit => {
            let st = cx.s.fpu.st;
            cx.s.fpu = Fpu {
                st,
                ..Fpu::default()
            };
        }
        M::Fnstcw => cx.write_op(ins, 0, 2, u64::from(cx.s.fpu.fcw))?,
        M::Fldcw => cx.s.fpu.fcw = cx.read_op(ins, 0, 2)? as u16,
        M::Fnstsw => {
            let v = u64::from(cx.s.fpu.fsw);
            if ins.op0_kind() == OpKind::Register {
                cx.s.gpr[0] = (cx.s.gpr[0] & !0xFFFF) | v;
            } else {
                cx.write_op(ins, 0, 2, v)?;
            }
        }
        M::Fnclex => cx.s.fpu.fsw &= 0x7F00,
        M::Wait | M::Emms => {
            if ins.mnemonic() == M::Emms {
                cx.s.fpu.ftw = 0;
            }
        }
        M::Ldmxcsr | M::Stmxcsr => {
            if cx.s.cr4 & cr4::OSFXSR == 0 {
                return Err(Event::fault(vec::UD, None));
            }
            if ins.mnemonic() == M::Stmxcsr {
                cx.write_op(ins, 0, 4, u64::from(cx.s.mxcsr))?;
            } else {
                let v = cx.read_op(ins, 0, 4)? as u32;
                if v & !MXCSR_MASK != 0 {
                    return gp(0);
                }
                cx.s.mxcsr = v;
            }
        }
        M::Fxsave | M::Fxsave64 => fxsave(cx, ins)?,
        _ => fxrstor(cx, ins)?,
    }
    Ok(())
}

fn fxsave(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let va = cx.ea(ins);
    if va & 15 != 0 {
        return gp(0);
    }
    let img = fx_image(cx, ins.mnemonic() == M::Fxsave64);
    // Bytes 416-511 are reserved or left to software: like the hardware, not written.
    cx.write_bytes(va, &img[..416])
}

/// The FXSAVE image of the current x87/SSE state (also XSAVE's legacy region); `wide`: the
/// 64-bit format (REX.W: 64-bit FIP/FDP).
pub fn fx_image(cx: &Ctx<'_>, wide: bool) -> [u8; 512] {
    let mut img = [0u8; 512];
    let f = &cx.s.fpu;
    img[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    img[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    img[4] = f.ftw;
    img[6..8].copy_from_slice(&(f.fop & 0x7FF).to_le_bytes());
    if wide {
        img[8..16].copy_from_slice(&f.fip.to_le_bytes());
        img[16..24].copy_from_slice(&f.fdp.to_le_bytes());
    } else {
        // 32-bit format: FIP/FDP offsets with FCS/FDS (deprecated: stored as 0).
        img[8..12].copy_from_slice(&(f.fip as u32).to_le_bytes());
        img[16..20].copy_from_slice(&(f.fdp as u32).to_le_bytes());
    }
    img[24..28].copy_from_slice(&cx.s.mxcsr.to_le_bytes());
    img[28..32].copy_from_slice(&MXCSR_MASK.to_le_bytes());
    for i in 0..8 {
        // 80-bit registers; the 6 bytes above each are reserved (stored as 0).
        img[32 + 16 * i..42 + 16 * i].copy_from_slice(&f.st[i][..10]);
    }
    for i in 0..16 {
        img[160 + 16 * i..176 + 16 * i].copy_from_slice(&cx.s.xmm[i].to_le_bytes());
    }
    img
}

fn fxrstor(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let va = cx.ea(ins);
    if va & 15 != 0 {
        return gp(0);
    }
    let mut img = [0u8; 512];
    cx.read_bytes(va, &mut img)?;
    let mxcsr = u32::from_le_bytes([img[24], img[25], img[26], img[27]]);
    if mxcsr & !MXCSR_MASK != 0 {
        return gp(0);
    }
    fx_load(cx, &img, ins.mnemonic() == M::Fxrstor64);
    Ok(())
}

/// Loads the x87/SSE state from an FXSAVE image (MXCSR already validated); `wide`: the 64-bit
/// format.
pub fn fx_load(cx: &mut Ctx<'_>, img: &[u8; 512], wide: bool) {
    let u16at = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
    let mxcsr = u32::from_le_bytes([img[24], img[25], img[26], img[27]]);
    let mut st = [[0u8; 16]; 8];
    for (i, s) in st.iter_mut().enumerate() {
        s.copy_from_slice(&img[32 + 16 * i..48 + 16 * i]);
    }
    let mut q = [0u8; 8];
    q.copy_from_slice(&img[8..16]);
    let mut fip = u64::from_le_bytes(q);
    q.copy_from_slice(&img[16..24]);
    let mut fdp = u64::from_le_bytes(q);
    if !wide {
        // 32-bit format: the selectors above the offsets are not part of FIP/FDP.
        fip &= 0xFFFF_FFFF;
        fdp &= 0xFFFF_FFFF;
    } else {
        // The CPU keeps canonical (48-bit, sign-extended) pointers.
        fip = ((fip << 16) as i64 >> 16) as u64;
        fdp = ((fdp << 16) as i64 >> 16) as u64;
    }
    cx.s.fpu = Fpu {
        fcw: u16at(0),
        fsw: u16at(2),
        ftw: img[4],
        fop: u16at(6) & 0x7FF,
        fip,
        fdp,
        st,
    };
    cx.s.mxcsr = mxcsr;
    for i in 0..16 {
        let mut b = [0u8; 16];
        b.copy_from_slice(&img[160 + 16 * i..176 + 16 * i]);
        cx.s.xmm[i] = u128::from_le_bytes(b);
    }
}
