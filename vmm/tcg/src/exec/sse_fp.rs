//! SSE/SSE2 floating point on the host's SSE unit: each instruction runs natively (register
//! form) under the guest's MXCSR rounding/DAZ/FTZ with every exception masked, so results,
//! NaN propagation and the exception flags are the hardware's; the flags are then merged into
//! the guest MXCSR, and an unmasked one raises #XM (#UD without CR4.OSXMMEXCPT) without
//! writing the destination. (The crate runs on x86-64 hosts only.) With OE or UE unmasked,
//! PE reports the rounding with an unbounded exponent, computed on the x87 unit.

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

/// Sets ZF/PF/CF for (U)COMISS/SD: unordered → all three, less → CF, equal → ZF.
fn comi_flags(cx: &mut Ctx<'_>, ord: Option<std::cmp::Ordering>) {
    use crate::flags::{CF, PF, ZF};
    use std::cmp::Ordering::*;
    let f = match ord {
        None => ZF | PF | CF,
        Some(Less) => CF,
        Some(Equal) => ZF,
        Some(Greater) => 0,
    };
    cx.s.flags.set_arith(f);
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
            let unmasked = f & !(csr >> 7) & FLAGS;
            if unmasked & PRE == 0 && unmasked & (OE | UE) != 0 {
                // No result is delivered: PE reports the rounding with an unbounded exponent.
                f &= !PE;
                if stopped_precision(m, a, b, csr) {
                    f |= PE;
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
            comi_flags(cx, ord);
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
pub(crate) const FLAGS: u32 = 0x3F;
/// The pre-computation exceptions (IE DE ZE): when one is unmasked, the post-computation ones
/// (OE UE PE) of the same instruction are not reported.
const PRE: u32 = 0x07;

const OE: u32 = 0x08;
pub(super) const UE: u32 = 0x10;
const PE: u32 = 0x20;

/// The MXCSR the host runs an instruction with: the guest's control bits, all exceptions
/// masked, no flags.
pub(crate) fn host_csr(guest: u32) -> u32 {
    (guest & 0xFFFF & !FLAGS) | 0x1F80
}

/// Merges exception flags `f` of an instruction into the guest MXCSR, or raises #XM/#UD
/// (destination not written) when one of them is unmasked.
pub(super) fn merge_flags(cx: &mut Ctx<'_>, f: u32) -> R<()> {
    let unmasked = f & !(cx.s.mxcsr >> 7) & FLAGS;
    if unmasked == 0 {
        cx.s.mxcsr |= f;
        return Ok(());
    }
    // Unmasked pre-computation exceptions hide the post-computation ones.
    cx.s.mxcsr |= if unmasked & PRE != 0 { f & PRE } else { f };
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

/// The operation whose unbounded-exponent rounding [`x87_inexact`] checks.
#[derive(Clone, Copy)]
enum X87Op {
    Add,
    Sub,
    Mul,
    Div,
    Sqrt,
    /// Round the (double) source to single precision (CVTSD2SS).
    Narrow,
}

/// PE of arithmetic instruction `m` stopped by an unmasked overflow or underflow: per lane,
/// the rounding with an unbounded exponent where the unmasked exception occurs, the
/// ordinary (masked) precision exception elsewhere.
fn stopped_precision(m: M, a: u128, b: u128, csr: u32) -> bool {
    let (scalar, bits, lanes) = match m {
        M::Addps => (M::Addss, 32, 4),
        M::Subps => (M::Subss, 32, 4),
        M::Mulps => (M::Mulss, 32, 4),
        M::Divps => (M::Divss, 32, 4),
        M::Sqrtps => (M::Sqrtss, 32, 4),
        M::Addpd => (M::Addsd, 64, 2),
        M::Subpd => (M::Subsd, 64, 2),
        M::Mulpd => (M::Mulsd, 64, 2),
        M::Divpd => (M::Divsd, 64, 2),
        M::Sqrtpd => (M::Sqrtsd, 64, 2),
        _ => (m, 0, 1),
    };
    let unmasked_post = !(csr >> 7) & (OE | UE);
    (0..lanes).any(|i| {
        let (al, bl) = (a >> (bits * i), b >> (bits * i));
        let Some((_, mut f)) = host_xx(scalar, al, bl, csr) else {
            return false;
        };
        if let Some((_, f2)) = host_xx(scalar, al, bl, csr | 0x8000) {
            f |= f2 & UE;
        }
        if f & unmasked_post != 0 {
            unbounded_inexact(scalar, al, bl, csr)
        } else {
            f & PE != 0
        }
    })
}

/// Whether arithmetic instruction `m` on `a`, `b` is inexact when rounded to the destination
/// precision with an unbounded exponent (in any lane): what PE reports when an unmasked
/// overflow or underflow stops the instruction.
fn unbounded_inexact(m: M, a: u128, b: u128, csr: u32) -> bool {
    use X87Op::*;
    let (op, single, lanes) = match m {
        M::Addss => (Add, true, 1),
        M::Subss => (Sub, true, 1),
        M::Mulss => (Mul, true, 1),
        M::Divss => (Div, true, 1),
        M::Sqrtss => (Sqrt, true, 1),
        M::Addps => (Add, true, 4),
        M::Subps => (Sub, true, 4),
        M::Mulps => (Mul, true, 4),
        M::Divps => (Div, true, 4),
        M::Sqrtps => (Sqrt, true, 4),
        M::Addsd => (Add, false, 1),
        M::Subsd => (Sub, false, 1),
        M::Mulsd => (Mul, false, 1),
        M::Divsd => (Div, false, 1),
        M::Sqrtsd => (Sqrt, false, 1),
        M::Addpd => (Add, false, 2),
        M::Subpd => (Sub, false, 2),
        M::Mulpd => (Mul, false, 2),
        M::Divpd => (Div, false, 2),
        M::Sqrtpd => (Sqrt, false, 2),
        M::Cvtsd2ss => (Narrow, false, 1),
        _ => return false,
    };
    let daz = csr & 0x40 != 0;
    let lane = |v: u128, i: u32| -> u64 {
        if single && !matches!(op, Narrow) {
            let x = (v >> (32 * i)) as u32;
            let denormal = x & 0x7F80_0000 == 0 && x & 0x007F_FFFF != 0;
            u64::from(if daz && denormal { x & 0x8000_0000 } else { x })
        } else {
            let x = (v >> (64 * i)) as u64;
            let denormal = x & 0x7FF0_0000_0000_0000 == 0 && x & 0x000F_FFFF_FFFF_FFFF != 0;
            if daz && denormal {
                x & (1 << 63)
            } else {
                x
            }
        }
    };
    // x87 control word: exceptions masked, precision 24 or 53 bits, the MXCSR rounding.
    let pc: u16 = if single || matches!(op, Narrow) { 0 } else { 2 };
    let cw = 0x3F | (pc << 8) | (((csr >> 13) & 3) as u16) << 10;
    (0..lanes).any(|i| x87_inexact(op, single, cw, lane(a, i), lane(b, i)))
}

/// Runs `a op b` (or `op b`) on the x87 unit with control word `cw` and returns its PE flag.
fn x87_inexact(op: X87Op, single: bool, cw: u16, a: u64, b: u64) -> bool {
    let v = [a, b];
    let mut w = [0u16, cw];
    let sw: u16;
    macro_rules! x87 {
        ($($body:literal),*) => {
            // SAFETY: the x87 control word is saved in `w[0]` and restored, the register
            // stack is left empty (one load, one pop) and the status flags cleared; memory
            // accessed: the local arrays `v` and `w` only.
            unsafe {
                asm!(
                    "fnstcw [{w}]",
                    "fldcw [{w} + 2]",
                    "fnclex",
                    $($body,)*
                    "fstp st(0)",
                    "fnstsw ax",
                    "fnclex",
                    "fldcw [{w}]",
                    w = in(reg) w.as_mut_ptr(),
                    v = in(reg) v.as_ptr(),
                    out("ax") sw,
                    out("st(0)") _,
                    out("st(1)") _,
                    options(nostack),
                );
            }
        };
    }
    match (op, single) {
        (X87Op::Add, true) => x87!("fld dword ptr [{v}]", "fadd dword ptr [{v} + 8]"),
        (X87Op::Sub, true) => x87!("fld dword ptr [{v}]", "fsub dword ptr [{v} + 8]"),
        (X87Op::Mul, true) => x87!("fld dword ptr [{v}]", "fmul dword ptr [{v} + 8]"),
        (X87Op::Div, true) => x87!("fld dword ptr [{v}]", "fdiv dword ptr [{v} + 8]"),
        (X87Op::Sqrt, true) => x87!("fld dword ptr [{v} + 8]", "fsqrt"),
        (X87Op::Add, false) => x87!("fld qword ptr [{v}]", "fadd qword ptr [{v} + 8]"),
        (X87Op::Sub, false) => x87!("fld qword ptr [{v}]", "fsub qword ptr [{v} + 8]"),
        (X87Op::Mul, false) => x87!("fld qword ptr [{v}]", "fmul qword ptr [{v} + 8]"),
        (X87Op::Div, false) => x87!("fld qword ptr [{v}]", "fdiv qword ptr [{v} + 8]"),
        (X87Op::Sqrt, false) => x87!("fld qword ptr [{v} + 8]", "fsqrt"),
        (X87Op::Narrow, _) => x87!("fld qword ptr [{v} + 8]", "fld1", "fmulp st(1), st"),
    }
    sw & 0x20 != 0
}
