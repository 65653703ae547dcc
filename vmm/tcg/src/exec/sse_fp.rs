//! SSE/SSE2 floating point on the host's SSE unit: each instruction runs natively (register
//! form) under the guest's MXCSR rounding/DAZ/FTZ with every exception masked, so results,
//! NaN propagation and the exception flags are the hardware's; the flags are then merged into
//! the guest MXCSR, and an unmasked one raises #XM (#UD without CR4.OSXMMEXCPT) without
//! writing the destination. (The crate runs on x86-64 hosts only.) Known gap: with OE or UE
//! unmasked, the hardware sets PE from the result rounded with an unbounded exponent; here
//! PE is dropped in that case (the #XM and the OE/UE flags are right).

use super::operand::{get_reg, set_reg};
use super::{vec, Ctx, Event, R};
use crate::state::cr4;
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};
use std::arch::asm;
use std::arch::x86_64::__m128i;

fn xi(r: Register) -> Option<usize> {
    let n = r as usize;
    let b = Register::XMM0 as usize;
    (b..b + 16).contains(&n).then(|| n - b)
}

/// Reads operand `i` as 128 bits (register) or `size` bytes zero-extended (memory).
fn src(cx: &mut Ctx<'_>, ins: &Instruction, i: u32, size: usize) -> R<u128> {
    if ins.op_kind(i) == OpKind::Register {
        let r = ins.op_register(i);
        return Ok(match xi(r) {
            Some(x) => cx.s.xmm[x],
            None => u128::from(get_reg(cx.s, r)),
        });
    }
    let va = cx.ea(ins);
    if size == 16 && va & 15 != 0 {
        return super::gp(0);
    }
    let mut b = [0u8; 16];
    cx.read_bytes(va, &mut b[..size])?;
    Ok(u128::from_le_bytes(b))
}

/// Returns Ok(false) if `ins` is not a float instruction handled here.
pub fn fp_ops(cx: &mut Ctx<'_>, ins: &Instruction) -> R<bool> {
    let m = ins.mnemonic();
    let d = match (ins.op0_kind(), xi(ins.op0_register())) {
        (OpKind::Register, Some(x)) => Some(x),
        _ => None,
    };
    let csr = cx.s.mxcsr;
    match m {
        M::Addsd
        | M::Subsd
        | M::Mulsd
        | M::Divsd
        | M::Minsd
        | M::Maxsd
        | M::Sqrtsd
        | M::Cvtsd2ss
        | M::Addss
        | M::Subss
        | M::Mulss
        | M::Divss
        | M::Minss
        | M::Maxss
        | M::Sqrtss
        | M::Cvtss2sd
        | M::Addpd
        | M::Subpd
        | M::Mulpd
        | M::Divpd
        | M::Minpd
        | M::Maxpd
        | M::Sqrtpd
        | M::Addps
        | M::Subps
        | M::Mulps
        | M::Divps
        | M::Minps
        | M::Maxps
        | M::Sqrtps => {
            let Some(d) = d else { return Ok(false) };
            let size = match m {
                M::Addsd
                | M::Subsd
                | M::Mulsd
                | M::Divsd
                | M::Minsd
                | M::Maxsd
                | M::Sqrtsd
                | M::Cvtsd2ss => 8,
                M::Addss
                | M::Subss
                | M::Mulss
                | M::Divss
                | M::Minss
                | M::Maxss
                | M::Sqrtss
                | M::Cvtss2sd => 4,
                _ => 16,
            };
            let b = src(cx, ins, 1, size)?;
            let a = cx.s.xmm[d];
            let Some((r, mut f)) = host_xx(m, a, b, csr) else {
                return Ok(false);
            };
            if csr & (UE << 7) == 0 && f & UE == 0 {
                // An unmasked underflow is signalled for every tiny result, a masked one only
                // for inexact ones; with FTZ every tiny result reports UE.
                if let Some((_, f2)) = host_xx(m, a, b, csr | 0x8000) {
                    f |= f2 & UE;
                }
            }
            merge_flags(cx, f)?;
            cx.s.xmm[d] = r;
        }
        M::Ucomisd | M::Comisd | M::Ucomiss | M::Comiss => {
            let Some(d) = d else { return Ok(false) };
            let size = if matches!(m, M::Ucomisd | M::Comisd) {
                8
            } else {
                4
            };
            let b = src(cx, ins, 1, size)?;
            let Some((ord, f)) = host_comi(m, cx.s.xmm[d], b, csr) else {
                return Ok(false);
            };
            merge_flags(cx, f)?;
            super::sse::comi_flags(cx, ord);
        }
        M::Cvtsi2sd | M::Cvtsi2ss => {
            let Some(d) = d else { return Ok(false) };
            let size = cx.op_size(ins, 1);
            let v = cx.read_op(ins, 1, size)?;
            let (r, f) = host_xg(m == M::Cvtsi2sd, size == 8, cx.s.xmm[d], v, csr);
            merge_flags(cx, f)?;
            cx.s.xmm[d] = r;
        }
        M::Cvttsd2si | M::Cvtsd2si | M::Cvttss2si | M::Cvtss2si => {
            let r = ins.op0_register();
            let size = super::operand::reg_size(r);
            let double = matches!(m, M::Cvttsd2si | M::Cvtsd2si);
            let b = src(cx, ins, 1, if double { 8 } else { 4 })?;
            let Some((v, f)) = host_gx(m, size == 8, b, csr) else {
                return Ok(false);
            };
            merge_flags(cx, f)?;
            set_reg(cx.s, r, v);
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// #XM: SIMD floating-point exception.
const XM: u8 = 19;
/// MXCSR exception flags: IE DE ZE OE UE PE.
const FLAGS: u32 = 0x3F;
/// The pre-computation exceptions (IE DE ZE): when one is unmasked, the post-computation ones
/// (OE UE PE) of the same instruction are not reported.
const PRE: u32 = 0x07;

const OE: u32 = 0x08;
const UE: u32 = 0x10;
const PE: u32 = 0x20;

/// The MXCSR the host runs an instruction with: the guest's control bits, all exceptions
/// masked, no flags.
fn host_csr(guest: u32) -> u32 {
    (guest & 0xFFFF & !FLAGS) | 0x1F80
}

/// Merges exception flags `f` of an instruction into the guest MXCSR, or raises #XM/#UD
/// (destination not written) when one of them is unmasked.
fn merge_flags(cx: &mut Ctx<'_>, f: u32) -> R<()> {
    let unmasked = f & !(cx.s.mxcsr >> 7) & FLAGS;
    if unmasked == 0 {
        cx.s.mxcsr |= f;
        return Ok(());
    }
    // Unmasked pre-computation exceptions hide the post-computation ones; an unmasked
    // overflow or underflow delivers no result, so no precision exception either.
    cx.s.mxcsr |= if unmasked & PRE != 0 {
        f & PRE
    } else if unmasked & (OE | UE) != 0 {
        f & !PE
    } else {
        f
    };
    let v = if cx.s.cr4 & cr4::OSXMMEXCPT != 0 {
        XM
    } else {
        vec::UD
    };
    Err(Event::fault(v, None))
}

macro_rules! host_xx {
    ($($m:ident => $text:literal,)*) => {
        /// Runs `ins xmm0, xmm1` natively with xmm0 = `a`, xmm1 = `b` under `host_csr(csr)`:
        /// xmm0 afterwards and the exception flags raised.
        fn host_xx(m: M, a: u128, b: u128, csr: u32) -> Option<(u128, u32)> {
            let mut v = [a, b];
            let mut c = [host_csr(csr), 0u32];
            match m {
                $(M::$m => {
                    // SAFETY: loads/stores only through the two local arrays; the host MXCSR
                    // is saved in `c[1]` and restored before the block ends; xmm0/xmm1 are
                    // declared clobbered.
                    unsafe {
                        asm!(
                            "stmxcsr [{c} + 4]",
                            "ldmxcsr [{c}]",
                            "movdqu xmm0, [{v}]",
                            "movdqu xmm1, [{v} + 16]",
                            concat!($text, " xmm0, xmm1"),
                            "movdqu [{v}], xmm0",
                            "stmxcsr [{c}]",
                            "ldmxcsr [{c} + 4]",
                            v = in(reg) v.as_mut_ptr(),
                            c = in(reg) c.as_mut_ptr(),
                            out("xmm0") _,
                            out("xmm1") _,
                            options(nostack),
                        );
                    }
                })*
                _ => return None,
            }
            Some((v[0], c[0] & FLAGS))
        }
    };
}

host_xx! {
    Addsd => "addsd", Subsd => "subsd", Mulsd => "mulsd", Divsd => "divsd",
    Minsd => "minsd", Maxsd => "maxsd", Sqrtsd => "sqrtsd", Cvtsd2ss => "cvtsd2ss",
    Addss => "addss", Subss => "subss", Mulss => "mulss", Divss => "divss",
    Minss => "minss", Maxss => "maxss", Sqrtss => "sqrtss", Cvtss2sd => "cvtss2sd",
    Addpd => "addpd", Subpd => "subpd", Mulpd => "mulpd", Divpd => "divpd",
    Minpd => "minpd", Maxpd => "maxpd", Sqrtpd => "sqrtpd",
    Addps => "addps", Subps => "subps", Mulps => "mulps", Divps => "divps",
    Minps => "minps", Maxps => "maxps", Sqrtps => "sqrtps",
}

fn to_m(v: u128) -> __m128i {
    // SAFETY: plain bit reinterpretation of 16 bytes.
    unsafe { std::mem::transmute::<u128, __m128i>(v) }
}

fn from_m(v: __m128i) -> u128 {
    // SAFETY: plain bit reinterpretation of 16 bytes.
    unsafe { std::mem::transmute::<__m128i, u128>(v) }
}

macro_rules! host_asm {
    ($c:expr, $($body:tt)*) => {
        // SAFETY: the host MXCSR is saved in `c[1]` and restored before the block ends; the
        // only memory accessed is the local array `c`; the other operands are registers.
        unsafe {
            asm!(
                "stmxcsr [{c} + 4]",
                "ldmxcsr [{c}]",
                $($body)*
                c = in(reg) $c.as_mut_ptr(),
                options(nostack),
            );
        }
    };
}

/// (U)COMISS/(U)COMISD `a`, `b` natively: the ordering (from ZF/PF/CF, so DAZ applies) and
/// the exception flags.
fn host_comi(m: M, a: u128, b: u128, csr: u32) -> Option<(Option<std::cmp::Ordering>, u32)> {
    let (a, b) = (to_m(a), to_m(b));
    let mut c = [host_csr(csr), 0u32];
    let (z, p, cf): (u8, u8, u8);
    macro_rules! comi {
        ($text:literal) => {
            host_asm!(c,
                concat!($text, " {a}, {b}"),
                "setz {z}",
                "setp {p}",
                "setc {cf}",
                "stmxcsr [{c}]",
                "ldmxcsr [{c} + 4]",
                a = in(xmm_reg) a,
                b = in(xmm_reg) b,
                z = out(reg_byte) z,
                p = out(reg_byte) p,
                cf = out(reg_byte) cf,
            )
        };
    }
    match m {
        M::Comisd => comi!("comisd"),
        M::Ucomisd => comi!("ucomisd"),
        M::Comiss => comi!("comiss"),
        M::Ucomiss => comi!("ucomiss"),
        _ => return None,
    }
    use std::cmp::Ordering::*;
    let ord = match (z, p, cf) {
        (_, 1, _) => None,
        (1, _, _) => Some(Equal),
        (_, _, 1) => Some(Less),
        _ => Some(Greater),
    };
    Some((ord, c[0] & FLAGS))
}

/// CVTSI2SD (`double`) / CVTSI2SS of the 64-bit (`wide`) or 32-bit integer `v` into the low
/// lane of `a`, natively: the result and the exception flags.
fn host_xg(double: bool, wide: bool, a: u128, v: u64, csr: u32) -> (u128, u32) {
    let mut x = to_m(a);
    let mut c = [host_csr(csr), 0u32];
    macro_rules! cvt {
        ($text:literal) => {
            host_asm!(c,
                $text,
                "stmxcsr [{c}]",
                "ldmxcsr [{c} + 4]",
                x = inout(xmm_reg) x,
                g = in(reg) v,
            )
        };
    }
    match (double, wide) {
        (true, true) => cvt!("cvtsi2sd {x}, {g:r}"),
        (true, false) => cvt!("cvtsi2sd {x}, {g:e}"),
        (false, true) => cvt!("cvtsi2ss {x}, {g:r}"),
        (false, false) => cvt!("cvtsi2ss {x}, {g:e}"),
    }
    (from_m(x), c[0] & FLAGS)
}

/// CVT(T)SD2SI / CVT(T)SS2SI of the low lane of `b` to a 64-bit (`wide`) or 32-bit integer
/// (zero-extended), natively: the result and the exception flags.
fn host_gx(m: M, wide: bool, b: u128, csr: u32) -> Option<(u64, u32)> {
    let x = to_m(b);
    let mut c = [host_csr(csr), 0u32];
    let mut g: u64 = 0;
    macro_rules! cvt {
        ($text:literal) => {
            host_asm!(c,
                $text,
                "stmxcsr [{c}]",
                "ldmxcsr [{c} + 4]",
                x = in(xmm_reg) x,
                g = inout(reg) g,
            )
        };
    }
    match (m, wide) {
        (M::Cvtsd2si, true) => cvt!("cvtsd2si {g:r}, {x}"),
        (M::Cvtsd2si, false) => cvt!("cvtsd2si {g:e}, {x}"),
        (M::Cvttsd2si, true) => cvt!("cvttsd2si {g:r}, {x}"),
        (M::Cvttsd2si, false) => cvt!("cvttsd2si {g:e}, {x}"),
        (M::Cvtss2si, true) => cvt!("cvtss2si {g:r}, {x}"),
        (M::Cvtss2si, false) => cvt!("cvtss2si {g:e}, {x}"),
        (M::Cvttss2si, true) => cvt!("cvttss2si {g:r}, {x}"),
        (M::Cvttss2si, false) => cvt!("cvttss2si {g:e}, {x}"),
        _ => return None,
    }
    Some((g, c[0] & FLAGS))
}
