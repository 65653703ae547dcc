//! SSE4.1 (and PCMPGTQ) differential cases, special float and integer lanes.

use super::xmm_table::{run, Op};
use rqemu_tcg::flags::{ARITH, CF, ZF};

#[test]
fn sse41_instructions() {
    const P: u8 = 0x66;
    let mut t = Vec::new();
    for op in [
        &[0x38, 0x10][..],
        &[0x38, 0x14],
        &[0x38, 0x15],
        &[0x38, 0x20],
        &[0x38, 0x21],
        &[0x38, 0x22],
        &[0x38, 0x23],
        &[0x38, 0x24],
        &[0x38, 0x25],
        &[0x38, 0x28],
        &[0x38, 0x29],
        &[0x38, 0x2B],
        &[0x38, 0x30],
        &[0x38, 0x31],
        &[0x38, 0x32],
        &[0x38, 0x33],
        &[0x38, 0x34],
        &[0x38, 0x35],
        &[0x38, 0x37],
        &[0x38, 0x38],
        &[0x38, 0x39],
        &[0x38, 0x3A],
        &[0x38, 0x3B],
        &[0x38, 0x3C],
        &[0x38, 0x3D],
        &[0x38, 0x3E],
        &[0x38, 0x3F],
        &[0x38, 0x40],
        &[0x38, 0x41],
    ] {
        t.push(Op::new(P, op, false, 16));
    }
    let mut ptest = Op::new(P, &[0x38, 0x17], false, 16);
    ptest.flags = ARITH & !(ZF | CF) | ZF | CF;
    t.push(ptest);
    t.push(Op::mem_only(P, &[0x38, 0x2A]));
    for op in [
        &[0x3A, 0x08][..],
        &[0x3A, 0x09],
        &[0x3A, 0x0A],
        &[0x3A, 0x0B],
        &[0x3A, 0x0C],
        &[0x3A, 0x0D],
        &[0x3A, 0x0E],
        &[0x3A, 0x21],
        &[0x3A, 0x42],
    ] {
        t.push(Op::new(P, op, true, 16));
    }
    for (op, w) in [
        (&[0x3A, 0x14][..], false),
        (&[0x3A, 0x16], false),
        (&[0x3A, 0x16], true),
        (&[0x3A, 0x17], false),
        (&[0x3A, 0x20], false),
        (&[0x3A, 0x22], false),
        (&[0x3A, 0x22], true),
    ] {
        t.push(Op::gpr(P, op, w));
    }
    run("sse41", &t, 12000, 0x5E41);
}

/// DPPS/DPPD without NaN inputs: with several NaNs, real CPUs pick the propagated NaN in an
/// undocumented order (different per destination lane), which the TCG does not reproduce.
#[test]
fn sse41_dot_products() {
    let mut dpps = Op::new(0x66, &[0x3A, 0x40], true, 16);
    dpps.no_nan = true;
    let mut dppd = Op::new(0x66, &[0x3A, 0x41], true, 16);
    dppd.no_nan = true;
    run("sse41-dp", &[dpps, dppd], 4000, 0xD0D0);
}
