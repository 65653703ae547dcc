//! The bridge from VEX-encoded SSE-SSE4.2 instructions to the legacy SSE handlers: a VEX form
//! `vop dst, src1, src2[, imm]` runs as the legacy `op scratch0, scratch1[, imm]` with
//! scratch0 = src1 (the legacy destination, which the legacy form reads) and scratch1 = src2,
//! per 128-bit lane for VEX.256, and the result is written to `dst` with bits 255:128 zeroed
//! for VEX.128. The legacy instruction is synthesised from the VEX `Code` by name (iced's
//! `VEX_Vpaddb_xmm_xmm_xmmm128` ↔ `Paddb_xmm_xmmm128`), once per code.
//!
//! Scratch registers are XMM0/XMM1 of the architectural state, saved and restored around each
//! lane. Vector memory sources (16 or 32 bytes) are read into the scratch register (VEX has no
//! alignment requirement); smaller memory operands and memory destinations are passed to the
//! legacy handler as an absolute address.

use super::{Ctx, Event, R};
use iced_x86::{Code, CodeSize, Instruction, Mnemonic as M, OpKind, Register};
use std::sync::OnceLock;

/// How a VEX code maps onto a legacy one.
#[derive(Clone, Copy)]
struct Map {
    legacy: Code,
    /// VEX operand 1 is the extra (vvvv) source: the legacy destination's input value.
    nds: bool,
}

fn tokens(c: Code) -> (String, Vec<String>) {
    let name = format!("{c:?}");
    let mut it = name.split('_');
    let m = it.next().unwrap_or("").to_string();
    (m, it.map(str::to_string).collect())
}

/// Whether legacy operand token `leg` accepts what VEX token `vex` (YMM forms narrowed to
/// XMM) describes.
fn compat(leg: &str, vex: &str) -> bool {
    let v = vex.replacen("ymm", "xmm", 1).replace("m256", "m128");
    if leg == v {
        return true;
    }
    if v == "xmm" || v.starts_with("xmmm") {
        return leg.starts_with("xmmm");
    }
    if v.starts_with('m') {
        return leg.starts_with("xmmm");
    }
    false
}

fn table() -> &'static Vec<Option<Map>> {
    static T: OnceLock<Vec<Option<Map>>> = OnceLock::new();
    T.get_or_init(|| {
        use std::collections::HashMap;
        let mut legacy: HashMap<String, Vec<(Code, Vec<String>)>> = HashMap::new();
        let mut vex = Vec::new();
        for c in Code::values() {
            let (m, t) = tokens(c);
            if m == "VEX" {
                vex.push(c);
            } else if !matches!(m.as_str(), "EVEX" | "XOP" | "D3NOW" | "MVEX") {
                legacy.entry(m.to_lowercase()).or_default().push((c, t));
            }
        }
        let mut out = vec![None; Code::values().len()];
        for c in vex {
            let name = format!("{c:?}");
            let mut parts = name.split('_').skip(1);
            let Some(vm) = parts.next() else { continue };
            let Some(lm) = vm.strip_prefix('V') else {
                continue;
            };
            let vt: Vec<String> = parts.map(str::to_string).collect();
            let Some(cands) = legacy.get(&lm.to_lowercase()) else {
                continue;
            };
            let fits = |vt: &[String]| {
                cands.iter().find(|(_, lt)| {
                    lt.len() == vt.len() && lt.iter().zip(vt).all(|(l, v)| compat(l, v))
                })
            };
            let found = fits(&vt).map(|(l, _)| Map {
                legacy: *l,
                nds: false,
            });
            let found = found.or_else(|| {
                if vt.len() < 2 {
                    return None;
                }
                let mut t = vt.clone();
                t.remove(1);
                fits(&t).map(|(l, _)| Map {
                    legacy: *l,
                    nds: true,
                })
            });
            out[c as usize] = found;
        }
        out
    })
}

/// A vector register: index and whether it is a YMM register.
pub(super) fn vreg(r: Register) -> Option<(usize, bool)> {
    let n = r as usize;
    let x = Register::XMM0 as usize;
    let y = Register::YMM0 as usize;
    if (x..x + 16).contains(&n) {
        Some((n - x, false))
    } else if (y..y + 16).contains(&n) {
        Some((n - y, true))
    } else {
        None
    }
}

/// The 256-bit value of YMM `i`.
pub(super) fn get_y(cx: &Ctx<'_>, i: usize) -> [u128; 2] {
    [cx.s.xmm[i], cx.s.ymmh[i]]
}

/// The per-lane source selection of one VEX operand.
#[derive(Clone, Copy)]
enum Src {
    /// A 256-bit value (register or full memory): lane L gets bytes `off_L..off_L + 16`.
    Val([u128; 2]),
    /// A memory operand passed by absolute address (plus the lane's byte offset).
    Mem(u64),
    /// A general-purpose register.
    Gpr(Register),
    /// An immediate.
    Imm(u8),
}

fn shr256(v: [u128; 2], bytes: u32) -> u128 {
    match bytes {
        0 => v[0],
        16.. => v[1] >> (8 * (bytes - 16)),
        b => (v[0] >> (8 * b)) | (v[1] << (128 - 8 * b)),
    }
}

fn operand(cx: &mut Ctx<'_>, ins: &Instruction, i: u32) -> R<Src> {
    Ok(match ins.op_kind(i) {
        OpKind::Register => {
            let r = ins.op_register(i);
            match vreg(r) {
                Some((x, true)) => Src::Val(get_y(cx, x)),
                Some((x, false)) => Src::Val([cx.s.xmm[x], 0]),
                None => Src::Gpr(r),
            }
        }
        OpKind::Memory => {
            let va = cx.ea(ins);
            let size = ins.memory_size().size();
            if size >= 16 && i != 0 {
                let mut b = [0u8; 32];
                cx.read_bytes(va, &mut b[..size.min(32)])?;
                let lo = u128::from_le_bytes(b[..16].try_into().unwrap_or([0; 16]));
                let hi = u128::from_le_bytes(b[16..].try_into().unwrap_or([0; 16]));
                Src::Val([lo, hi])
            } else {
                Src::Mem(va)
            }
        }
        OpKind::Immediate8 | OpKind::Immediate8_2nd => Src::Imm(ins.immediate(i) as u8),
        _ => return super::ud(),
    })
}

/// What the legacy instruction's destination is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dst {
    /// The VEX destination vector register.
    Vec(usize, bool),
    /// Nothing vector (GPR, memory, flags: the legacy handler writes it).
    Other,
    /// XMM0 (PCMPxSTRM).
    Xmm0,
}

/// Runs the VEX instruction `ins` through the legacy handler. `Ok(false)`: no legacy form.
pub(super) fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<bool> {
    let Some(map) = table().get(ins.code() as usize).copied().flatten() else {
        return Ok(false);
    };
    let m = ins.mnemonic();
    let n = ins.op_count();
    let first = if map.nds { 1 } else { 0 };
    let dst = match m {
        M::Vpcmpistrm | M::Vpcmpestrm | M::Vpcmpestrm64 => Dst::Xmm0,
        M::Vptest | M::Vcomiss | M::Vcomisd | M::Vucomiss | M::Vucomisd => Dst::Other,
        M::Vpcmpistri | M::Vpcmpestri | M::Vpcmpestri64 => Dst::Other,
        _ => match (ins.op0_kind(), vreg(ins.op0_register())) {
            (OpKind::Register, Some((x, y))) => Dst::Vec(x, y),
            _ => Dst::Other,
        },
    };
    let wide = matches!(dst, Dst::Vec(_, true));
    // Legacy operands: 0 = VEX operand `first` (the destination's input) unless the
    // destination is not an input-bearing vector, then the rest.
    let mut ops = Vec::with_capacity(4);
    if map.nds {
        ops.push(operand(cx, ins, 1)?);
    } else {
        ops.push(operand(cx, ins, 0)?);
    }
    for i in (first + 1)..n {
        ops.push(operand(cx, ins, i)?);
    }
    // Lane-crossing shapes.
    let src_bytes = ins.memory_size().size() as u32;
    let widen = wide
        && matches!(
            m,
            M::Vcvtps2pd
                | M::Vcvtdq2pd
                | M::Vpmovzxbw
                | M::Vpmovzxbd
                | M::Vpmovzxbq
                | M::Vpmovzxwd
                | M::Vpmovzxwq
                | M::Vpmovzxdq
                | M::Vpmovsxbw
                | M::Vpmovsxbd
                | M::Vpmovsxbq
                | M::Vpmovsxwd
                | M::Vpmovsxwq
                | M::Vpmovsxdq
        );
    let narrow = matches!(dst, Dst::Vec(_, false))
        && matches!(m, M::Vcvtpd2ps | M::Vcvtpd2dq | M::Vcvttpd2dq)
        && src_bytes == 32;
    let lanes = if wide || narrow { 2 } else { 1 };
    let mxcsr0 = cx.s.mxcsr;
    let mut res = [0u128; 2];
    let mut flags = 0u32;
    let mut fault: Option<Event> = None;
    #[allow(clippy::needless_range_loop)]
    for lane in 0..lanes {
        let mut imm_shift = 0;
        if lane == 1 {
            imm_shift = match m {
                M::Vshufpd | M::Vblendpd => 2,
                M::Vblendps => 4,
                M::Vmpsadbw => 3,
                _ => 0,
            };
        }
        // Byte offset of this lane in each source (legacy operand k is VEX operand
        // k + first): the upper half of 256-bit sources, the next elements of a widened one;
        // XMM-sized operands of 256-bit instructions (shift counts) are used whole by both.
        let last = ops.len() - 1;
        let off = |k: usize| -> u32 {
            if lane == 0 {
                return 0;
            }
            if widen && k == last {
                return src_bytes / 2;
            }
            let vi = k as u32 + first;
            let is_256 = match ins.op_kind(vi) {
                OpKind::Register => vreg(ins.op_register(vi)).is_some_and(|(_, y)| y),
                OpKind::Memory => src_bytes == 32,
                _ => false,
            };
            if is_256 {
                16
            } else {
                0
            }
        };
        let mut l = Instruction::default();
        l.set_code(map.legacy);
        l.set_code_size(CodeSize::Code64);
        let saved = cx.s.xmm;
        let mut scratch = 0usize;
        for (k, s) in ops.iter().enumerate() {
            let k32 = k as u32;
            match *s {
                Src::Val(v) => {
                    let o = off(k);
                    // The legacy destination's slot when it is a GPR/memory is not here.
                    cx.s.xmm[scratch] = shr256(v, o);
                    l.set_op_kind(k32, OpKind::Register);
                    l.set_op_register(k32, xmm(scratch));
                    scratch += 1;
                }
                Src::Mem(va) => {
                    let o = off(k);
                    l.set_op_kind(k32, OpKind::Memory);
                    l.set_memory_base(Register::None);
                    l.set_memory_index(Register::None);
                    l.set_memory_displ_size(8);
                    l.set_memory_displacement64(va.wrapping_add(u64::from(o)));
                }
                Src::Gpr(r) => {
                    l.set_op_kind(k32, OpKind::Register);
                    l.set_op_register(k32, r);
                }
                Src::Imm(v) => {
                    l.set_op_kind(k32, OpKind::Immediate8);
                    l.set_immediate8(v >> imm_shift);
                }
            }
        }
        // PCMPxSTRM writes XMM0, which is also a scratch register: read it before restoring.
        cx.s.mxcsr = mxcsr0;
        let h = super::select(&l);
        let r = h(cx, &l);
        res[lane] = cx.s.xmm[0];
        cx.s.xmm = saved;
        flags |= cx.s.mxcsr;
        if let Err(e) = r {
            fault.get_or_insert(e);
        }
    }
    if let Some(e) = fault {
        // Unmasked pre-computation exceptions (IE DE ZE) hide the post-computation ones.
        let f = flags & 0x3F & !(mxcsr0 & 0x3F);
        let unmasked = f & !(mxcsr0 >> 7) & 0x3F;
        cx.s.mxcsr = mxcsr0 | if unmasked & 7 != 0 { f & 7 } else { f };
        return Err(e);
    }
    cx.s.mxcsr = flags;
    match dst {
        Dst::Vec(d, true) => {
            cx.s.xmm[d] = res[0];
            cx.s.ymmh[d] = res[1];
        }
        Dst::Vec(d, false) => {
            cx.s.xmm[d] = if narrow {
                (res[0] & u128::from(u64::MAX)) | (res[1] << 64)
            } else {
                res[0]
            };
            cx.s.ymmh[d] = 0;
        }
        Dst::Xmm0 => {
            cx.s.xmm[0] = res[0];
            cx.s.ymmh[0] = 0;
        }
        Dst::Other => {}
    }
    Ok(true)
}

fn xmm(i: usize) -> Register {
    match i {
        0 => Register::XMM0,
        1 => Register::XMM1,
        _ => Register::XMM2,
    }
}
