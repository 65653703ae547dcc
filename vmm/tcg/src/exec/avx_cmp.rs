//! VCMPPS/VCMPPD/VCMPSS/VCMPSD: the 32 AVX compare predicates, with the MXCSR exceptions they
//! raise (IE for SNaN operands, and for QNaN operands of the signalling predicates; DE for
//! denormal operands without DAZ).

use super::avx::{dst, el, set_el, set_v, src, width, Y};
use super::{Ctx, Event, R};
use crate::state::cr4;
use iced_x86::{Instruction, Mnemonic as M};
use std::cmp::Ordering;

/// Predicate `p` (0-31) on an ordering (`None`: unordered).
fn holds(p: u8, ord: Option<Ordering>) -> bool {
    use Ordering::*;
    let (lt, eq, gt, un) = (
        ord == Some(Less),
        ord == Some(Equal),
        ord == Some(Greater),
        ord.is_none(),
    );
    match p & 0xF {
        0 => eq,
        1 => lt,
        2 => lt || eq,
        3 => un,
        4 => !eq,
        5 => !lt,
        6 => !(lt || eq),
        7 => !un,
        8 => eq || un,
        9 => lt || un,
        10 => lt || eq || un,
        11 => false,
        12 => !un && !eq,
        13 => gt || eq,
        14 => gt,
        _ => true,
    }
}

/// Whether predicate `p` signals (IE) on QNaN operands.
fn signalling(p: u8) -> bool {
    matches!(p & 0xF, 1 | 2 | 5 | 6 | 9 | 10 | 13 | 14) != (p & 0x10 != 0)
}

/// One lane: (result, exception flags).
fn lane(p: u8, a: u64, b: u64, double: bool, daz: bool) -> (bool, u32) {
    let (exp_mask, frac_mask, quiet, sign) = if double {
        (
            0x7FF0_0000_0000_0000u64,
            0x000F_FFFF_FFFF_FFFFu64,
            1u64 << 51,
            1u64 << 63,
        )
    } else {
        (0x7F80_0000, 0x007F_FFFF, 1 << 22, 1 << 31)
    };
    let nan = |x: u64| x & exp_mask == exp_mask && x & frac_mask != 0;
    let snan = |x: u64| nan(x) && x & quiet == 0;
    let denormal = |x: u64| x & exp_mask == 0 && x & frac_mask != 0;
    let mut f = 0;
    if snan(a) || snan(b) || ((nan(a) || nan(b)) && signalling(p)) {
        f |= 1;
    } else if !(nan(a) || nan(b)) && (denormal(a) || denormal(b)) && !daz {
        f |= 2;
    }
    let fix = |x: u64| if daz && denormal(x) { x & sign } else { x };
    let (a, b) = (fix(a), fix(b));
    let ord = if double {
        f64::from_bits(a).partial_cmp(&f64::from_bits(b))
    } else {
        f32::from_bits(a as u32).partial_cmp(&f32::from_bits(b as u32))
    };
    (holds(p, ord), f)
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let m = ins.mnemonic();
    let (d, y) = dst(ins)?;
    let w = width(ins);
    let (ew, scalar) = match m {
        M::Vcmpps => (32, false),
        M::Vcmppd => (64, false),
        M::Vcmpss => (32, true),
        _ => (64, true),
    };
    let a = src(cx, ins, 1, w, false)?;
    let b: Y = if scalar {
        src(cx, ins, 2, ew as usize / 8, false)?
    } else {
        src(cx, ins, 2, w, false)?
    };
    let p = ins.immediate(3) as u8;
    let daz = cx.s.mxcsr & 0x40 != 0;
    let n = if scalar { 1 } else { w as u32 * 8 / ew };
    let mut r = a;
    let mut flags = 0;
    for i in 0..n {
        let (t, f) = lane(p, el(a, ew, i), el(b, ew, i), ew == 64, daz);
        flags |= f;
        set_el(&mut r, ew, i, if t { u64::MAX } else { 0 });
    }
    cx.s.mxcsr |= flags;
    if flags & !(cx.s.mxcsr >> 7) & 0x3F != 0 {
        let v = if cx.s.cr4 & cr4::OSXMMEXCPT != 0 {
            19
        } else {
            super::vec::UD
        };
        return Err(Event::fault(v, None));
    }
    if scalar {
        r[1] = 0;
    }
    set_v(cx, d, y, r);
    Ok(())
}
