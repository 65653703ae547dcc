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
    let a32 = (0..ins.op_count())
        .any(|i| matches!(ins.op_kind(i), OpKind::MemorySegESI | OpKind::MemoryESEDI));
    let amask: u64 = if a32 { 0xFFFF_FFFF } else { u64::MAX };
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
    let m = size_mask(size);
    let mut n = 0u32;
    loop {
        if rep && cx.s.gpr[1] & amask == 0 {
            break;
        }
        let rsi = cx.s.gpr[6] & amask;
        let rdi = cx.s.gpr[7] & amask;
        let mut cmp: Option<(u64, u64)> = None;
        match kind {
            Kind::Movs => {
                let v = cx.read(src_base.wrapping_add(rsi), size)?;
                cx.write(rdi, size, v)?;
            }
            Kind::Stos => cx.write(rdi, size, cx.s.gpr[0] & m)?,
            Kind::Lods => {
                let v = cx.read(src_base.wrapping_add(rsi), size)?;
                super::operand::set_reg(cx.s, acc(size), v);
            }
            Kind::Cmps => {
                let a = cx.read(src_base.wrapping_add(rsi), size)?;
                let b = cx.read(rdi, size)?;
                cmp = Some((a, b));
            }
            Kind::Scas => {
                let b = cx.read(rdi, size)?;
                cmp = Some((cx.s.gpr[0] & m, b));
            }
            Kind::Ins => {
                cx.check_write(rdi, size as usize)?;
                let mut b = [0u8; 4];
                cx.plat.pio_read(cx.s.gpr[2] as u16, &mut b[..size as usize]);
                cx.poll_stop();
                cx.write(rdi, size, u64::from(u32::from_le_bytes(b)))?;
            }
            Kind::Outs => {
                let v = cx.read(src_base.wrapping_add(rsi), size)?;
                let b = (v as u32).to_le_bytes();
                cx.plat.pio_write(cx.s.gpr[2] as u16, &b[..size as usize]);
                cx.poll_stop();
            }
        }
        if matches!(kind, Kind::Movs | Kind::Lods | Kind::Cmps | Kind::Outs) {
            cx.s.gpr[6] = rsi.wrapping_add(step) & amask;
        }
        if matches!(kind, Kind::Movs | Kind::Stos | Kind::Cmps | Kind::Scas | Kind::Ins) {
            cx.s.gpr[7] = rdi.wrapping_add(step) & amask;
        }
        if let Some((a, b)) = cmp {
            let res = a.wrapping_sub(b) & m;
            cx.s.flags.set_lazy(FlagOp::Sub, size, res, a, b, 0);
        }
        if !rep {
            break;
        }
        cx.s.gpr[1] = (cx.s.gpr[1] & amask).wrapping_sub(1) & amask;
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
