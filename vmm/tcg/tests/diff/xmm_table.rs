//! A table-driven differential runner for `xmm, xmm/mem [, imm8]` instructions (SSE float
//! compares, SSSE3, SSE4.x): random and special-value lanes, register and memory forms, all
//! XMM registers, flags and memory compared.

use super::harness::{check, random_state, Case, Harness, Rng, DATA};
use rqemu_tcg::flags::ARITH;

/// One table entry.
#[derive(Clone, Copy)]
pub struct Op {
    /// Mandatory prefix (0 = none).
    pub pfx: u8,
    /// Opcode bytes after 0F (e.g. `[0x38, 0x00]` for PSHUFB, `[0xC2]` for CMPPS).
    pub op: &'static [u8],
    /// Has an imm8.
    pub imm: bool,
    /// Memory operand size for the memory form (16 = m128, aligned); 0 = register only.
    pub mem: u8,
    /// Flags compared after the instruction.
    pub flags: u64,
    /// The r/m operand is a GPR (never RSP/RBX) in the register form.
    pub gpr_rm: bool,
    /// REX.W.
    pub w: bool,
    /// No register form (e.g. MOVNTDQA).
    pub mem_only: bool,
    /// Replace NaN float lanes (32- and 64-bit views) of the inputs by finite values.
    pub no_nan: bool,
}

impl Op {
    pub const fn new(pfx: u8, op: &'static [u8], imm: bool, mem: u8) -> Op {
        Op {
            pfx,
            op,
            imm,
            mem,
            flags: ARITH,
            gpr_rm: false,
            w: false,
            mem_only: false,
            no_nan: false,
        }
    }

    /// The r/m operand is a general-purpose register (PEXTR*/PINSR*); `w` sets REX.W.
    pub const fn gpr(pfx: u8, op: &'static [u8], w: bool) -> Op {
        let mut o = Op::new(pfx, op, true, 8);
        o.gpr_rm = true;
        o.w = w;
        o
    }

    /// Memory form only.
    pub const fn mem_only(pfx: u8, op: &'static [u8]) -> Op {
        let mut o = Op::new(pfx, op, false, 16);
        o.mem_only = true;
        o
    }
}

/// Special 32-bit lane values: float specials (NaNs, infinities, zeroes, denormals, halves)
/// and integer edges.
const SPECIAL32: [u32; 16] = [
    0x7fc0_0001,
    0xffa0_0000,
    0x7f80_0000,
    0xff80_0000,
    0x8000_0000,
    0x0000_0000,
    0x0000_0001,
    0x3f80_0000,
    0xbfc0_0000,
    0x4020_0000,
    0x7fff_ffff,
    0xffff_ffff,
    0x0000_ff00,
    0x8080_8080,
    0x7f7f_7f7f,
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

fn special_xmm(r: &mut Rng) -> u128 {
    if r.below(2) == 0 {
        (0..4).fold(0u128, |v, i| {
            v | (u128::from(SPECIAL32[r.below(16) as usize]) << (32 * i))
        })
    } else {
        u128::from(SPECIAL64[r.below(8) as usize])
            | (u128::from(SPECIAL64[r.below(8) as usize]) << 64)
    }
}

/// `v` with every lane that is a NaN as f32 or as f64 replaced by 1.5.
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

/// `[pfx] [REX] 0F op... modrm [disp8] [imm8]`.
pub fn encode(o: &Op, reg: u8, rm: Option<u8>, disp: u8, imm: Option<u8>) -> Vec<u8> {
    let mut c = Vec::new();
    if o.pfx != 0 {
        c.push(o.pfx);
    }
    let rex = 0x40 | if o.w { 8 } else { 0 } | ((reg >> 3) << 2) | rm.map_or(0, |m| m >> 3);
    if rex != 0x40 {
        c.push(rex);
    }
    c.push(0x0F);
    c.extend_from_slice(o.op);
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

/// Runs `n` random cases drawn from `table`; panics with the first mismatches.
pub fn run(name: &str, table: &[Op], n: usize, seed: u64) {
    let mut h = Harness::new();
    let mut r = Rng(seed);
    let mut failures = Vec::new();
    for _ in 0..n {
        let o = table[r.below(table.len() as u64) as usize];
        let mut st = random_state(&mut r);
        match r.below(3) {
            0 => st.xmm.iter_mut().for_each(|x| *x = special_xmm(&mut r)),
            1 => {
                // Equal lanes in pairs of registers (compares, string matches).
                for i in 0..8 {
                    if r.below(2) == 0 {
                        st.xmm[2 * i + 1] = st.xmm[2 * i];
                    }
                }
            }
            _ => {}
        }
        if o.no_nan {
            for x in st.xmm.iter_mut() {
                *x = finite(*x);
            }
        }
        st.gpr[3] = DATA + 0x100 + 16 * r.below(0x100);
        let mem = o.mem_only || (o.mem != 0 && r.below(3) == 0);
        let reg = r.below(16) as u8;
        let rm = if o.gpr_rm {
            loop {
                let g = r.below(16) as u8;
                if g != 3 && g != 4 {
                    break g;
                }
            }
        } else {
            r.below(16) as u8
        };
        let imm = o.imm.then(|| match r.below(4) {
            0 => r.below(8) as u8,
            _ => r.below(256) as u8,
        });
        let code = encode(&o, reg, (!mem).then_some(rm), 16 * r.below(4) as u8, imm);
        let c = Case {
            code,
            st,
            flag_mask: o.flags,
            xmm: true,
            data_seed: seed,
            expect: None,
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    for f in failures.iter().take(20) {
        eprintln!("{name}: {f}");
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {n} cases differ",
        failures.len()
    );
    eprintln!("{name}: {n} cases match the host");
}
