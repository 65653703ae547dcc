//! The x87 instructions run on the host unit (`exec/x87_host.rs`, `exec/x87_env.rs`) against
//! the host: comparisons and FTST/FXAM (C0-C3), FSQRT, FRNDINT, FSCALE, FXTRACT, FPREM/FPREM1,
//! the transcendentals, constants under every rounding control, FCMOVcc on random flags,
//! FBLD/FBSTP, FFREEP, and FNSTENV/FLDENV/FNSAVE/FRSTOR round trips. Stack order, tags (by
//! the stores of empty registers), FSW and memory are compared.

use super::harness::{check, random_state, Case, Harness, Rng, DATA};

/// An 80-bit sign/exponent: mostly moderate values, sometimes zero/denormal/huge/special.
fn exponent(r: &mut Rng) -> u64 {
    let e: u64 = match r.below(12) {
        0 => 0,
        1 => 0x7FFF,
        2 => 16383 + 60 + r.below(8),
        3 => 1 + r.below(4),
        4 => 16383 - 70 + r.below(8),
        _ => 16383 - 4 + r.below(9),
    };
    e | (r.below(2) << 15)
}

const OPS: &[&[u8]] = &[
    &[0xD9, 0xE4],       // ftst
    &[0xD9, 0xE5],       // fxam
    &[0xD9, 0xFA],       // fsqrt
    &[0xD9, 0xFC],       // frndint
    &[0xD9, 0xFD],       // fscale
    &[0xD9, 0xF4],       // fxtract
    &[0xD9, 0xF8],       // fprem
    &[0xD9, 0xF5],       // fprem1
    &[0xD9, 0xF0],       // f2xm1
    &[0xD9, 0xF1],       // fyl2x
    &[0xD9, 0xF9],       // fyl2xp1
    &[0xD9, 0xF2],       // fptan
    &[0xD9, 0xF3],       // fpatan
    &[0xD9, 0xFE],       // fsin
    &[0xD9, 0xFF],       // fcos
    &[0xD9, 0xFB],       // fsincos
    &[0xD9, 0xEB],       // fldpi
    &[0xD9, 0xEA],       // fldl2e
    &[0xD9, 0xE9],       // fldl2t
    &[0xD9, 0xEC],       // fldlg2
    &[0xD9, 0xED],       // fldln2
    &[0xDE, 0xD9],       // fcompp
    &[0xDA, 0xE9],       // fucompp
    &[0xD8, 0xD1],       // fcom st1
    &[0xD8, 0xDA],       // fcomp st2
    &[0xDD, 0xE1],       // fucom st1
    &[0xDD, 0xE9],       // fucomp st1
    &[0xD8, 0x53, 0x00], // fcom dword [rbx]
    &[0xDC, 0x5B, 0x10], // fcomp qword [rbx+0x10]
    &[0xDE, 0x53, 0x00], // ficom word [rbx]
    &[0xDA, 0x5B, 0x10], // ficomp dword [rbx+0x10]
    &[0xDF, 0xC1],       // ffreep st1
    &[0xD9, 0xD0],       // fnop
    &[0xDF, 0x73, 0x40], // fbstp [rbx+0x40]
    &[0xDF, 0x63, 0x50], // fbld [rbx+0x50]
];

/// [rbx] = r8:r9, [rbx+0x10] = r10:r11; every physical register filled with the first value
/// (the contents of empty registers show through FXAM's C1 and FNSAVE), fninit, fldcw cw.
fn prologue(code: &mut Vec<u8>, cw: u16) {
    code.extend([0x4C, 0x89, 0x03, 0x4C, 0x89, 0x4B, 0x08]);
    code.extend([0x4C, 0x89, 0x53, 0x10, 0x4C, 0x89, 0x5B, 0x18]);
    code.extend([0xDB, 0xE3]);
    for _ in 0..8 {
        code.extend([0xDB, 0x2B]);
    }
    code.extend([0xDB, 0xE3]);
    super::x87::load_cw(code, cw);
}

fn operands(r: &mut Rng, st: &mut super::harness::State) {
    let e1 = exponent(r);
    st.gpr[9] = e1;
    st.gpr[11] = match r.below(3) {
        0 => e1 ^ (r.below(2) << 15),
        1 => (e1 & 0x8000) | ((e1 & 0x7FFF) + r.below(3)).min(0x7FFF),
        _ => exponent(r),
    };
    for g in [8, 10] {
        if r.below(6) != 0 {
            st.gpr[g] |= 1 << 63;
        }
    }
    if r.below(8) == 0 {
        st.gpr[10] = st.gpr[8];
    }
}

fn run(name: &str, seed: u64, n: usize, mut gen: impl FnMut(&mut Rng, &mut Vec<u8>)) {
    let mut h = Harness::new();
    let mut r = Rng(seed);
    let mut failures = Vec::new();
    for _ in 0..n {
        let mut st = random_state(&mut r);
        st.gpr[3] = DATA + 0x100 + 16 * r.below(0x100);
        operands(&mut r, &mut st);
        let pc = [0u16, 2, 3, 3][r.below(4) as usize];
        let rc = r.below(4) as u16;
        let mut code = Vec::new();
        prologue(&mut code, 0x007F | (pc << 8) | (rc << 10));
        gen(&mut r, &mut code);
        let c = Case {
            code,
            st,
            flag_mask: rqemu_tcg::flags::ARITH,
            xmm: true,
            data_seed: 0x77,
            expect: None,
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    for f in failures.iter().take(12) {
        eprintln!("{name}: {f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {n} {name} cases differ",
        failures.len()
    );
}

#[test]
fn x87_host_ops() {
    run("x87 host ops", 0x87A5, 12000, |r, code| {
        // Zero, one or two values on the stack.
        let loads = r.below(8).min(2);
        if loads >= 1 {
            code.extend([0xDB, 0x2B]);
        }
        if loads == 2 {
            code.extend([0xDB, 0x6B, 0x10]);
        }
        if r.below(4) == 0 {
            // A BCD operand for FBLD: random digits, sometimes invalid ones.
            code.extend([0x48, 0xB8]);
            let mut v = 0u64;
            for k in 0..16 {
                let base = if r.below(8) == 0 { 16 } else { 10 };
                v |= r.below(base) << (4 * k);
            }
            code.extend(v.to_le_bytes());
            code.extend([0x48, 0x89, 0x43, 0x50]); // mov [rbx+0x50], rax
            code.extend([0x66, 0xC7, 0x43, 0x58, r.below(2) as u8 * 0x80, 0x00]); // sign
            code.extend([0xC6, 0x43, 0x57, r.below(0x9A) as u8]);
        }
        for _ in 0..1 + r.below(2) {
            code.extend(OPS[r.below(OPS.len() as u64) as usize]);
        }
        // fnstsw ax; three stores (empty registers give the indefinite); fninit.
        code.extend([0xDF, 0xE0]);
        code.extend([
            0xDB, 0x7B, 0x20, 0xDB, 0x7B, 0x30, 0xDB, 0x7B, 0x60, 0xDB, 0xE3,
        ]);
    });
}

#[test]
fn x87_fcmov() {
    run("x87 fcmov", 0xFC30, 3000, |r, code| {
        if r.below(4) != 0 {
            code.extend([0xDB, 0x2B]);
        }
        code.extend([0xDB, 0x6B, 0x10]);
        // Random arithmetic flags: cmp r8, r10.
        code.extend([0x4D, 0x39, 0xD0]);
        let (a, b) = [(0xDA, 0xC0), (0xDA, 0xC8), (0xDA, 0xD0), (0xDA, 0xD8)][r.below(4) as usize];
        let a = if r.below(2) == 0 { a } else { a + 1 }; // DB: the negated forms
        code.extend([a, b | r.below(3) as u8]);
        code.extend([0xDF, 0xE0]);
        code.extend([0xDB, 0x7B, 0x20, 0xDB, 0x7B, 0x30, 0xDB, 0xE3]);
    });
}

#[test]
fn x87_env_and_save_images() {
    run("x87 env", 0xE7E7, 3000, |r, code| {
        code.extend([0xDB, 0x2B]);
        if r.below(2) == 0 {
            code.extend([0xDB, 0x6B, 0x10]);
        }
        code.extend(OPS[r.below(OPS.len() as u64) as usize]);
        let p66 = r.below(3) == 0;
        let (store, load, len): (u8, u8, u8) = match r.below(2) {
            0 => (0x33, 0x23, if p66 { 14 } else { 28 }), // D9 /6 fnstenv, D9 /4 fldenv
            _ => (0x33, 0x23, if p66 { 94 } else { 108 }), // DD /6 fnsave, DD /4 frstor
        };
        let save = len > 28;
        let opc = if save { 0xDD } else { 0xD9 };
        let insn = |c: &mut Vec<u8>, modrm: u8| {
            if p66 {
                c.push(0x66);
            }
            c.extend([opc, modrm | 0x40, 0x40]);
        };
        insn(code, store);
        // The instruction and data pointers are the host's/ours: zero them in the image.
        let (ip_lo, ip_hi) = if p66 { (6u8, 14u8) } else { (12, 28) };
        for o in (ip_lo..ip_hi).step_by(2) {
            code.extend([0x66, 0xC7, 0x43, 0x40 + o, 0, 0]);
        }
        if r.below(2) == 0 {
            // Fiddle with the stored control/tag words, then load the image back.
            code.extend([
                0x66,
                0xC7,
                0x43,
                0x40,
                r.below(256) as u8 | 0x3F,
                0x03 | (r.below(16) as u8) << 2,
            ]);
            let tw_off = if p66 { 4 } else { 8 };
            code.extend([
                0x66,
                0xC7,
                0x43,
                0x40 + tw_off,
                r.below(256) as u8,
                r.below(256) as u8,
            ]);
            insn(code, load);
        }
        code.extend([0xDF, 0xE0]);
        code.extend([0xDB, 0x7B, 0x20, 0xDB, 0x7B, 0x30, 0xDB, 0xE3]);
    });
}
