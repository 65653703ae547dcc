//! SSE/AVX instructions translated to host code: the data moves, bitwise operations, byte/
//! word/dword equality compares, unpacks (PUNPCKL/H*) and byte masks that library string and memory functions
//! (glibc's `memcpy`, `strlen`, `memchr`, ... in their SSE2 and AVX2 variants) and scalar
//! double-precision code (`movsd`) are made of. None of them reads or writes MXCSR or the
//! flags. Each runs natively when its unit is enabled and its memory operand is a RAM page
//! of the TLB (aligned where the form requires it); otherwise the interpreter handler runs
//! the whole instruction on a side path and raises what it raises (`Em::vstart`).
//!
//! As the interpreter: legacy SSE forms leave bits 255:128 of the destination alone, VEX
//! forms clear them (VEX.128) or write them (VEX.256).

use super::{reg_info, Em};
use crate::jit::emit::Unit;
use crate::mmu::walk::Access;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{I16X8, I32, I32X4, I64, I64X2, I8X16};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Type, Value};
use iced_x86::{EncodingKind, Instruction, Mnemonic as M, OpKind, Register};

/// The mnemonics translated here (other forms of them, e.g. MMX, go to the interpreter).
pub(super) fn handles(m: M) -> bool {
    full_move(m).is_some()
        || bitwise(m).is_some()
        || unpack(m).is_some()
        || cmpeq(m).is_some()
        || matches!(
            m,
            M::Movsd
                | M::Movss
                | M::Vmovsd
                | M::Vmovss
                | M::Movd
                | M::Movq
                | M::Vmovd
                | M::Vmovq
                | M::Vzeroupper
                | M::Pmovmskb
                | M::Vpmovmskb
                | M::Pshufd
                | M::Vpshufd
        )
        || bcast(m).is_some()
}

/// Whole-register moves: whether the memory form must be aligned.
fn full_move(m: M) -> Option<bool> {
    match m {
        M::Movups | M::Movupd | M::Movdqu | M::Vmovups | M::Vmovupd | M::Vmovdqu => Some(false),
        M::Movaps | M::Movapd | M::Movdqa | M::Vmovaps | M::Vmovapd | M::Vmovdqa => Some(true),
        _ => None,
    }
}

#[derive(Clone, Copy)]
enum Bit {
    And,
    AndNot,
    Or,
    Xor,
}

fn bitwise(m: M) -> Option<Bit> {
    Some(match m {
        M::Pand | M::Andps | M::Andpd | M::Vpand | M::Vandps | M::Vandpd => Bit::And,
        M::Pandn | M::Andnps | M::Andnpd | M::Vpandn | M::Vandnps | M::Vandnpd => Bit::AndNot,
        M::Por | M::Orps | M::Orpd | M::Vpor | M::Vorps | M::Vorpd => Bit::Or,
        M::Pxor | M::Xorps | M::Xorpd | M::Vpxor | M::Vxorps | M::Vxorpd => Bit::Xor,
        _ => return None,
    })
}

/// PUNPCKL/PUNPCKH BW/WD/DQ/QDQ and their VEX forms: the byte shuffle (indices 16-31 from
/// the second source) of `d = unpack(a, b)` within each 128-bit lane.
fn unpack(m: M) -> Option<[u8; 16]> {
    let (hi, w) = match m {
        M::Punpcklbw | M::Vpunpcklbw => (false, 1),
        M::Punpcklwd | M::Vpunpcklwd => (false, 2),
        M::Punpckldq | M::Vpunpckldq => (false, 4),
        M::Punpcklqdq | M::Vpunpcklqdq => (false, 8),
        M::Punpckhbw | M::Vpunpckhbw => (true, 1),
        M::Punpckhwd | M::Vpunpckhwd => (true, 2),
        M::Punpckhdq | M::Vpunpckhdq => (true, 4),
        M::Punpckhqdq | M::Vpunpckhqdq => (true, 8),
        _ => return None,
    };
    let base = if hi { 8 } else { 0 };
    // Result byte i: element i / (2w) of the low or high half, from a then b in turn.
    Some(std::array::from_fn(|i| {
        let (elem, within) = (i / (2 * w), i % (2 * w));
        let byte = base + elem * w + within % w;
        (byte + if within >= w { 16 } else { 0 }) as u8
    }))
}

/// VPBROADCASTB/W/D/Q: the vector type of the element broadcast.
fn bcast(m: M) -> Option<Type> {
    Some(match m {
        M::Vpbroadcastb => I8X16,
        M::Vpbroadcastw => I16X8,
        M::Vpbroadcastd => I32X4,
        M::Vpbroadcastq => I64X2,
        _ => return None,
    })
}

fn cmpeq(m: M) -> Option<Type> {
    Some(match m {
        M::Pcmpeqb | M::Vpcmpeqb => I8X16,
        M::Pcmpeqw | M::Vpcmpeqw => I16X8,
        M::Pcmpeqd | M::Vpcmpeqd => I32X4,
        _ => return None,
    })
}

/// XMM/YMM register number (0-15) and whether it is a YMM register.
fn vreg(r: Register) -> Option<(usize, bool)> {
    let (base, ymm) = if r.is_xmm() {
        (Register::XMM0, false)
    } else if r.is_ymm() {
        (Register::YMM0, true)
    } else {
        return None;
    };
    let n = r as usize - base as usize;
    (n < 16).then_some((n, ymm))
}

pub(super) fn gmem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Operand `i`: a vector register (number, YMM), a general register or memory.
#[derive(Clone, Copy)]
pub(super) enum Opd {
    V(usize, bool),
    G(Register),
    Mem,
}

pub(super) fn opd(ins: &Instruction, i: u32) -> Option<Opd> {
    match ins.op_kind(i) {
        OpKind::Register => {
            let r = ins.op_register(i);
            if let Some((n, y)) = vreg(r) {
                return Some(Opd::V(n, y));
            }
            let (_, size, high) = reg_info(r)?;
            (!high && size >= 4).then_some(Opd::G(r))
        }
        OpKind::Memory => {
            let ok = |r: Register| {
                r == Register::None
                    || r == Register::RIP
                    || reg_info(r).is_some_and(|(_, s, h)| !h && s >= 4)
            };
            (ok(ins.memory_base()) && ok(ins.memory_index())).then_some(Opd::Mem)
        }
        _ => None,
    }
}

/// Translates `ins` (a mnemonic [`handles`] accepts) with `op` (its interpreter handler for
/// the side path). `None` before anything was emitted when the form is not translated here.
pub(super) fn translate(e: &mut Em<'_>, ins: &Instruction, m: M, op: usize) -> Option<()> {
    let vex = ins.encoding() == EncodingKind::VEX;
    if !matches!(ins.encoding(), EncodingKind::Legacy | EncodingKind::VEX) {
        return None;
    }
    let unit = if vex { Unit::Avx } else { Unit::Sse };
    if matches!(m, M::Pshufd | M::Vpshufd) {
        return pshufd(e, ins, unit, op);
    }
    let ops: Vec<Opd> = (0..ins.op_count())
        .map(|i| opd(ins, i))
        .collect::<Option<_>>()?;
    if m == M::Vzeroupper {
        let (_, slow) = e.vstart(unit, None);
        for n in 0..16 {
            e.yzero(n);
        }
        e.vfinish(slow, op, None);
        return Some(());
    }
    if let Some(aligned) = full_move(m) {
        return full(e, ins, &ops, unit, aligned, op);
    }
    if let Some(k) = bitwise(m) {
        return logic(e, ins, &ops, unit, Logic::Bit(k), op);
    }
    if let Some(t) = cmpeq(m) {
        return logic(e, ins, &ops, unit, Logic::Eq(t), op);
    }
    if let Some(mask) = unpack(m) {
        return logic(e, ins, &ops, unit, Logic::Unpack(mask), op);
    }
    if let Some(t) = bcast(m) {
        return broadcast(e, ins, &ops, t, op);
    }
    match m {
        M::Movsd | M::Movss | M::Vmovsd | M::Vmovss => scalar(
            e,
            ins,
            &ops,
            unit,
            if matches!(m, M::Movsd | M::Vmovsd) {
                8
            } else {
                4
            },
            op,
        ),
        M::Movd | M::Movq | M::Vmovd | M::Vmovq => movdq(e, ins, &ops, unit, op),
        M::Pmovmskb | M::Vpmovmskb => movmsk(e, &ops, unit, op),
        _ => None,
    }
}

/// A memory operand's linear address, computed before the fast/side split (it reads
/// general registers, which must be loaded on both paths).
pub(super) fn addr(e: &mut Em<'_>, ins: &Instruction, ops: &[Opd]) -> Option<Option<Value>> {
    if ops.iter().any(|o| matches!(o, Opd::Mem)) {
        Some(Some(e.ea(ins)?))
    } else {
        Some(None)
    }
}

/// MOVUPS/MOVAPS/MOVDQU/... and their VEX forms: a whole register from a register or memory,
/// or to memory.
fn full(
    e: &mut Em<'_>,
    ins: &Instruction,
    ops: &[Opd],
    unit: Unit,
    aligned: bool,
    op: usize,
) -> Option<()> {
    let [d, s] = ops else { return None };
    let ymm = matches!(d, Opd::V(_, true)) || matches!(s, Opd::V(_, true));
    let width: u8 = if ymm { 32 } else { 16 };
    let align = if aligned { width } else { 0 };
    let va = addr(e, ins, ops)?;
    match (*d, *s) {
        (Opd::V(dn, _), Opd::V(sn, _)) => {
            let (_, slow) = e.vstart(unit, None);
            let lo = e.xget(sn, false);
            let hi = ymm.then(|| e.xget(sn, true));
            e.xset(dn, false, lo);
            set_upper(e, dn, unit, hi);
            e.vfinish(slow, op, None);
        }
        (Opd::V(dn, _), Opd::Mem) => {
            let (m, slow) = e.vstart(unit, Some((va?, width, Access::Read, align)));
            let h = m?.host;
            let lo = e.b.ins().load(I8X16, gmem(), h, 0);
            let hi = ymm.then(|| e.b.ins().load(I8X16, gmem(), h, 16));
            e.xset(dn, false, lo);
            set_upper(e, dn, unit, hi);
            e.vfinish(slow, op, None);
        }
        (Opd::Mem, Opd::V(sn, _)) => {
            let (m, slow) = e.vstart(unit, Some((va?, width, Access::Write, align)));
            let h = m?.host;
            let lo = e.xget(sn, false);
            e.b.ins().store(gmem(), lo, h, 0);
            if ymm {
                let hi = e.xget(sn, true);
                e.b.ins().store(gmem(), hi, h, 16);
            }
            e.vfinish(slow, op, None);
        }
        _ => return None,
    }
    Some(())
}

/// Bits 255:128 of destination `n` after a write of its low half: `hi` for a YMM write,
/// cleared by a VEX.128 write, kept by a legacy SSE write.
fn set_upper(e: &mut Em<'_>, n: usize, unit: Unit, hi: Option<Value>) {
    match hi {
        Some(v) => e.xset(n, true, v),
        None if unit == Unit::Avx => e.yzero(n),
        None => {}
    }
}

#[derive(Clone, Copy)]
enum Logic {
    Bit(Bit),
    Eq(Type),
    /// A byte shuffle of the two sources ([`unpack`]).
    Unpack([u8; 16]),
}

/// PXOR/PAND/..., PCMPEQB/W/D and PUNPCKL/H*: legacy `d = d op s` (a memory `s` aligned), VEX
/// `d = s1 op s2` (unaligned), per 128-bit lane.
fn logic(
    e: &mut Em<'_>,
    ins: &Instruction,
    ops: &[Opd],
    unit: Unit,
    k: Logic,
    op: usize,
) -> Option<()> {
    let (dn, a, b) = match (unit, ops) {
        (Unit::Sse, [Opd::V(d, false), s]) => (*d, Opd::V(*d, false), *s),
        (Unit::Avx, [Opd::V(d, _), a @ Opd::V(..), b]) => (*d, *a, *b),
        _ => return None,
    };
    if matches!(b, Opd::G(_)) {
        return None;
    }
    let ymm = matches!(ops[0], Opd::V(_, true));
    let width: u8 = if ymm { 32 } else { 16 };
    let align = if unit == Unit::Sse { 16 } else { 0 };
    let va = addr(e, ins, ops)?;
    let memop = va.map(|v| (v, width, Access::Read, align));
    let Opd::V(an, _) = a else { return None };
    let (m, slow) = e.vstart(unit, memop);
    let ty = match k {
        Logic::Eq(t) => t,
        Logic::Bit(_) | Logic::Unpack(_) => I8X16,
    };
    let mut halves = [None, None];
    for (i, half) in halves.iter_mut().enumerate().take(if ymm { 2 } else { 1 }) {
        let hi = i == 1;
        let x = e.sload(ty, Em::xmm_off(an, hi, 0));
        let y = match (b, &m) {
            (Opd::V(bn, _), _) => e.sload(ty, Em::xmm_off(bn, hi, 0)),
            (_, Some(mm)) => e.b.ins().load(ty, gmem(), mm.host, 16 * i as i32),
            _ => return None,
        };
        *half = Some(match k {
            Logic::Bit(Bit::And) => e.b.ins().band(x, y),
            Logic::Bit(Bit::AndNot) => e.b.ins().band_not(y, x),
            Logic::Bit(Bit::Or) => e.b.ins().bor(x, y),
            Logic::Bit(Bit::Xor) => e.b.ins().bxor(x, y),
            Logic::Eq(_) => e.b.ins().icmp(IntCC::Equal, x, y),
            Logic::Unpack(mask) => {
                let imm = e.b.func.dfg.immediates.push(mask.to_vec().into());
                e.b.ins().shuffle(x, y, imm)
            }
        });
    }
    let lo = halves[0]?;
    e.sstore(lo, Em::xmm_off(dn, false, 0));
    set_upper(e, dn, unit, halves[1]);
    e.vfinish(slow, op, None);
    Some(())
}

/// MOVSD/MOVSS and VMOVSD/VMOVSS (`size` 8 or 4): register merges, loads that zero the rest
/// of the register, stores of the low element.
fn scalar(
    e: &mut Em<'_>,
    ins: &Instruction,
    ops: &[Opd],
    unit: Unit,
    size: u8,
    op: usize,
) -> Option<()> {
    let ty = if size == 8 { I64 } else { I32 };
    let va = addr(e, ins, ops)?;
    match ops {
        // Legacy: the low element of d from s, the rest of d kept.
        [Opd::V(d, false), Opd::V(s, false)] if unit == Unit::Sse => {
            let (_, slow) = e.vstart(unit, None);
            let v = e.sload(ty, Em::xmm_off(*s, false, 0));
            e.sstore(v, Em::xmm_off(*d, false, 0));
            e.vfinish(slow, op, None);
        }
        // VEX: d = s2's low element with s1's other elements; bits 255:128 cleared.
        [Opd::V(d, false), Opd::V(s1, false), Opd::V(s2, false)] if unit == Unit::Avx => {
            let (_, slow) = e.vstart(unit, None);
            let lo = e.sload(ty, Em::xmm_off(*s2, false, 0));
            let hi = e.sload(I64, Em::xmm_off(*s1, false, 8));
            let mid = (size == 4).then(|| e.sload(I32, Em::xmm_off(*s1, false, 4)));
            e.sstore(lo, Em::xmm_off(*d, false, 0));
            if let Some(m) = mid {
                e.sstore(m, Em::xmm_off(*d, false, 4));
            }
            e.sstore(hi, Em::xmm_off(*d, false, 8));
            e.yzero(*d);
            e.vfinish(slow, op, None);
        }
        [Opd::V(d, false), Opd::Mem] => {
            let (m, slow) = e.vstart(unit, Some((va?, size, Access::Read, 0)));
            let v = e.b.ins().load(ty, gmem(), m?.host, 0);
            let v = if size == 4 {
                e.b.ins().uextend(I64, v)
            } else {
                v
            };
            let z = e.c(0);
            e.sstore(v, Em::xmm_off(*d, false, 0));
            e.sstore(z, Em::xmm_off(*d, false, 8));
            if unit == Unit::Avx {
                e.yzero(*d);
            }
            e.vfinish(slow, op, None);
        }
        [Opd::Mem, Opd::V(s, false)] => {
            let (m, slow) = e.vstart(unit, Some((va?, size, Access::Write, 0)));
            let v = e.sload(ty, Em::xmm_off(*s, false, 0));
            e.b.ins().store(gmem(), v, m?.host, 0);
            e.vfinish(slow, op, None);
        }
        _ => return None,
    }
    Some(())
}

/// MOVD/MOVQ/VMOVD/VMOVQ between XMM registers, general registers and memory (the MMX forms
/// go to the interpreter). Into an XMM register the value is zero-extended to 128 bits.
fn movdq(e: &mut Em<'_>, ins: &Instruction, ops: &[Opd], unit: Unit, op: usize) -> Option<()> {
    let [d, s] = ops else { return None };
    let gsize = |r: Register| reg_info(r).map(|i| i.1);
    // The element size: of the general register, the memory operand or 8 (xmm to xmm).
    let size = match (d, s) {
        (Opd::G(r), _) | (_, Opd::G(r)) => gsize(*r)?,
        (Opd::Mem, _) | (_, Opd::Mem) => match ins.memory_size().size() {
            s @ (4 | 8) => s as u8,
            _ => return None,
        },
        _ => 8,
    };
    let ty = if size == 8 { I64 } else { I32 };
    let va = addr(e, ins, ops)?;
    // Into an XMM register: the value (I64, zero-extended), then the rest cleared.
    let into = |e: &mut Em<'_>, n: usize, v: Value| {
        let v = if size == 4 {
            e.b.ins().uextend(I64, v)
        } else {
            v
        };
        let z = e.c(0);
        e.sstore(v, Em::xmm_off(n, false, 0));
        e.sstore(z, Em::xmm_off(n, false, 8));
        if unit == Unit::Avx {
            e.yzero(n);
        }
    };
    match (*d, *s) {
        (Opd::V(dn, false), Opd::G(r)) => {
            let (i, _, _) = reg_info(r)?;
            let g = e.gpr(i);
            let g = if size == 4 {
                e.b.ins().ireduce(I32, g)
            } else {
                g
            };
            let (_, slow) = e.vstart(unit, None);
            into(e, dn, g);
            e.vfinish(slow, op, None);
        }
        (Opd::V(dn, false), Opd::V(sn, false)) => {
            let (_, slow) = e.vstart(unit, None);
            let v = e.sload(I64, Em::xmm_off(sn, false, 0));
            into(e, dn, v);
            e.vfinish(slow, op, None);
        }
        (Opd::V(dn, false), Opd::Mem) => {
            let (m, slow) = e.vstart(unit, Some((va?, size, Access::Read, 0)));
            let v = e.b.ins().load(ty, gmem(), m?.host, 0);
            into(e, dn, v);
            e.vfinish(slow, op, None);
        }
        (Opd::G(r), Opd::V(sn, false)) => {
            let (i, _, _) = reg_info(r)?;
            let (_, slow) = e.vstart(unit, None);
            let v = e.sload(ty, Em::xmm_off(sn, false, 0));
            let v = if size == 4 {
                e.b.ins().uextend(I64, v)
            } else {
                v
            };
            e.set_gpr(i, v);
            e.vfinish(slow, op, Some(i));
        }
        (Opd::Mem, Opd::V(sn, false)) => {
            let (m, slow) = e.vstart(unit, Some((va?, size, Access::Write, 0)));
            let v = e.sload(ty, Em::xmm_off(sn, false, 0));
            e.b.ins().store(gmem(), v, m?.host, 0);
            e.vfinish(slow, op, None);
        }
        _ => return None,
    }
    Some(())
}

/// PMOVMSKB/VPMOVMSKB r32/r64, xmm/ymm: the top bit of every byte, zero-extended.
fn movmsk(e: &mut Em<'_>, ops: &[Opd], unit: Unit, op: usize) -> Option<()> {
    let [Opd::G(r), Opd::V(sn, ymm)] = ops else {
        return None;
    };
    if unit == Unit::Sse && *ymm {
        return None;
    }
    let (i, _, _) = reg_info(*r)?;
    let (_, slow) = e.vstart(unit, None);
    let lo = e.xget(*sn, false);
    let mut v = e.b.ins().vhigh_bits(I64, lo);
    if *ymm {
        let hi = e.xget(*sn, true);
        let h = e.b.ins().vhigh_bits(I64, hi);
        let h = e.b.ins().ishl_imm_s(h, 16);
        v = e.b.ins().bor(v, h);
    }
    e.set_gpr(i, v);
    e.vfinish(slow, op, Some(i));
    Some(())
}

/// PSHUFD/VPSHUFD (.128/.256): dword `i` of each lane of the destination is dword
/// `imm >> 2i & 3` of the same lane of the source (a register, or memory: aligned for the
/// legacy form).
fn pshufd(e: &mut Em<'_>, ins: &Instruction, unit: Unit, op: usize) -> Option<()> {
    if ins.op_count() != 3 || !super::is_imm(ins.op2_kind()) {
        return None;
    }
    let ops = [opd(ins, 0)?, opd(ins, 1)?];
    let [Opd::V(dn, ymm), s] = ops else {
        return None;
    };
    if matches!(s, Opd::G(_)) || (unit == Unit::Sse && ymm) {
        return None;
    }
    let imm = u32::from(ins.immediate8());
    let mask: [u8; 16] = std::array::from_fn(|i| {
        let sel = (imm >> (2 * (i / 4))) & 3;
        (4 * sel as usize + i % 4) as u8
    });
    let width: u8 = if ymm { 32 } else { 16 };
    let align = if unit == Unit::Sse { 16 } else { 0 };
    let va = addr(e, ins, &ops)?;
    let (m, slow) = e.vstart(unit, va.map(|v| (v, width, Access::Read, align)));
    let imm = e.b.func.dfg.immediates.push(mask.to_vec().into());
    let mut halves = [None, None];
    for (i, half) in halves.iter_mut().enumerate().take(if ymm { 2 } else { 1 }) {
        let x = match (s, &m) {
            (Opd::V(sn, _), _) => e.xget(sn, i == 1),
            (_, Some(mm)) => e.b.ins().load(I8X16, gmem(), mm.host, 16 * i as i32),
            _ => return None,
        };
        *half = Some(e.b.ins().shuffle(x, x, imm));
    }
    e.xset(dn, false, halves[0]?);
    set_upper(e, dn, unit, halves[1]);
    e.vfinish(slow, op, None);
    Some(())
}

/// VPBROADCASTB/W/D/Q (.128/.256, VEX only): every element of the destination is the low
/// element of the source register or the element in memory; bits 255:128 cleared by .128.
fn broadcast(e: &mut Em<'_>, ins: &Instruction, ops: &[Opd], vt: Type, op: usize) -> Option<()> {
    if ins.encoding() != EncodingKind::VEX {
        return None;
    }
    let [Opd::V(dn, ymm), s] = ops else {
        return None;
    };
    let et = vt.lane_type();
    let va = addr(e, ins, ops)?;
    let size = et.bytes() as u8;
    let (m, slow) = e.vstart(Unit::Avx, va.map(|v| (v, size, Access::Read, 0)));
    let x = match (s, &m) {
        (Opd::V(sn, false), _) => e.sload(et, Em::xmm_off(*sn, false, 0)),
        (Opd::Mem, Some(mm)) => e.b.ins().load(et, gmem(), mm.host, 0),
        _ => return None,
    };
    let v = e.b.ins().splat(vt, x);
    e.xset(*dn, false, v);
    set_upper(e, *dn, Unit::Avx, ymm.then_some(v));
    e.vfinish(slow, op, None);
    Some(())
}
