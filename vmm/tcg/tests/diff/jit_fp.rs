//! The JIT's translated scalar double arithmetic (`jit/insn/fp.rs`) against the interpreter:
//! random sequences of ADDSD/SUBSD/MULSD/DIVSD and their VEX forms, the 12 scalar double FMA3
//! forms, UCOMISD/COMISD (legacy and VEX) followed by SETcc, CVTSI2SD (legacy and VEX, 32- and
//! 64-bit sources, register or memory), on operands drawn from zeros, ones, denormals, the
//! largest and smallest normals, infinities, quiet and signalling NaNs and random bits, under
//! a random MXCSR: rounding mode, DAZ, FTZ, flags already set, and sometimes exceptions
//! unmasked (the side path then raises #XM or #UD where the interpreter does), with
//! (V)STMXCSR/(V)LDMXCSR between them. Memory operands
//! are `[rbx+disp8]` (sometimes across a page) or `[r15]` (unmapped: #PF). The end state,
//! MXCSR's sticky flags included, must be the interpreter's. Every block is translated on its
//! first run.

use super::harness::{random_state, Rng, State, DATA, UNMAPPED};
use super::jit_vector::{modrm, random_vs_interp, sse, vex_map, Mem};

/// General registers an instruction may read or write here: never RSP, RBX or R15.
const GREG: [u8; 13] = [0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];

/// A double worth testing: signed zeros, ones, denormals, extreme normals, infinities, quiet
/// and signalling NaNs (with payloads), values near 1, random bits.
fn double(r: &mut Rng) -> u64 {
    let sign = r.below(2) << 63;
    sign | match r.below(12) {
        0 => 0,
        1 => 0x3FF0_0000_0000_0000,
        2 => 1 + r.below(0x000F_FFFF_FFFF_FFFF),
        3 => 0x7FEF_FFFF_FFFF_FFFF,
        4 => 0x0010_0000_0000_0000,
        5 => 0x7FF0_0000_0000_0000,
        6 => 0x7FF8_0000_0000_0000 | r.below(0x0007_FFFF_FFFF_FFFF),
        7 => 0x7FF0_0000_0000_0001 + r.below(0x0007_FFFF_FFFF_FFFE),
        8 | 9 => 0x3FF0_0000_0000_0000 + r.below(0x0010_0000_0000_0000) - 0x0008_0000_0000_0000,
        _ => r.value() & !(1 << 63),
    }
}

fn fp_insn(r: &mut Rng) -> Vec<u8> {
    let mut v = Vec::new();
    let m = match r.below(8) {
        0 | 1 => Some(Mem::Data(r.below(0x80) as u8)),
        2 if r.below(4) == 0 => Some(Mem::Fault),
        _ => None,
    };
    let (x, y, z) = (r.below(16) as u8, r.below(16) as u8, r.below(16) as u8);
    match r.below(7) {
        // ADDSD/SUBSD/MULSD/DIVSD.
        0 => {
            let op = [0x58, 0x5C, 0x59, 0x5E][r.below(4) as usize];
            sse(&mut v, 0xF2, false, op, x, y, m);
        }
        // VADDSD/VSUBSD/VMULSD/VDIVSD.
        1 => {
            let op = [0x58, 0x5C, 0x59, 0x5E][r.below(4) as usize];
            vex_map(&mut v, 1, 3, false, false, y, op, x, z, m);
        }
        // VF(N)MADD/VF(N)MSUB 132/213/231 SD (66 0F38 W1).
        2 | 3 => {
            let op = [0x99, 0x9B, 0x9D, 0x9F][r.below(4) as usize] + 0x10 * r.below(3) as u8;
            vex_map(&mut v, 2, 1, true, false, y, op, x, z, m);
        }
        // (V)UCOMISD/(V)COMISD, then SETcc al (the flags are read in the block).
        4 => {
            let op = 0x2E + r.below(2) as u8;
            if r.below(2) == 0 {
                sse(&mut v, 0x66, false, op, x, y, m);
            } else {
                vex_map(&mut v, 1, 1, false, false, 0, op, x, y, m);
            }
            v.extend([0x0F, 0x90 + r.below(16) as u8, 0xC0]);
        }
        // (V)CVTSI2SD from a 32- or 64-bit general register or memory.
        5 => {
            let w = r.below(2) == 0;
            let g = GREG[r.below(GREG.len() as u64) as usize];
            if r.below(2) == 0 {
                sse(&mut v, 0xF2, w, 0x2A, x, g, m);
            } else {
                vex_map(&mut v, 1, 3, w, false, y, 0x2A, x, g, m);
            }
        }
        // STMXCSR or LDMXCSR [rbx+0x40] (often reading what a STMXCSR stored there): run by
        // their handlers from translated code, which must see the flags raised so far and
        // leave the new control bits in force.
        6 if r.below(2) == 0 => {
            let mut reg = 2 + r.below(2) as u8;
            if r.below(2) == 0 {
                // MOV dword [rbx+0x40], a new MXCSR (other control bits, masked); LDMXCSR.
                v.extend([0xC7, 0x43, 0x40]);
                v.extend((mxcsr(r) | 0x1F80).to_le_bytes());
                reg = 2;
            }
            if r.below(2) == 0 {
                v.extend([0x0F, 0xAE]);
            } else {
                v.extend([0xC5, 0xF8, 0xAE]);
            }
            modrm(&mut v, reg, 0, Some(Mem::Data(0x40)));
        }
        // CMP r64, r64: flags set before an FP instruction, read after it.
        _ => {
            let (a, b) = (GREG[r.below(13) as usize], GREG[r.below(13) as usize]);
            v.push(0x48 | ((b >> 3) & 1) << 2 | ((a >> 3) & 1));
            v.extend([0x39, 0xC0 | (b & 7) << 3 | (a & 7)]);
        }
    }
    v
}

/// An MXCSR: mostly the default, else a random rounding mode, DAZ, FTZ and sticky flags,
/// and sometimes unmasked exceptions.
fn mxcsr(r: &mut Rng) -> u32 {
    if r.below(3) == 0 {
        return 0x1F80;
    }
    let mut c = 0x1F80 | (r.below(4) as u32) << 13;
    if r.below(4) == 0 {
        c |= 0x40; // DAZ
    }
    if r.below(4) == 0 {
        c |= 0x8000; // FTZ
    }
    if r.below(4) == 0 {
        c |= r.below(64) as u32;
    }
    if r.below(6) == 0 {
        c &= !((1 + r.below(63) as u32) << 7);
    }
    c
}

fn sequence(r: &mut Rng) -> (Vec<u8>, State) {
    let mut st = random_state(r);
    st.gpr[3] = DATA + 0x100 + r.below(0x1000);
    st.gpr[15] = UNMAPPED + r.below(0x1000);
    st.mxcsr = mxcsr(r);
    for x in st.xmm.iter_mut() {
        *x = (u128::from(r.value()) << 64) | u128::from(double(r));
    }
    for y in st.ymmh.iter_mut() {
        *y = (u128::from(r.value()) << 64) | u128::from(r.value());
    }
    for g in GREG {
        if r.below(4) == 0 {
            st.gpr[g as usize] = r.below(2000).wrapping_sub(1000);
        }
    }
    let mut code = Vec::new();
    for _ in 0..(1 + r.below(24)) {
        code.extend(fp_insn(r));
    }
    (code, st)
}

/// The JIT and the interpreter end in the same state (registers, vector registers, flags,
/// MXCSR, memory, exception).
#[test]
fn jit_fp_ops_match_interpreter() {
    random_vs_interp("jit_fp_ops_match_interpreter", 3000, sequence);
}
