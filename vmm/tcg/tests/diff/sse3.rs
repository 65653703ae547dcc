//! SSE3 differential cases: the XMM instructions (table runner, special lanes) and FISTTP
//! (with FLD m32/m64/m80/ST(i) to load the x87 stack; FSW compared through FNSTSW AX).

use super::harness::{check, random_state, Case, Harness, Rng, DATA};
use super::xmm_table::{run, Op};

#[test]
fn sse3_xmm() {
    let t = [
        Op::new(0xF2, &[0xD0], false, 16),
        Op::new(0x66, &[0xD0], false, 16),
        Op::new(0xF2, &[0x7C], false, 16),
        Op::new(0x66, &[0x7C], false, 16),
        Op::new(0xF2, &[0x7D], false, 16),
        Op::new(0x66, &[0x7D], false, 16),
        Op::mem_only(0xF2, &[0xF0]),
        Op::new(0xF2, &[0x12], false, 8),
        Op::new(0xF3, &[0x16], false, 16),
        Op::new(0xF3, &[0x12], false, 16),
    ];
    run("sse3", &t, 6000, 0x55E3);
}

/// Doubles around the integer limits and rounding boundaries, and special values.
const DOUBLES: [f64; 16] = [
    1.5,
    -2.5,
    0.3,
    -0.0,
    1e9,
    -1e18,
    2147483647.9,
    -2147483648.9,
    2147483648.0,
    32767.9,
    -32768.5,
    -32769.0,
    9.223_372_036_854_776e18,
    -9.223_372_036_854_776e18,
    f64::INFINITY,
    1e-310,
];

#[test]
fn sse3_fisttp() {
    let mut h = Harness::new();
    let mut r = Rng(0xF157);
    let mut failures = Vec::new();
    let n = 3000;
    for _ in 0..n {
        let mut st = random_state(&mut r);
        st.gpr[3] = DATA + 0x100 + 16 * r.below(0x100);
        for g in [8, 9] {
            st.gpr[g] = match r.below(4) {
                0 => st.gpr[g],
                1 => [
                    0x7ff4_0000_0000_0001u64,
                    0x7ff8_0000_0000_0000,
                    0x7f80_0001,
                    0x0000_0001,
                ][r.below(4) as usize],
                _ => DOUBLES[r.below(16) as usize].to_bits(),
            };
        }
        if r.below(4) == 0 {
            // A float in the low half of R9 for FLD m32.
            st.gpr[9] = u64::from((DOUBLES[r.below(16) as usize] as f32).to_bits());
        }
        // fninit; mov [rbx], r8; mov [rbx+8], r9
        let mut code = vec![0xDB, 0xE3, 0x4C, 0x89, 0x03, 0x4C, 0x89, 0x4B, 0x08];
        let fisttp = |k: u8, d: u8| -> [u8; 3] { [[0xDF, 0xDB, 0xDD][k as usize], 0x4B, d] };
        match r.below(4) {
            0 => {
                // fld qword [rbx] | fld dword [rbx+8] | fld tword [rbx]
                code.extend(match r.below(3) {
                    0 => vec![0xDD, 0x03],
                    1 => vec![0xD9, 0x43, 0x08],
                    _ => vec![0xDB, 0x2B],
                });
                code.extend(fisttp(r.below(3) as u8, 0x10));
            }
            1 => {
                // fld qword [rbx]; fld dword [rbx+8]; fld st1; three FISTTPs
                code.extend([0xDD, 0x03, 0xD9, 0x43, 0x08, 0xD9, 0xC1]);
                for d in [0x10, 0x18, 0x20] {
                    code.extend(fisttp(r.below(3) as u8, d));
                }
            }
            2 => {
                // Stack underflow: FISTTP of an empty ST0.
                code.extend(fisttp(r.below(3) as u8, 0x10));
            }
            _ => {
                // Nine pushes: the last one overflows the stack.
                for _ in 0..9 {
                    code.extend([0xDD, 0x03]);
                }
                code.extend(fisttp(2, 0x10));
            }
        }
        // fnstsw ax; fninit
        code.extend([0xDF, 0xE0, 0xDB, 0xE3]);
        let c = Case {
            code,
            st,
            flag_mask: 0,
            xmm: true,
            data_seed: 0xF1,
            expect: None,
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    for f in failures.iter().take(20) {
        eprintln!("fisttp: {f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {n} FISTTP cases differ",
        failures.len()
    );
}
