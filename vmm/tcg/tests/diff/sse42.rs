//! SSE4.2 differential cases: PCMPESTRI/M, PCMPISTRI/M (all control bytes, explicit lengths
//! from RAX/RDX), CRC32 (every operand size, register and memory).

use super::harness::{check, random_state, Case, Harness, Rng, DATA};
use super::xmm_table::{run, Op};
use rqemu_tcg::flags::ARITH;

#[test]
fn sse42_string_compares() {
    let mut t = Vec::new();
    for op in [0x60u8, 0x61, 0x62, 0x63] {
        let ops: &'static [u8] = match op {
            0x60 => &[0x3A, 0x60],
            0x61 => &[0x3A, 0x61],
            0x62 => &[0x3A, 0x62],
            _ => &[0x3A, 0x63],
        };
        t.push(Op::new(0x66, ops, true, 16));
        if op < 0x62 {
            let mut w = Op::new(0x66, ops, true, 16);
            w.w = true;
            t.push(w);
        }
    }
    run("sse42-str", &t, 12000, 0x5E42);
}

#[test]
fn sse42_crc32() {
    let mut h = Harness::new();
    let mut r = Rng(0xC3C2);
    let mut failures = Vec::new();
    let n = 4000;
    let gpr = |r: &mut Rng| loop {
        let g = r.below(16) as u8;
        if g != 3 && g != 4 {
            break g;
        }
    };
    for _ in 0..n {
        let mut st = random_state(&mut r);
        st.gpr[3] = DATA + 0x100 + r.below(0x1000);
        // (operand-size prefix, REX.W, opcode)
        let (p66, w, op) = [
            (false, false, 0xF0),
            (true, false, 0xF1),
            (false, false, 0xF1),
            (false, true, 0xF1),
            (false, true, 0xF0),
        ][r.below(5) as usize];
        let reg = gpr(&mut r);
        let mem = r.below(3) == 0;
        let rm = gpr(&mut r);
        let mut code = Vec::new();
        if p66 {
            code.push(0x66);
        }
        code.push(0xF2);
        let rex = 0x40 | if w { 8 } else { 0 } | ((reg >> 3) << 2) | if mem { 0 } else { rm >> 3 };
        // 8-bit sources with REX: SPL..DIL instead of AH..BH; always use REX for byte forms.
        if rex != 0x40 || op == 0xF0 {
            code.push(rex);
        }
        code.extend([0x0F, 0x38, op]);
        if mem {
            code.extend([0x43 | ((reg & 7) << 3), r.below(128) as u8]);
        } else {
            code.push(0xC0 | ((reg & 7) << 3) | (rm & 7));
        }
        let c = Case {
            code,
            st,
            flag_mask: ARITH,
            xmm: false,
            data_seed: 0xC3,
            expect: None,
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    for f in failures.iter().take(20) {
        eprintln!("crc32: {f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {n} CRC32 cases differ",
        failures.len()
    );
}
