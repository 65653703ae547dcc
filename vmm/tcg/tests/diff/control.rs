//! Control flow and stack frames: Jcc/JMP (rel8, rel32, backwards, indirect through a
//! register and memory), CALL/RET/RET imm16, LOOP/LOOPE/LOOPNE and JRCXZ (with the 0x67
//! prefix: ECX), ENTER (nesting levels 0-5)/LEAVE, CLD/STD before string instructions,
//! 16-bit PUSH/POP and PUSH imm8/imm32. Every sequence ends at the last byte, so both
//! outcomes of a branch are compared (registers, flags, stack contents, RSP).

use super::harness::{random_state, Case, Rng, DATA, STACK};
use super::run_cases;
use rqemu_tcg::flags::{ARITH, DF};

fn imm32(r: &mut Rng) -> [u8; 4] {
    (r.next() as u32).to_le_bytes()
}

/// A general register other than RSP.
fn reg(r: &mut Rng) -> u8 {
    loop {
        let n = r.below(16) as u8;
        if n != 4 {
            return n;
        }
    }
}

fn rex_b(w: bool, n: u8) -> Option<u8> {
    let v = 0x40 | if w { 8 } else { 0 } | (n >> 3);
    (v != 0x40).then_some(v)
}

/// `mov r32, imm32` with `n` any register but RSP.
fn mov_imm(c: &mut Vec<u8>, r: &mut Rng, n: u8) {
    c.extend(rex_b(false, n));
    c.push(0xB8 + (n & 7));
    c.extend(imm32(r));
}

fn gen(r: &mut Rng) -> Case {
    let mut st = random_state(r);
    let mut c: Vec<u8> = Vec::new();
    match r.below(13) {
        // Jcc rel8 / rel32 over a MOV.
        0 | 1 => {
            let cc = r.below(16) as u8;
            let n = reg(r);
            let skip: Vec<u8> = {
                let mut s = Vec::new();
                mov_imm(&mut s, r, n);
                s
            };
            if r.below(2) == 0 {
                c.extend([0x70 + cc, skip.len() as u8]);
            } else {
                c.extend([0x0F, 0x80 + cc]);
                c.extend((skip.len() as u32).to_le_bytes());
            }
            c.extend(skip);
        }
        // JMP forward, then backward, then forward to the end.
        2 => {
            let (a, b) = (reg(r), reg(r));
            c.extend([0xE9, 0x07, 0x00, 0x00, 0x00]); // -> L2
            let l1 = c.len();
            mov_imm(&mut c, r, a); // L1
            let j_end = c.len();
            c.extend([0xEB, 0x00]); // -> end (patched)
            let l2 = c.len();
            mov_imm(&mut c, r, b); // L2
            let back = l1 as i64 - (c.len() as i64 + 2);
            c.extend([0xEB, back as u8]);
            let end = c.len();
            c[j_end + 1] = (end - (j_end + 2)) as u8;
            // Patch the first jump to L2.
            c[1..5].copy_from_slice(&((l2 - 5) as u32).to_le_bytes());
        }
        // CALL rel32; JMP over; RET [imm16].
        3 => {
            let imm = r.below(3) == 0;
            c.extend([0xE8, 0x02, 0x00, 0x00, 0x00]);
            c.extend([0xEB, if imm { 0x03 } else { 0x01 }]);
            if imm {
                c.extend([0xC2, 8 * r.below(4) as u8, 0x00]);
            } else {
                c.push(0xC3);
            }
        }
        // CALL next; POP r (the return address: same on both sides).
        4 => {
            let n = reg(r);
            c.extend([0xE8, 0, 0, 0, 0]);
            c.extend(rex_b(false, n));
            c.push(0x58 + (n & 7));
        }
        // LEA r, [rip+k]; JMP r / CALL r (+ POP) / JMP [mem].
        5 => {
            let n = loop {
                let n = reg(r);
                if n != 3 {
                    break n;
                }
            };
            st.gpr[3] = DATA + 0x800 + 8 * r.below(0x400);
            let kind = r.below(3);
            let (jump, skipped): (Vec<u8>, Vec<u8>) = match kind {
                0 => (
                    [
                        rex_b(false, n).into_iter().collect::<Vec<_>>(),
                        vec![0xFF, 0xE0 | (n & 7)],
                    ]
                    .concat(),
                    vec![0x48, 0x31, 0xC9],
                ),
                1 => (
                    [
                        rex_b(false, n).into_iter().collect::<Vec<_>>(),
                        vec![0xFF, 0xD0 | (n & 7)],
                    ]
                    .concat(),
                    vec![0x48, 0x31, 0xD2],
                ),
                _ => {
                    // mov [rbx], r; jmp [rbx]
                    let mut j = vec![0x48 | ((n >> 3) << 2), 0x89, 0x03 | ((n & 7) << 3)];
                    j.extend([0xFF, 0x23]);
                    (j, vec![0x90, 0x90])
                }
            };
            // lea r, [rip + (jump.len() + skipped.len())]
            c.extend([0x48 | ((n >> 3) << 2), 0x8D, 0x05 | ((n & 7) << 3)]);
            c.extend(((jump.len() + skipped.len()) as u32).to_le_bytes());
            c.extend(jump);
            c.extend(skipped);
            if kind == 1 {
                c.push(0x5A); // pop rdx: the return address
            }
        }
        // LOOP/LOOPE/LOOPNE over `inc rdx; cmp rdx, rsi`, 64-bit RCX or (0x67) ECX.
        6 | 7 => {
            let a32 = r.below(3) == 0;
            let count = 1 + r.below(40);
            st.gpr[1] = if a32 { (r.next() << 32) | count } else { count };
            st.gpr[2] = r.below(20);
            st.gpr[6] = st.gpr[2] + r.below(50);
            let op = [0xE2u8, 0xE1, 0xE0][r.below(3) as usize];
            c.extend([0x48, 0xFF, 0xC2, 0x48, 0x39, 0xF2]);
            if a32 {
                c.push(0x67);
            }
            let back = -(c.len() as i64 + 2);
            c.extend([op, back as u8]);
        }
        // JRCXZ / JECXZ over a MOV.
        8 => {
            let a32 = r.below(2) == 0;
            st.gpr[1] = match r.below(3) {
                0 => 0,
                1 => r.next() << 32,
                _ => r.value(),
            };
            let n = reg(r);
            let mut skip = Vec::new();
            mov_imm(&mut skip, r, n);
            if a32 {
                c.push(0x67);
            }
            c.extend([0xE3, skip.len() as u8]);
            c.extend(skip);
        }
        // ENTER size, level [; body; LEAVE] with RBP in the buffer.
        9 | 10 => {
            st.gpr[5] = STACK - 0x100 - 8 * r.below(0x200);
            let size = 8 * r.below(64) as u16;
            let level = r.below(6) as u8;
            c.push(0xC8);
            c.extend(size.to_le_bytes());
            c.push(level);
            if r.below(2) == 0 {
                // mov [rbp-8], rax; leave
                c.extend([0x48, 0x89, 0x45, 0xF8, 0xC9]);
            }
        }
        // CLD/STD then a string instruction.
        11 => {
            st.gpr[6] = DATA + 0x2000 + r.below(0x1000);
            st.gpr[7] = DATA + 0x5000 + r.below(0x1000);
            st.gpr[1] = r.below(8);
            c.push(if r.below(2) == 0 { 0xFC } else { 0xFD });
            let rep = r.below(2) == 0;
            if rep {
                c.push(0xF3);
            }
            c.push([0xA4u8, 0xA5, 0xAA, 0xAB, 0xAC, 0xAD][r.below(6) as usize]);
        }
        // 16-bit PUSH/POP, PUSH imm8/imm32 (sign-extended), POP into another register.
        _ => {
            let (a, b) = (reg(r), reg(r));
            match r.below(3) {
                0 => {
                    c.push(0x66);
                    c.extend(rex_b(false, a));
                    c.push(0x50 + (a & 7));
                    c.push(0x66);
                    c.extend(rex_b(false, b));
                    c.push(0x58 + (b & 7));
                }
                1 => {
                    c.extend([0x6A, r.below(256) as u8]);
                    c.extend(rex_b(false, b));
                    c.push(0x58 + (b & 7));
                }
                _ => {
                    c.push(0x68);
                    c.extend(imm32(r));
                    // pop qword [rsp-?]: pop into memory via [rbx]
                    st.gpr[3] = DATA + 0x800 + 8 * r.below(0x100);
                    c.extend([0x8F, 0x03]);
                }
            }
        }
    }
    Case {
        code: c,
        st,
        flag_mask: ARITH | DF,
        xmm: false,
        data_seed: 0x41,
        expect: None,
    }
}

#[test]
fn branches_calls_loops_and_frames() {
    run_cases("branches_calls_loops_and_frames", 6000, gen);
}
