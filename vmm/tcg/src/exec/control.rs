//! Branches, calls, returns, stack ops, and privileged control flow (INT, IRET, SYSCALL, ...).

use super::operand::{get_reg, set_reg};
use super::{gp, ud, vec, Ctx, Event, R};
use crate::flags::{self, IF, IOPL, RF, VM};
use crate::interrupt::{self, IntKind};
use crate::state::{efer, SegReg, Segment};
use iced_x86::{Code, Instruction, Mnemonic as M, OpKind};

pub fn branch(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let m = ins.mnemonic();
    match m {
        M::Jmp => {
            cx.next_rip = match ins.op0_kind() {
                OpKind::NearBranch64 | OpKind::NearBranch32 | OpKind::NearBranch16 => {
                    cx.branch_target(ins)
                }
                OpKind::Register | OpKind::Memory => cx.read_op(ins, 0, 8)?,
                _ => return ud(),
            };
        }
        M::Call => {
            let target = match ins.op0_kind() {
                OpKind::NearBranch64 => cx.branch_target(ins),
                OpKind::Register | OpKind::Memory => cx.read_op(ins, 0, 8)?,
                _ => return ud(),
            };
            cx.push(cx.next_rip, 8)?;
            cx.next_rip = target;
        }
        M::Ret => {
            let sp = cx.s.gpr[4];
            let target = cx.read(sp, 8)?;
            let imm = if ins.op_count() > 0 {
                ins.immediate(0) & 0xFFFF
            } else {
                0
            };
            cx.s.gpr[4] = sp.wrapping_add(8 + imm);
            cx.next_rip = target;
        }
        M::Loop | M::Loope | M::Loopne => {
            let mask = count_mask(ins);
            let c = (cx.s.gpr[1] & mask).wrapping_sub(1) & mask;
            // A 32-bit count register zero-extends; CX (outside 64-bit mode) merges.
            cx.s.gpr[1] = if mask == 0xFFFF {
                (cx.s.gpr[1] & !mask) | c
            } else {
                c
            };
            let take = c != 0
                && match m {
                    M::Loope => cx.s.flags.zf(),
                    M::Loopne => !cx.s.flags.zf(),
                    _ => true,
                };
            if take {
                cx.next_rip = cx.branch_target(ins);
            }
        }
        M::Jrcxz | M::Jecxz | M::Jcxz => {
            if cx.s.gpr[1] & count_mask(ins) == 0 {
                cx.next_rip = cx.branch_target(ins);
            }
        }
        _ => {
            if cx.s.flags.cond(super::alu::cc(ins)) {
                cx.next_rip = cx.branch_target(ins);
            }
        }
    }
    Ok(())
}

/// The count register of LOOP/LOOPcc/JrCXZ by address size: RCX, ECX or (outside 64-bit
/// mode) CX.
fn count_mask(ins: &Instruction) -> u64 {
    match ins.code() {
        Code::Loop_rel8_16_CX
        | Code::Loop_rel8_32_CX
        | Code::Loope_rel8_16_CX
        | Code::Loope_rel8_32_CX
        | Code::Loopne_rel8_16_CX
        | Code::Loopne_rel8_32_CX
        | Code::Jcxz_rel8_16
        | Code::Jcxz_rel8_32 => 0xFFFF,
        Code::Loop_rel8_16_ECX
        | Code::Loop_rel8_32_ECX
        | Code::Loop_rel8_64_ECX
        | Code::Loope_rel8_16_ECX
        | Code::Loope_rel8_32_ECX
        | Code::Loope_rel8_64_ECX
        | Code::Loopne_rel8_16_ECX
        | Code::Loopne_rel8_32_ECX
        | Code::Loopne_rel8_64_ECX
        | Code::Jecxz_rel8_16
        | Code::Jecxz_rel8_32
        | Code::Jecxz_rel8_64 => 0xFFFF_FFFF,
        _ => u64::MAX,
    }
}

/// Size of a push/pop from the instruction's stack pointer increment.
fn stack_size(ins: &Instruction) -> u8 {
    ins.stack_pointer_increment().unsigned_abs().min(8) as u8
}

pub fn stack(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    match ins.mnemonic() {
        M::Push => {
            let size = stack_size(ins);
            let v = match ins.op0_kind() {
                OpKind::Register => get_reg(cx.s, ins.op0_register()),
                OpKind::Memory => cx.read_op(ins, 0, size)?,
                _ => ins.immediate(0),
            };
            cx.push(v & flags::size_mask(size), size)
        }
        M::Pop => {
            let size = stack_size(ins);
            let sp = cx.s.gpr[4];
            let v = cx.read(sp, size)?;
            match ins.op0_kind() {
                OpKind::Register => {
                    let r = ins.op0_register();
                    if r.is_segment_register() {
                        super::system::load_seg(cx, r, v as u16)?;
                        cx.s.gpr[4] = sp.wrapping_add(u64::from(size));
                    } else {
                        cx.s.gpr[4] = sp.wrapping_add(u64::from(size));
                        set_reg(cx.s, r, v);
                    }
                }
                _ => {
                    // The address is computed with the incremented RSP.
                    cx.s.gpr[4] = sp.wrapping_add(u64::from(size));
                    let va = cx.ea(ins);
                    if let Err(e) = cx.write(va, size, v) {
                        cx.s.gpr[4] = sp;
                        return Err(e);
                    }
                }
            }
            Ok(())
        }
        M::Pushfq | M::Pushf => {
            let size = stack_size(ins);
            let v = cx.s.rflags() & !(VM | RF);
            cx.push(v & flags::size_mask(size), size)
        }
        M::Popfq | M::Popf => {
            let size = stack_size(ins);
            let sp = cx.s.gpr[4];
            let v = cx.read(sp, size)?;
            cx.s.gpr[4] = sp.wrapping_add(u64::from(size));
            set_flags_checked(cx, v, if size == 2 { 0xFFFF } else { u64::MAX });
            cx.end_block = true;
            Ok(())
        }
        M::Enter => {
            let frame = ins.immediate(0) & 0xFFFF;
            let level = (ins.immediate(1) & 0x1F) as u32;
            let rbp = cx.s.gpr[5];
            let mut sp = cx.s.gpr[4].wrapping_sub(8);
            cx.write(sp, 8, rbp)?;
            let frame_temp = sp;
            for i in 1..level {
                let v = cx.read(rbp.wrapping_sub(8 * u64::from(i)), 8)?;
                sp = sp.wrapping_sub(8);
                cx.write(sp, 8, v)?;
            }
            if level > 0 {
                sp = sp.wrapping_sub(8);
                cx.write(sp, 8, frame_temp)?;
            }
            let new_sp = sp.wrapping_sub(frame);
            cx.s.gpr[5] = frame_temp;
            cx.s.gpr[4] = new_sp;
            Ok(())
        }
        _ => {
            // LEAVE
            let rbp = cx.s.gpr[5];
            let v = cx.read(rbp, 8)?;
            cx.s.gpr[4] = rbp.wrapping_add(8);
            cx.s.gpr[5] = v;
            Ok(())
        }
    }
}

/// POPF/IRET flag update honouring CPL/IOPL: IOPL only changes at CPL 0, IF only when
/// CPL <= IOPL; VM/VIF/VIP are never set, RF is cleared.
pub fn set_flags_checked(cx: &mut Ctx<'_>, v: u64, width_mask: u64) {
    let cur = cx.s.rflags();
    let cpl = cx.s.cpl();
    let iopl = ((cur & IOPL) >> 12) as u8;
    let mut mask = flags::POPF_MASK & width_mask;
    if cpl > 0 {
        mask &= !IOPL;
    }
    if cpl > iopl {
        mask &= !IF;
    }
    cx.s.set_rflags((cur & !mask) | (v & mask));
}

pub fn system_flow(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let cpl = cx.s.cpl();
    match ins.mnemonic() {
        M::Int3 => soft_int(cx, vec::BP, IntKind::Software),
        M::Int1 => soft_int(cx, vec::DB, IntKind::Exception),
        M::Int => soft_int(cx, ins.immediate(0) as u8, IntKind::Software),
        M::Hlt => {
            if cpl != 0 {
                return gp(0);
            }
            cx.s.halted = true;
            cx.end_block = true;
            Ok(())
        }
        M::Cli | M::Sti => {
            let iopl = ((cx.s.flags.other() & IOPL) >> 12) as u8;
            if cpl > iopl {
                return gp(0);
            }
            let sti = ins.mnemonic() == M::Sti;
            if sti && cx.s.flags.other() & IF == 0 {
                cx.irq_shadow = true;
            }
            cx.s.flags.set_bit(IF, sti);
            cx.end_block = true;
            Ok(())
        }
        M::Swapgs => {
            if cpl != 0 {
                return gp(0);
            }
            let gs = &mut cx.s.seg[SegReg::Gs as usize].base;
            std::mem::swap(gs, &mut cx.s.msr.kernel_gs_base);
            Ok(())
        }
        M::Syscall => syscall(cx),
        M::Sysretq | M::Sysret => sysret(cx, ins.mnemonic() == M::Sysretq),
        M::Iretq => iretq(cx),
        M::Retf => retf(cx, ins),
        _ => ud(),
    }
}

fn soft_int(cx: &mut Ctx<'_>, vector: u8, kind: IntKind) -> R<()> {
    interrupt::deliver(cx, vector, None, kind, cx.next_rip)?;
    cx.next_rip = cx.s.rip;
    cx.end_block = true;
    Ok(())
}

fn syscall(cx: &mut Ctx<'_>) -> R<()> {
    if cx.s.efer & efer::SCE == 0 {
        return ud();
    }
    let star = cx.s.msr.star;
    let sel = ((star >> 32) & 0xFFFC) as u16;
    cx.s.gpr[1] = cx.next_rip;
    let fl = cx.s.rflags() & !RF;
    cx.s.gpr[11] = fl;
    cx.s.set_rflags(fl & !cx.s.msr.fmask & !RF);
    cx.s.seg[SegReg::Cs as usize] = Segment::code64(sel, 0);
    cx.s.seg[SegReg::Ss as usize] = Segment::data(sel.wrapping_add(8), 0);
    cx.next_rip = cx.s.msr.lstar;
    cx.end_block = true;
    Ok(())
}

fn sysret(cx: &mut Ctx<'_>, wide: bool) -> R<()> {
    if cx.s.efer & efer::SCE == 0 {
        return ud();
    }
    if cx.s.cpl() != 0 {
        return gp(0);
    }
    let base = ((cx.s.msr.star >> 48) & 0xFFFF) as u16;
    let rip = cx.s.gpr[1];
    if wide {
        if ((rip as i64) << 16 >> 16) as u64 != rip {
            return gp(0);
        }
        cx.s.seg[SegReg::Cs as usize] = Segment::code64(base.wrapping_add(16) | 3, 3);
    } else {
        let mut cs = Segment::code64(base | 3, 3);
        cs.attr = (cs.attr & !Segment::L) | Segment::DB;
        cx.s.seg[SegReg::Cs as usize] = cs;
    }
    cx.s.seg[SegReg::Ss as usize] = Segment::data(base.wrapping_add(8) | 3, 3);
    cx.s.set_rflags((cx.s.gpr[11] & 0x3C_7FD7) | 2);
    cx.next_rip = if wide { rip } else { rip & 0xFFFF_FFFF };
    cx.end_block = true;
    Ok(())
}

fn iretq(cx: &mut Ctx<'_>) -> R<()> {
    let sp = cx.s.gpr[4];
    let mut v = [0u64; 5];
    for (i, slot) in v.iter_mut().enumerate() {
        *slot = cx.read(sp.wrapping_add(8 * i as u64), 8)?;
    }
    let [rip, cs, rfl, rsp, ss] = v;
    let cpl = cx.s.cpl();
    let (cs, ss) = (cs as u16, ss as u16);
    let new_cpl = (cs & 3) as u8;
    if new_cpl < cpl {
        return gp(u32::from(cs & 0xFFFC));
    }
    let cs_seg = super::system::read_descriptor(cx, cs)?;
    if cs_seg.attr & Segment::S == 0 || cs_seg.attr & 0x8 == 0 {
        return gp(u32::from(cs & 0xFFFC));
    }
    if cs_seg.attr & Segment::P == 0 {
        return Err(Event::fault(vec::NP, Some(u32::from(cs & 0xFFFC))));
    }
    let ss_seg = if ss & 0xFFFC == 0 {
        if new_cpl == 3 {
            return gp(0);
        }
        Segment {
            selector: ss,
            attr: 0,
            ..Segment::default()
        }
    } else {
        super::system::read_descriptor(cx, ss)?
    };
    set_flags_checked(cx, rfl, u64::MAX);
    cx.s.seg[SegReg::Cs as usize] = cs_seg;
    cx.s.seg[SegReg::Ss as usize] = ss_seg;
    cx.s.gpr[4] = rsp;
    cx.next_rip = rip;
    cx.end_block = true;
    Ok(())
}

fn retf(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size: u8 = if matches!(ins.code(), Code::Retfq | Code::Retfq_imm16) {
        8
    } else {
        4
    };
    let sp = cx.s.gpr[4];
    let rip = cx.read(sp, size)?;
    let cs = cx.read(sp.wrapping_add(u64::from(size)), size)? as u16;
    if (cs & 3) as u8 != cx.s.cpl() {
        // Returns to an outer privilege level are not implemented.
        return gp(u32::from(cs & 0xFFFC));
    }
    let seg = super::system::read_descriptor(cx, cs)?;
    if seg.attr & Segment::S == 0 || seg.attr & 0x8 == 0 {
        return gp(u32::from(cs & 0xFFFC));
    }
    let imm = if ins.op_count() > 0 {
        ins.immediate(0) & 0xFFFF
    } else {
        0
    };
    cx.s.seg[SegReg::Cs as usize] = seg;
    cx.s.gpr[4] = sp.wrapping_add(2 * u64::from(size) + imm);
    cx.next_rip = rip;
    cx.end_block = true;
    Ok(())
}
