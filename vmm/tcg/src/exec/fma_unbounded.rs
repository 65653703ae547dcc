//! PE when an FMA or VCVTPS2PH result overflows or underflows with that exception unmasked:
//! the hardware then reports the precision exception of the rounding with an unbounded
//! exponent (the #XM handler sees the scaled result), not of the masked response the host
//! computed. Only this rare path (an unmasked OE/UE raised) comes here: each lane is rerun
//! alone on the host to learn whether it overflowed or underflowed, and the inexactness of
//! such a lane is decided exactly in integer arithmetic.

/// A finite value as sign, integer significand and binary exponent (value = m * 2^e);
/// None for NaN and infinity. Denormals are zero under DAZ.
fn decompose(bits: u64, single: bool, daz: bool) -> Option<(bool, u64, i32)> {
    let (fb, eb, bias) = if single { (23, 8, 150) } else { (52, 11, 1075) };
    let neg = bits >> (fb + eb) & 1 != 0;
    let e = (bits >> fb) & ((1 << eb) - 1);
    let f = bits & ((1u64 << fb) - 1);
    if e == (1 << eb) - 1 {
        return None;
    }
    if e == 0 {
        let m = if daz { 0 } else { f };
        return Some((neg, m, 1 - bias));
    }
    Some((neg, f | (1 << fb), e as i32 - bias))
}

/// Significant bits of `v` (its span between the highest and the lowest set bit).
fn sig(v: u128) -> u32 {
    if v == 0 {
        0
    } else {
        128 - v.leading_zeros() - v.trailing_zeros()
    }
}

/// Whether `a * b + c` (`sub`: `a * b - c`; the sign of the whole does not matter) needs
/// more than the format's precision with an unbounded exponent.
pub(super) fn fma_inexact(a: u64, b: u64, c: u64, sub: bool, single: bool, daz: bool) -> bool {
    let p = if single { 24 } else { 53 };
    let (Some(a), Some(b), Some(c)) = (
        decompose(a, single, daz),
        decompose(b, single, daz),
        decompose(c, single, daz),
    ) else {
        return false;
    };
    let mut pm = u128::from(a.1) * u128::from(b.1);
    let mut pe = a.2 + b.2;
    let mut cm = u128::from(c.1);
    let mut ce = c.2;
    if pm == 0 {
        return false; // the result is c
    }
    if cm == 0 {
        return sig(pm) > p;
    }
    // Odd significands: the lower-exponent term's lowest bit is the sum's lowest.
    let t = pm.trailing_zeros();
    pm >>= t;
    pe += t as i32;
    let t = cm.trailing_zeros();
    cm >>= t;
    ce += t as i32;
    let lo = pe.min(ce);
    let (sp, sc) = ((pe - lo) as u32, (ce - lo) as u32);
    let bits = |v: u128| 128 - v.leading_zeros();
    if bits(pm) + sp > 126 || bits(cm) + sc > 126 {
        // The terms are far apart: the sum spans more than 70 bits.
        return true;
    }
    let x = (pm << sp) as i128;
    let y = (cm << sc) as i128;
    let product_neg = a.0 ^ b.0;
    let addend_neg = c.0 ^ sub;
    let s = if product_neg == addend_neg {
        x + y
    } else {
        x - y
    };
    sig(s.unsigned_abs()) > p
}

/// Whether single `x` rounded to half precision (11 bits) with an unbounded exponent is
/// inexact.
pub(super) fn half_inexact(x: u32, daz: bool) -> bool {
    match decompose(u64::from(x), true, daz) {
        Some((_, m, _)) => sig(u128::from(m)) > 11,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactness() {
        let f = |x: f64| x.to_bits();
        assert!(!fma_inexact(f(3.0), f(5.0), f(1.0), false, false, false));
        assert!(fma_inexact(f(0.1), f(3.0), f(0.0), false, false, false));
        // 2^-1074 * 2^-10 + 0: one significant bit however tiny.
        assert!(!fma_inexact(1, f(2f64.powi(-10)), 0, false, false, false));
        // 1 + 2^-80: far apart.
        assert!(fma_inexact(
            f(1.0),
            f(1.0),
            f(2f64.powi(-80)),
            false,
            false,
            false
        ));
        // (1 + 2^-52)^2 - 1 = 2^-51 + 2^-104: 54 bits.
        let x = f(1.0 + 2f64.powi(-52));
        assert!(fma_inexact(x, x, f(1.0), true, false, false));
        let s = |x: f32| u64::from(x.to_bits());
        assert!(!fma_inexact(s(1.5), s(1.5), s(-2.25), false, true, false));
        assert!(half_inexact(1.0f32.to_bits() | 1, false));
        assert!(!half_inexact(1.5f32.to_bits(), false));
    }
}
