//! AVX2 operations with no SSE counterpart: VPBLENDD, VPERMD/VPERMPS/VPERMQ/VPERMPD, the
//! variable shifts VPSLLV*/VPSRLV*/VPSRAVD, and the gathers (VGATHER*/VPGATHER*).

use super::avx::{dst, el, set_el, set_v, src, width};
use super::{Ctx, R};
use iced_x86::{Instruction, Mnemonic as M};

/// Runs `ins` if it is one of this module's instructions (`Ok(false)` otherwise).
pub(super) fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<bool> {
    let m = ins.mnemonic();
    match m {
        M::Vpblendd => {
            let (d, y) = dst(ins)?;
            let w = width(ins);
            let a = src(cx, ins, 1, w, false)?;
            let b = src(cx, ins, 2, w, false)?;
            let imm = ins.immediate(3);
            let mut r = a;
            for i in 0..(w as u32 / 4) {
                if imm >> i & 1 != 0 {
                    set_el(&mut r, 32, i, el(b, 32, i));
                }
            }
            set_v(cx, d, y, r);
        }
        M::Vpermd | M::Vpermps => {
            let (d, y) = dst(ins)?;
            let idx = src(cx, ins, 1, 32, false)?;
            let a = src(cx, ins, 2, 32, false)?;
            let mut r = [0u128; 2];
            for i in 0..8 {
                set_el(&mut r, 32, i, el(a, 32, el(idx, 32, i) as u32 & 7));
            }
            set_v(cx, d, y, r);
        }
        M::Vpermq | M::Vpermpd => {
            let (d, y) = dst(ins)?;
            let a = src(cx, ins, 1, 32, false)?;
            let imm = ins.immediate(2) as u32;
            let mut r = [0u128; 2];
            for i in 0..4 {
                set_el(&mut r, 64, i, el(a, 64, (imm >> (2 * i)) & 3));
            }
            set_v(cx, d, y, r);
        }
        M::Vpsllvd | M::Vpsllvq | M::Vpsrlvd | M::Vpsrlvq | M::Vpsravd => {
            let (d, y) = dst(ins)?;
            let w = width(ins);
            let a = src(cx, ins, 1, w, false)?;
            let c = src(cx, ins, 2, w, false)?;
            let ew: u32 = if matches!(m, M::Vpsllvq | M::Vpsrlvq) {
                64
            } else {
                32
            };
            let mut r = [0u128; 2];
            for i in 0..(w as u32 * 8 / ew) {
                let (x, n) = (el(a, ew, i), el(c, ew, i));
                let v = match m {
                    _ if n >= u64::from(ew) && m != M::Vpsravd => 0,
                    M::Vpsllvd | M::Vpsllvq => x << n,
                    M::Vpsrlvd | M::Vpsrlvq => x >> n,
                    _ => ((x as u32 as i32) >> n.min(31)) as u32 as u64,
                };
                set_el(&mut r, ew, i, v);
            }
            set_v(cx, d, y, r);
        }
        _ => return Ok(false),
    }
    Ok(true)
}
