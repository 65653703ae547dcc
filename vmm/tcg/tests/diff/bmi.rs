//! BMI1/BMI2 differential cases (VEX-encoded GPR instructions, 32 and 64 bits, register and
//! memory sources) and TZCNT (BMI1) with a zero source.

use super::harness::{check, random_state, Case, Harness, Rng, DATA};
use rqemu_tcg::flags::{ARITH, CF, OF, SF, ZF};

/// Where the operands go: reg = ModRM.reg, vvvv = VEX.vvvv, rm = ModRM.rm.
#[derive(Clone, Copy)]
struct Op {
    map: u8,
    pp: u8,
    opcode: u8,
    /// Fixed ModRM.reg (/n group forms: BLSR/BLSMSK/BLSI use vvvv as destination).
    group: Option<u8>,
    imm: bool,
    flags: u64,
}

const fn op(map: u8, pp: u8, opcode: u8, flags: u64) -> Op {
    Op {
        map,
        pp,
        opcode,
        group: None,
        imm: false,
        flags,
    }
}

const LOGIC: u64 = SF | ZF | CF | OF;

const OPS: [Op; 13] = [
    op(2, 0, 0xF2, LOGIC),        // ANDN
    op(2, 0, 0xF7, ZF | CF | OF), // BEXTR
    Op {
        group: Some(1),
        ..op(2, 0, 0xF3, LOGIC)
    }, // BLSR
    Op {
        group: Some(2),
        ..op(2, 0, 0xF3, SF | CF | OF)
    }, // BLSMSK
    Op {
        group: Some(3),
        ..op(2, 0, 0xF3, LOGIC)
    }, // BLSI
    op(2, 0, 0xF5, LOGIC),        // BZHI
    op(2, 2, 0xF5, ARITH),        // PEXT
    op(2, 3, 0xF5, ARITH),        // PDEP
    op(2, 3, 0xF6, ARITH),        // MULX
    Op {
        imm: true,
        ..op(3, 3, 0xF0, ARITH)
    }, // RORX
    op(2, 2, 0xF7, ARITH),        // SARX
    op(2, 1, 0xF7, ARITH),        // SHLX
    op(2, 3, 0xF7, ARITH),        // SHRX
];

fn gpr(r: &mut Rng) -> u8 {
    loop {
        let g = r.below(16) as u8;
        if g != 3 && g != 4 {
            return g;
        }
    }
}

#[test]
fn bmi1_bmi2() {
    let mut h = Harness::new();
    let mut r = Rng(0xB312);
    let mut failures = Vec::new();
    let n = 8000;
    for _ in 0..n {
        let o = OPS[r.below(OPS.len() as u64) as usize];
        let mut st = random_state(&mut r);
        // Small counts/controls now and then (BEXTR/BZHI/shifts).
        if r.below(2) == 0 {
            for g in st.gpr.iter_mut() {
                if r.below(2) == 0 {
                    *g = r.below(0x5000);
                }
            }
        }
        st.gpr[3] = DATA + 0x100 + r.below(0x1000);
        let w = r.below(2) == 0;
        let reg = o.group.unwrap_or_else(|| gpr(&mut r));
        // RORX has no vvvv operand: the field must encode 1111b (0 once inverted).
        let vvvv = if o.imm { 0 } else { gpr(&mut r) };
        let mem = r.below(3) == 0;
        let rm = gpr(&mut r);
        let rb = if o.group.is_some() { 0 } else { reg >> 3 };
        let b = if mem { 0 } else { rm >> 3 };
        let mut code = vec![
            0xC4,
            ((rb ^ 1) << 7) | (1 << 6) | ((b ^ 1) << 5) | o.map,
            (u8::from(w) << 7) | ((!vvvv & 15) << 3) | o.pp,
            o.opcode,
        ];
        if mem {
            code.extend([0x43 | ((reg & 7) << 3), r.below(128) as u8]);
        } else {
            code.push(0xC0 | ((reg & 7) << 3) | (rm & 7));
        }
        if o.imm {
            code.push(r.below(256) as u8);
        }
        let c = Case {
            code,
            st,
            flag_mask: o.flags,
            xmm: false,
            data_seed: 0xB3,
            expect: None,
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    for f in failures.iter().take(20) {
        eprintln!("bmi: {f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {n} BMI cases differ",
        failures.len()
    );
}

#[test]
fn tzcnt_zero_and_nonzero() {
    let mut h = Harness::new();
    let mut r = Rng(0x7C);
    for i in 0..400 {
        let mut st = random_state(&mut r);
        if i % 2 == 0 {
            st.gpr[1] = 0;
        }
        for code in [
            vec![0xF3, 0x48, 0x0F, 0xBC, 0xC1],
            vec![0xF3, 0x0F, 0xBC, 0xC1],
            vec![0x66, 0xF3, 0x0F, 0xBC, 0xC1],
        ] {
            let c = Case {
                code,
                st,
                flag_mask: CF | ZF,
                xmm: false,
                data_seed: 1,
                expect: None,
            };
            if let Err(e) = check(&mut h, &c) {
                panic!("tzcnt: {e}");
            }
        }
    }
}
