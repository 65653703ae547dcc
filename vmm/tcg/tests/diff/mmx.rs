//! MMX differential cases. The harness state has no MM registers, so every case loads MM0-7
//! from R8-R15 (random "interesting" values), runs the instruction, stores MM0-7 into the
//! data buffer (compared in full) and executes EMMS (the host's x87 must be left empty).

use super::harness::{check, random_state, Case, Harness, Rng, DATA};
use rqemu_tcg::flags::ARITH;

/// Operand shape of a table entry.
#[derive(Clone, Copy, PartialEq, Eq)]
enum K {
    /// mm, mm/m64.
    Mm,
    /// mm, mm/m64, imm8.
    MmI,
    /// mm (r/m field), imm8 with /n in the reg field.
    ShiftI(u8),
    /// mm, r/m32|64 (REX.W for 64).
    MmGpr,
    /// r/m32|64, mm.
    GprMm,
    /// mm/m64 destination, mm source.
    Store,
    /// m64 destination only (MOVNTQ).
    StoreMem,
    /// r32 (reg field), mm (r/m), imm8 (PEXTRW) / no imm (PMOVMSKB).
    GprMmI,
    GprMmReg,
    /// mm, r32/m16, imm8 (PINSRW).
    MmGprI,
    /// MASKMOVQ mm, mm (to [RDI]).
    MaskMov,
    /// xmm, mm/m64 (CVTPI2PS/PD, MOVQ2DQ register-only).
    XMm,
    XMmReg,
    /// mm, xmm/m64 (CVT(T)PS2PI) / mm, xmm/m128 (CVT(T)PD2PI) / mm, xmm (MOVDQ2Q).
    MmX,
    MmX128,
    MmXReg,
}

const NONE: u8 = 0;
const P66: u8 = 0x66;
const F2: u8 = 0xF2;
const F3: u8 = 0xF3;

#[rustfmt::skip]
const TABLE: &[(u8, u8, K)] = &[
    (NONE, 0x60, K::Mm), (NONE, 0x61, K::Mm), (NONE, 0x62, K::Mm), (NONE, 0x63, K::Mm),
    (NONE, 0x64, K::Mm), (NONE, 0x65, K::Mm), (NONE, 0x66, K::Mm), (NONE, 0x67, K::Mm),
    (NONE, 0x68, K::Mm), (NONE, 0x69, K::Mm), (NONE, 0x6A, K::Mm), (NONE, 0x6B, K::Mm),
    (NONE, 0x6E, K::MmGpr), (NONE, 0x6F, K::Mm), (NONE, 0x7E, K::GprMm), (NONE, 0x7F, K::Store),
    (NONE, 0x70, K::MmI),
    (NONE, 0x71, K::ShiftI(2)), (NONE, 0x71, K::ShiftI(4)), (NONE, 0x71, K::ShiftI(6)),
    (NONE, 0x72, K::ShiftI(2)), (NONE, 0x72, K::ShiftI(4)), (NONE, 0x72, K::ShiftI(6)),
    (NONE, 0x73, K::ShiftI(2)), (NONE, 0x73, K::ShiftI(6)),
    (NONE, 0x74, K::Mm), (NONE, 0x75, K::Mm), (NONE, 0x76, K::Mm),
    (NONE, 0xC4, K::MmGprI), (NONE, 0xC5, K::GprMmI),
    (NONE, 0xD1, K::Mm), (NONE, 0xD2, K::Mm), (NONE, 0xD3, K::Mm), (NONE, 0xD4, K::Mm),
    (NONE, 0xD5, K::Mm), (NONE, 0xD7, K::GprMmReg), (NONE, 0xD8, K::Mm), (NONE, 0xD9, K::Mm),
    (NONE, 0xDA, K::Mm), (NONE, 0xDB, K::Mm), (NONE, 0xDC, K::Mm), (NONE, 0xDD, K::Mm),
    (NONE, 0xDE, K::Mm), (NONE, 0xDF, K::Mm), (NONE, 0xE0, K::Mm), (NONE, 0xE1, K::Mm),
    (NONE, 0xE2, K::Mm), (NONE, 0xE3, K::Mm), (NONE, 0xE4, K::Mm), (NONE, 0xE5, K::Mm),
    (NONE, 0xE7, K::StoreMem), (NONE, 0xE8, K::Mm), (NONE, 0xE9, K::Mm), (NONE, 0xEA, K::Mm),
    (NONE, 0xEB, K::Mm), (NONE, 0xEC, K::Mm), (NONE, 0xED, K::Mm), (NONE, 0xEE, K::Mm),
    (NONE, 0xEF, K::Mm), (NONE, 0xF1, K::Mm), (NONE, 0xF2, K::Mm), (NONE, 0xF3, K::Mm),
    (NONE, 0xF4, K::Mm), (NONE, 0xF5, K::Mm), (NONE, 0xF6, K::Mm), (NONE, 0xF7, K::MaskMov),
    (NONE, 0xF8, K::Mm), (NONE, 0xF9, K::Mm), (NONE, 0xFA, K::Mm), (NONE, 0xFB, K::Mm),
    (NONE, 0xFC, K::Mm), (NONE, 0xFD, K::Mm), (NONE, 0xFE, K::Mm),
    (NONE, 0x2A, K::XMm), (P66, 0x2A, K::XMm), (NONE, 0x2C, K::MmX), (NONE, 0x2D, K::MmX),
    (P66, 0x2C, K::MmX128), (P66, 0x2D, K::MmX128),
    (F3, 0xD6, K::XMmReg), (F2, 0xD6, K::MmXReg),
];

/// `[pfx] [REX] 0F op modrm`: `rm` register number or `[rbx+disp8]`.
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

/// MOVQ MMi, R(8+i) for every i.
pub fn load_mm_from_r8_r15() -> Vec<u8> {
    let mut c = Vec::new();
    for i in 0..8u8 {
        c.extend([0x49, 0x0F, 0x6E, 0xC0 | (i << 3) | i]);
    }
    c
}

/// MOVQ [RBX+0x40+8i], MMi for every i, then EMMS.
pub fn store_mm_and_emms() -> Vec<u8> {
    let mut c = Vec::new();
    for i in 0..8u8 {
        c.extend([0x0F, 0x7F, 0x43 | (i << 3), 0x40 + 8 * i]);
    }
    c.extend([0x0F, 0x77]);
    c
}

/// A general-purpose register other than RSP and RBX (the address register).
fn gpr(r: &mut Rng) -> u8 {
    loop {
        let n = r.below(16) as u8;
        if n != 4 && n != 3 {
            return n;
        }
    }
}

/// Float lanes with special values (NaNs, infinities, out-of-range, halves for rounding).
fn special_float_xmm(r: &mut Rng) -> u128 {
    const F32: [u32; 10] = [
        0x7fc0_0001,
        0xff80_0000,
        0x4f00_0000, // 2^31
        0xcf00_0000, // -2^31
        0x3fc0_0000, // 1.5
        0x4020_0000, // 2.5
        0xbfc0_0000, // -1.5
        0x0000_0001,
        0x8000_0000,
        0x4eff_ffff,
    ];
    const F64: [u64; 8] = [
        0x7ff8_0000_0000_0001,
        0xfff0_0000_0000_0000,
        0x41e0_0000_0000_0000, // 2^31
        0xc1e0_0000_0000_0000, // -2^31
        0x41df_ffff_ffe0_0000, // 2^31 - 1
        0x3ff8_0000_0000_0000, // 1.5
        0x4004_0000_0000_0000, // 2.5
        0xc1e0_0000_0010_0000, // just below -2^31
    ];
    if r.below(2) == 0 {
        let mut v = 0u128;
        for i in 0..4 {
            v |= u128::from(F32[r.below(10) as usize]) << (32 * i);
        }
        v
    } else {
        u128::from(F64[r.below(8) as usize]) | (u128::from(F64[r.below(8) as usize]) << 64)
    }
}

#[test]
fn mmx_instructions() {
    let mut h = Harness::new();
    let mut r = Rng(0x3317_0001);
    let mut failures = Vec::new();
    let n = 8000;
    for _ in 0..n {
        let (pfx, op, k) = TABLE[r.below(TABLE.len() as u64) as usize];
        let mut st = random_state(&mut r);
        if r.below(3) == 0 {
            for x in st.xmm.iter_mut() {
                *x = special_float_xmm(&mut r);
            }
        }
        let mem = match k {
            K::StoreMem => true,
            K::ShiftI(_) | K::GprMmReg | K::MaskMov | K::XMmReg | K::MmXReg => false,
            _ => r.below(3) == 0,
        };
        st.gpr[3] = DATA + 0x100 + 16 * r.below(0x100);
        let disp = 16 * r.below(4) as u8;
        let m1 = r.below(8) as u8;
        let m2 = r.below(8) as u8;
        let x = r.below(16) as u8;
        let imm = r.below(256) as u8;
        let w = r.below(2) == 0;
        let rm = |v: u8| (!mem).then_some(v);
        let body = match k {
            K::Mm | K::Store | K::StoreMem => encode(pfx, op, false, m1, rm(m2), disp, None),
            K::MmI => encode(pfx, op, false, m1, rm(m2), disp, Some(imm)),
            K::ShiftI(n) => encode(pfx, op, false, n, Some(m2), 0, Some(imm % 72)),
            K::MmGpr | K::GprMm => {
                let g = gpr(&mut r);
                encode(pfx, op, w, m1, rm(g), disp, None)
            }
            K::GprMmI => encode(pfx, op, false, gpr(&mut r), Some(m2), 0, Some(imm)),
            K::GprMmReg => encode(pfx, op, false, gpr(&mut r), Some(m2), 0, None),
            K::MmGprI => {
                let g = gpr(&mut r);
                encode(pfx, op, false, m1, rm(g), disp, Some(imm))
            }
            K::MaskMov => {
                st.gpr[7] = DATA + 0x2000 + r.below(0x1000);
                encode(pfx, op, false, m1, Some(m2), 0, None)
            }
            K::XMm | K::XMmReg => encode(pfx, op, false, x, rm(m2), disp, None),
            K::MmX | K::MmX128 | K::MmXReg => encode(pfx, op, false, m1, rm(x), disp, None),
        };
        let mut code = load_mm_from_r8_r15();
        code.extend(body);
        code.extend(store_mm_and_emms());
        let c = Case {
            code,
            st,
            flag_mask: ARITH,
            xmm: true,
            data_seed: 0x88,
            expect: None,
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    for f in failures.iter().take(20) {
        eprintln!("mmx: {f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {n} MMX cases differ",
        failures.len()
    );
    eprintln!("mmx: {n} cases match the host");
}

/// The x87 tag word and TOP as FXSAVE shows them: all valid after an MMX instruction, all
/// empty after EMMS; the exponent of a written MM register is all ones.
#[test]
fn mmx_tag_word_in_fxsave() {
    let mut h = Harness::new();
    for emms in [false, true] {
        let mut st = random_state(&mut Rng(7));
        st.gpr[3] = DATA + 0x100;
        let mut code = load_mm_from_r8_r15();
        // paddb mm1, mm2
        code.extend([0x0F, 0xFC, 0xCA]);
        if emms {
            code.extend([0x0F, 0x77]);
        }
        // fxsave [rbx+0x100]
        code.extend([0x0F, 0xAE, 0x83, 0x00, 0x01, 0x00, 0x00]);
        // movzx r10d, byte [rbx+0x104] (abridged tag word)
        code.extend([0x44, 0x0F, 0xB6, 0x93, 0x04, 0x01, 0x00, 0x00]);
        // movzx r11d, word [rbx+0x102] (FSW, TOP in bits 11-13)
        code.extend([0x44, 0x0F, 0xB7, 0x9B, 0x02, 0x01, 0x00, 0x00]);
        // mov r12, [rbx+0x128] (R0 exponent and reserved bytes)
        code.extend([0x4C, 0x8B, 0xA3, 0x28, 0x01, 0x00, 0x00]);
        // mov r13, [rbx+0x138] (R1 exponent and reserved bytes)
        code.extend([0x4C, 0x8B, 0xAB, 0x38, 0x01, 0x00, 0x00]);
        // mov r14, [rbx+0x130] (R1 = MM1 mantissa)
        code.extend([0x4C, 0x8B, 0xB3, 0x30, 0x01, 0x00, 0x00]);
        // lea rdi, [rbx+0x100]; mov ecx, 64; xor eax, eax; rep stosq (erase the image, whose
        // reserved bytes FXSAVE leaves alone on the host)
        code.extend([0x48, 0x8D, 0xBB, 0x00, 0x01, 0x00, 0x00]);
        code.extend([0xB9, 0x40, 0x00, 0x00, 0x00, 0x31, 0xC0, 0xF3, 0x48, 0xAB]);
        if !emms {
            code.extend([0x0F, 0x77]);
        }
        let c = Case {
            code,
            st,
            flag_mask: 0,
            xmm: true,
            data_seed: 0x99,
            expect: None,
        };
        if let Err(e) = check(&mut h, &c) {
            panic!("emms={emms}: {e}");
        }
    }
}
