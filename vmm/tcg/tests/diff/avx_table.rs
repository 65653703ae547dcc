//! A table-driven differential runner for VEX-encoded instructions (AVX, AVX2): 128- and
//! 256-bit forms, random and special lanes in all YMM registers (upper halves included),
//! register and (unaligned unless required) memory forms, random MXCSR modes.

use super::harness::{check, random_state, Case, Harness, Rng, DATA};
use rqemu_tcg::flags::ARITH;

/// Entry flags.
pub const I: u32 = 1; // imm8
pub const N: u32 = 2; // vvvv is a source (else 1111)
pub const L0: u32 = 4; // 128-bit only
pub const L1: u32 = 8; // 256-bit only
pub const W1: u32 = 16; // VEX.W = 1
pub const GRM: u32 = 32; // r/m is a GPR in the register form
pub const GREG: u32 = 64; // ModRM.reg is a GPR
pub const MEM: u32 = 128; // memory form only
pub const REG: u32 = 256; // register form only
pub const FL: u32 = 512; // compare the arithmetic flags
pub const IS4: u32 = 1024; // imm8[7:4] is a register operand
pub const AL: u32 = 2048; // memory operand must be aligned to the vector size
pub const NONAN: u32 = 4096; // no NaN float lanes
pub const XM: u32 = 8192; // some cases unmask random MXCSR exceptions (#XM compared)

/// One entry: mandatory prefix (0 none, 1 66, 2 F3, 3 F2), map (1 0F, 2 0F38, 3 0F3A),
/// opcode, flags, ModRM.reg extension (groups: the destination is vvvv).
#[derive(Clone, Copy)]
pub struct V(pub u8, pub u8, pub u8, pub u32, pub Option<u8>);

const SPECIAL32: [u32; 12] = [
    0x7fc0_0001,
    0xffa0_0000,
    0x7f80_0000,
    0xff80_0000,
    0x8000_0000,
    0x0000_0000,
    0x0000_0001,
    0x3f80_0000,
    0xbfc0_0000,
    0x7fff_ffff,
    0x8080_8080,
    0x4b00_0000,
];
const SPECIAL64: [u64; 8] = [
    0x7ff8_0000_0000_0001,
    0xfff4_0000_0000_0000,
    0x7ff0_0000_0000_0000,
    0x8000_0000_0000_0000,
    0x0000_0000_0000_0001,
    0x3ff8_0000_0000_0000,
    0xc004_0000_0000_0000,
    0x4330_0000_0000_0000,
];

fn special(r: &mut Rng) -> u128 {
    if r.below(2) == 0 {
        (0..4).fold(0u128, |v, i| {
            v | (u128::from(SPECIAL32[r.below(12) as usize]) << (32 * i))
        })
    } else {
        u128::from(SPECIAL64[r.below(8) as usize])
            | (u128::from(SPECIAL64[r.below(8) as usize]) << 64)
    }
}

fn finite(v: u128) -> u128 {
    let mut v = v;
    for i in 0..4 {
        let sh = 32 * i;
        if f32::from_bits((v >> sh) as u32).is_nan() {
            v = (v & !(u128::from(u32::MAX) << sh)) | (u128::from(1.5f32.to_bits()) << sh);
        }
    }
    for i in 0..2 {
        let sh = 64 * i;
        if f64::from_bits((v >> sh) as u64).is_nan() {
            v = (v & !(u128::from(u64::MAX) << sh)) | (u128::from(1.5f64.to_bits()) << sh);
        }
    }
    v
}

/// `C4 RXBmmmmm WvvvvLpp op modrm [disp8] [imm8]`; memory operands are `[rbx + disp8]`.
pub fn encode(
    v: &V,
    l: bool,
    reg: u8,
    vvvv: u8,
    rm: Option<u8>,
    disp: u8,
    imm: Option<u8>,
) -> Vec<u8> {
    let V(pp, map, op, f, _) = *v;
    let r = if reg < 8 { 0x80 } else { 0 };
    let b = match rm {
        Some(m) if m >= 8 => 0,
        _ => 0x20,
    };
    let w = if f & W1 != 0 { 0x80 } else { 0 };
    let mut c = vec![
        0xC4,
        r | 0x40 | b | map,
        w | ((!vvvv & 15) << 3) | if l { 4 } else { 0 } | pp,
        op,
    ];
    match rm {
        Some(m) => c.push(0xC0 | ((reg & 7) << 3) | (m & 7)),
        None => {
            c.push(0x40 | ((reg & 7) << 3) | 3);
            c.push(disp);
        }
    }
    if let Some(i) = imm {
        c.push(i);
    }
    c
}

fn gpr(r: &mut Rng) -> u8 {
    loop {
        let g = r.below(16) as u8;
        if g != 3 && g != 4 {
            break g;
        }
    }
}

/// Runs `n` random cases drawn from `table`; panics with the first mismatches.
pub fn run(name: &str, table: &[V], n: usize, seed: u64) {
    let mut h = Harness::new();
    let mut r = Rng(seed);
    let mut failures = Vec::new();
    let mut failing = std::collections::BTreeSet::new();
    for _ in 0..n {
        let v = table[r.below(table.len() as u64) as usize];
        let f = v.3;
        let mut st = random_state(&mut r);
        for x in st.ymmh.iter_mut() {
            *x = (u128::from(r.value()) << 64) | u128::from(r.value());
        }
        if r.below(2) == 0 {
            st.xmm.iter_mut().for_each(|x| *x = special(&mut r));
            st.ymmh.iter_mut().for_each(|x| *x = special(&mut r));
        } else if r.below(2) == 0 {
            for i in 0..8 {
                if r.below(2) == 0 {
                    st.xmm[2 * i + 1] = st.xmm[2 * i];
                    st.ymmh[2 * i + 1] = st.ymmh[2 * i];
                }
            }
        }
        if f & NONAN != 0 {
            st.xmm.iter_mut().for_each(|x| *x = finite(*x));
            st.ymmh.iter_mut().for_each(|x| *x = finite(*x));
        }
        // Rounding mode, FTZ/DAZ (all exceptions masked).
        st.mxcsr = match r.below(4) {
            0 => 0x1F80 | ((r.below(4) as u32) << 13),
            1 => 0x9FC0,
            _ => 0x1F80,
        };
        let unmask = f & XM != 0 && r.below(3) == 0;
        if unmask {
            st.mxcsr &= !((r.below(64) as u32) << 7);
        }
        st.gpr[3] = DATA + 0x100 + 64 * r.below(0x100);
        let l = match (f & L0 != 0, f & L1 != 0) {
            (true, _) => false,
            (_, true) => true,
            _ => r.below(2) == 0,
        };
        let mem = f & MEM != 0 || (f & REG == 0 && r.below(3) == 0);
        let (reg, rm) = match v.4 {
            Some(e) => (e, r.below(16) as u8),
            None if f & GREG != 0 => (gpr(&mut r), r.below(16) as u8),
            None if f & GRM != 0 => (r.below(16) as u8, gpr(&mut r)),
            None => (r.below(16) as u8, r.below(16) as u8),
        };
        let vvvv = if f & N != 0 || v.4.is_some() {
            r.below(16) as u8
        } else {
            0
        };
        let imm = if f & IS4 != 0 {
            Some((r.below(16) as u8) << 4)
        } else if f & I != 0 {
            Some(match r.below(4) {
                0 => r.below(8) as u8,
                _ => r.below(256) as u8,
            })
        } else {
            None
        };
        let disp = if f & AL != 0 {
            32 * r.below(2) as u8
        } else {
            r.below(64) as u8
        };
        let code = encode(&v, l, reg, vvvv, (!mem).then_some(rm), disp, imm);
        let c = Case {
            code,
            st,
            flag_mask: if f & FL != 0 { ARITH } else { 0 },
            xmm: true,
            data_seed: seed,
            expect: if unmask { super::harness::ANY } else { None },
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
            failing.insert((v.1, v.0, v.2, l));
        }
    }
    for f in failures.iter().take(20) {
        eprintln!("{name}: {f}");
    }
    if !failing.is_empty() {
        eprintln!("{name}: failing (map, pp, opcode, VEX.L): {failing:x?}");
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {n} cases differ",
        failures.len()
    );
    eprintln!("{name}: {n} cases match the host");
}
