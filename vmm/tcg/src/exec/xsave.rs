//! XSAVE feature set for the x87, SSE and AVX state components: XGETBV/XSETBV (XCR0), XSAVE and
//! XRSTOR in the standard format (no XSAVEOPT/XSAVEC/XSAVES, no compacted format). The legacy
//! region is the FXSAVE image (`x87::fx_image`/`x87::fx_load`).

use super::x87::{fx_image, fx_load, MXCSR_MASK};
use super::{gp, ud, Ctx, R};
use crate::cpuid::{XCR0_SUPPORTED, XSAVE_AVX_OFFSET, XSAVE_AVX_SIZE};
use crate::state::{cr4, Fpu};
use iced_x86::{Instruction, Mnemonic as M};

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    if cx.s.cr4 & cr4::OSXSAVE == 0 {
        return ud();
    }
    let m = ins.mnemonic();
    match m {
        M::Xgetbv => {
            let v = match cx.s.gpr[1] as u32 {
                0 => cx.s.xcr0,
                _ => return gp(0),
            };
            cx.s.gpr[0] = v & 0xFFFF_FFFF;
            cx.s.gpr[2] = v >> 32;
            Ok(())
        }
        M::Xsetbv => {
            let v = (cx.s.gpr[2] << 32) | (cx.s.gpr[0] & 0xFFFF_FFFF);
            if cx.s.cpl() != 0 || cx.s.gpr[1] as u32 != 0 || v & 1 == 0 {
                return gp(0);
            }
            // SSE must be enabled with AVX.
            if v & !XCR0_SUPPORTED != 0 || v & 6 == 4 {
                return gp(0);
            }
            cx.s.xcr0 = v;
            Ok(())
        }
        _ => {
            super::x87::check_fpu(cx)?;
            let va = cx.ea(ins);
            if va & 63 != 0 {
                return gp(0);
            }
            let rfbm = cx.s.xcr0 & ((cx.s.gpr[2] << 32) | (cx.s.gpr[0] & 0xFFFF_FFFF));
            // REX.W: the 64-bit format of the legacy region's FIP/FDP.
            let wide = matches!(m, M::Xsave64 | M::Xrstor64);
            if matches!(m, M::Xsave | M::Xsave64) {
                xsave(cx, va, rfbm, wide)
            } else {
                xrstor(cx, va, rfbm, wide)
            }
        }
    }
}

fn xsave(cx: &mut Ctx<'_>, va: u64, rfbm: u64, wide: bool) -> R<()> {
    let img = fx_image(cx, wide);
    let len = if rfbm & 4 != 0 {
        (XSAVE_AVX_OFFSET + XSAVE_AVX_SIZE) as usize
    } else {
        512 + 64
    };
    cx.check_write(va, len)?;
    if rfbm & 1 != 0 {
        cx.write_bytes(va, &img[..24])?;
        cx.write_bytes(va + 32, &img[32..160])?;
    }
    if rfbm & 2 != 0 {
        cx.write_bytes(va + 160, &img[160..416])?;
    }
    if rfbm & 6 != 0 {
        // MXCSR and MXCSR_MASK go with the SSE (or AVX) component.
        cx.write_bytes(va + 24, &img[24..32])?;
    }
    if rfbm & 4 != 0 {
        let mut b = [0u8; XSAVE_AVX_SIZE as usize];
        for (i, h) in cx.s.ymmh.iter().enumerate() {
            b[16 * i..16 * i + 16].copy_from_slice(&h.to_le_bytes());
        }
        cx.write_bytes(va + u64::from(XSAVE_AVX_OFFSET), &b)?;
    }
    // XSTATE_BV: every saved component is reported in use (allowed: no init tracking).
    let old = cx.read(va + 512, 8)?;
    cx.write(va + 512, 8, (old & !rfbm) | rfbm)
}

fn xrstor(cx: &mut Ctx<'_>, va: u64, rfbm: u64, wide: bool) -> R<()> {
    let mut hdr = [0u8; 64];
    cx.read_bytes(va + 512, &mut hdr)?;
    let q = |i: usize| u64::from_le_bytes(hdr[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]));
    let xstate_bv = q(0);
    // Compacted format (XCOMP_BV[63]) is not supported; reserved header bytes must be zero;
    // components outside XCR0 cannot be restored.
    if q(1) != 0 || hdr[16..].iter().any(|&b| b != 0) || xstate_bv & !cx.s.xcr0 != 0 {
        return gp(0);
    }
    let mut img = [0u8; 512];
    cx.read_bytes(va, &mut img)?;
    let mut avx = [0u8; XSAVE_AVX_SIZE as usize];
    if rfbm & xstate_bv & 4 != 0 {
        cx.read_bytes(va + u64::from(XSAVE_AVX_OFFSET), &mut avx)?;
    }
    let mxcsr = u32::from_le_bytes([img[24], img[25], img[26], img[27]]);
    if rfbm & 6 != 0 && mxcsr & !MXCSR_MASK != 0 {
        return gp(0);
    }
    // Start from the current state and replace what the request covers.
    let mut cur = fx_image(cx, wide);
    if rfbm & 1 != 0 {
        if xstate_bv & 1 != 0 {
            cur[..24].copy_from_slice(&img[..24]);
            cur[32..160].copy_from_slice(&img[32..160]);
        } else {
            let init = Fpu::default();
            let st = [[0u8; 16]; 8];
            cx.s.fpu = Fpu { st, ..init };
            let fresh = fx_image(cx, wide);
            cur[..24].copy_from_slice(&fresh[..24]);
            cur[32..160].copy_from_slice(&fresh[32..160]);
        }
    }
    if rfbm & 2 != 0 {
        if xstate_bv & 2 != 0 {
            cur[160..416].copy_from_slice(&img[160..416]);
        } else {
            cur[160..416].fill(0);
        }
    }
    if rfbm & 6 != 0 {
        cur[24..28].copy_from_slice(&img[24..28]);
    }
    fx_load(cx, &cur, wide);
    if rfbm & 4 != 0 {
        // Not in XSTATE_BV: the init state (zero); `avx` was left zero.
        for (i, h) in cx.s.ymmh.iter_mut().enumerate() {
            let mut b = [0u8; 16];
            b.copy_from_slice(&avx[16 * i..16 * i + 16]);
            *h = u128::from_le_bytes(b);
        }
    }
    Ok(())
}
