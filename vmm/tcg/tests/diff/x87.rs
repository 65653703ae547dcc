//! x87 data movement against the host: FLD/FILD/FLDZ/FLD1 loads, FXCH/FCHS/FABS,
//! FST/FSTP (m32/m64 rounded under all four rounding controls, m80, ST(i)), FIST/FISTP,
//! FINCSTP/FDECSTP/FFREE; results in memory and FSW (C1, PE, UE, OE, IE, SF, DE, TOP)
//! through FNSTSW AX.

use super::harness::{check, random_state, Case, Harness, Rng, DATA};

const DOUBLES: [f64; 12] = [
    1.5,
    -2.5,
    0.1,
    -0.0,
    3.4028235677973366e38,
    1.401298464324817e-45,
    2.2250738585072014e-308,
    1e-310,
    -1e300,
    2147483647.5,
    -9.2e18,
    f64::NAN,
];

/// `mov word [rbx+0x100], cw; fldcw [rbx+0x100]`.
pub(super) fn load_cw(code: &mut Vec<u8>, cw: u16) {
    let [lo, hi] = cw.to_le_bytes();
    code.extend([0x66, 0xC7, 0x83, 0x00, 0x01, 0, 0, lo, hi]);
    code.extend([0xD9, 0xAB, 0x00, 0x01, 0, 0]);
}

/// An 80-bit sign/exponent near interesting boundaries.
fn exponent(r: &mut Rng) -> u64 {
    let base: i64 = [
        0, 127, -126, -149, -150, 1023, -1022, -1074, -1075, 31, 63, 15,
    ][r.below(12) as usize];
    let e = 16383 + base + r.below(5) as i64 - 2;
    let e = match r.below(10) {
        0 => 0x7FFF,
        1 => 0,
        _ => e,
    };
    (e as u64 & 0x7FFF) | (r.below(2) << 15)
}

#[test]
fn x87_loads_stores_and_rounding() {
    let mut h = Harness::new();
    let mut r = Rng(0x8787);
    let mut failures = Vec::new();
    let n = 6000;
    for _ in 0..n {
        let mut st = random_state(&mut r);
        st.gpr[3] = DATA + 0x100 + 16 * r.below(0x100);
        match r.below(3) {
            0 => st.gpr[8] = DOUBLES[r.below(12) as usize].to_bits(),
            1 => st.gpr[8] |= 1 << 63,
            _ => {}
        }
        st.gpr[9] = exponent(&mut r);
        let mut code = vec![0xDB, 0xE3]; // fninit
        let rc = r.below(4) as u16;
        let cw = 0x037F | (rc << 10);
        load_cw(&mut code, cw);
        // mov [rbx], r8; mov [rbx+8], r9
        code.extend([0x4C, 0x89, 0x03, 0x4C, 0x89, 0x4B, 0x08]);
        let loads: [&[u8]; 8] = [
            &[0xDD, 0x03],
            &[0xD9, 0x03],
            &[0xDB, 0x2B],
            &[0xDF, 0x03],
            &[0xDB, 0x03],
            &[0xDF, 0x2B],
            &[0xD9, 0xEE],
            &[0xD9, 0xE8],
        ];
        for _ in 0..1 + r.below(2) {
            code.extend(loads[r.below(8) as usize]);
        }
        let ops: [&[u8]; 8] = [
            &[0xD9, 0xC9], // fxch st1
            &[0xD9, 0xE0], // fchs
            &[0xD9, 0xE1], // fabs
            &[0xD9, 0xF7], // fincstp
            &[0xD9, 0xF6], // fdecstp
            &[0xDD, 0xC1], // ffree st1
            &[0xDD, 0xD1], // fst st1
            &[0xDD, 0xD9], // fstp st1
        ];
        for _ in 0..r.below(3) {
            code.extend(ops[r.below(8) as usize]);
        }
        let stores: [&[u8]; 12] = [
            &[0xD9, 0x53, 0x20],
            &[0xD9, 0x5B, 0x20],
            &[0xDD, 0x53, 0x20],
            &[0xDD, 0x5B, 0x20],
            &[0xDB, 0x7B, 0x20],
            &[0xDF, 0x53, 0x20],
            &[0xDB, 0x53, 0x20],
            &[0xDF, 0x5B, 0x20],
            &[0xDB, 0x5B, 0x20],
            &[0xDF, 0x7B, 0x20],
            &[0xDD, 0x5B, 0x30],
            &[0xDB, 0x7B, 0x30],
        ];
        for _ in 0..1 + r.below(2) {
            code.extend(stores[r.below(12) as usize]);
        }
        // fnstsw ax; fninit
        code.extend([0xDF, 0xE0, 0xDB, 0xE3]);
        let c = Case {
            code,
            st,
            flag_mask: 0,
            xmm: true,
            data_seed: 0x87,
            expect: None,
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    for f in failures.iter().take(12) {
        eprintln!("x87: {f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {n} x87 cases differ",
        failures.len()
    );
}

/// FADD/FSUB/FSUBR/FMUL/FDIV/FDIVR (register, popping, m32/m64 and m16/m32 integer forms) under every
/// precision and rounding control, with operands near each other (cancellation), far apart,
/// denormal, infinite, NaN.
#[test]
fn x87_add_sub_mul_div() {
    let mut h = Harness::new();
    let mut r = Rng(0xADD8);
    let mut failures = Vec::new();
    let n = 8000;
    for _ in 0..n {
        let mut st = random_state(&mut r);
        st.gpr[3] = DATA + 0x100 + 16 * r.below(0x100);
        let e1 = exponent(&mut r);
        st.gpr[9] = e1;
        st.gpr[11] = match r.below(3) {
            0 => e1 ^ r.below(2) << 15,
            1 => (e1 & 0x8000) | ((e1 & 0x7FFF) + r.below(70)).min(0x7FFF),
            _ => exponent(&mut r),
        };
        if r.below(3) == 0 {
            st.gpr[10] = st.gpr[8] ^ r.below(1 << 20);
        }
        for g in [8, 10] {
            if r.below(4) != 0 {
                st.gpr[g] |= 1 << 63;
            }
        }
        let pc = [0u16, 2, 3][r.below(3) as usize];
        let rc = r.below(4) as u16;
        let cw = 0x007F | (pc << 8) | (rc << 10);
        let mut code = vec![0xDB, 0xE3];
        load_cw(&mut code, cw);
        // [rbx] = r8:r9 (80-bit), [rbx+0x10] = r10:r11, then FLD both (ST1 = first).
        code.extend([0x4C, 0x89, 0x03, 0x4C, 0x89, 0x4B, 0x08]);
        code.extend([0x4C, 0x89, 0x53, 0x10, 0x4C, 0x89, 0x5B, 0x18]);
        code.extend([0xDB, 0x2B, 0xDB, 0x6B, 0x10]);
        // /0 add, /1 mul, /4 sub, /5 subr, /6 div, /7 divr
        let reg = [0u8, 1, 4, 5, 6, 7][r.below(6) as usize];
        let i = r.below(2) as u8;
        match r.below(7) {
            6 => {
                // fcomi / fucomi / fcomip / fucomip st0, st(i)
                let (a, b) =
                    [(0xDB, 0xF0), (0xDB, 0xE8), (0xDF, 0xF0), (0xDF, 0xE8)][r.below(4) as usize];
                code.extend([a, b | i]);
            }
            0 => code.extend([0xD8, 0xC0 | (reg << 3) | i]), // fop st0, st(i)
            1 => code.extend([0xDC, 0xC0 | (reg << 3) | 1]), // fop st1, st0
            2 => code.extend([0xDE, 0xC0 | (reg << 3) | 1]), // fopp st1, st0
            3 => code.extend([0xD8, (reg << 3) | 0x43, 0x00]), // fop dword [rbx]
            4 => code.extend([0xDC, (reg << 3) | 0x43, 0x10]), // fop qword [rbx+0x10]
            _ => code.extend([[0xDE, 0xDA][r.below(2) as usize], (reg << 3) | 0x43, 0x00]), // fiop
        }
        // fstp tword [rbx+0x20]; fstp tword [rbx+0x30]; fnstsw ax; fninit
        code.extend([0xDB, 0x7B, 0x20, 0xDB, 0x7B, 0x30, 0xDF, 0xE0, 0xDB, 0xE3]);
        let c = Case {
            code,
            st,
            flag_mask: rqemu_tcg::flags::ARITH,
            xmm: true,
            data_seed: 0xAD,
            expect: None,
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    for f in failures.iter().take(12) {
        eprintln!("x87 arith: {f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {n} x87 arithmetic cases differ",
        failures.len()
    );
}
