//! AVX: VEX-encoded instructions on XMM/YMM registers. The availability checks (CR4.OSXSAVE,
//! XCR0 x87|SSE|AVX, CR0.TS), data movement (VMOV*, VBROADCAST*, VINSERT/VEXTRACT*128,
//! VPERM2*128, VPERMIL*, VMASKMOV*, VZEROUPPER/VZEROALL), the AVX-only operations (VTEST*,
//! VBLENDV*, 256-bit VMOVMSK*, VCMP* with its 32 predicates) and the dispatch: VEX forms of the
//! SSE-SSE4.2 instructions go through [`super::avx_legacy`], AVX2 to [`super::avx2`], FMA and
//! F16C to [`super::fma`].

use super::avx_legacy::{get_y, vreg};
use super::operand::{get_reg, set_reg};
use super::{gp, ud, vec, Ctx, Event, R};
use crate::flags::{CF, ZF};
use crate::state::{cr0, cr4};
use iced_x86::{EncodingKind, Instruction, Mnemonic as M, OpKind};

pub(super) type Y = [u128; 2];

/// Whether `ins` is a VEX instruction of the AVX family (anything VEX-encoded but BMI1/BMI2).
pub(super) fn is_avx(ins: &Instruction) -> bool {
    ins.encoding() == EncodingKind::VEX
        && !matches!(
            ins.mnemonic(),
            M::Andn
                | M::Bextr
                | M::Blsi
                | M::Blsmsk
                | M::Blsr
                | M::Bzhi
                | M::Mulx
                | M::Pdep
                | M::Pext
                | M::Rorx
                | M::Sarx
                | M::Shlx
                | M::Shrx
        )
}

/// #UD unless the OS enabled AVX state (CR4.OSXSAVE, XCR0 SSE and AVX); #NM when CR0.TS.
pub(super) fn check_avx(cx: &Ctx<'_>) -> R<()> {
    if cx.s.cr4 & cr4::OSXSAVE == 0 || cx.s.xcr0 & 6 != 6 {
        return ud();
    }
    if cx.s.cr0 & cr0::TS != 0 {
        return Err(Event::fault(vec::NM, None));
    }
    Ok(())
}

/// Writes a vector register with VEX semantics: an XMM write zeroes bits 255:128.
pub(super) fn set_v(cx: &mut Ctx<'_>, i: usize, ymm: bool, v: Y) {
    cx.s.xmm[i] = v[0];
    cx.s.ymmh[i] = if ymm { v[1] } else { 0 };
}

/// The destination register of `ins` (operand 0): index and whether it is a YMM register.
pub(super) fn dst(ins: &Instruction) -> R<(usize, bool)> {
    match (ins.op0_kind(), vreg(ins.op0_register())) {
        (OpKind::Register, Some(d)) => Ok(d),
        _ => ud(),
    }
}

/// Reads operand `i`: a vector register (an XMM one zero-extended), or `size` bytes of
/// memory (`align`: #GP unless aligned to `size`).
pub(super) fn src(cx: &mut Ctx<'_>, ins: &Instruction, i: u32, size: usize, align: bool) -> R<Y> {
    if ins.op_kind(i) == OpKind::Register {
        return match vreg(ins.op_register(i)) {
            Some((x, true)) => Ok(get_y(cx, x)),
            Some((x, false)) => Ok([cx.s.xmm[x], 0]),
            None => ud(),
        };
    }
    let va = cx.ea(ins);
    if align && va & (size as u64 - 1) != 0 {
        return gp(0);
    }
    let mut b = [0u8; 32];
    cx.read_bytes(va, &mut b[..size.min(32)])?;
    Ok(from_bytes(&b))
}

pub(super) fn from_bytes(b: &[u8; 32]) -> Y {
    let mut lo = [0u8; 16];
    let mut hi = [0u8; 16];
    lo.copy_from_slice(&b[..16]);
    hi.copy_from_slice(&b[16..]);
    [u128::from_le_bytes(lo), u128::from_le_bytes(hi)]
}

pub(super) fn to_bytes(v: Y) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..16].copy_from_slice(&v[0].to_le_bytes());
    b[16..].copy_from_slice(&v[1].to_le_bytes());
    b
}

/// Operand width in bytes of a vector instruction: 32 for VEX.256 (YMM destination or
/// source), else 16.
pub(super) fn width(ins: &Instruction) -> usize {
    let y = (0..ins.op_count()).any(|i| {
        ins.op_kind(i) == OpKind::Register && vreg(ins.op_register(i)).is_some_and(|(_, y)| y)
    });
    if y {
        32
    } else {
        16
    }
}

/// Element `i` of width `w` bits of a 256-bit value.
pub(super) fn el(v: Y, w: u32, i: u32) -> u64 {
    let bit = w * i;
    let half = v[(bit / 128) as usize & 1];
    let x = (half >> (bit % 128)) as u64;
    if w == 64 {
        x
    } else {
        x & ((1u64 << w) - 1)
    }
}

/// `v` with element `i` (width `w`) set to `x`.
pub(super) fn set_el(v: &mut Y, w: u32, i: u32, x: u64) {
    let bit = w * i;
    let h = (bit / 128) as usize & 1;
    let m = if w == 64 {
        u128::from(u64::MAX)
    } else {
        (1u128 << w) - 1
    };
    let sh = bit % 128;
    v[h] = (v[h] & !(m << sh)) | ((u128::from(x) & m) << sh);
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    check_avx(cx)?;
    let m = ins.mnemonic();
    match m {
        M::Vzeroupper => cx.s.ymmh = [0; 16],
        M::Vzeroall => {
            cx.s.ymmh = [0; 16];
            cx.s.xmm = [0; 16];
        }
        M::Vldmxcsr => {
            let va = cx.ea(ins);
            let v = cx.read(va, 4)? as u32;
            if v & !super::x87::MXCSR_MASK != 0 {
                return gp(0);
            }
            cx.s.mxcsr = v;
        }
        M::Vstmxcsr => {
            let va = cx.ea(ins);
            cx.write(va, 4, u64::from(cx.s.mxcsr))?;
        }
        M::Vmovaps
        | M::Vmovapd
        | M::Vmovdqa
        | M::Vmovntps
        | M::Vmovntpd
        | M::Vmovntdq
        | M::Vmovntdqa
        | M::Vmovups
        | M::Vmovupd
        | M::Vmovdqu
        | M::Vlddqu => {
            let w = width(ins);
            let align = !matches!(m, M::Vmovups | M::Vmovupd | M::Vmovdqu | M::Vlddqu);
            let v = src(cx, ins, 1, w, align)?;
            store(cx, ins, w, align, v)?;
        }
        M::Vbroadcastss | M::Vbroadcastsd | M::Vpbroadcastb | M::Vpbroadcastw => {
            broadcast(cx, ins)?
        }
        M::Vpbroadcastd | M::Vpbroadcastq | M::Vbroadcastf128 | M::Vbroadcasti128 => {
            broadcast(cx, ins)?
        }
        M::Vinsertf128 | M::Vinserti128 => {
            let (d, _) = dst(ins)?;
            let mut a = src(cx, ins, 1, 32, false)?;
            let b = src(cx, ins, 2, 16, false)?;
            a[(ins.immediate(3) & 1) as usize] = b[0];
            set_v(cx, d, true, a);
        }
        M::Vextractf128 | M::Vextracti128 => {
            let a = src(cx, ins, 1, 32, false)?;
            let v = [a[(ins.immediate(2) & 1) as usize], 0];
            store(cx, ins, 16, false, v)?;
        }
        M::Vperm2f128 | M::Vperm2i128 => {
            let (d, _) = dst(ins)?;
            let a = src(cx, ins, 1, 32, false)?;
            let b = src(cx, ins, 2, 32, false)?;
            let imm = ins.immediate(3) as u8;
            let pick = |c: u8| -> u128 {
                if c & 8 != 0 {
                    return 0;
                }
                match c & 3 {
                    0 => a[0],
                    1 => a[1],
                    2 => b[0],
                    _ => b[1],
                }
            };
            set_v(cx, d, true, [pick(imm), pick(imm >> 4)]);
        }
        M::Vpermilps | M::Vpermilpd => permil(cx, ins)?,
        M::Vtestps | M::Vtestpd | M::Vptest => {
            let w = width(ins);
            let a = src(cx, ins, 0, w, false)?;
            let b = src(cx, ins, 1, w, false)?;
            let sign: u128 = match m {
                M::Vtestps => 0x8000_0000_8000_0000_8000_0000_8000_0000,
                M::Vtestpd => 0x8000_0000_0000_0000_8000_0000_0000_0000,
                _ => u128::MAX,
            };
            let z = (a[0] & b[0] | a[1] & b[1]) & sign == 0;
            let c = (!a[0] & b[0] | !a[1] & b[1]) & sign == 0;
            cx.s.flags
                .set_arith(if z { ZF } else { 0 } | if c { CF } else { 0 });
        }
        M::Vblendvps | M::Vblendvpd | M::Vpblendvb => {
            let (d, y) = dst(ins)?;
            let w = width(ins);
            let a = src(cx, ins, 1, w, false)?;
            let b = src(cx, ins, 2, w, false)?;
            let mask = src(cx, ins, 3, w, false)?;
            let ew = match m {
                M::Vblendvps => 32,
                M::Vblendvpd => 64,
                _ => 8,
            };
            let mut r = a;
            for i in 0..(w as u32 * 8 / ew) {
                if el(mask, ew, i) >> (ew - 1) != 0 {
                    set_el(&mut r, ew, i, el(b, ew, i));
                }
            }
            set_v(cx, d, y, r);
        }
        M::Vmaskmovps | M::Vmaskmovpd | M::Vpmaskmovd | M::Vpmaskmovq => maskmov(cx, ins)?,
        M::Vmovmskps | M::Vmovmskpd | M::Vpmovmskb if width(ins) == 32 => {
            let a = src(cx, ins, 1, 32, false)?;
            let ew = match m {
                M::Vmovmskps => 32,
                M::Vmovmskpd => 64,
                _ => 8,
            };
            let mut r = 0u64;
            for i in 0..256 / ew {
                r |= (el(a, ew, i) >> (ew - 1)) << i;
            }
            set_reg(cx.s, ins.op0_register(), r);
        }
        M::Vcmpps | M::Vcmppd | M::Vcmpss | M::Vcmpsd => super::avx_cmp::exec(cx, ins)?,
        M::Vmovss | M::Vmovsd if ins.op_count() == 3 && ins.op2_kind() == OpKind::Register => {
            // Register forms (0F10 and 0F11): the low element of operand 2, the rest of
            // operand 1's low 128 bits.
            let (d, _) = dst(ins)?;
            let a = src(cx, ins, 1, 16, false)?[0];
            let b = src(cx, ins, 2, 16, false)?[0];
            let lo: u128 = if m == M::Vmovss {
                0xFFFF_FFFF
            } else {
                u128::from(u64::MAX)
            };
            set_v(cx, d, false, [(a & !lo) | (b & lo), 0]);
        }
        M::Vmaskmovdqu => {
            // Bytes of operand 1 whose operand-2 byte has its sign bit set, to [DS:rDI].
            let v = src(cx, ins, 1, 16, false)?[0];
            let mask = src(cx, ins, 2, 16, false)?[0];
            let mut di = get_reg(cx.s, iced_x86::Register::RDI);
            if ins.op0_kind() == OpKind::MemorySegEDI {
                di &= 0xFFFF_FFFF;
            }
            let va = cx.seg_base(ins.memory_segment()).wrapping_add(di);
            for i in 0..16 {
                if (mask >> (8 * i + 7)) & 1 != 0 {
                    cx.check_write(va.wrapping_add(i), 1)?;
                }
            }
            for i in 0..16 {
                if (mask >> (8 * i + 7)) & 1 != 0 {
                    cx.write(va.wrapping_add(i), 1, (v >> (8 * i)) as u64 & 0xFF)?;
                }
            }
        }
        _ => {
            if super::avx2::exec(cx, ins)?
                || super::fma::exec(cx, ins)?
                || super::avx_legacy::exec(cx, ins)?
            {
                return Ok(());
            }
            return ud();
        }
    }
    Ok(())
}

/// Writes a `w`-byte result to operand 0 (register: VEX zeroing; memory: `align` checked).
fn store(cx: &mut Ctx<'_>, ins: &Instruction, w: usize, align: bool, v: Y) -> R<()> {
    if ins.op0_kind() == OpKind::Register {
        let (d, y) = dst(ins)?;
        set_v(cx, d, y, v);
        return Ok(());
    }
    let va = cx.ea(ins);
    if align && va & (w as u64 - 1) != 0 {
        return gp(0);
    }
    cx.write_bytes(va, &to_bytes(v)[..w])
}

fn broadcast(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let (d, y) = dst(ins)?;
    let ew = match ins.mnemonic() {
        M::Vpbroadcastb => 8,
        M::Vpbroadcastw => 16,
        M::Vbroadcastss | M::Vpbroadcastd => 32,
        M::Vbroadcastsd | M::Vpbroadcastq => 64,
        _ => 128,
    };
    let s = src(cx, ins, 1, ew as usize / 8, false)?;
    let mut r = [0u128; 2];
    if ew == 128 {
        r = [s[0], s[0]];
    } else {
        let x = el(s, ew, 0);
        for i in 0..256 / ew {
            set_el(&mut r, ew, i, x);
        }
    }
    set_v(cx, d, y, r);
    Ok(())
}

fn permil(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let (d, y) = dst(ins)?;
    let w = width(ins);
    let ps = ins.mnemonic() == M::Vpermilps;
    let (ew, n) = if ps {
        (32, w as u32 / 4)
    } else {
        (64, w as u32 / 8)
    };
    let per_lane = 128 / ew;
    let imm_form = ins.op_kind(2) != OpKind::Register && ins.op_kind(2) != OpKind::Memory;
    let (a, ctl) = if imm_form {
        (src(cx, ins, 1, w, false)?, None)
    } else {
        (src(cx, ins, 1, w, false)?, Some(src(cx, ins, 2, w, false)?))
    };
    let imm = if imm_form { ins.immediate(2) as u32 } else { 0 };
    let mut r = [0u128; 2];
    for i in 0..n {
        let lane = i / per_lane;
        let sel = match (ps, ctl) {
            (true, Some(c)) => el(c, 32, i) as u32 & 3,
            (false, Some(c)) => (el(c, 64, i) as u32 >> 1) & 1,
            (true, None) => (imm >> (2 * (i % 4))) & 3,
            (false, None) => (imm >> i) & 1,
        };
        set_el(&mut r, ew, i, el(a, ew, lane * per_lane + sel));
    }
    set_v(cx, d, y, r);
    Ok(())
}

/// VMASKMOVPS/PD, VPMASKMOVD/Q: elements whose mask sign bit is clear are neither read
/// (loaded as zero) nor written, and cannot fault.
fn maskmov(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let m = ins.mnemonic();
    let w = width(ins);
    let ew: u32 = if matches!(m, M::Vmaskmovps | M::Vpmaskmovd) {
        32
    } else {
        64
    };
    let n = w as u32 * 8 / ew;
    let bytes = (ew / 8) as u8;
    let va = cx.ea(ins);
    if ins.op0_kind() == OpKind::Register {
        let (d, y) = dst(ins)?;
        let mask = src(cx, ins, 1, w, false)?;
        let mut r = [0u128; 2];
        for i in 0..n {
            if el(mask, ew, i) >> (ew - 1) != 0 {
                let x = cx.read(va + u64::from(i * ew / 8), bytes)?;
                set_el(&mut r, ew, i, x);
            }
        }
        set_v(cx, d, y, r);
    } else {
        let mask = src(cx, ins, 1, w, false)?;
        let v = src(cx, ins, 2, w, false)?;
        // All faults before any write.
        for i in 0..n {
            if el(mask, ew, i) >> (ew - 1) != 0 {
                cx.check_write(va + u64::from(i * ew / 8), usize::from(bytes))?;
            }
        }
        for i in 0..n {
            if el(mask, ew, i) >> (ew - 1) != 0 {
                cx.write(va + u64::from(i * ew / 8), bytes, el(v, ew, i))?;
            }
        }
    }
    Ok(())
}
