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

use super::harness::{random_state, Harness, Rng, State, DATA, UNMAPPED};
use super::seed;

/// Where the memory operand of a generated instruction is.
#[derive(Clone, Copy)]
enum Mem {
    /// `[rbx + disp8]`.
    Data(u8),
    /// `[r15]`: unmapped.
    Fault,
}

fn modrm(v: &mut Vec<u8>, reg: u8, rm: u8, m: Option<Mem>) {
    match m {
        Some(Mem::Data(d)) => {
            v.push(0x40 | ((reg & 7) << 3) | 3);
            v.push(d);
        }
        Some(Mem::Fault) => v.push(((reg & 7) << 3) | 7),
        None => v.push(0xC0 | ((reg & 7) << 3) | (rm & 7)),
    }
}

fn rm_num(rm: u8, m: Option<Mem>) -> u8 {
    match m {
        Some(Mem::Data(_)) => 3,
        Some(Mem::Fault) => 15,
        None => rm,
    }
}

/// Legacy SSE: prefix `pfx`, REX (W, R, B), 0F `op`, ModRM.
fn sse(v: &mut Vec<u8>, pfx: u8, w: bool, op: u8, reg: u8, rm: u8, m: Option<Mem>) {
    v.push(pfx);
    let b = rm_num(rm, m);
    let rex = 0x40 | u8::from(w) << 3 | ((reg >> 3) & 1) << 2 | ((b >> 3) & 1);
    if rex != 0x40 {
        v.push(rex);
    }
    v.extend([0x0F, op]);
    modrm(v, reg, rm, m);
}

/// VEX (3-byte form, L=0): opcode map `map` (1: 0F, 2: 0F38), `pp`, W, `vvvv`, `op`, ModRM.
#[allow(clippy::too_many_arguments)]
fn vex(
    v: &mut Vec<u8>,
    map: u8,
    pp: u8,
    w: bool,
    vvvv: u8,
    op: u8,
    reg: u8,
    rm: u8,
    m: Option<Mem>,
) {
    let b = rm_num(rm, m);
    v.push(0xC4);
    v.push(((!reg >> 3) & 1) << 7 | 1 << 6 | ((!b >> 3) & 1) << 5 | map);
    v.push(u8::from(w) << 7 | ((!vvvv) & 0xF) << 3 | pp);
    v.push(op);
    modrm(v, reg, rm, m);
}

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
            vex(&mut v, 1, 3, false, y, op, x, z, m);
        }
        // VF(N)MADD/VF(N)MSUB 132/213/231 SD (66 0F38 W1).
        2 | 3 => {
            let op = [0x99, 0x9B, 0x9D, 0x9F][r.below(4) as usize] + 0x10 * r.below(3) as u8;
            vex(&mut v, 2, 1, true, y, op, x, z, m);
        }
        // (V)UCOMISD/(V)COMISD, then SETcc al (the flags are read in the block).
        4 => {
            let op = 0x2E + r.below(2) as u8;
            if r.below(2) == 0 {
                sse(&mut v, 0x66, false, op, x, y, m);
            } else {
                vex(&mut v, 1, 1, false, 0, op, x, y, m);
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
                vex(&mut v, 1, 3, w, y, 0x2A, x, g, m);
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
    let name = "jit_fp_ops_match_interpreter";
    let mut h = Harness::new();
    let mut r = Rng(seed::for_test(name));
    let mut failures = Vec::new();
    let n = 3000;
    let (mut native, mut total) = (0, 0);
    for i in 0..n {
        let (code, st) = sequence(&mut r);
        let (stats, ran) = super::jit::jit_vs_interp(&mut h, i, &code, &st, 0, &mut failures);
        native += stats.native_insns;
        total += ran;
    }
    eprintln!("{name}: {native} of {total} instructions ran in translated code");
    assert!(native * 2 > total, "too little ran in translated code");
    super::report(name, n as usize, &failures);
}
