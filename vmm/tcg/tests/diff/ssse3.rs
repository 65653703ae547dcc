//! SSSE3 on XMM (table runner) and MM registers (loaded from R8-R15, stored to memory).

use super::harness::{check, random_state, Case, Harness, Rng, DATA};
use super::mmx::{load_mm_from_r8_r15, store_mm_and_emms};
use super::xmm_table::{run, Op};
use rqemu_tcg::flags::ARITH;

/// (0F 38 xx | 0F 3A 0F) opcodes of SSSE3; PALIGNR has an imm8.
const OPS: [&[u8]; 16] = [
    &[0x38, 0x00],
    &[0x38, 0x01],
    &[0x38, 0x02],
    &[0x38, 0x03],
    &[0x38, 0x04],
    &[0x38, 0x05],
    &[0x38, 0x06],
    &[0x38, 0x07],
    &[0x38, 0x08],
    &[0x38, 0x09],
    &[0x38, 0x0A],
    &[0x38, 0x0B],
    &[0x38, 0x1C],
    &[0x38, 0x1D],
    &[0x38, 0x1E],
    &[0x3A, 0x0F],
];

#[test]
fn ssse3_xmm() {
    let table: Vec<Op> = OPS
        .iter()
        .map(|op| Op::new(0x66, op, op[0] == 0x3A, 16))
        .collect();
    run("ssse3", &table, 6000, 0x5553);
}

#[test]
fn ssse3_mmx() {
    let mut h = Harness::new();
    let mut r = Rng(0x5554);
    let mut failures = Vec::new();
    let n = 4000;
    for _ in 0..n {
        let op = OPS[r.below(OPS.len() as u64) as usize];
        let mut st = random_state(&mut r);
        st.gpr[3] = DATA + 0x100 + 16 * r.below(0x100);
        let mem = r.below(3) == 0;
        let (m1, m2) = (r.below(8) as u8, r.below(8) as u8);
        let mut code = load_mm_from_r8_r15();
        code.push(0x0F);
        code.extend_from_slice(op);
        if mem {
            code.extend([0x43 | (m1 << 3), 16 * r.below(4) as u8]);
        } else {
            code.push(0xC0 | (m1 << 3) | m2);
        }
        if op[0] == 0x3A {
            code.push(if r.below(2) == 0 {
                r.below(20)
            } else {
                r.below(256)
            } as u8);
        }
        code.extend(store_mm_and_emms());
        let c = Case {
            code,
            st,
            flag_mask: ARITH,
            xmm: true,
            data_seed: 0x5554,
            expect: None,
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    for f in failures.iter().take(20) {
        eprintln!("ssse3 mmx: {f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {n} cases differ",
        failures.len()
    );
}
