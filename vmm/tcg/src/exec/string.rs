//! String instructions (MOVS/STOS/LODS/CMPS/SCAS/INS/OUTS) with REP/REPE/REPNE.
//! Each iteration commits RSI/RDI/RCX, so a fault mid-way restarts correctly; long REP runs
//! are split into chunks (RIP stays on the instruction) so interrupts are not starved.

use super::{gp, Ctx, R};
use crate::flags::{size_mask, FlagOp, DF, IOPL, ZF};
use iced_x86::{Instruction, Mnemonic as M, OpKind};

/// Iterations per chunk before re-checking interrupts.
const CHUNK: u32 = 4096;

/// Whether `ins` is a string instruction (disambiguates MOVSD/CMPSD from the SSE forms).
pub fn is_string(ins: &Instruction) -> bool {
    (0..ins.op_count()).any(|i| {
        matches!(
            ins.op_kind(i),
            OpKind::MemorySegRSI
                | OpKind::MemorySegESI
                | OpKind::MemorySegSI
                | OpKind::MemoryESRDI
                | OpKind::MemoryESEDI
                | OpKind::MemoryESDI
        )
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Movs,
    Stos,
    Lods,
    Cmps,
    Scas,
    Ins,
    Outs,
}

fn classify(m: M) -> (Kind, u8) {
    use Kind::*;
    match m {
        M::Movsb => (Movs, 1),
        M::Movsw => (Movs, 2),
        M::Movsd => (Movs, 4),
        M::Movsq => (Movs, 8),
        M::Stosb => (Stos, 1),
        M::Stosw => (Stos, 2),
        M::Stosd => (Stos, 4),
        M::Stosq => (Stos, 8),
        M::Lodsb => (Lods, 1),
        M::Lodsw => (Lods, 2),
        M::Lodsd => (Lods, 4),
        M::Lodsq => (Lods, 8),
        M::Cmpsb => (Cmps, 1),
        M::Cmpsw => (Cmps, 2),
        M::Cmpsd => (Cmps, 4),
        M::Cmpsq => (Cmps, 8),
        M::Scasb => (Scas, 1),
        M::Scasw => (Scas, 2),
        M::Scasd => (Scas, 4),
        M::Scasq => (Scas, 8),
        M::Insb => (Ins, 1),
        M::Insw => (Ins, 2),
        M::Insd => (Ins, 4),
        M::Outsb => (Outs, 1),
        M::Outsw => (Outs, 2),
        _ => (Outs, 4),
    }
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let (kind, size) = classify(ins.mnemonic());
    // Address size: RSI/RDI, ESI/EDI or (outside 64-bit mode) SI/DI.
    let amask: u64 = (0..ins.op_count())
        .find_map(|i| match ins.op_kind(i) {
            OpKind::MemorySegESI | OpKind::MemoryESEDI => Some(0xFFFF_FFFF),
            OpKind::MemorySegSI | OpKind::MemoryESDI => Some(0xFFFF),
            _ => None,
        })
        .unwrap_or(u64::MAX);
    let a32 = amask != u64::MAX;
    // Outside 64-bit mode the destination is ES-relative and 16-bit counters merge.
    let (dst_base, keep) = if cx.legacy {
        (cx.seg_base(iced_x86::Register::ES), !amask)
    } else {
        (0, 0)
    };
    let merge = |old: u64, new: u64| (old & keep) | (new & amask);
    let rep = ins.has_rep_prefix() || ins.has_repne_prefix();
    let repne = ins.has_repne_prefix();
    if matches!(kind, Kind::Ins | Kind::Outs) {
        let iopl = ((cx.s.flags.other() & IOPL) >> 12) as u8;
        if cx.s.cpl() > iopl {
            return gp(0);
        }
    }
    let step = if cx.s.flags.other() & DF != 0 {
        (u64::from(size)).wrapping_neg()
    } else {
        u64::from(size)
    };
    let src_base = cx.seg_base(ins.memory_segment());
    let fast = rep
        && !a32
        && !cx.legacy
        && step == u64::from(size)
        && matches!(kind, Kind::Movs | Kind::Stos);
    if fast && fast_rep(cx, kind, size, src_base)? {
        // Budget for this execution used up: resume the instruction later.
        cx.next_rip = cx.s.rip;
        cx.end_block = true;
        return Ok(());
    }
    let m = size_mask(size);
    let mut n = 0u32;
    loop {
        if rep && cx.s.gpr[1] & amask == 0 {
            break;
        }
        let rsi = cx.s.gpr[6] & amask;
        let rdi = cx.s.gpr[7] & amask;
        let dst = dst_base.wrapping_add(rdi);
        let mut cmp: Option<(u64, u64)> = None;
        match kind {
            Kind::Movs => {
                let v = cx.read(src_base.wrapping_add(rsi), size)?;
                cx.write(dst, size, v)?;
            }
            Kind::Stos => cx.write(dst, size, cx.s.gpr[0] & m)?,
            Kind::Lods => {
                let v = cx.read(src_base.wrapping_add(rsi), size)?;
                super::operand::set_reg(cx.s, acc(size), v);
            }
            Kind::Cmps => {
                let a = cx.read(src_base.wrapping_add(rsi), size)?;
                let b = cx.read(dst, size)?;
                cmp = Some((a, b));
            }
            Kind::Scas => {
                let b = cx.read(dst, size)?;
                cmp = Some((cx.s.gpr[0] & m, b));
            }
            Kind::Ins => {
                cx.check_write(dst, size as usize)?;
                let mut b = [0u8; 4];
                cx.plat
                    .pio_read(cx.s.gpr[2] as u16, &mut b[..size as usize]);
                cx.poll_stop();
                cx.write(dst, size, u64::from(u32::from_le_bytes(b)))?;
            }
            Kind::Outs => {
                let v = cx.read(src_base.wrapping_add(rsi), size)?;
                let b = (v as u32).to_le_bytes();
                cx.plat.pio_write(cx.s.gpr[2] as u16, &b[..size as usize]);
                cx.poll_stop();
            }
        }
        if matches!(kind, Kind::Movs | Kind::Lods | Kind::Cmps | Kind::Outs) {
            cx.s.gpr[6] = merge(cx.s.gpr[6], rsi.wrapping_add(step));
        }
        if matches!(
            kind,
            Kind::Movs | Kind::Stos | Kind::Cmps | Kind::Scas | Kind::Ins
        ) {
            cx.s.gpr[7] = merge(cx.s.gpr[7], rdi.wrapping_add(step));
        }
        if let Some((a, b)) = cmp {
            let res = a.wrapping_sub(b) & m;
            cx.s.flags.set_lazy(FlagOp::Sub, size, res, a, b, 0);
        }
        if !rep {
            break;
        }
        cx.s.gpr[1] = merge(cx.s.gpr[1], (cx.s.gpr[1] & amask).wrapping_sub(1));
        if cmp.is_some() {
            let zf = cx.s.flags.arith() & ZF != 0;
            if zf == repne {
                break;
            }
        }
        n += 1;
        if cx.stop.is_some() || (n >= CHUNK && cx.s.gpr[1] & amask != 0) {
            // Resume this instruction later (interrupt window / device stop).
            cx.next_rip = cx.s.rip;
            cx.end_block = true;
            break;
        }
    }
    Ok(())
}

fn acc(size: u8) -> iced_x86::Register {
    match size {
        1 => iced_x86::Register::AL,
        2 => iced_x86::Register::AX,
        4 => iced_x86::Register::EAX,
        _ => iced_x86::Register::RAX,
    }
}

/// Bytes a single execution of a fast REP MOVS/STOS may move before yielding.
const FAST_BUDGET: u64 = 256 * 1024;

/// Page-at-a-time REP MOVS/STOS (DF=0, 64-bit addressing) on RAM with host copies. Stops at
/// anything unusual (MMIO, code pages, overlapping moves, elements straddling pages), leaving
/// the rest to the per-element loop. Returns true if it stopped because of its budget.
fn fast_rep(cx: &mut Ctx<'_>, kind: Kind, size: u8, src_base: u64) -> R<bool> {
    let sz = u64::from(size);
    let mut moved = 0u64;
    while cx.s.gpr[1] != 0 {
        if moved >= FAST_BUDGET {
            return Ok(true);
        }
        let dst = cx.s.gpr[7];
        let dst_room = 0x1000 - (dst & 0xFFF);
        let mut n = (dst_room / sz).min(cx.s.gpr[1]);
        let src = src_base.wrapping_add(cx.s.gpr[6]);
        if kind == Kind::Movs {
            n = n.min((0x1000 - (src & 0xFFF)) / sz);
        }
        if n == 0 {
            return Ok(false);
        }
        let bytes = n * sz;
        let d = cx.xlate(dst, crate::mmu::walk::Access::Write)?;
        if d.host == 0 || cx.code.is_code(d.phys) {
            return Ok(false);
        }
        let dp = (d.host + (dst & 0xFFF) as usize) as *mut u8;
        if kind == Kind::Movs {
            let s = cx.xlate(src, crate::mmu::walk::Access::Read)?;
            if s.host == 0 {
                return Ok(false);
            }
            let sp = (s.host + (src & 0xFFF) as usize) as *const u8;
            let (a, b) = (sp as usize, dp as usize);
            if a < b + bytes as usize && b < a + bytes as usize {
                return Ok(false);
            }
            // SAFETY: both ranges lie inside single RAM pages (bounded by the page room
            // computed above) of live mappings, and they do not overlap (checked).
            unsafe { std::ptr::copy_nonoverlapping(sp, dp, bytes as usize) };
            cx.s.gpr[6] = cx.s.gpr[6].wrapping_add(bytes);
        } else {
            let v = cx.s.gpr[0].to_le_bytes();
            let pat = &v[..size as usize];
            if size == 1 {
                // SAFETY: `dp .. dp + bytes` is inside the destination page (see above).
                unsafe { std::ptr::write_bytes(dp, v[0], bytes as usize) };
            }
            for i in 0..if size == 1 { 0 } else { n as usize } {
                // SAFETY: `dp + i*size .. + size` is inside the destination page (see above).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        pat.as_ptr(),
                        dp.add(i * size as usize),
                        pat.len(),
                    )
                };
            }
        }
        cx.s.gpr[7] = dst.wrapping_add(bytes);
        cx.s.gpr[1] -= n;
        moved += bytes;
    }
    Ok(false)
}
