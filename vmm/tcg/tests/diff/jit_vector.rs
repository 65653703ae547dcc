//! The JIT's translated SSE/AVX instructions (`jit/insn/vector.rs`) against the interpreter:
//! random sequences of whole-register moves (MOVUPS/MOVAPS/MOVDQU/MOVDQA/..., VEX.128 and
//! VEX.256), MOVSD/MOVSS and VMOVSD/VMOVSS (merges, loads, stores), MOVD/MOVQ/VMOVD/VMOVQ in
//! every direction, PXOR/POR/PAND/PANDN/XORPS/..., PCMPEQB/W/D, PUNPCKL/H*, PSHUFD,
//! VPBROADCASTB/W/D/Q, PMOVMSKB, VZEROUPPER, mixed with flag-setting ALU instructions and
//! SETcc (the flag record must survive a vector instruction's side path). Memory operands are `[rbx+disp8]` at a random alignment (the
//! aligned forms then take the side path, where the interpreter raises #GP), sometimes
//! across a page, or `[r15]` (unmapped: #PF from the side path). Every block is translated
//! on its first run; XMM and YMM upper halves start random and are compared at the end.

use super::harness::{random_state, Harness, Rng, State, DATA, UNMAPPED};
use super::seed;

/// Where the memory operand of a generated instruction is.
#[derive(Clone, Copy)]
pub(super) enum Mem {
    /// `[rbx + disp8]`.
    Data(u8),
    /// `[r15]`: unmapped.
    Fault,
}

/// ModRM (+ disp8) for register `reg` and either register `rm` or memory `m`.
pub(super) fn modrm(v: &mut Vec<u8>, reg: u8, rm: u8, m: Option<Mem>) {
    match m {
        Some(Mem::Data(d)) => {
            v.push(0x40 | ((reg & 7) << 3) | 3);
            v.push(d);
        }
        Some(Mem::Fault) => v.push(((reg & 7) << 3) | 7),
        None => v.push(0xC0 | ((reg & 7) << 3) | (rm & 7)),
    }
}

/// The base register number of `m` (for REX.B / VEX.B), else `rm`.
fn rm_num(rm: u8, m: Option<Mem>) -> u8 {
    match m {
        Some(Mem::Data(_)) => 3,
        Some(Mem::Fault) => 15,
        None => rm,
    }
}

/// A legacy SSE instruction: `pfx` (0x66/0xF2/0xF3 or 0), REX (W, R, B), 0F `op`, ModRM.
pub(super) fn sse(v: &mut Vec<u8>, pfx: u8, w: bool, op: u8, reg: u8, rm: u8, m: Option<Mem>) {
    if pfx != 0 {
        v.push(pfx);
    }
    let b = rm_num(rm, m);
    let rex = 0x40 | u8::from(w) << 3 | ((reg >> 3) & 1) << 2 | ((b >> 3) & 1);
    if rex != 0x40 {
        v.push(rex);
    }
    v.extend([0x0F, op]);
    modrm(v, reg, rm, m);
}

/// A VEX instruction (3-byte form, map 0F): `pp` (0 none, 1 66, 2 F3, 3 F2), W, L, `vvvv`
/// (a register number, or 0 for none), `op`, ModRM.
#[allow(clippy::too_many_arguments)]
fn vex(
    v: &mut Vec<u8>,
    pp: u8,
    w: bool,
    l: bool,
    vvvv: u8,
    op: u8,
    reg: u8,
    rm: u8,
    m: Option<Mem>,
) {
    vex_map(v, 1, pp, w, l, vvvv, op, reg, rm, m);
}

/// [`vex`] in opcode map `map` (1: 0F, 2: 0F38, 3: 0F3A).
#[allow(clippy::too_many_arguments)]
pub(super) fn vex_map(
    v: &mut Vec<u8>,
    map: u8,
    pp: u8,
    w: bool,
    l: bool,
    vvvv: u8,
    op: u8,
    reg: u8,
    rm: u8,
    m: Option<Mem>,
) {
    let b = rm_num(rm, m);
    v.push(0xC4);
    v.push(((!reg >> 3) & 1) << 7 | 1 << 6 | ((!b >> 3) & 1) << 5 | map);
    v.push(u8::from(w) << 7 | ((!vvvv) & 0xF) << 3 | u8::from(l) << 2 | pp);
    v.push(op);
    modrm(v, reg, rm, m);
}

/// General registers the vector instructions may write: never RSP, RBX or R15.
const GDEST: [u8; 13] = [0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];

fn vector_insn(r: &mut Rng) -> Vec<u8> {
    let mut v = Vec::new();
    let m = match r.below(8) {
        0..=2 => Some(Mem::Data((r.below(0x78) as u8) & !3)),
        3 => Some(Mem::Fault),
        _ => None,
    };
    let (x, y, z) = (r.below(16) as u8, r.below(16) as u8, r.below(16) as u8);
    let g = GDEST[r.below(GDEST.len() as u64) as usize];
    let l = r.below(2) == 0;
    let store = r.below(2) == 0;
    match r.below(15) {
        // MOVUPS/MOVAPS/MOVUPD/MOVAPD/MOVDQU/MOVDQA load, store or register move.
        0 => {
            let (pfx, lo) = [
                (0, 0x10),
                (0, 0x28),
                (0x66, 0x10),
                (0x66, 0x28),
                (0xF3, 0x6F),
                (0x66, 0x6F),
            ][r.below(6) as usize];
            let op = if store && m.is_some() {
                lo + if lo == 0x6F { 0x10 } else { 1 }
            } else {
                lo
            };
            sse(&mut v, pfx, false, op, x, y, m);
        }
        // VMOVUPS/VMOVAPS/VMOVDQU/VMOVDQA (VEX.128 or .256).
        1 => {
            let (pp, lo) = [(0, 0x10), (0, 0x28), (2, 0x6F), (1, 0x6F)][r.below(4) as usize];
            let op = if store && m.is_some() {
                lo + if lo == 0x6F { 0x10 } else { 1 }
            } else {
                lo
            };
            vex(&mut v, pp, false, l, 0, op, x, y, m);
        }
        // MOVSD/MOVSS: register merge, load, store.
        2 => {
            let pfx = [0xF2, 0xF3][r.below(2) as usize];
            let op = if store && m.is_some() { 0x11 } else { 0x10 };
            sse(&mut v, pfx, false, op, x, y, m);
        }
        // VMOVSD/VMOVSS: x = {z low, y rest} or load/store.
        3 => {
            let pp = 2 + r.below(2) as u8;
            match m {
                None => vex(&mut v, pp, false, false, y, 0x10, x, z, None),
                Some(_) => {
                    let op = if store { 0x11 } else { 0x10 };
                    vex(&mut v, pp, false, false, 0, op, x, y, m);
                }
            }
        }
        // MOVD/MOVQ xmm <-> r/m32/64 (legacy or VEX).
        4 => {
            let w = r.below(2) == 0;
            let op = if store { 0x7E } else { 0x6E };
            let rm = if m.is_some() { 0 } else { g };
            if r.below(2) == 0 {
                sse(&mut v, 0x66, w, op, x, rm, m);
            } else {
                vex(&mut v, 1, w, false, 0, op, x, rm, m);
            }
        }
        // MOVQ xmm, xmm/m64 (F3 0F 7E) and MOVQ xmm/m64, xmm (66 0F D6), legacy or VEX.
        5 => {
            let (pfx, pp, op) = if store {
                (0x66, 1, 0xD6)
            } else {
                (0xF3, 2, 0x7E)
            };
            if r.below(2) == 0 {
                sse(&mut v, pfx, false, op, x, y, m);
            } else {
                vex(&mut v, pp, false, false, 0, op, x, y, m);
            }
        }
        // PXOR/POR/PAND/PANDN, XORPS/ANDPS/ANDNPS/ORPS, XORPD.
        6 => {
            let (pfx, op) = [
                (0x66, 0xEF),
                (0x66, 0xEB),
                (0x66, 0xDB),
                (0x66, 0xDF),
                (0, 0x57),
                (0, 0x54),
                (0, 0x55),
                (0, 0x56),
                (0x66, 0x57),
            ][r.below(9) as usize];
            sse(&mut v, pfx, false, op, x, y, m);
        }
        // VPXOR/VPOR/VPAND/VPANDN, VXORPS/VXORPD (.128/.256).
        7 => {
            let (pp, op) = [
                (1, 0xEF),
                (1, 0xEB),
                (1, 0xDB),
                (1, 0xDF),
                (0, 0x57),
                (1, 0x57),
            ][r.below(6) as usize];
            vex(&mut v, pp, false, l, y, op, x, z, m);
        }
        // PCMPEQB/W/D and VPCMPEQB/W/D.
        8 => {
            let op = 0x74 + r.below(3) as u8;
            if r.below(2) == 0 {
                sse(&mut v, 0x66, false, op, x, y, m);
            } else {
                vex(&mut v, 1, false, l, y, op, x, z, m);
            }
        }
        // VPBROADCASTB/W/D/Q (.128/.256) from a register or memory (VEX map 0F38).
        13 => {
            let op = [0x78, 0x79, 0x58, 0x59][r.below(4) as usize];
            vex_map(&mut v, 2, 1, false, l, 0, op, x, y, m);
        }
        // PSHUFD/VPSHUFD (.128/.256) with a random order.
        12 => {
            if r.below(2) == 0 {
                sse(&mut v, 0x66, false, 0x70, x, y, m);
            } else {
                vex(&mut v, 1, false, l, 0, 0x70, x, y, m);
            }
            v.push(r.below(256) as u8);
        }
        // PUNPCKL/H BW/WD/DQ/QDQ and their VEX forms (.128/.256).
        11 => {
            let op = [0x60, 0x61, 0x62, 0x6C, 0x68, 0x69, 0x6A, 0x6D][r.below(8) as usize];
            if r.below(2) == 0 {
                sse(&mut v, 0x66, false, op, x, y, m);
            } else {
                vex(&mut v, 1, false, l, y, op, x, z, m);
            }
        }
        // PMOVMSKB / VPMOVMSKB r32, xmm/ymm.
        9 => {
            if r.below(2) == 0 {
                sse(&mut v, 0x66, false, 0xD7, g, y, None);
            } else {
                vex(&mut v, 1, false, l, 0, 0xD7, g, y, None);
            }
        }
        // VZEROUPPER.
        10 => v.extend([0xC5, 0xF8, 0x77]),
        // CMP r32, r32 then SETcc al: flags set before a vector instruction read after it.
        _ => {
            let (a, b) = (GDEST[r.below(13) as usize], GDEST[r.below(13) as usize]);
            v.push(0x40 | ((b >> 3) & 1) << 2 | ((a >> 3) & 1));
            v.extend([0x39, 0xC0 | (b & 7) << 3 | (a & 7)]);
            v.extend([0x0F, 0x90 + r.below(16) as u8, 0xC0]);
        }
    }
    v
}

fn sequence(r: &mut Rng) -> (Vec<u8>, State) {
    let mut st = random_state(r);
    st.gpr[3] = DATA + 0x100 + r.below(0x1000);
    st.gpr[15] = UNMAPPED + r.below(0x1000);
    for y in st.ymmh.iter_mut() {
        *y = (u128::from(r.value()) << 64) | u128::from(r.value());
    }
    let mut code = Vec::new();
    for _ in 0..(1 + r.below(24)) {
        code.extend(vector_insn(r));
    }
    (code, st)
}

/// The JIT and the interpreter end in the same state (registers, vector registers, flags,
/// memory, exception).
#[test]
fn jit_vector_ops_match_interpreter() {
    random_vs_interp("jit_vector_ops_match_interpreter", 3000, sequence);
}

/// Runs `n` random sequences from `sequence` with the interpreter and with the JIT
/// (every block translated on its first run) and fails on any difference; more than half of
/// the instructions must have run in translated code.
pub(super) fn random_vs_interp(
    name: &str,
    n: u64,
    mut sequence: impl FnMut(&mut Rng) -> (Vec<u8>, State),
) {
    let mut h = Harness::new();
    let mut r = Rng(seed::for_test(name));
    let mut failures = Vec::new();
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
