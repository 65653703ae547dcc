//! Exceptions other than the divide error of plain DIV/IDIV: #UD (UD2, opcodes invalid in
//! 64-bit mode, INTO), #BP (INT3, INT 3) and #DB (INT1), #GP (misaligned MOVAPS/MOVAPD/
//! MOVDQA/FXSAVE/FXRSTOR/CMPXCHG16B, non-canonical addresses, reserved MXCSR bits),
//! #SS (non-canonical RSP/RBP-based addresses), #PF (unmapped memory, read and write, CR2),
//! #DE from memory operands and INT_MIN/-1, and #XM (unmasked SIMD exceptions). Each case
//! runs a few instructions before the faulting one and one after it: the vector, the RIP
//! the exception reports, the error code/CR2 and the whole state at the fault are compared.

use super::harness::{random_state, Case, Rng, DATA, UNMAPPED};
use super::host_quirks::quirks;
use super::run_cases;
use rqemu_tcg::flags::{ARITH, DF};

/// Vectors.
const DE: u8 = 0;
const DB: u8 = 1;
const BP: u8 = 3;
const UD: u8 = 6;
const SS: u8 = 12;
const GP: u8 = 13;
const PF: u8 = 14;
const XM: u8 = 19;

fn reg(r: &mut Rng) -> u8 {
    loop {
        let n = r.below(16) as u8;
        if n != 4 && n != 3 && n != 5 {
            return n;
        }
    }
}

fn noncanonical(r: &mut Rng) -> u64 {
    // Bit 47 set with bits 48-63 clear, or bit 63 set with bits 47-62 clear.
    let low = r.next() & 0x7FFF_FFFF_FFFF;
    if r.below(2) == 0 {
        low | 0x0000_8000_0000_0000
    } else {
        low | 0x8000_0000_0000_0000
    }
}

/// A few state-changing instructions before the fault (committed on both sides).
fn prelude(r: &mut Rng, c: &mut Vec<u8>) {
    for _ in 0..r.below(3) {
        let n = reg(r);
        let rex = 0x40 | (n >> 3);
        match r.below(3) {
            0 => {
                if rex != 0x40 {
                    c.push(rex);
                }
                c.push(0xB8 + (n & 7));
                c.extend((r.next() as u32).to_le_bytes());
            }
            1 => {
                if rex != 0x40 {
                    c.push(rex);
                }
                c.push(0x50 + (n & 7));
            }
            _ => c.extend([0x48 | (n >> 3), 0x01, 0xC0 | (n & 7)]),
        }
    }
}

fn gen(r: &mut Rng) -> Case {
    let mut st = random_state(r);
    st.gpr[3] = DATA + 0x800 + 16 * r.below(0x400);
    let mut c = Vec::new();
    prelude(r, &mut c);
    let n = reg(r);
    let modrm_rbx = |reg: u8| 0x03 | ((reg & 7) << 3);
    let vector = match r.below(11) {
        0 => {
            const INVALID: [&[u8]; 16] = [
                &[0x0F, 0x0B],
                &[0x06],
                &[0x07],
                &[0x0E],
                &[0x16],
                &[0x17],
                &[0x1E],
                &[0x1F],
                &[0x27],
                &[0x2F],
                &[0x37],
                &[0x3F],
                &[0x60],
                &[0x61],
                &[0xCE],
                &[0xD4, 0x0A],
            ];
            c.extend(INVALID[r.below(16) as usize]);
            UD
        }
        1 => {
            match r.below(3) {
                0 => c.push(0xCC),
                1 => c.extend([0xCD, 0x03]),
                _ => {
                    c.push(0xF1);
                    c.extend([0x48, 0x31, 0xC0]);
                    return case(c, st, DB);
                }
            }
            if r.below(2) == 0 {
                c.extend([0xB8, 1, 2, 3, 4]); // after a trap, the next instruction does not run
            }
            return case(c, st, BP);
        }
        // Misaligned 16-byte SSE loads/stores.
        2 => {
            let x = r.below(8) as u8;
            let (pfx, op): (Option<u8>, u8) = match r.below(6) {
                0 => (None, 0x28),
                1 => (None, 0x29),
                2 => (Some(0x66), 0x28),
                3 => (Some(0x66), 0x29),
                4 => (Some(0x66), 0x6F),
                _ => (Some(0x66), 0x7F),
            };
            c.extend(pfx);
            c.extend([0x0F, op, 0x43 | (x << 3), 1 + r.below(15) as u8]);
            GP
        }
        // Non-canonical data addresses: #GP, or #SS through RSP/RBP.
        3 => {
            st.gpr[3] = noncanonical(r);
            let store = r.below(2) == 0;
            c.extend([
                0x48 | ((n >> 3) << 2),
                if store { 0x89 } else { 0x8B },
                modrm_rbx(n),
            ]);
            GP
        }
        4 => {
            st.gpr[5] = noncanonical(r);
            // mov r, [rbp+0]
            c.extend([0x48 | ((n >> 3) << 2), 0x8B, 0x45 | ((n & 7) << 3), 0x00]);
            SS
        }
        // Unmapped memory: read or write, #PF with CR2.
        5 => {
            st.gpr[3] = UNMAPPED + r.below(0xF00);
            let op = [0x8Bu8, 0x89, 0x01, 0x03][r.below(4) as usize];
            c.extend([0x48 | ((n >> 3) << 2), op, modrm_rbx(n)]);
            PF
        }
        // Reserved MXCSR bits: LDMXCSR and FXRSTOR #GP.
        6 => {
            // A bit reserved on the host too (AMD's MM, bit 17, is not).
            let bad = loop {
                let b = 1u32 << (16 + r.below(16));
                if b & quirks().mxcsr_mask_extra == 0 {
                    break b;
                }
            };
            // mov dword [rbx], 0x1f80 | bad
            c.extend([0xC7, 0x03]);
            c.extend((0x1F80 | bad).to_le_bytes());
            if r.below(2) == 0 {
                c.extend([0x0F, 0xAE, 0x13]); // ldmxcsr [rbx]
            } else {
                // mov dword [rbx+24], 0x1f80 | bad ; fxrstor [rbx]
                c.extend([0xC7, 0x43, 24]);
                c.extend((0x1F80 | bad).to_le_bytes());
                c.extend([0x0F, 0xAE, 0x0B]);
            }
            GP
        }
        // Misaligned FXSAVE/FXRSTOR/CMPXCHG16B.
        7 => {
            let off = 1 + r.below(15) as u8;
            match r.below(3) {
                0 => c.extend([0x0F, 0xAE, 0x43, off]),
                1 => c.extend([0x48, 0x0F, 0xAE, 0x4B, off]),
                _ => c.extend([0x48, 0x0F, 0xC7, 0x4B, off]),
            }
            GP
        }
        // #DE from a memory divisor of 0 and from INT_MIN / -1.
        8 => {
            if r.below(2) == 0 {
                // mov qword [rbx], 0 ; div/idiv qword [rbx]
                c.extend([0x48, 0xC7, 0x03, 0, 0, 0, 0]);
                c.extend([0x48, 0xF7, if r.below(2) == 0 { 0x33 } else { 0x3B }]);
            } else {
                // mov rax, i64::MIN ; cqo ; mov rcx, -1 ; idiv rcx
                c.extend([0x48, 0xB8]);
                c.extend(i64::MIN.to_le_bytes());
                c.extend([0x48, 0x99, 0x48, 0xC7, 0xC1, 0xFF, 0xFF, 0xFF, 0xFF]);
                c.extend([0x48, 0xF7, 0xF9]);
            }
            DE
        }
        // INTO is invalid in 64-bit mode; so is a far call/jump with an immediate pointer.
        9 => {
            c.extend(if r.below(2) == 0 {
                &[0xCE][..]
            } else {
                &[0xEA, 0, 0, 0, 0, 0x10, 0][..]
            });
            UD
        }
        // LDMXCSR to unmask an exception, then an SSE operation that raises it.
        _ => {
            let (ex, a, b, op): (u32, u64, u64, &[u8]) = match r.below(4) {
                // ZE: 1.0 / 0.0
                0 => (2, 0x3ff0_0000_0000_0000, 0, &[0xF2, 0x0F, 0x5E, 0xC1]),
                // IE: 0.0 / 0.0
                1 => (0, 0, 0, &[0xF2, 0x0F, 0x5E, 0xC1]),
                // PE: 1.0 / 3.0
                2 => (
                    5,
                    0x3ff0_0000_0000_0000,
                    0x4008_0000_0000_0000,
                    &[0xF2, 0x0F, 0x5E, 0xC1],
                ),
                // IE: sqrt(-1.0)
                _ => (0, 0, 0xbff0_0000_0000_0000, &[0xF2, 0x0F, 0x51, 0xC1]),
            };
            st.xmm[0] = u128::from(a) | (u128::from(r.next()) << 64);
            st.xmm[1] = u128::from(b) | (u128::from(r.next()) << 64);
            let csr = (0x1F80 & !(0x80 << ex)) | (r.below(4) as u32) << 13;
            c.extend([0xC7, 0x03]);
            c.extend(csr.to_le_bytes());
            c.extend([0x0F, 0xAE, 0x13]);
            c.extend(op);
            let mut k = case(c, st, XM);
            k.xmm = true;
            return k;
        }
    };
    // Not reached after a fault.
    c.extend([0xB8, 0x78, 0x56, 0x34, 0x12]);
    case(c, st, vector)
}

fn case(code: Vec<u8>, st: super::harness::State, vector: u8) -> Case {
    Case {
        code,
        st,
        flag_mask: ARITH | DF,
        xmm: false,
        data_seed: 0x51,
        expect: Some(vector),
    }
}

#[test]
fn faults_other_than_plain_divide_error() {
    run_cases("faults_other_than_plain_divide_error", 3000, gen);
}
