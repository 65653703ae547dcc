//! The JIT against the interpreter (and the host CPU) on random sequences of the instruction
//! classes the translator handles: MOV/LEA/MOVZX/MOVSX, ALU reg-reg/reg-imm/reg-mem/mem-reg/
//! mem-imm, INC/DEC/NOT/NEG, PUSH/POP, CALL/Jcc, SETcc/CMOVcc, shifts and rotates, DIV,
//! CMPXCHG, BT/BTS/BTR/BTC, one-operand MUL, BSF/BSR/TZCNT/LZCNT/POPCNT, SHLX/SARX/SHRX
//! (generated with the handler instructions below), with occasional accesses to
//! MMIO (slow path) and to an unmapped page (precise #PF in the middle of a block), and
//! self-modifying code. Against the interpreter the sequences also hold instructions the
//! translator leaves to their interpreter handlers, called from the middle of translated
//! blocks ([`insn_handler`]: IMUL, 8/16-bit MUL, XADD, XCHG, SHLD/SHRD, CPUID,
//! SSE2 integer ops and MOVQ between GPRs and XMM, a #PF inside a handler), and 64-bit DIV
//! of a 128-bit dividend. Every block is
//! translated on its first run (threshold 0).

use super::harness::{
    check, random_state, Case, Harness, Rng, State, TcgOutcome, DATA, DATA_LEN, UNMAPPED,
};
use super::host_quirks::quirks;
use super::seed;
use rqemu_tcg::flags::{AF, ARITH};

/// Destination registers: never RSP (stack), RBX (memory base) or R15 (unmapped address).
const DEST: [u8; 13] = [0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];

fn dest(r: &mut Rng) -> u8 {
    DEST[r.below(DEST.len() as u64) as usize]
}

/// Operand size prefix/REX for size `sz` (1, 2, 4, 8) with ModRM reg `reg` and rm `rm`.
fn prefix(sz: u8, reg: u8, rm: u8, v: &mut Vec<u8>) {
    if sz == 2 {
        v.push(0x66);
    }
    let rex = 0x40 | if sz == 8 { 8 } else { 0 } | ((reg >> 3) << 2) | (rm >> 3);
    // 8-bit: always REX so that registers 4-7 are SPL..DIL (never AH..BH here except below).
    if rex != 0x40 || sz == 1 {
        v.push(rex);
    }
}

/// `op modrm(reg, rm)`; `mem`: rm is `[rbx+disp8]`.
fn modrm(v: &mut Vec<u8>, reg: u8, rm: u8, mem: Option<u8>) {
    match mem {
        Some(d) => {
            v.push(0x40 | ((reg & 7) << 3) | 3);
            v.push(d);
        }
        None => v.push(0xC0 | ((reg & 7) << 3) | (rm & 7)),
    }
}

fn size(r: &mut Rng) -> u8 {
    [1, 2, 4, 8][r.below(4) as usize]
}

/// One random instruction. `mmio`: may also access MMIO (which the host cannot run) and use
/// IMUL (whose SF/ZF/PF the host leaves undefined, and later instructions read).
fn insn(r: &mut Rng, mmio: bool) -> Vec<u8> {
    let mut v = Vec::new();
    let mem = (r.below(3) == 0).then(|| (r.below(120) as u8) & !7);
    let (d, s) = (dest(r), dest(r));
    match r.below(24) {
        // ALU r/m, r and r, r/m (ADD OR AND SUB XOR CMP) and TEST r/m, r.
        0 | 1 => {
            let sz = size(r);
            let op = [0u8, 1, 2, 3, 4, 5, 6, 7][r.below(8) as usize];
            let dir = r.below(2) as u8 * 2;
            let (reg, rm) = if mem.is_some() { (d, 3) } else { (s, d) };
            prefix(sz, reg, rm, &mut v);
            let base = if r.below(8) == 0 { 0x84 } else { op * 8 + dir };
            v.push(base + u8::from(sz != 1));
            modrm(&mut v, reg, rm, mem);
        }
        // ALU r/m, imm8/imm32.
        2 => {
            let sz = size(r);
            let op = r.below(8) as u8;
            let rm = if mem.is_some() { 3 } else { d };
            prefix(sz, 0, rm, &mut v);
            let short = sz != 1 && r.below(2) == 0;
            v.push(if sz == 1 {
                0x80
            } else if short {
                0x83
            } else {
                0x81
            });
            modrm(&mut v, op, rm, mem);
            let imm = r.value();
            match (sz, short) {
                (1, _) | (_, true) => v.push(imm as u8),
                (2, _) => v.extend((imm as u16).to_le_bytes()),
                _ => v.extend((imm as u32).to_le_bytes()),
            }
        }
        // MOV r/m, r; MOV r, r/m.
        3 | 4 => {
            let sz = size(r);
            let (reg, rm) = if mem.is_some() { (d, 3) } else { (s, d) };
            prefix(sz, reg, rm, &mut v);
            v.push(if r.below(2) == 0 { 0x88 } else { 0x8A } + u8::from(sz != 1));
            modrm(&mut v, reg, rm, mem);
        }
        // MOV r, imm32 / imm64.
        5 => {
            if r.below(2) == 0 {
                v.extend([0x49 - u8::from(d < 8), 0xB8 + (d & 7)]);
                v.extend(r.value().to_le_bytes());
            } else {
                prefix(4, 0, d, &mut v);
                v.push(0xB8 + (d & 7));
                v.extend((r.value() as u32).to_le_bytes());
            }
        }
        // LEA r, [rbx + s*scale + disp8] (64- or 32-bit destination).
        6 => {
            let sz = if r.below(2) == 0 { 8 } else { 4 };
            let idx = dest(r);
            v.push(0x40 | if sz == 8 { 8 } else { 0 } | ((d >> 3) << 2) | ((idx >> 3) << 1));
            v.push(0x8D);
            v.push(0x44 | ((d & 7) << 3));
            v.push(((r.below(4) as u8) << 6) | ((idx & 7) << 3) | 3);
            v.push(r.value() as u8);
        }
        // MOVZX/MOVSX r, r/m8 or r/m16; MOVSXD r64, r/m32.
        7 => {
            let (reg, rm) = if mem.is_some() { (d, 3) } else { (d, s) };
            let dsz = [2, 4, 8][r.below(3) as usize];
            match r.below(5) {
                4 => {
                    prefix(8, reg, rm, &mut v);
                    v.push(0x63);
                }
                k => {
                    prefix(dsz, reg, rm, &mut v);
                    if v.last().is_some_and(|b| b & 0xF0 != 0x40) {
                        v.push(0x40);
                    }
                    v.extend([0x0F, [0xB6, 0xB7, 0xBE, 0xBF][k as usize]]);
                }
            }
            modrm(&mut v, reg, rm, mem);
        }
        // INC/DEC/NOT/NEG r/m.
        8 => {
            let sz = size(r);
            let rm = if mem.is_some() { 3 } else { d };
            prefix(sz, 0, rm, &mut v);
            let k = r.below(4) as u8;
            if k < 2 {
                v.push(0xFE + u8::from(sz != 1));
                modrm(&mut v, k, rm, mem);
                if r.below(2) == 0 {
                    // BT r64, imm8 (takes every other flag from INC/DEC's record) and SETO AL.
                    v.extend([
                        0x48 | (d >> 3),
                        0x0F,
                        0xBA,
                        0xE0 | (d & 7),
                        r.below(64) as u8,
                    ]);
                    v.extend([0x0F, 0x90, 0xC0]);
                }
            } else {
                v.push(0xF6 + u8::from(sz != 1));
                modrm(&mut v, k, rm, mem);
            }
        }
        // PUSH r / PUSH imm8 / POP r.
        9 => match r.below(3) {
            0 => {
                if s >= 8 {
                    v.push(0x41);
                }
                v.push(0x50 + (s & 7));
            }
            1 => v.extend([0x6A, r.value() as u8]),
            _ => {
                if d >= 8 {
                    v.push(0x41);
                }
                v.push(0x58 + (d & 7));
            }
        },
        // SETcc r8/m8.
        10 => {
            let rm = if mem.is_some() { 3 } else { d };
            prefix(1, 0, rm, &mut v);
            v.extend([0x0F, 0x90 + r.below(16) as u8]);
            modrm(&mut v, 0, rm, mem);
        }
        // CMOVcc r, r/m.
        11 => {
            let sz = [2, 4, 8][r.below(3) as usize];
            let (reg, rm) = if mem.is_some() { (d, 3) } else { (d, s) };
            prefix(sz, reg, rm, &mut v);
            v.extend([0x0F, 0x40 + r.below(16) as u8]);
            modrm(&mut v, reg, rm, mem);
        }
        // Jcc over a random instruction (taken or not).
        12 => {
            let next = insn_simple(r);
            v.extend([0x70 + r.below(16) as u8, next.len() as u8]);
            v.extend(next);
        }
        // CALL next; POP r (the return address).
        13 => {
            v.extend([0xE8, 0, 0, 0, 0]);
            if d >= 8 {
                v.push(0x41);
            }
            v.push(0x58 + (d & 7));
        }
        // An access to MMIO (no RAM behind the identity map there): MOV r, [rbx+0x100000].
        14 if mmio && r.below(4) == 0 => {
            prefix(8, d, 3, &mut v);
            v.extend([0x8B, 0x83 | ((d & 7) << 3)]);
            v.extend(0x10_0000u32.to_le_bytes());
        }
        // A load through R15: a page fault in the middle of a block (R15 in the unmapped
        // page), or an access crossing from the last RAM page into MMIO (R15 at the end of
        // the data buffer: `sequence`), which only the slow path does right.
        15 if r.below(8) == 0 => {
            let sz = [2, 4, 8][r.below(3) as usize];
            prefix(sz, d, 15, &mut v);
            v.extend([0x8B, 0x07 | ((d & 7) << 3)]);
        }
        // SHL/SHR/SAR/ROL/ROR r/m by 1 or by an immediate (masked counts of 0 and above the size too).
        16 => {
            let sz = size(r);
            let rm = if mem.is_some() { 3 } else { d };
            prefix(sz, 0, rm, &mut v);
            let k = [4u8, 5, 7, 0, 1][r.below(5) as usize];
            // A host whose OF after multi-bit shifts differs: shift by 1 only.
            if r.below(4) == 0 || (!mmio && quirks().shift_of_differs) {
                v.push(0xD0 + u8::from(sz != 1));
                modrm(&mut v, k, rm, mem);
            } else {
                v.push(0xC0 + u8::from(sz != 1));
                modrm(&mut v, k, rm, mem);
                v.push(r.below(70) as u8);
            }
        }
        // CWDE/CDQE/CDQ/CQO, BSWAP r32/r64.
        17 => match r.below(3) {
            0 => v.extend([0x48, 0x98 + r.below(2) as u8]),
            1 => v.push(0x98 + r.below(2) as u8),
            _ => {
                let w = if r.below(2) == 0 { 8 } else { 0 };
                v.extend([0x40 | w | (d >> 3), 0x0F, 0xC8 + (d & 7)]);
            }
        },
        // PREFETCHT0 [rbx+disp8] then a flag-setting ALU op.
        18 => {
            v.extend([0x0F, 0x18, 0x4B, r.value() as u8]);
            v.extend(insn_simple(r));
        }
        // IMUL r, r/m; IMUL r, r/m, imm8/imm32.
        19 if mmio => {
            let sz = [2, 4, 8][r.below(3) as usize];
            let (reg, rm) = if mem.is_some() { (d, 3) } else { (d, s) };
            prefix(sz, reg, rm, &mut v);
            match r.below(3) {
                0 => v.extend([0x0F, 0xAF]),
                1 => v.push(0x6B),
                _ => v.push(0x69),
            }
            let op = v[v.len() - 1];
            modrm(&mut v, reg, rm, mem);
            match (op, sz) {
                (0x6B, _) => v.push(r.value() as u8),
                (0x69, 2) => v.extend((r.value() as u16).to_le_bytes()),
                (0x69, _) => v.extend((r.value() as u32).to_le_bytes()),
                _ => {}
            }
        }
        // SHL/SHR/SAR/ROL/ROR r/m by CL (CL sometimes masked to 0).
        20 => {
            let sz = size(r);
            let rm = if mem.is_some() { 3 } else { d };
            if !mmio && quirks().shift_of_differs {
                v.extend([0xB1, 0x01]); // mov cl, 1 (host OF quirk)
            } else if r.below(4) == 0 {
                v.extend([0x80, 0xE1, 0xC0]); // and cl, 0xc0
            }
            prefix(sz, 0, rm, &mut v);
            v.push(0xD2 + u8::from(sz != 1));
            modrm(&mut v, [4u8, 5, 7, 0, 1][r.below(5) as usize], rm, mem);
        }
        // DIV r/m (EDX/RDX often cleared first so that the quotient fits; #DE otherwise).
        // The host leaves the flags undefined: interpreter comparisons only.
        21 if mmio => {
            if r.below(2) == 0 {
                v.extend([0x31, 0xD2]);
            }
            let sz = size(r);
            let rm = if mem.is_some() { 3 } else { s };
            prefix(sz, 0, rm, &mut v);
            v.push(0xF6 + u8::from(sz != 1));
            modrm(&mut v, 6, rm, mem);
        }
        // [LOCK] CMPXCHG m, r, sometimes with the accumulator loaded from m first (equal).
        22 => {
            let sz = size(r);
            let disp = (r.below(120) as u8) & !7;
            if r.below(2) == 0 {
                prefix(sz, 0, 3, &mut v);
                v.push(0x8A + u8::from(sz != 1));
                modrm(&mut v, 0, 3, Some(disp));
            }
            if r.below(2) == 0 {
                v.push(0xF0);
            }
            prefix(sz, s, 3, &mut v);
            v.extend([0x0F, 0xB0 + u8::from(sz != 1)]);
            modrm(&mut v, s, 3, Some(disp));
        }
        // BT/BTS/BTR/BTC r/m, r (a memory bit offset kept within the data buffer: AND r32,
        // 0x3FF first) or r/m, imm8.
        23 => {
            let sz = [2, 4, 8][r.below(3) as usize];
            let rm = if mem.is_some() { 3 } else { d };
            let k = r.below(4) as u8;
            if r.below(2) == 0 {
                if mem.is_some() {
                    prefix(4, 0, s, &mut v);
                    v.push(0x81);
                    modrm(&mut v, 4, s, None);
                    v.extend(0x3FFu32.to_le_bytes());
                }
                prefix(sz, s, rm, &mut v);
                v.extend([0x0F, 0xA3 + 8 * k]);
                modrm(&mut v, s, rm, mem);
            } else {
                prefix(sz, 0, rm, &mut v);
                v.extend([0x0F, 0xBA]);
                modrm(&mut v, 4 + k, rm, mem);
                v.push(r.value() as u8);
            }
        }
        _ => return insn_simple(r),
    }
    v
}

/// A short non-branching instruction (ALU reg-reg).
fn insn_simple(r: &mut Rng) -> Vec<u8> {
    let mut v = Vec::new();
    let (d, s) = (dest(r), dest(r));
    let sz = size(r);
    prefix(sz, s, d, &mut v);
    v.push([0u8, 8, 0x20, 0x28, 0x30, 0x38][r.below(6) as usize] + u8::from(sz != 1));
    modrm(&mut v, s, d, None);
    v
}

/// An instruction the translator leaves to its interpreter handler (run by a helper call
/// from translated code), with register or `[rbx+disp8]` operands, or `[r15]` (unmapped: a
/// fault inside the handler).
fn insn_handler(r: &mut Rng) -> Vec<u8> {
    let mut v = Vec::new();
    let mem = (r.below(3) == 0).then(|| (r.below(120) as u8) & !7);
    let (d, s) = (dest(r), dest(r));
    let sz = [2, 4, 8][r.below(3) as usize];
    let rm = if mem.is_some() { 3 } else { s };
    match r.below(11) {
        // MUL / IMUL r/m (one operand: RDX:RAX).
        0 => {
            prefix(sz, 0, rm, &mut v);
            v.push(0xF7);
            modrm(&mut v, 4 + r.below(2) as u8, rm, mem);
        }
        // BSF / BSR r, r/m.
        1 => {
            prefix(sz, d, rm, &mut v);
            v.extend([0x0F, 0xBC + r.below(2) as u8]);
            modrm(&mut v, d, rm, mem);
        }
        // TZCNT / LZCNT / POPCNT r, r/m.
        2 => {
            v.push(0xF3);
            prefix(sz, d, rm, &mut v);
            v.extend([0x0F, [0xBC, 0xBD, 0xB8][r.below(3) as usize]]);
            modrm(&mut v, d, rm, mem);
        }
        // (LOCK) XADD r/m, r.
        3 => {
            if mem.is_some() && r.below(2) == 0 {
                v.push(0xF0);
            }
            prefix(sz, d, rm, &mut v);
            v.extend([0x0F, 0xC1]);
            modrm(&mut v, d, if mem.is_some() { 3 } else { s }, mem);
        }
        // XCHG r/m, r.
        4 => {
            prefix(sz, d, rm, &mut v);
            v.push(0x87);
            modrm(&mut v, d, rm, mem);
        }
        // SHLD / SHRD r/m, r, imm8.
        5 => {
            prefix(sz, s, if mem.is_some() { 3 } else { d }, &mut v);
            v.extend([0x0F, [0xA4, 0xAC][r.below(2) as usize]]);
            modrm(&mut v, s, if mem.is_some() { 3 } else { d }, mem);
            v.push(r.below(64) as u8);
        }
        // CPUID (leaf 0 or 1: EAX is set first; RBX, the memory base, saved around it).
        6 => {
            v.extend([0x53, 0xB8, r.below(2) as u8, 0, 0, 0, 0x0F, 0xA2, 0x5B]);
        }
        // PXOR / PADDQ / PCMPEQB xmm(0-7), xmm/m128 (aligned: disp 0x40).
        7 => {
            let (x, y) = (r.below(8) as u8, r.below(8) as u8);
            v.extend([0x66, 0x0F, [0xEF, 0xD4, 0x74][r.below(3) as usize]]);
            modrm(&mut v, x, y, mem.map(|_| 0x40));
        }
        // MOVQ xmm, r64 then MOVQ r64, xmm.
        8 => {
            let x = r.below(8) as u8;
            v.push(0x66);
            prefix(8, x, s, &mut v);
            v.extend([0x0F, 0x6E]);
            modrm(&mut v, x, s, None);
            v.push(0x66);
            prefix(8, x, d, &mut v);
            v.extend([0x0F, 0x7E]);
            modrm(&mut v, x, d, None);
        }
        // and rdx, 0xff; or rN, 0x100; div rN (N = 8..14): a 128-bit dividend RDX:RAX whose
        // quotient fits.
        9 if r.below(2) == 0 => {
            let n = 8 + r.below(7) as u8;
            v.extend([0x48, 0x81, 0xE2, 0xFF, 0, 0, 0]);
            v.extend([0x49, 0x81, 0xC8 | (n & 7), 0, 1, 0, 0]);
            v.extend([0x49, 0xF7, 0xF0 | (n & 7)]);
        }
        // SHLX / SARX / SHRX r, r/m, r (VEX, 32 or 64 bits).
        10 => {
            let w = u8::from(sz == 8 || r.below(2) == 0);
            let c = dest(r);
            let pp = 1 + r.below(3) as u8;
            v.push(0xC4);
            v.push(((!d >> 3) & 1) << 7 | 1 << 6 | ((!rm >> 3) & 1) << 5 | 0b00010);
            v.push(w << 7 | ((!c) & 0xF) << 3 | pp);
            v.push(0xF7);
            modrm(&mut v, d, rm, mem);
        }
        // MUL qword [r15]: #PF in the translated load, RIP and state as before it.
        _ => v.extend([0x49, 0xF7, 0x27]),
    }
    v
}

fn sequence(r: &mut Rng, mmio: bool) -> (Vec<u8>, State) {
    sequence_with(r, mmio, true)
}

/// A loop body ([`loop_program`]): R15 is the loop counter there, so no stores through it.
fn loop_body(r: &mut Rng) -> (Vec<u8>, State) {
    sequence_with(r, true, false)
}

/// A random sequence and its start state; `r15_stores`: may store through R15 when it
/// points just before the end of the data buffer.
fn sequence_with(r: &mut Rng, mmio: bool, r15_stores: bool) -> (Vec<u8>, State) {
    let mut st = random_state(r);
    st.gpr[3] = DATA + 0x100 + r.below(0x1000);
    // R15: unmapped, or (with MMIO) 1-7 bytes before the end of the data buffer, where
    // accesses through it cross into MMIO.
    let cross = mmio && r.below(3) == 0;
    st.gpr[15] = if cross {
        DATA + DATA_LEN as u64 - 1 - r.below(7)
    } else {
        UNMAPPED + r.below(0x1000)
    };
    let mut code = Vec::new();
    for _ in 0..(1 + r.below(40)) {
        if cross && r15_stores && r.below(8) == 0 {
            // MOV [r15], r (16/32/64-bit): a store crossing into MMIO.
            let (sz, d) = ([2, 4, 8][r.below(3) as usize], dest(r));
            prefix(sz, d, 15, &mut code);
            code.extend([0x89, 0x07 | ((d & 7) << 3)]);
        } else if mmio && r.below(6) == 0 {
            code.extend(insn_handler(r));
        } else {
            code.extend(insn(r, mmio));
        }
    }
    (code, st)
}

fn fill(h: &mut Harness, seed: u64) {
    let mut r = Rng(seed | 1);
    for b in h.data().chunks_mut(8) {
        b.copy_from_slice(&r.next().to_le_bytes());
    }
}

/// Runs `code` from `st` with the interpreter and with the JIT (translating a block after
/// `threshold` interpreted runs), guest data filled from seed `i` before each; a difference
/// in the end state or memory is added to `failures`. Returns the JIT run's counters and the
/// instructions it ran.
pub(super) fn jit_vs_interp(
    h: &mut Harness,
    i: u64,
    code: &[u8],
    st: &State,
    threshold: u32,
    failures: &mut Vec<String>,
) -> (rqemu_tcg::JitStats, u64) {
    fill(h, i);
    h.set_jit(false);
    let interp = h.run_tcg(code, st);
    let interp_data = h.data().to_vec();
    fill(h, i);
    h.set_jit_config(rqemu_tcg::JitConfig {
        threshold,
        ..Default::default()
    });
    let before = h.cpu().icount;
    let jit = h.run_tcg(code, st);
    let same_data = interp_data[..] == h.data()[..];
    note_difference(code, st, "", (&interp, &jit, same_data), failures);
    let stats = h.cpu().jit_stats().expect("jit enabled");
    (stats, h.cpu().icount - before)
}

/// Adds a failure for `code` from `st` (`what` qualifies the run) when the interpreter ended
/// in an unexpected way, or the JIT's outcome or memory (`same_data`) differs from it.
fn note_difference(
    code: &[u8],
    st: &State,
    what: &str,
    (interp, jit, same_data): (&TcgOutcome, &TcgOutcome, bool),
    failures: &mut Vec<String>,
) {
    if matches!(interp, TcgOutcome::Other(_)) || interp != jit || !same_data {
        failures.push(format!(
            "code {code:02x?} state {:x?}{what}:\n  interp {interp:x?}\n  jit    {jit:x?}\n  memory equal: {same_data}",
            st.gpr
        ));
    }
}

/// `mov r15d, 20; top: body; [call f;] dec r15; jnz top` and, with `f`,
/// `jmp end; f: f; ret; end:` (`call`: the loop calls `f`).
fn loop_program(body: Vec<u8>, f: Option<Vec<u8>>, call: bool) -> Vec<u8> {
    let mut code = vec![0x41, 0xBF, 20, 0, 0, 0];
    let top = code.len() as i64;
    code.extend(body);
    if call {
        code.extend([0xE8, 0, 0, 0, 0]);
    }
    let call_end = code.len();
    code.extend([0x49, 0xFF, 0xCF, 0x0F, 0x85]);
    let rel = top - (code.len() as i64 + 4);
    code.extend((rel as i32).to_le_bytes());
    let Some(f) = f else {
        return code;
    };
    code.extend([0xEB, f.len() as u8 + 1]);
    let f_at = code.len();
    if call {
        code[call_end - 4..call_end].copy_from_slice(&((f_at - call_end) as i32).to_le_bytes());
    }
    code.extend(f);
    code.push(0xC3);
    code
}

/// The JIT and the interpreter end in the same state (registers, flags, memory, exception).
#[test]
fn jit_matches_interpreter_on_random_sequences() {
    let name = "jit_matches_interpreter_on_random_sequences";
    let mut h = Harness::new();
    let mut r = Rng(seed::for_test(name));
    let mut failures = Vec::new();
    let n = 3000;
    let (mut native, mut total, mut helpers) = (0, 0, 0);
    for i in 0..n {
        let (code, st) = sequence(&mut r, true);
        let (stats, ran) = jit_vs_interp(&mut h, i, &code, &st, 0, &mut failures);
        native += stats.native_insns;
        helpers += stats.helper_insns;
        total += ran;
    }
    eprintln!(
        "{name}: {native} of {total} instructions ran in translated code; {helpers} translated \
         as calls of their interpreter handler"
    );
    assert!(native * 2 > total, "too little ran in translated code");
    assert!(helpers > 0, "no instruction ran through a handler call");
    super::report(name, n as usize, &failures);
}

/// The JIT against the host CPU on the same sequences.
#[test]
fn jit_matches_host_on_random_sequences() {
    let name = "jit_matches_host_on_random_sequences";
    let mut h = Harness::new();
    h.set_jit(true);
    let mut r = Rng(seed::for_test(name));
    let mut failures = Vec::new();
    let n = 2000;
    for i in 0..n {
        let (code, st) = sequence(&mut r, false);
        let c = Case {
            code,
            st,
            flag_mask: ARITH & !AF,
            xmm: false,
            data_seed: i,
            expect: super::harness::ANY,
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    super::report(name, n as usize, &failures);
}

/// A block that rewrites the immediate of its own next instruction: translated code must
/// stop after the store and the new bytes must run.
#[test]
fn jit_self_modifying_code() {
    let mut h = Harness::new();
    h.set_jit(true);
    // mov byte [rip+3], 0x42 ; mov eax, 0x11111111  (the store hits the imm's low byte)
    let code = vec![
        0xC6, 0x05, 0x01, 0, 0, 0, 0x42, 0xB8, 0x11, 0x11, 0x11, 0x11,
    ];
    let st = State::default();
    for i in 0..3 {
        let c = Case {
            code: code.clone(),
            st,
            flag_mask: ARITH,
            xmm: false,
            data_seed: i,
            expect: None,
        };
        let r = check(&mut h, &c);
        assert!(r.is_ok(), "run {i}: {r:?}");
    }
    let stats = h.cpu().jit_stats().expect("jit enabled");
    assert!(stats.translated > 0, "nothing translated: {stats:?}");
}

/// A code cache too small for more than one block: it is flushed whole again and again while
/// translated code keeps matching the host.
#[test]
fn jit_flushes_a_full_code_cache() {
    let name = "jit_flushes_a_full_code_cache";
    let mut h = Harness::new();
    h.set_jit_config(rqemu_tcg::JitConfig {
        threshold: 0,
        cache_bytes: 1,
        ..Default::default()
    });
    let mut r = Rng(seed::for_test(name));
    let mut failures = Vec::new();
    let n = 300;
    for i in 0..n {
        let (code, st) = sequence(&mut r, false);
        let c = Case {
            code,
            st,
            flag_mask: ARITH & !AF,
            xmm: false,
            data_seed: i,
            expect: super::harness::ANY,
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    let stats = h.cpu().jit_stats().expect("jit enabled");
    eprintln!("{name}: {stats:?}");
    assert!(
        stats.flushes > 0,
        "the code cache was never flushed: {stats:?}"
    );
    assert!(
        stats.native_insns > 0,
        "nothing ran in translated code: {stats:?}"
    );
    super::report(name, n as usize, &failures);
}

/// Loops of random blocks (Jcc over an instruction, CALL/POP, MMIO, page faults) and a call
/// of a small function run 20 times, with R15 counting down: from the second iteration on,
/// translated blocks chain to their translated successors without the run loop (the RET
/// through the jump cache). JIT and interpreter end in the same
/// state, and chains were taken.
#[test]
fn jit_chained_loops_match_interpreter() {
    let name = "jit_chained_loops_match_interpreter";
    let mut h = Harness::new();
    let mut r = Rng(seed::for_test(name));
    let mut failures = Vec::new();
    let n = 600;
    let mut chained = 0;
    for i in 0..n {
        let (body, st) = loop_body(&mut r);
        let code = loop_program(body, Some(insn_simple(&mut r)), true);
        chained += jit_vs_interp(&mut h, i, &code, &st, 0, &mut failures)
            .0
            .chained;
    }
    eprintln!("{name}: {chained} chains taken");
    assert!(chained > 0, "no translated block ever chained to another");
    super::report(name, n as usize, &failures);
}

/// Superblocks and loops: loops of random blocks (Jcc over an instruction, MMIO, page
/// faults, handler-run instructions), sometimes with a call, run 20 times with R15 counting
/// down, translated on their third run (threshold 2), when the blocks a conditional branch
/// falls through to are decoded: the JIT translates them into one function with the block
/// before (a superblock), and the branch back to the loop's first instruction becomes a jump
/// inside the function. JIT and interpreter end in the same state, and both kinds were
/// translated.
#[test]
fn jit_superblocks_and_loops_match_interpreter() {
    let name = "jit_superblocks_and_loops_match_interpreter";
    let mut h = Harness::new();
    let mut r = Rng(seed::for_test(name));
    let mut failures = Vec::new();
    let n = 600;
    let (mut merged, mut loops, mut superblocks) = (0, 0, 0);
    for i in 0..n {
        let (body, st) = loop_body(&mut r);
        let call = r.below(3) == 0;
        let code = loop_program(body, Some(insn_simple(&mut r)), call);
        let (s, _) = jit_vs_interp(&mut h, i, &code, &st, 2, &mut failures);
        (merged, loops, superblocks) = (
            merged + s.merged,
            loops + s.loops,
            superblocks + s.superblocks,
        );
    }
    eprintln!("{name}: {superblocks} superblocks, {merged} passes inside them, {loops} loops");
    assert!(
        merged > 0,
        "no superblock passed into its fall-through block"
    );
    assert!(loops > 0, "no translated loop jumped back to its start");
    super::report(name, n as usize, &failures);
}

/// A chained successor on another page is rewritten by code on the first page: the chain
/// must not enter the successor's stale translation (the invalidation moves the chain
/// generation on). Each iteration stores ECX into the immediate of `add eax, imm32` on the
/// second page, reached by a JMP from the first page; an inner loop jumps back to its start
/// inside its translation.
#[test]
fn jit_chain_to_a_rewritten_block() {
    let page = 0x1000 - (Harness::code_addr() & 0xFFF) as usize;
    // First page:   mov r15d, 10; xor eax, eax; xor ecx, ecx
    //         top:  add ecx, 3; mov edx, 4
    //         inner: inc esi; dec edx; jnz inner (chains to itself); jmp second
    //         back: mov [rip + to imm], ecx; dec r15; jnz top
    // Second page:  second: add eax, imm32; jmp back
    let mut code = vec![0x41, 0xBF, 10, 0, 0, 0, 0x31, 0xC0, 0x31, 0xC9];
    let top = code.len();
    code.extend([0x83, 0xC1, 0x03, 0xBA, 4, 0, 0, 0]);
    code.extend([0xFF, 0xC6, 0xFF, 0xCA, 0x75, 0xFA, 0xE9]);
    let jmp_end = code.len() + 4;
    code.extend(((page - jmp_end) as i32).to_le_bytes());
    let back = code.len();
    code.extend([0x89, 0x0D]);
    let imm = page + 1;
    code.extend(((imm - (code.len() + 4)) as i32).to_le_bytes());
    code.extend([0x49, 0xFF, 0xCF, 0x0F, 0x85]);
    code.extend(((top as i64 - (code.len() as i64 + 4)) as i32).to_le_bytes());
    // Leave the loop: jmp over the second page's code to the end.
    code.push(0xE9);
    let skip_from = code.len() + 4;
    code.extend([0; 4]);
    code.resize(page, 0xCC);
    code.extend([0x05, 0, 0, 0, 0, 0xE9]);
    code.extend(((back as i64 - (code.len() as i64 + 4)) as i32).to_le_bytes());
    let end = code.len();
    code[skip_from - 4..skip_from].copy_from_slice(&((end - skip_from) as i32).to_le_bytes());
    let st = State::default();
    let mut h = Harness::new();
    h.set_jit(false);
    let interp = h.run_tcg(&code, &st);
    h.set_jit(true);
    let jit = h.run_tcg(&code, &st);
    let stats = h.cpu().jit_stats().expect("jit enabled");
    // eax = sum over iterations k = 1..=10 of the ECX stored in iteration k-1 (0 first).
    let want: u64 = (0..10).map(|k| 3 * k).sum();
    match &jit {
        TcgOutcome::Ran(s, ..) => assert_eq!(s.gpr[0], want, "stale code ran: {stats:?}"),
        other => panic!("jit: {other:?}"),
    }
    assert_eq!(interp, jit);
    assert!(
        stats.chained + stats.loops > 0,
        "no chain or loop inside translated code taken: {stats:?}"
    );
}

/// Background compilation: the loops of [`jit_chained_loops_match_interpreter`] with the
/// blocks sent to the compile thread on their first run and interpreted until their code
/// arrives (whenever that is: the first run's result must not depend on it), then, once
/// every translation is installed, run again from the same state with the same cached
/// blocks. Both runs end in the interpreter's state, and the second runs in translated code.
#[test]
fn jit_background_compile_matches_interpreter() {
    let name = "jit_background_compile_matches_interpreter";
    let mut h = Harness::new();
    let mut r = Rng(seed::for_test(name));
    let mut failures = Vec::new();
    let n = 200;
    let (mut native_settled, mut total_settled) = (0, 0);
    for i in 0..n {
        let (body, st) = loop_body(&mut r);
        let code = loop_program(body, None, false);
        fill(&mut h, i);
        h.set_jit(false);
        let interp = h.run_tcg(&code, &st);
        let interp_data = h.data().to_vec();
        h.set_jit_config(rqemu_tcg::JitConfig {
            threshold: 0,
            background: true,
            ..Default::default()
        });
        for settled in [false, true] {
            if settled {
                h.settle_jit();
            }
            fill(&mut h, i);
            let (before, native_before) = (
                h.cpu().icount,
                h.cpu().jit_stats().expect("jit enabled").native_insns,
            );
            let jit = if settled {
                h.rerun_tcg(&code, &st)
            } else {
                h.run_tcg(&code, &st)
            };
            let same_data = interp_data[..] == h.data()[..];
            if settled {
                native_settled +=
                    h.cpu().jit_stats().expect("jit enabled").native_insns - native_before;
                total_settled += h.cpu().icount - before;
            }
            let what = format!(" (settled: {settled})");
            note_difference(&code, &st, &what, (&interp, &jit, same_data), &mut failures);
        }
    }
    eprintln!(
        "{name}: after settling, {native_settled} of {total_settled} instructions ran in \
         translated code"
    );
    assert!(
        native_settled * 2 > total_settled,
        "settled translations did not run"
    );
    super::report(name, n as usize, &failures);
}
