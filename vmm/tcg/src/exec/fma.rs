//! FMA3 (VFMADD/VFMSUB/VFMADDSUB/VFMSUBADD/VFNMADD/VFNMSUB 132/213/231 PS/PD/SS/SD) and
//! F16C (VCVTPH2PS, VCVTPS2PH) on the host's FMA/F16C units, like [`super::sse_native`]:
//! each instruction runs natively in exactly the guest's form (`op ymm0, ymm1, ymm2` with
//! ymm0 = the destination's value, ymm1 = the vvvv source, ymm2 = the r/m source), so the
//! single rounding, NaN selection, DAZ/FTZ and the exception flags are the hardware's; the
//! flags are merged into the guest MXCSR, and an unmasked exception raises #XM (#UD without
//! CR4.OSXMMEXCPT) before the destination is written. A host without FMA or F16C gives #UD
//! (and CPUID does not advertise them: [`host_fma`], [`host_f16c`]).
//!
//! VEX.128 packed forms run as 256-bit ones with zero upper lanes (0 * 0 + 0 raises nothing);
//! scalar forms run on XMM registers, so bits 127:32/64 come from the destination as on
//! hardware. VCVTPS2PH's immediate is part of the encoding: bits 2:0 select one of eight
//! native instructions (bits 7:3 are ignored by the hardware).

use super::avx::{dst, el, set_el, set_v, src, to_bytes, width, Y};
use super::fma_unbounded::{fma_inexact, half_inexact};
use super::sse_fp::{host_csr, merge_flags, FLAGS, UE};

const OE: u32 = 0x08;
const PE: u32 = 0x20;
use super::{ud, Ctx, R};
use iced_x86::{Instruction, Mnemonic as M, OpKind};
use std::arch::asm;

/// Whether the host can run the FMA instructions (the guest's FMA exists only then).
pub(crate) fn host_fma() -> bool {
    std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx")
}

/// Whether the host can run the F16C instructions (the guest's F16C exists only then).
pub(crate) fn host_f16c() -> bool {
    std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx")
}

/// Runs `$text` with ymm0/ymm1/ymm2 = `$v[0..3]` under MXCSR `$c[0]`: ymm0 is stored in
/// `$v[0]`, the MXCSR afterwards in `$c[0]`.
macro_rules! native3 {
    ($v:ident, $c:ident, $text:expr) => {
        // SAFETY: loads/stores only through the two local arrays (`$v`: three 32-byte
        // values, `$c`: two u32); the host MXCSR is saved in `$c[1]` and restored before the
        // block ends; xmm0-2 are declared clobbered and VZEROUPPER clears the upper halves
        // this block used (the callers checked that the host has AVX and the instruction's
        // extension).
        unsafe {
            asm!(
                "stmxcsr [{c} + 4]",
                "ldmxcsr [{c}]",
                "vmovdqu ymm0, [{v}]",
                "vmovdqu ymm1, [{v} + 32]",
                "vmovdqu ymm2, [{v} + 64]",
                $text,
                "vmovdqu [{v}], ymm0",
                "stmxcsr [{c}]",
                "ldmxcsr [{c} + 4]",
                "vzeroupper",
                v = in(reg) $v.as_mut_ptr(),
                c = in(reg) $c.as_mut_ptr(),
                out("xmm0") _,
                out("xmm1") _,
                out("xmm2") _,
                options(nostack),
            )
        }
    };
}

macro_rules! fma_table {
    (packed: $($p:ident => $pt:literal,)* ; scalar: $($s:ident => $st:literal,)*) => {
        /// Whether `m` is an FMA3 instruction; its scalar element size in bytes (4 or 8),
        /// or 0 for a packed form.
        fn fma_kind(m: M) -> Option<usize> {
            match m {
                $(M::$p => Some(0),)*
                $(M::$s => Some(if $st.ends_with("ss") { 4 } else { 8 }),)*
                _ => None,
            }
        }

        /// Runs FMA instruction `m` natively on `v` (destination, vvvv source, r/m source)
        /// under `host_csr(csr)`: the destination's new value and the flags raised.
        fn host(m: M, v: [Y; 3], csr: u32) -> Option<(Y, u32)> {
            let mut b = [[0u8; 32]; 3];
            for (o, x) in b.iter_mut().zip(v) {
                *o = to_bytes(x);
            }
            let mut c = [host_csr(csr), 0u32];
            match m {
                $(M::$p => native3!(b, c, concat!($pt, " ymm0, ymm1, ymm2")),)*
                $(M::$s => native3!(b, c, concat!($st, " xmm0, xmm1, xmm2")),)*
                _ => return None,
            }
            Some((super::avx::from_bytes(&b[0]), c[0] & FLAGS))
        }
    };
}

fma_table! {
    packed:
    Vfmadd132ps => "vfmadd132ps", Vfmadd213ps => "vfmadd213ps", Vfmadd231ps => "vfmadd231ps",
    Vfmadd132pd => "vfmadd132pd", Vfmadd213pd => "vfmadd213pd", Vfmadd231pd => "vfmadd231pd",
    Vfmsub132ps => "vfmsub132ps", Vfmsub213ps => "vfmsub213ps", Vfmsub231ps => "vfmsub231ps",
    Vfmsub132pd => "vfmsub132pd", Vfmsub213pd => "vfmsub213pd", Vfmsub231pd => "vfmsub231pd",
    Vfnmadd132ps => "vfnmadd132ps", Vfnmadd213ps => "vfnmadd213ps",
    Vfnmadd231ps => "vfnmadd231ps", Vfnmadd132pd => "vfnmadd132pd",
    Vfnmadd213pd => "vfnmadd213pd", Vfnmadd231pd => "vfnmadd231pd",
    Vfnmsub132ps => "vfnmsub132ps", Vfnmsub213ps => "vfnmsub213ps",
    Vfnmsub231ps => "vfnmsub231ps", Vfnmsub132pd => "vfnmsub132pd",
    Vfnmsub213pd => "vfnmsub213pd", Vfnmsub231pd => "vfnmsub231pd",
    Vfmaddsub132ps => "vfmaddsub132ps", Vfmaddsub213ps => "vfmaddsub213ps",
    Vfmaddsub231ps => "vfmaddsub231ps", Vfmaddsub132pd => "vfmaddsub132pd",
    Vfmaddsub213pd => "vfmaddsub213pd", Vfmaddsub231pd => "vfmaddsub231pd",
    Vfmsubadd132ps => "vfmsubadd132ps", Vfmsubadd213ps => "vfmsubadd213ps",
    Vfmsubadd231ps => "vfmsubadd231ps", Vfmsubadd132pd => "vfmsubadd132pd",
    Vfmsubadd213pd => "vfmsubadd213pd", Vfmsubadd231pd => "vfmsubadd231pd",
    ;
    scalar:
    Vfmadd132ss => "vfmadd132ss", Vfmadd213ss => "vfmadd213ss", Vfmadd231ss => "vfmadd231ss",
    Vfmadd132sd => "vfmadd132sd", Vfmadd213sd => "vfmadd213sd", Vfmadd231sd => "vfmadd231sd",
    Vfmsub132ss => "vfmsub132ss", Vfmsub213ss => "vfmsub213ss", Vfmsub231ss => "vfmsub231ss",
    Vfmsub132sd => "vfmsub132sd", Vfmsub213sd => "vfmsub213sd", Vfmsub231sd => "vfmsub231sd",
    Vfnmadd132ss => "vfnmadd132ss", Vfnmadd213ss => "vfnmadd213ss",
    Vfnmadd231ss => "vfnmadd231ss", Vfnmadd132sd => "vfnmadd132sd",
    Vfnmadd213sd => "vfnmadd213sd", Vfnmadd231sd => "vfnmadd231sd",
    Vfnmsub132ss => "vfnmsub132ss", Vfnmsub213ss => "vfnmsub213ss",
    Vfnmsub231ss => "vfnmsub231ss", Vfnmsub132sd => "vfnmsub132sd",
    Vfnmsub213sd => "vfnmsub213sd", Vfnmsub231sd => "vfnmsub231sd",
}

/// Runs `op` (a native run under an MXCSR) and adds UE as hardware reports it with underflow
/// unmasked (every tiny result, not only inexact ones: found by a rerun with FTZ).
fn with_ue(csr: u32, op: impl Fn(u32) -> Option<(Y, u32)>) -> Option<(Y, u32)> {
    let (r, mut f) = op(csr)?;
    if csr & (UE << 7) == 0 && f & UE == 0 {
        if let Some((_, f2)) = op(csr | 0x8000) {
            f |= f2 & UE;
        }
    }
    Some((r, f))
}

/// Runs `ins` if it is an FMA3 or F16C instruction (`Ok(false)` otherwise).
pub(super) fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<bool> {
    let m = ins.mnemonic();
    if matches!(m, M::Vcvtph2ps | M::Vcvtps2ph) {
        if !host_f16c() {
            return ud();
        }
        f16c(cx, ins)?;
        return Ok(true);
    }
    let Some(scalar) = fma_kind(m) else {
        return Ok(false);
    };
    if !host_fma() {
        return ud();
    }
    let (d, y) = dst(ins)?;
    let w = if scalar != 0 { 16 } else { width(ins) };
    let a = src(cx, ins, 0, w, false)?;
    let b = src(cx, ins, 1, w, false)?;
    let c = src(cx, ins, 2, if scalar != 0 { scalar } else { w }, false)?;
    let csr = cx.s.mxcsr;
    let Some((r, mut f)) = with_ue(csr, |csr| host(m, [a, b, c], csr)) else {
        return ud();
    };
    if f & post_unmasked(csr) != 0 {
        f = (f & !PE) | fma_pe(m, [a, b, c], csr, scalar != 0, w);
    }
    merge_flags(cx, f)?;
    set_v(cx, d, y && scalar == 0, r);
    Ok(true)
}

/// The post-computation exceptions (OE, UE) unmasked in `csr`.
fn post_unmasked(csr: u32) -> u32 {
    !(csr >> 7) & (OE | UE)
}

/// `v` with only element `i` (width `ew`) kept.
fn lane(v: Y, ew: u32, i: u32) -> Y {
    let mut r = [0, 0];
    set_el(&mut r, ew, i, el(v, ew, i));
    r
}

/// PE of FMA `m` on `v` when an unmasked OE/UE was raised: per lane, the unbounded-exponent
/// inexactness where that lane overflowed or underflowed, else the lane's own PE.
fn fma_pe(m: M, v: [Y; 3], csr: u32, scalar: bool, w: usize) -> u32 {
    let name = format!("{m:?}").to_lowercase();
    let single = name.ends_with('s');
    let ew = if single { 32 } else { 64 };
    let n = if scalar { 1 } else { w as u32 * 8 / ew };
    let daz = csr & 0x40 != 0;
    // Multiplicands and addend among (destination, vvvv, r/m).
    let (ia, ib, ic) = if name.contains("132") {
        (0, 2, 1)
    } else if name.contains("213") {
        (1, 0, 2)
    } else {
        (1, 2, 0)
    };
    let mut pe = 0;
    for i in 0..n {
        let vi = if scalar {
            v
        } else {
            [lane(v[0], ew, i), lane(v[1], ew, i), lane(v[2], ew, i)]
        };
        let Some((_, fl)) = with_ue(csr, |c| host(m, vi, c)) else {
            continue;
        };
        if fl & post_unmasked(csr) == 0 {
            pe |= fl & PE;
            continue;
        }
        let sub = if name.starts_with("vfmaddsub") {
            i % 2 == 0
        } else if name.starts_with("vfmsubadd") {
            i % 2 == 1
        } else {
            name.starts_with("vfmsub") || name.starts_with("vfnmadd")
        };
        let (a, b, c) = (el(v[ia], ew, i), el(v[ib], ew, i), el(v[ic], ew, i));
        if fma_inexact(a, b, c, sub, single, daz) {
            pe = PE;
        }
    }
    pe
}

/// VCVTPH2PS / VCVTPS2PH.
fn f16c(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let csr = cx.s.mxcsr;
    if ins.mnemonic() == M::Vcvtph2ps {
        let (d, y) = dst(ins)?;
        let s = src(cx, ins, 1, if y { 16 } else { 8 }, false)?;
        let run = |csr: u32| {
            let mut b = [[0u8; 32], to_bytes(s), [0u8; 32]];
            let mut c = [host_csr(csr), 0u32];
            if y {
                native3!(b, c, "vcvtph2ps ymm0, xmm1");
            } else {
                native3!(b, c, "vcvtph2ps xmm0, xmm1");
            }
            Some((super::avx::from_bytes(&b[0]), c[0] & FLAGS))
        };
        let Some((r, f)) = run(csr) else {
            return ud();
        };
        merge_flags(cx, f)?;
        set_v(cx, d, y, r);
        return Ok(());
    }
    let w = width(ins);
    let s = src(cx, ins, 1, w, false)?;
    let imm = ins.immediate(2) as u8 & 7;
    let y = w == 32;
    let run = |s: Y, csr: u32| {
        let mut b = [[0u8; 32], to_bytes(s), [0u8; 32]];
        let mut c = [host_csr(csr), 0u32];
        macro_rules! by_imm {
            ($r:literal) => {
                match imm {
                    0 => native3!(b, c, concat!("vcvtps2ph xmm0, ", $r, "1, 0")),
                    1 => native3!(b, c, concat!("vcvtps2ph xmm0, ", $r, "1, 1")),
                    2 => native3!(b, c, concat!("vcvtps2ph xmm0, ", $r, "1, 2")),
                    3 => native3!(b, c, concat!("vcvtps2ph xmm0, ", $r, "1, 3")),
                    4 => native3!(b, c, concat!("vcvtps2ph xmm0, ", $r, "1, 4")),
                    5 => native3!(b, c, concat!("vcvtps2ph xmm0, ", $r, "1, 5")),
                    6 => native3!(b, c, concat!("vcvtps2ph xmm0, ", $r, "1, 6")),
                    _ => native3!(b, c, concat!("vcvtps2ph xmm0, ", $r, "1, 7")),
                }
            };
        }
        if y {
            by_imm!("ymm");
        } else {
            by_imm!("xmm");
        }
        Some((super::avx::from_bytes(&b[0]), c[0] & FLAGS))
    };
    let Some((r, mut f)) = with_ue(csr, |c| run(s, c)) else {
        return ud();
    };
    if f & post_unmasked(csr) != 0 {
        // Per lane: a lane that overflowed with OE unmasked is inexact as its rounding with
        // an unbounded exponent (as in `fma_pe`); one that underflowed with UE unmasked as
        // its masked (denormal) result, as Intel's CPUs report it (seen on a Xeon; an AMD
        // EPYC reported the unbounded-exponent PE there too); other lanes their own PE.
        let mut pe = 0;
        for i in 0..(w as u32 / 4) {
            let Some((_, fl)) = with_ue(csr, |c| run(lane(s, 32, i), c)) else {
                continue;
            };
            let raised = fl & post_unmasked(csr);
            pe |= if raised & OE == 0 {
                fl & PE
            } else if half_inexact(el(s, 32, i) as u32, csr & 0x40 != 0) {
                PE
            } else {
                0
            };
        }
        f = (f & !PE) | pe;
    }
    merge_flags(cx, f)?;
    let n = w / 2;
    if ins.op0_kind() == OpKind::Register {
        let (d, _) = dst(ins)?;
        set_v(cx, d, false, r);
        return Ok(());
    }
    let va = cx.ea(ins);
    cx.write_bytes(va, &to_bytes(r)[..n])
}
