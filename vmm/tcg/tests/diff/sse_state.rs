//! MXCSR and SSE state instructions: LDMXCSR/STMXCSR around float operations with random
//! control words (rounding modes, DAZ/FTZ, flags, masks — unmasked exceptions raise #XM),
//! FXRSTOR/FXSAVE (and the REX.W forms) of random images.

use super::harness::{random_state, Case, Rng, State, ANY, DATA};
use super::host_quirks::{clear_mask_extra, quirks};
use super::run_cases;
use rqemu_tcg::flags::ARITH;

/// `(prefix, opcode)` of register-form float operations `xmm, xmm`.
const FP_OPS: &[(u8, u8)] = &[
    (0, 0x58),
    (0x66, 0x5C),
    (0xF3, 0x59),
    (0xF2, 0x5E),
    (0, 0x51),
    (0x66, 0x5D),
    (0xF3, 0x5F),
    (0xF2, 0x5A),
    (0xF3, 0x5A),
    (0x66, 0x2F),
    (0, 0x2E),
    (0, 0x5E),
    (0x66, 0x59),
    (0xF2, 0x51),
];

fn fp_op(r: &mut Rng, c: &mut Vec<u8>) {
    let (p, op) = FP_OPS[r.below(FP_OPS.len() as u64) as usize];
    if p != 0 {
        c.push(p);
    }
    let (a, b) = (r.below(16) as u8, r.below(16) as u8);
    let rex = 0x40 | ((a >> 3) << 2) | (b >> 3);
    if rex != 0x40 {
        c.push(rex);
    }
    c.extend([0x0F, op, 0xC0 | ((a & 7) << 3) | (b & 7)]);
}

fn float_lanes(r: &mut Rng, st: &mut State) {
    const V64: [u64; 8] = [
        0x3ff0_0000_0000_0000,
        0x4008_0000_0000_0000,
        0x0000_0000_0000_0001,
        0x7ff0_0000_0000_0000,
        0x7ff4_0000_0000_0000,
        0x8000_0000_0000_0000,
        0x7fef_ffff_ffff_ffff,
        0xbff0_0000_0000_0000,
    ];
    const V32: [u32; 8] = [
        0x3f80_0000,
        0x4040_0000,
        0x0000_0001,
        0x7f80_0000,
        0x7fa0_0000,
        0x8000_0000,
        0x7f7f_ffff,
        0xbf80_0000,
    ];
    for x in st.xmm.iter_mut() {
        *x = match r.below(3) {
            0 => u128::from(V64[r.below(8) as usize]) | u128::from(V64[r.below(8) as usize]) << 64,
            1 => (0..4).fold(0u128, |v, i| {
                v | u128::from(V32[r.below(8) as usize]) << (32 * i)
            }),
            _ => u128::from(r.next()) | u128::from(r.next()) << 64,
        };
    }
}

#[test]
fn ldmxcsr_stmxcsr_and_float_ops() {
    run_cases("ldmxcsr_stmxcsr_and_float_ops", 4000, |r| {
        let mut st = random_state(r);
        float_lanes(r, &mut st);
        st.gpr[3] = DATA + 0x800 + 16 * r.below(0x400);
        // Random MXCSR: flags, masks (some exceptions unmasked), RC, DAZ, FTZ.
        let mut csr = r.next() as u32 & 0xFFFF;
        if r.below(2) == 0 {
            csr |= 0x1F80; // mostly masked
        }
        let mut c = vec![0xC7, 0x03];
        c.extend(csr.to_le_bytes());
        c.extend([0x0F, 0xAE, 0x13]); // ldmxcsr [rbx]
        fp_op(r, &mut c);
        c.extend([0x0F, 0xAE, 0x5B, 0x04]); // stmxcsr [rbx+4]
        fp_op(r, &mut c);
        Case {
            code: c,
            st,
            flag_mask: ARITH,
            xmm: true,
            data_seed: 0x61,
            expect: ANY,
        }
    });
}

#[test]
fn fxrstor_fxsave_round_trip() {
    run_cases("fxrstor_fxsave_round_trip", 1500, |r| {
        let mut st = random_state(r);
        st.gpr[3] = DATA + 0x1000 + 16 * r.below(0x300);
        let w64 = r.below(2) == 0;
        let csr = (r.next() as u32 & 0xFFFF) | 0x1F80;
        let mut c = Vec::new();
        // mov dword [rbx+24], csr ; mov word [rbx], fcw (exceptions masked)
        c.extend([0xC7, 0x43, 24]);
        c.extend(csr.to_le_bytes());
        c.extend([0x66, 0xC7, 0x03]);
        c.extend((0x037F | (r.next() as u16 & 0x0C00)).to_le_bytes());
        // mov word [rbx+2], fsw (no exception summary)
        c.extend([0x66, 0xC7, 0x43, 2]);
        c.extend((r.next() as u16 & 0x3F00).to_le_bytes());
        // FIP/FDP: canonical in 48 bits (the host may keep 57-bit pointers with LA57).
        // A host that saves the pointers only with FSW.ES set gets zero pointers and FOP.
        let zero_pointers = quirks().fx_pointers_need_es;
        for off in [8u8, 16] {
            c.extend([0x48, 0xC7, 0x43, off]);
            let v = r.next() as u32;
            c.extend(if zero_pointers { 0 } else { v }.to_le_bytes());
        }
        if zero_pointers {
            c.extend([0x66, 0xC7, 0x43, 6, 0, 0]); // mov word [rbx+6], 0 (FOP)
        }
        if w64 {
            c.push(0x48);
        }
        c.extend([0x0F, 0xAE, 0x0B]); // fxrstor [rbx]
        if r.below(2) == 0 {
            fp_op(r, &mut c);
        }
        if w64 || r.below(2) == 0 {
            c.push(0x48);
        }
        c.extend([0x0F, 0xAE, 0x83, 0x00, 0x02, 0x00, 0x00]); // fxsave [rbx+512]
        c.extend(clear_mask_extra(0x200));
        c.extend([0xDB, 0xE3]); // fninit: leave no odd x87 state behind
        Case {
            code: c,
            st,
            flag_mask: ARITH,
            xmm: true,
            data_seed: 0x62,
            expect: None,
        }
    });
}

/// The x87 state instructions the TCG implements (no x87 arithmetic): FNINIT, FLDCW/FNSTCW,
/// FNSTSW to AX and memory, FNCLEX, FWAIT, EMMS, then FXSAVE of the resulting state (the
/// register contents, which FNINIT leaves alone, are loaded by an FXRSTOR first).
#[test]
fn x87_control_instructions() {
    run_cases("x87_control_instructions", 1000, |r| {
        let mut st = random_state(r);
        st.gpr[3] = DATA + 0x1000 + 16 * r.below(0x300);
        let mut c = Vec::new();
        // A canonical image: FCW/MXCSR valid, FSW/FTW/pointers zero.
        c.extend([0x48, 0xC7, 0x03, 0x7F, 0x03, 0, 0]); // mov qword [rbx], 0x37f
        c.extend([0x48, 0xC7, 0x43, 8, 0, 0, 0, 0]); // FIP
        c.extend([0x48, 0xC7, 0x43, 16, 0, 0, 0, 0]); // FDP
        c.extend([0xC7, 0x43, 24, 0x80, 0x1F, 0, 0]); // MXCSR
        c.extend([0x48, 0x0F, 0xAE, 0x0B]); // fxrstor64 [rbx]
        for _ in 0..1 + r.below(6) {
            match r.below(7) {
                0 => c.extend([0xDB, 0xE3]), // fninit
                1 => {
                    // mov word [rbx+0x300], cw ; fldcw [rbx+0x300] (exceptions masked)
                    let cw = 0x037F | (r.next() as u16 & 0x0F00) | 0x40;
                    c.extend([0x66, 0xC7, 0x83, 0x00, 0x03, 0, 0]);
                    c.extend(cw.to_le_bytes());
                    c.extend([0xD9, 0xAB, 0x00, 0x03, 0, 0]);
                }
                2 => c.extend([0xD9, 0xBB, 0x10, 0x03, 0, 0]), // fnstcw [rbx+0x310]
                3 => c.extend([0xDF, 0xE0]),                   // fnstsw ax
                4 => c.extend([0xDD, 0xBB, 0x20, 0x03, 0, 0]), // fnstsw [rbx+0x320]
                5 => c.extend([0xDB, 0xE2]),                   // fnclex
                _ => c.extend(if r.below(2) == 0 {
                    [0x9B, 0x90]
                } else {
                    [0x0F, 0x77]
                }),
            }
        }
        c.extend([0x48, 0x0F, 0xAE, 0x83, 0x00, 0x01, 0, 0]); // fxsave64 [rbx+0x100]
        c.extend(clear_mask_extra(0x100));
        c.extend([0xDB, 0xE3]); // fninit
        Case {
            code: c,
            st,
            flag_mask: ARITH,
            xmm: true,
            data_seed: 0x63,
            expect: None,
        }
    });
}
