//! Memory-operand forms (ModRM/SIB/disp8/disp32/RIP-relative/absolute, the 0x67 address-size
//! prefix, FS/GS and ignored segment overrides), LOCK (lockable forms complete, the others
//! are #UD), and the short encodings (B0+r/B8+r, A0-A3 moffs, A8/A9, 90+r).

use super::harness::{check, random_state, Case, Harness, Rng, State, DATA};
use super::{op_for, run_cases, seed, Sz};
use rqemu_tcg::flags::{AF, ARITH};

/// Where the memory operands of a case point (inside the data buffer, away from the stack).
fn target(r: &mut Rng) -> u64 {
    DATA + 0x800 + r.below(0x6000)
}

/// A memory operand in encoded form.
struct Mem {
    /// Prefixes (0x67, segment).
    pfx: Vec<u8>,
    /// REX.X and REX.B bits.
    rex: u8,
    /// ModRM mod and rm bits (reg left 0).
    modrm: u8,
    /// SIB and displacement bytes.
    tail: Vec<u8>,
    /// RIP-relative: the address the displacement must reach (patched once the instruction
    /// length is known).
    rip_target: Option<u64>,
}

/// Picks a register other than RSP and those in `avoid`.
fn free_reg(r: &mut Rng, avoid: &[u8]) -> u8 {
    loop {
        let n = r.below(16) as u8;
        if n != 4 && !avoid.contains(&n) {
            return n;
        }
    }
}

/// Generates a memory operand whose effective address is `t` (random form), setting the
/// registers it uses in `st`. Registers in `avoid` are left alone (the instruction's other
/// operands). `seg_base`: base of the segment override chosen by the caller (0 for none).
fn gen_mem(r: &mut Rng, st: &mut State, t: u64, avoid: &[u8], seg_base: u64, a32: bool) -> Mem {
    let ea = t.wrapping_sub(seg_base);
    let mut pfx = Vec::new();
    if a32 {
        pfx.push(0x67);
    }
    // Register values: with 0x67 only the low halves count, fill the high ones with junk.
    let fit = |r: &mut Rng, v: u64| {
        if a32 {
            (v & 0xFFFF_FFFF) | (r.next() << 32)
        } else {
            v
        }
    };
    let disp_kind = r.below(3); // 0: none, 1: disp8, 2: disp32
    let disp: i64 = match disp_kind {
        0 => 0,
        1 => r.below(256) as i64 - 128,
        _ => r.below(0x2000) as i64 - 0x1000,
    };
    let push_disp = |tail: &mut Vec<u8>, kind: u64, d: i64| match kind {
        1 => tail.push(d as u8),
        2 => tail.extend((d as i32).to_le_bytes()),
        _ => {}
    };
    let md = [0x00u8, 0x40, 0x80][disp_kind as usize];
    // FS (the host TLS base) is far from everything: no absolute or RIP-relative form.
    let far = ea > 0xFFFF_FFFF;
    let form = r.below(if far { 4 } else { 7 });
    match form {
        // [base + disp]: base is any register but RSP/R12 (SIB) and, without displacement,
        // RBP/R13 (which mean RIP/disp32).
        0 => {
            let b = loop {
                let b = free_reg(r, avoid);
                if b & 7 != 4 && !(disp_kind == 0 && b & 7 == 5) {
                    break b;
                }
            };
            st.gpr[b as usize] = fit(r, ea.wrapping_sub(disp as u64));
            let mut tail = Vec::new();
            push_disp(&mut tail, disp_kind, disp);
            Mem {
                pfx,
                rex: b >> 3,
                modrm: md | (b & 7),
                tail,
                rip_target: None,
            }
        }
        // [base + index*scale + disp] (base may be RSP with an index, index may be R12).
        1 | 2 => {
            let scale = r.below(4) as u8;
            let i = free_reg(r, avoid);
            let use_rsp = !a32 && seg_base == 0 && r.below(4) == 0;
            let b = if use_rsp {
                4
            } else {
                loop {
                    let b = free_reg(r, &[avoid, &[i]].concat());
                    if !(disp_kind == 0 && b & 7 == 5) {
                        break b;
                    }
                }
            };
            let iv = if use_rsp {
                // RSP is fixed: pick the index so that the address lands below the stack.
                let want = -(0x800 + r.below(0x2000) as i64) - disp;
                (want >> scale) as u64
            } else {
                (r.below(0x200) as i64 - 0x100) as u64
            };
            st.gpr[i as usize] = fit(r, iv);
            let scaled = iv.wrapping_shl(u32::from(scale));
            if !use_rsp {
                st.gpr[b as usize] = fit(r, ea.wrapping_sub(disp as u64).wrapping_sub(scaled));
            }
            let mut tail = vec![(scale << 6) | ((i & 7) << 3) | (b & 7)];
            push_disp(&mut tail, disp_kind, disp);
            Mem {
                pfx,
                rex: ((i >> 3) << 1) | (b >> 3),
                modrm: md | 4,
                tail,
                rip_target: None,
            }
        }
        // [index*scale + disp32] (SIB without base).
        3 => {
            let scale = r.below(4) as u8;
            let i = free_reg(r, avoid);
            let d = (r.below(0x1000) as i64) << 4;
            let iv = ea.wrapping_sub(d as u64) >> scale;
            let rem = ea.wrapping_sub(d as u64) & ((1 << scale) - 1);
            st.gpr[i as usize] = fit(r, iv);
            let mut tail = vec![(scale << 6) | ((i & 7) << 3) | 5];
            tail.extend(((d + rem as i64) as i32).to_le_bytes());
            Mem {
                pfx,
                rex: (i >> 3) << 1,
                modrm: 4,
                tail,
                rip_target: None,
            }
        }
        // [disp32] absolute (SIB, no base, no index).
        4 => {
            let mut tail = vec![0x25];
            tail.extend((ea as u32).to_le_bytes());
            Mem {
                pfx,
                rex: 0,
                modrm: 4,
                tail,
                rip_target: None,
            }
        }
        // [rip + disp32] (patched by the caller).
        _ => Mem {
            pfx,
            rex: 0,
            modrm: 5,
            tail: vec![0; 4],
            rip_target: Some(ea),
        },
    }
}

/// Assembles `pfx* [66] [REX] op modrm(reg, mem) tail imm` and patches a RIP-relative
/// displacement (the target was stored in the tail) for an instruction at `at`.
fn assemble(m: &Mem, sz: Sz, op: &[u8], reg: u8, imm: &[u8], at: u64, rex8: bool) -> Vec<u8> {
    let mut c = m.pfx.clone();
    if sz == Sz::W {
        c.push(0x66);
    }
    let rex = 0x40 | if sz == Sz::Q { 8 } else { 0 } | ((reg >> 3) << 2) | m.rex;
    if rex != 0x40 || rex8 {
        c.push(rex);
    }
    c.extend_from_slice(op);
    c.push(m.modrm | ((reg & 7) << 3));
    let disp_at = c.len();
    c.extend_from_slice(&m.tail);
    c.extend_from_slice(imm);
    if let Some(t) = m.rip_target {
        let next = at + c.len() as u64;
        let d = t.wrapping_sub(next) as i64;
        c[disp_at..disp_at + 4].copy_from_slice(&(d as i32).to_le_bytes());
    }
    c
}

/// The GS base used by this file's cases (segment-relative addresses reach the buffer).
const GS_BASE: u64 = 0x4000_0000;

/// One load/store/ALU instruction with a random memory-operand form and prefixes.
fn mem_form_case(r: &mut Rng, fs_base: u64) -> Case {
    let mut st = random_state(r);
    let sz = Sz::ALL[r.below(4) as usize];
    let seg = r.below(8);
    let (seg_pfx, seg_base) = match seg {
        0 => (Some(0x64u8), fs_base),
        1 => (Some(0x65), GS_BASE),
        // ES/CS/SS/DS overrides: ignored in 64-bit mode.
        2 => (Some([0x26u8, 0x2E, 0x36, 0x3E][r.below(4) as usize]), 0),
        _ => (None, 0),
    };
    let a32 = seg != 0 && r.below(3) == 0;
    let reg = free_reg(r, &[]);
    let t = target(r);
    let mut m = gen_mem(r, &mut st, t, &[reg], seg_base, a32);
    if let Some(p) = seg_pfx {
        m.pfx.insert(0, p);
    }
    let rex8 = sz == Sz::B && r.below(2) == 0;
    // Without REX, byte registers 4-7 are AH..BH (they alias 0-3, fine for a data operand).
    let op = r.below(9);
    let (opc, reg_field, imm): (Vec<u8>, u8, Vec<u8>) = match op {
        0 => (vec![op_for(sz, 0x8A)], reg, vec![]),
        1 => (vec![op_for(sz, 0x88)], reg, vec![]),
        2 => (vec![op_for(sz, 0xC6)], 0, sz.imm_z(r.value())),
        3 => {
            let k = r.below(8) as u8;
            (vec![op_for(sz, k * 8)], reg, vec![])
        }
        4 => {
            let k = r.below(8) as u8;
            (vec![op_for(sz, k * 8 + 2)], reg, vec![])
        }
        5 => {
            let k = r.below(8) as u8;
            (vec![op_for(sz, 0x80)], k, sz.imm_z(r.value()))
        }
        6 => (vec![op_for(sz, 0xFE)], r.below(2) as u8, vec![]),
        7 => (vec![op_for(sz, 0x84)], reg, vec![]),
        _ => (vec![0x8D], reg, vec![]),
    };
    let sz = if op == 8 && sz == Sz::B { Sz::Q } else { sz };
    let code = assemble(&m, sz, &opc, reg_field, &imm, Harness::code_addr(), rex8);
    Case {
        code,
        st,
        flag_mask: ARITH,
        xmm: false,
        data_seed: 0x31,
        expect: None,
    }
}

#[test]
fn memory_operand_forms() {
    let name = "memory_operand_forms";
    let mut h = Harness::new();
    h.set_gs_base(GS_BASE);
    let fs_base = h.fs_base;
    let mut r = Rng(seed::for_test(name));
    let n = 6000;
    let mut failures = Vec::new();
    for _ in 0..n {
        let c = mem_form_case(&mut r, fs_base);
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    h.set_gs_base(0);
    super::report(name, n, &failures);
}

/// LOCK: every lockable read-modify-write form on memory completes like the unlocked one; LOCK
/// on a register destination or a non-lockable instruction is #UD.
#[test]
fn lock_prefix() {
    run_cases("lock_prefix", 3000, |r| {
        let mut st = random_state(r);
        let sz = Sz::ALL[r.below(4) as usize];
        let reg = free_reg(r, &[3]);
        st.gpr[3] = target(r) & !15;
        let disp = (16 * r.below(8)) as u8;
        let k = r.below(8) as u8;
        // (opcode, reg field, immediate, lockable, 8-bit form allowed)
        let (op, rf, imm, lockable): (Vec<u8>, u8, Vec<u8>, bool) = match r.below(12) {
            0 => (vec![op_for(sz, k * 8)], reg, vec![], k != 7),
            1 => (vec![op_for(sz, 0x80)], k, sz.imm_z(r.value()), k != 7),
            2 => (vec![op_for(sz, 0xF6)], 2 + r.below(2) as u8, vec![], true),
            3 => (vec![op_for(sz, 0xFE)], r.below(2) as u8, vec![], true),
            4 => (vec![op_for(sz, 0x86)], reg, vec![], true),
            5 => (vec![0x0F, op_for(sz, 0xC0)], reg, vec![], true),
            6 => (vec![0x0F, op_for(sz, 0xB0)], reg, vec![], true),
            7 => {
                let b = [0xA3u8, 0xAB, 0xB3, 0xBB][r.below(4) as usize];
                st.gpr[reg as usize] = r.below(64);
                (vec![0x0F, b], reg, vec![], b != 0xA3)
            }
            8 => {
                let f = 4 + r.below(4) as u8;
                (vec![0x0F, 0xBA], f, vec![r.below(256) as u8], f != 4)
            }
            9 => (vec![op_for(sz, 0x88)], reg, vec![], false),
            10 => (vec![op_for(sz, 0x84)], reg, vec![], false),
            _ => (vec![op_for(sz, k * 8 + 2)], reg, vec![], false),
        };
        let sz = if op[0] == 0x0F && matches!(op[1], 0xA3 | 0xAB | 0xB3 | 0xBB | 0xBA) {
            [Sz::W, Sz::D, Sz::Q][r.below(3) as usize]
        } else {
            sz
        };
        let register_form = r.below(5) == 0;
        let mut c = vec![0xF0];
        if sz == Sz::W {
            c.push(0x66);
        }
        let rex = 0x40 | if sz == Sz::Q { 8 } else { 0 } | ((rf >> 3) << 2);
        if rex != 0x40 {
            c.push(rex);
        }
        c.extend(&op);
        if register_form {
            c.push(0xC0 | ((rf & 7) << 3) | 1);
        } else {
            c.push(0x40 | ((rf & 7) << 3) | 3);
            c.push(disp);
        }
        c.extend(imm);
        let ud = register_form || !lockable;
        Case {
            code: c,
            st,
            flag_mask: if ud { ARITH } else { ARITH & !AF },
            xmm: false,
            data_seed: 0x32,
            expect: ud.then_some(6),
        }
    });
}

/// Short encodings: MOV r8/r, imm (B0+r, B8+r, imm64 with REX.W), MOV AL/rAX <-> moffs
/// (A0-A3, 64-bit and 0x67 32-bit offsets), TEST AL/rAX, imm (A8/A9), XCHG rAX, r (90+r).
#[test]
fn short_encodings() {
    run_cases("short_encodings", 3000, |r| {
        let st = random_state(r);
        let sz = Sz::ALL[r.below(4) as usize];
        let n = r.below(16) as u8;
        let mut c = Vec::new();
        if sz == Sz::W {
            c.push(0x66);
        }
        let rex = |w: bool, b: u8| 0x40 | if w { 8 } else { 0 } | (b >> 3);
        match r.below(4) {
            0 => {
                let n = if n == 4 { 0 } else { n };
                let rx = rex(sz == Sz::Q, n);
                if rx != 0x40 || (sz == Sz::B && r.below(2) == 0) {
                    c.push(rx);
                }
                c.push(if sz == Sz::B { 0xB0 } else { 0xB8 } + (n & 7));
                let v = r.value();
                match sz {
                    Sz::B => c.push(v as u8),
                    Sz::W => c.extend((v as u16).to_le_bytes()),
                    Sz::D => c.extend((v as u32).to_le_bytes()),
                    Sz::Q => c.extend(v.to_le_bytes()),
                }
            }
            1 => {
                let a32 = r.below(3) == 0;
                if a32 {
                    c.insert(0, 0x67);
                }
                if sz == Sz::Q {
                    c.push(0x48);
                }
                c.push(op_for(sz, 0xA0) + 2 * r.below(2) as u8);
                let t = target(r);
                if a32 {
                    c.extend((t as u32).to_le_bytes());
                } else {
                    c.extend(t.to_le_bytes());
                }
            }
            2 => {
                if sz == Sz::Q {
                    c.push(0x48);
                }
                c.push(op_for(sz, 0xA8));
                c.extend(sz.imm_z(r.value()));
            }
            _ => {
                let sz = if sz == Sz::B { Sz::D } else { sz };
                let n = if n == 4 { 12 } else { n };
                let rx = rex(sz == Sz::Q, n);
                if rx != 0x40 {
                    c.push(rx);
                }
                c.push(0x90 + (n & 7));
            }
        }
        Case {
            code: c,
            st,
            flag_mask: ARITH & !AF,
            xmm: false,
            data_seed: 0x33,
            expect: None,
        }
    });
}

/// Prefix edge cases on ALU instructions: repeated and ignored prefixes (segment overrides on
/// register operands or ignored in 64-bit mode, F2/F3, 0x67 without memory, several 0x66),
/// and a REX prefix followed by a legacy prefix (then ignored).
#[test]
fn redundant_and_ignored_prefixes() {
    run_cases("redundant_and_ignored_prefixes", 3000, |r| {
        let mut st = random_state(r);
        let sz = Sz::ALL[r.below(4) as usize];
        let k = r.below(8) as u8;
        let op = op_for(sz, k * 8 + 2 * r.below(2) as u8);
        let mem = r.below(2) == 0;
        let reg = free_reg(r, &[3]);
        let rm = free_reg(r, &[]);
        let mut c = Vec::new();
        for _ in 0..r.below(4) {
            let p = match r.below(6) {
                0 => [0x26u8, 0x2E, 0x36, 0x3E, 0x65][r.below(5) as usize],
                1 if !mem => 0x64,
                2 => 0xF2,
                3 => 0xF3,
                4 if !mem => 0x67,
                _ => 0x66,
            };
            c.push(p);
        }
        if sz == Sz::W {
            c.push(0x66);
        }
        if !c.is_empty() && r.below(3) == 0 {
            // A REX prefix followed by a legacy prefix is ignored.
            c.insert(0, 0x48 | r.below(8) as u8);
        }
        let rex = 0x40
            | if sz == Sz::Q { 8 } else { 0 }
            | ((reg >> 3) << 2)
            | if mem { 0 } else { rm >> 3 };
        if rex != 0x40 || sz == Sz::B {
            c.push(rex);
        }
        c.push(op);
        if mem {
            st.gpr[3] = target(r);
            c.extend([0x43 | ((reg & 7) << 3), r.below(128) as u8]);
        } else {
            c.push(0xC0 | ((reg & 7) << 3) | (rm & 7));
        }
        Case {
            code: c,
            st,
            flag_mask: ARITH & !AF,
            xmm: false,
            data_seed: 0x34,
            expect: None,
        }
    });
}
