//! SSE/SSE2 differential cases (XMM state compared in full).

use super::harness::{check, random_state, Case, Harness, Rng, DATA};
use rqemu_tcg::flags::ARITH;

/// Operand shape of a table entry.
#[derive(Clone, Copy, PartialEq, Eq)]
enum K {
    /// xmm, xmm/m128 (aligned memory).
    Xx,
    /// xmm, xmm/m128, imm8.
    XxI,
    /// xmm (r/m field), imm8 with /n in the reg field.
    ShiftI(u8),
    /// xmm, r/m32|64 (REX.W for 64).
    XGpr,
    /// r32|64 (reg field), xmm.
    GprX,
    /// xmm, xmm/m(scalar `n` bytes).
    Scalar(u8),
    /// r/m (memory or xmm) destination, xmm source (stores).
    Store,
    /// xmm, r32, imm8 (PINSRW) / r32, xmm, imm8 (PEXTRW).
    XGprI,
    GprXI,
    /// r/m32|64 destination (GPR or memory), xmm in the reg field (MOVD/MOVQ stores).
    RmGpr,
    /// register-only xmm, xmm (MOVHLPS/MOVLHPS).
    XxReg,
    /// xmm, xmm/m128 without alignment requirement (memory operand misaligned at random).
    XxU,
    /// Unaligned-capable store: r/m (memory misaligned at random, or xmm), xmm.
    StoreU,
    /// xmm, m64 (memory only: MOVLPS/MOVHPS/MOVLPD/MOVHPD loads).
    MemLoad,
    /// m, xmm (memory only: MOVLPS/MOVHPS/MOVLPD/MOVHPD stores, MOVNTPS/PD/DQ).
    MemStore,
    /// m32|64, r (MOVNTI).
    MemGpr,
    /// r32|64, xmm/m (scalar `n` bytes): CVT(T)SS2SI / CVT(T)SD2SI with a memory source.
    GprXm(u8),
}

const P66: u8 = 0x66;
const NONE: u8 = 0;
const F2: u8 = 0xF2;
const F3: u8 = 0xF3;

#[rustfmt::skip]
const TABLE: &[(u8, u8, K)] = &[
    (P66, 0xEF, K::Xx), (P66, 0xEB, K::Xx), (P66, 0xDB, K::Xx), (P66, 0xDF, K::Xx),
    (P66, 0xFC, K::Xx), (P66, 0xFD, K::Xx), (P66, 0xFE, K::Xx), (P66, 0xD4, K::Xx),
    (P66, 0xF8, K::Xx), (P66, 0xF9, K::Xx), (P66, 0xFA, K::Xx), (P66, 0xFB, K::Xx),
    (P66, 0xDC, K::Xx), (P66, 0xDD, K::Xx), (P66, 0xD8, K::Xx), (P66, 0xD9, K::Xx),
    (P66, 0xEC, K::Xx), (P66, 0xED, K::Xx), (P66, 0xE8, K::Xx), (P66, 0xE9, K::Xx),
    (P66, 0x74, K::Xx), (P66, 0x75, K::Xx), (P66, 0x76, K::Xx),
    (P66, 0x64, K::Xx), (P66, 0x65, K::Xx), (P66, 0x66, K::Xx),
    (P66, 0xDA, K::Xx), (P66, 0xDE, K::Xx), (P66, 0xEA, K::Xx), (P66, 0xEE, K::Xx),
    (P66, 0xE0, K::Xx), (P66, 0xE3, K::Xx), (P66, 0xD5, K::Xx), (P66, 0xE5, K::Xx),
    (P66, 0xE4, K::Xx), (P66, 0xF4, K::Xx), (P66, 0xF5, K::Xx), (P66, 0xF6, K::Xx),
    (P66, 0x60, K::Xx), (P66, 0x61, K::Xx), (P66, 0x62, K::Xx), (P66, 0x6C, K::Xx),
    (P66, 0x68, K::Xx), (P66, 0x69, K::Xx), (P66, 0x6A, K::Xx), (P66, 0x6D, K::Xx),
    (P66, 0x63, K::Xx), (P66, 0x67, K::Xx), (P66, 0x6B, K::Xx),
    (P66, 0xD1, K::Xx), (P66, 0xD2, K::Xx), (P66, 0xD3, K::Xx), (P66, 0xE1, K::Xx),
    (P66, 0xE2, K::Xx), (P66, 0xF1, K::Xx), (P66, 0xF2, K::Xx), (P66, 0xF3, K::Xx),
    (P66, 0x6F, K::Xx), (F3, 0x6F, K::Xx), (NONE, 0x28, K::Xx), (NONE, 0x10, K::Xx),
    (P66, 0x7F, K::Store), (F3, 0x7F, K::Store), (NONE, 0x29, K::Store), (NONE, 0x11, K::Store),
    (P66, 0x70, K::XxI), (F2, 0x70, K::XxI), (F3, 0x70, K::XxI),
    (NONE, 0xC6, K::XxI), (P66, 0xC6, K::XxI),
    (P66, 0x71, K::ShiftI(2)), (P66, 0x71, K::ShiftI(4)), (P66, 0x71, K::ShiftI(6)),
    (P66, 0x72, K::ShiftI(2)), (P66, 0x72, K::ShiftI(4)), (P66, 0x72, K::ShiftI(6)),
    (P66, 0x73, K::ShiftI(2)), (P66, 0x73, K::ShiftI(3)), (P66, 0x73, K::ShiftI(6)),
    (P66, 0x73, K::ShiftI(7)),
    (NONE, 0x57, K::Xx), (NONE, 0x54, K::Xx), (NONE, 0x55, K::Xx), (NONE, 0x56, K::Xx),
    (P66, 0x57, K::Xx), (NONE, 0x14, K::Xx), (NONE, 0x15, K::Xx), (P66, 0x14, K::Xx),
    (P66, 0x15, K::Xx), (NONE, 0x12, K::XxReg), (NONE, 0x16, K::XxReg),
    (P66, 0x6E, K::XGpr), (P66, 0x7E, K::RmGpr), (F3, 0x7E, K::Scalar(8)), (P66, 0xD6, K::Store),
    (F3, 0x10, K::Scalar(4)), (F2, 0x10, K::Scalar(8)), (P66, 0xD7, K::GprX),
    (NONE, 0x50, K::GprX), (P66, 0x50, K::GprX),
    (P66, 0xC4, K::XGprI), (P66, 0xC5, K::GprXI),
    (F2, 0x58, K::Scalar(8)), (F2, 0x59, K::Scalar(8)), (F2, 0x5C, K::Scalar(8)),
    (F2, 0x5E, K::Scalar(8)), (F2, 0x5D, K::Scalar(8)), (F2, 0x5F, K::Scalar(8)),
    (F2, 0x51, K::Scalar(8)), (F3, 0x58, K::Scalar(4)), (F3, 0x59, K::Scalar(4)),
    (F3, 0x5E, K::Scalar(4)), (F3, 0x5D, K::Scalar(4)), (F3, 0x51, K::Scalar(4)),
    (P66, 0x58, K::Xx), (P66, 0x59, K::Xx), (NONE, 0x58, K::Xx), (NONE, 0x5E, K::Xx),
    (P66, 0x2E, K::Scalar(8)), (P66, 0x2F, K::Scalar(8)), (NONE, 0x2E, K::Scalar(4)),
    (NONE, 0x2F, K::Scalar(4)), (F2, 0x2A, K::XGpr), (F3, 0x2A, K::XGpr),
    (F2, 0x2C, K::GprX), (F2, 0x2D, K::GprX), (F3, 0x2C, K::GprX),
    (F3, 0x5A, K::Scalar(4)), (F2, 0x5A, K::Scalar(8)),
    // Packed/scalar float arithmetic not covered above.
    (NONE, 0x5C, K::Xx), (P66, 0x5C, K::Xx), (NONE, 0x59, K::Xx), (P66, 0x5E, K::Xx),
    (NONE, 0x5D, K::Xx), (P66, 0x5D, K::Xx), (NONE, 0x5F, K::Xx), (P66, 0x5F, K::Xx),
    (NONE, 0x51, K::Xx), (P66, 0x51, K::Xx), (F3, 0x5C, K::Scalar(4)), (F3, 0x5F, K::Scalar(4)),
    (P66, 0x54, K::Xx), (P66, 0x55, K::Xx), (P66, 0x56, K::Xx),
    // Moves: MOVAPD, MOVUPD/MOVUPS/MOVDQU unaligned, MOVSS/MOVSD stores, half moves, MOVNT*.
    (P66, 0x28, K::Xx), (P66, 0x29, K::Store), (P66, 0x10, K::XxU), (P66, 0x11, K::StoreU),
    (NONE, 0x10, K::XxU), (NONE, 0x11, K::StoreU), (F3, 0x6F, K::XxU), (F3, 0x7F, K::StoreU),
    (F3, 0x11, K::StoreU), (F2, 0x11, K::StoreU),
    (NONE, 0x12, K::MemLoad), (NONE, 0x16, K::MemLoad), (P66, 0x12, K::MemLoad),
    (P66, 0x16, K::MemLoad), (NONE, 0x13, K::MemStore), (NONE, 0x17, K::MemStore),
    (P66, 0x13, K::MemStore), (P66, 0x17, K::MemStore), (NONE, 0x2B, K::MemStore),
    (P66, 0x2B, K::MemStore), (P66, 0xE7, K::MemStore), (NONE, 0xC3, K::MemGpr),
    // Conversions to integers with memory sources, CVTSS2SI.
    (F3, 0x2D, K::GprX), (F3, 0x2D, K::GprXm(4)), (F3, 0x2C, K::GprXm(4)),
    (F2, 0x2D, K::GprXm(8)), (F2, 0x2C, K::GprXm(8)),
    // Packed conversions, reciprocal approximations.
    (NONE, 0x5B, K::Xx), (P66, 0x5B, K::Xx), (F3, 0x5B, K::Xx), (F2, 0xE6, K::Xx),
    (P66, 0xE6, K::Xx), (F3, 0xE6, K::Scalar(8)), (NONE, 0x5A, K::Scalar(8)), (P66, 0x5A, K::Xx),
    (NONE, 0x53, K::Xx), (NONE, 0x52, K::Xx), (F3, 0x53, K::Scalar(4)), (F3, 0x52, K::Scalar(4)),
];

fn gpr(r: &mut Rng) -> u8 {
    loop {
        let n = r.below(16) as u8;
        if n != 4 && n != 3 {
            return n;
        }
    }
}

fn encode(pfx: u8, op: u8, w: bool, reg: u8, rm: Option<u8>, disp: u8, imm: Option<u8>) -> Vec<u8> {
    let mut c = Vec::new();
    if pfx != 0 {
        c.push(pfx);
    }
    let rex = 0x40 | if w { 8 } else { 0 } | ((reg >> 3) << 2) | rm.map_or(0, |m| m >> 3);
    if rex != 0x40 {
        c.push(rex);
    }
    c.extend([0x0F, op]);
    match rm {
        Some(m) => c.push(0xC0 | ((reg & 7) << 3) | (m & 7)),
        None => {
            c.push(0x40 | ((reg & 7) << 3) | 3);
            c.push(disp);
        }
    }
    if let Some(i) = imm {
        c.push(i);
    }
    c
}

#[test]
fn sse_integer_and_float_subset() {
    let mut h = Harness::new();
    let mut r = Rng(super::seed::for_test("sse_integer_and_float_subset"));
    let mut failures = Vec::new();
    let n = 12000;
    for _ in 0..n {
        let (pfx, op, k) = TABLE[r.below(TABLE.len() as u64) as usize];
        let mut st = random_state(&mut r);
        // Some float-friendly lanes: small integers as doubles/singles.
        if r.below(3) == 0 {
            for x in st.xmm.iter_mut() {
                let a = (r.below(2000) as f64 - 1000.0) / 8.0;
                let b = (r.below(2000) as f32 - 1000.0) / 4.0;
                *x = u128::from(a.to_bits()) | (u128::from(b.to_bits()) << 64);
            }
        } else if r.below(4) == 0 {
            // Special values in every lane: quiet/signalling NaNs of both signs, infinities,
            // zeroes, denormals — NaN propagation and invalid operations.
            const SPECIAL64: [u64; 14] = [
                0x7ff8_0000_0000_0001,
                0xfff4_0000_0000_0000,
                0x7ff0_0000_0000_0001,
                0x7ff0_0000_0000_0000,
                0xfff0_0000_0000_0000,
                0x8000_0000_0000_0000,
                0x0000_0000_0000_0001,
                0xffff_ffff_ffff_ffff,
                0x000f_ffff_ffff_ffff,
                0x7fef_ffff_ffff_ffff,
                0x0010_0000_0000_0000,
                0x3ff0_0000_0000_0000,
                0x4008_0000_0000_0000,
                0x0000_0000_0000_0000,
            ];
            const SPECIAL32: [u32; 12] = [
                0x7fc0_0001,
                0xffa0_0000,
                0x7f80_0000,
                0xff80_0000,
                0x8000_0000,
                0x7fff_ffff,
                0x0000_0001,
                0x807f_ffff,
                0x7f7f_ffff,
                0x0080_0000,
                0x3f80_0000,
                0x4040_0000,
            ];
            for x in st.xmm.iter_mut() {
                let lo = SPECIAL64[r.below(14) as usize];
                let hi = u64::from(SPECIAL32[r.below(12) as usize])
                    | u64::from(SPECIAL32[r.below(12) as usize]) << 32;
                *x = u128::from(lo) | (u128::from(hi) << 64);
            }
        }
        // MXCSR: every rounding mode, DAZ/FTZ, sticky flags already set; exceptions masked.
        st.mxcsr = 0x1F80 | (r.below(4) as u32) << 13 | (r.below(64) as u32 & r.below(64) as u32);
        if r.below(4) == 0 {
            st.mxcsr |= 0x40;
        }
        if r.below(4) == 0 {
            st.mxcsr |= 0x8000;
        }
        let mem = match k {
            K::MemLoad | K::MemStore | K::MemGpr => true,
            K::ShiftI(_) | K::XxReg | K::GprXI | K::GprX => false,
            _ => r.below(3) == 0,
        };
        st.gpr[3] = DATA + 0x100 + 16 * r.below(0x100);
        let misalign = if matches!(
            k,
            K::XxU | K::StoreU | K::MemLoad | K::MemStore | K::GprXm(_)
        ) && !matches!(op, 0x2B | 0xE7)
        {
            r.below(16) as u8
        } else {
            0
        };
        let disp = 16 * r.below(8) as u8 + misalign;
        let x1 = r.below(16) as u8;
        let x2 = r.below(16) as u8;
        let imm = r.below(256) as u8;
        let w = r.below(2) == 0;
        let code = match k {
            K::Xx
            | K::Scalar(_)
            | K::Store
            | K::XxReg
            | K::XxU
            | K::StoreU
            | K::MemLoad
            | K::MemStore => encode(pfx, op, false, x1, (!mem).then_some(x2), disp, None),
            K::MemGpr => encode(pfx, op, w, gpr(&mut r), None, disp, None),
            K::GprXm(_) => {
                let g = gpr(&mut r);
                encode(pfx, op, w, g, (!mem).then_some(x2), disp, None)
            }
            K::XxI => encode(pfx, op, false, x1, (!mem).then_some(x2), disp, Some(imm)),
            K::ShiftI(n) => encode(pfx, op, false, n, Some(x2), 0, Some(imm % 40)),
            K::XGpr | K::RmGpr => {
                let g = gpr(&mut r);
                encode(pfx, op, w, x1, (!mem).then_some(g), disp, None)
            }
            K::GprX => {
                let g = gpr(&mut r);
                // PMOVMSKB/MOVMSK have no memory form.
                encode(pfx, op, w, g, Some(x2), 0, None)
            }
            K::XGprI => {
                let g = gpr(&mut r);
                encode(pfx, op, false, x1, (!mem).then_some(g), disp, Some(imm))
            }
            K::GprXI => {
                let g = gpr(&mut r);
                encode(pfx, op, false, g, Some(x2), 0, Some(imm))
            }
        };
        let c = Case {
            code,
            st,
            flag_mask: ARITH,
            xmm: true,
            data_seed: 0x77,
            expect: None,
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    for f in failures.iter().take(20) {
        eprintln!("sse: {f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {n} SSE cases differ",
        failures.len()
    );
    eprintln!("sse: {n} cases match the host");
}
