//! AVX2 operations with no SSE counterpart: VPBLENDD, VPERMD/VPERMPS/VPERMQ/VPERMPD, the
//! variable shifts VPSLLV*/VPSRLV*/VPSRAVD, and the gathers (VGATHER*/VPGATHER*).

use super::avx::{dst, el, set_el, set_v, src, width};
use super::avx_legacy::{get_y, vreg};
use super::operand::get_reg;
use super::{ud, Ctx, R};
use iced_x86::{Instruction, Mnemonic as M, Register};

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
        M::Vgatherdps
        | M::Vgatherdpd
        | M::Vgatherqps
        | M::Vgatherqpd
        | M::Vpgatherdd
        | M::Vpgatherdq
        | M::Vpgatherqd
        | M::Vpgatherqq => gather(cx, ins)?,
        _ => return Ok(false),
    }
    Ok(true)
}

/// VGATHER*/VPGATHER*: elements are processed in order, those whose mask element has its
/// sign bit set loaded into the destination, and every processed element's mask element
/// cleared (set or not), so a fault on element k leaves elements < k done and the rest of
/// both registers untouched (no VEX.128 zeroing: as the host does it) and the instruction
/// restartable. On completion the whole mask register is zero, and so are the destination's
/// bits beyond the gathered elements. #UD when any two of the destination, index
/// and mask registers are the same.
fn gather(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let m = ins.mnemonic();
    let idx_q = matches!(
        m,
        M::Vgatherqps | M::Vgatherqpd | M::Vpgatherqd | M::Vpgatherqq
    );
    let data_q = matches!(
        m,
        M::Vgatherdpd | M::Vgatherqpd | M::Vpgatherdq | M::Vpgatherqq
    );
    let (Some((d, dy)), Some((k, ky)), Some((x, xy))) = (
        vreg(ins.op0_register()),
        vreg(ins.op2_register()),
        vreg(ins.memory_index()),
    ) else {
        return ud();
    };
    if d == k || d == x || k == x {
        return ud();
    }
    let (iw, dw) = (if idx_q { 64 } else { 32 }, if data_q { 64 } else { 32 });
    let n = (if xy { 256 } else { 128 } / iw).min(if dy { 256 } else { 128 } / dw);
    // Base + displacement (the index is a vector: added per element).
    let mut base = ins.memory_displacement64();
    let mut a32 = false;
    let b = ins.memory_base();
    if b != Register::None {
        a32 = b.is_gpr32();
        base = base.wrapping_add(get_reg(cx.s, b));
    }
    let scale = ins.memory_index_scale().trailing_zeros();
    let seg = cx.seg_base(ins.memory_segment());
    let index = get_y(cx, x);
    let mut v = get_y(cx, d);
    let mut mask = get_y(cx, k);
    for i in 0..n {
        if el(mask, dw, i) >> (dw - 1) != 0 {
            let off = el(index, iw, i);
            let off = if iw == 32 {
                off as u32 as i32 as i64 as u64
            } else {
                off
            };
            let mut ea = base.wrapping_add(off << scale);
            if a32 {
                ea &= 0xFFFF_FFFF;
            }
            match cx.read(seg.wrapping_add(ea), (dw / 8) as u8) {
                Ok(val) => set_el(&mut v, dw, i, val),
                Err(e) => {
                    // Only the completed elements change: no VEX.128 zeroing on a fault.
                    set_v(cx, d, true, v);
                    set_v(cx, k, true, mask);
                    return Err(e);
                }
            }
        }
        set_el(&mut mask, dw, i, 0);
    }
    // Elements beyond those gathered (QPS/PQD with a 128-bit index) are zero.
    for i in n..(if dy { 256 } else { 128 } / dw) {
        set_el(&mut v, dw, i, 0);
    }
    set_v(cx, d, dy, v);
    set_v(cx, k, ky, [0, 0]);
    Ok(())
}
