//! Control flow and the stack outside 64-bit mode: near and far JMP/CALL/RET, IRET, PUSH/POP
//! and friends with SP or ESP (SS.B), far-pointer loads. (LOOP/JCXZ with CX are
//! `exec::control::branch`'s.)

use super::{ip_mask, linear};
use crate::ctx::{gp, ud, vec, Ctx, Event, R};
use crate::exec::control::set_flags_checked;
use crate::exec::operand::{get_reg, reg_size, set_reg};
use crate::exec::system::{load_seg, read_descriptor};
use crate::flags::{size_mask, NT, OF, RF, VM};
use crate::interrupt::{self, IntKind};
use crate::platform::{Exit, ShutdownReason};
use crate::state::{cr0, ArchState, SegReg, Segment};
use iced_x86::{Code, Instruction, MemorySize, Mnemonic as M, OpKind, Register};

/// Stops the machine for something this CPU does not model outside 64-bit mode.
pub(super) fn not_modelled<T>(what: String) -> R<T> {
    Err(Event::Exit(Exit::Shutdown(ShutdownReason::Unsupported(
        format!("{what} (outside 64-bit mode) is not implemented"),
    ))))
}

/// Instructions that do not exist here (or are not implemented): #UD, as on a CPU without
/// them.
pub(super) fn unsupported(_cx: &mut Ctx<'_>, _ins: &Instruction) -> R<()> {
    ud()
}

fn sp_mask(s: &ArchState) -> u64 {
    if s.seg[SegReg::Ss as usize].attr & Segment::DB != 0 {
        0xFFFF_FFFF
    } else {
        0xFFFF
    }
}

/// Pushes `vals` in order (`size` bytes each), committing SP only when all are written.
pub(super) fn push_all(cx: &mut Ctx<'_>, vals: &[u64], size: u8) -> R<()> {
    let m = sp_mask(cx.s);
    let mut sp = cx.s.gpr[4] & m;
    for &v in vals {
        sp = sp.wrapping_sub(u64::from(size)) & m;
        let va = linear(cx, Register::SS, sp);
        cx.write(va, size, v & size_mask(size))?;
    }
    cx.s.gpr[4] = (cx.s.gpr[4] & !m) | sp;
    Ok(())
}

/// Reads `size` bytes `at` bytes above the stack pointer.
pub(super) fn peek(cx: &mut Ctx<'_>, at: u64, size: u8) -> R<u64> {
    let sp = cx.s.gpr[4].wrapping_add(at) & sp_mask(cx.s);
    let va = linear(cx, Register::SS, sp);
    cx.read(va, size)
}

/// Drops `bytes` from the stack.
pub(super) fn release(cx: &mut Ctx<'_>, bytes: u64) {
    let m = sp_mask(cx.s);
    cx.s.gpr[4] = (cx.s.gpr[4] & !m) | (cx.s.gpr[4].wrapping_add(bytes) & m);
}

/// A code segment checked for a far transfer, not yet loaded.
pub(super) struct NewCs(Segment);

/// Checks `sel` as the target of a far JMP/CALL (`ret` false: the CPL stays) or of a far
/// RET/IRET (`ret` true: the CPL becomes the selector's RPL).
pub(super) fn check_cs(cx: &mut Ctx<'_>, sel: u16, ret: bool) -> R<NewCs> {
    if cx.s.cr0 & cr0::PE == 0 {
        let mut cs = cx.s.seg[SegReg::Cs as usize];
        cs.selector = sel;
        cs.base = u64::from(sel) << 4;
        return Ok(NewCs(cs));
    }
    let mut d = read_descriptor(cx, sel)?;
    let err = u32::from(sel & 0xFFFC);
    if d.attr & Segment::S == 0 {
        return not_modelled(format!("a far transfer through gate/TSS selector {sel:#x}"));
    }
    if d.attr & 0x8 == 0 {
        return gp(err);
    }
    let (cpl, rpl, dpl) = (cx.s.cpl(), (sel & 3) as u8, d.dpl());
    let conforming = d.attr & 0x4 != 0;
    let new_cpl = if ret {
        if rpl < cpl || (conforming && dpl > rpl) || (!conforming && dpl != rpl) {
            return gp(err);
        }
        rpl
    } else {
        if (conforming && dpl > cpl) || (!conforming && (rpl > cpl || dpl != cpl)) {
            return gp(err);
        }
        cpl
    };
    if d.attr & Segment::P == 0 {
        return Err(Event::fault(vec::NP, Some(err)));
    }
    d.selector = (sel & 0xFFFC) | u16::from(new_cpl);
    Ok(NewCs(d))
}

/// Loads a checked code segment and continues at `ip` in it.
pub(super) fn commit_cs(cx: &mut Ctx<'_>, cs: NewCs, ip: u64) {
    let attr = cs.0.attr;
    cx.s.seg[SegReg::Cs as usize] = cs.0;
    cx.next_rip = ip & ip_mask(cx.s, attr);
    cx.end_block = true;
}

/// Size of the instruction's operand in bytes (2 or 4).
fn opsize(ins: &Instruction) -> u8 {
    match ins.code() {
        Code::Retnw
        | Code::Retnw_imm16
        | Code::Retfw
        | Code::Retfw_imm16
        | Code::Iretw
        | Code::Leavew
        | Code::Enterw_imm16_imm8
        | Code::Jmp_ptr1616
        | Code::Call_ptr1616
        | Code::Jmp_rel16
        | Code::Call_rel16
        | Code::Jmp_rm16
        | Code::Call_rm16 => 2,
        _ if ins.memory_size() == MemorySize::SegPtr16 => 2,
        _ => 4,
    }
}

/// The far pointer of a far JMP/CALL: (selector, offset).
fn far_target(cx: &mut Ctx<'_>, ins: &Instruction) -> R<(u16, u64)> {
    Ok(match ins.op0_kind() {
        OpKind::FarBranch16 => (ins.far_branch_selector(), u64::from(ins.far_branch16())),
        OpKind::FarBranch32 => (ins.far_branch_selector(), u64::from(ins.far_branch32())),
        _ => {
            let size = opsize(ins);
            let va = cx.ea(ins);
            let off = cx.read(va, size)?;
            let sel = cx.read(va.wrapping_add(u64::from(size)), 2)? as u16;
            (sel, off)
        }
    })
}

/// Target of a near JMP/CALL, wrapped at the operand size.
fn near_target(cx: &mut Ctx<'_>, ins: &Instruction, size: u8) -> R<u64> {
    let t = match ins.op0_kind() {
        OpKind::NearBranch16 | OpKind::NearBranch32 => cx.branch_target(ins),
        OpKind::Register | OpKind::Memory => cx.read_op(ins, 0, size)?,
        _ => return ud(),
    };
    Ok(t & size_mask(size))
}

pub(super) fn jmp_near(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    cx.next_rip = near_target(cx, ins, opsize(ins))?;
    Ok(())
}

pub(super) fn jmp_far(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let (sel, off) = far_target(cx, ins)?;
    let cs = check_cs(cx, sel, false)?;
    commit_cs(cx, cs, off);
    Ok(())
}

pub(super) fn call(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = opsize(ins);
    let far = matches!(ins.op0_kind(), OpKind::FarBranch16 | OpKind::FarBranch32)
        || (ins.op0_kind() == OpKind::Memory && super::is_far_memory(ins));
    if far {
        let (sel, off) = far_target(cx, ins)?;
        let cs = check_cs(cx, sel, false)?;
        let old_cs = u64::from(cx.s.seg[SegReg::Cs as usize].selector);
        push_all(cx, &[old_cs, cx.next_rip], size)?;
        commit_cs(cx, cs, off);
    } else {
        let target = near_target(cx, ins, size)?;
        push_all(cx, &[cx.next_rip], size)?;
        cx.next_rip = target;
    }
    Ok(())
}

fn imm16(ins: &Instruction) -> u64 {
    if ins.op_count() > 0 {
        ins.immediate(0) & 0xFFFF
    } else {
        0
    }
}

pub(super) fn ret(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = opsize(ins);
    let ip = peek(cx, 0, size)?;
    release(cx, u64::from(size) + imm16(ins));
    cx.next_rip = ip;
    Ok(())
}

/// Checks the SS popped by a return to the outer privilege level `new_cpl`.
fn check_ss(cx: &mut Ctx<'_>, ss: u16, new_cpl: u8) -> R<Segment> {
    let d = read_descriptor(cx, ss)?;
    let writable_data = d.attr & Segment::S != 0 && d.attr & 0xA == 0x2;
    if ss & 3 != u16::from(new_cpl) || d.dpl() != new_cpl || !writable_data {
        return gp(u32::from(ss & 0xFFFC));
    }
    if d.attr & Segment::P == 0 {
        return Err(Event::fault(vec::SS, Some(u32::from(ss & 0xFFFC))));
    }
    Ok(d)
}

/// Loads the outer stack SS:SP (after [`check_ss`]).
fn set_stack(cx: &mut Ctx<'_>, ss: Segment, sp: u64) {
    cx.s.seg[SegReg::Ss as usize] = ss;
    let m = sp_mask(cx.s);
    cx.s.gpr[4] = (cx.s.gpr[4] & !m) | (sp & m);
}

pub(super) fn retf(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = opsize(ins);
    let sz = u64::from(size);
    let imm = imm16(ins);
    let ip = peek(cx, 0, size)?;
    let sel = peek(cx, sz, 2)? as u16;
    let cpl = cx.s.cpl();
    let cs = check_cs(cx, sel, true)?;
    let new_cpl = (cs.0.selector & 3) as u8;
    if cx.s.cr0 & cr0::PE != 0 && new_cpl > cpl {
        let sp = peek(cx, 2 * sz + imm, size)?;
        let ss = peek(cx, 3 * sz + imm, 2)? as u16;
        let ss = check_ss(cx, ss, new_cpl)?;
        commit_cs(cx, cs, ip);
        set_stack(cx, ss, sp);
        release(cx, imm);
    } else {
        commit_cs(cx, cs, ip);
        release(cx, 2 * sz + imm);
    }
    Ok(())
}

pub(super) fn iret(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = opsize(ins);
    let sz = u64::from(size);
    let ip = peek(cx, 0, size)?;
    let sel = peek(cx, sz, 2)? as u16;
    let fl = peek(cx, 2 * sz, size)?;
    let width = size_mask(size);
    if cx.s.cr0 & cr0::PE == 0 {
        let cs = check_cs(cx, sel, true)?;
        release(cx, 3 * sz);
        set_flags_checked(cx, fl, width);
        commit_cs(cx, cs, ip);
        return Ok(());
    }
    if cx.s.flags.other() & NT != 0 {
        return not_modelled("IRET with NT set (a task return)".into());
    }
    if fl & VM != 0 && cx.s.cpl() == 0 && size == 4 {
        return not_modelled("IRET to virtual-8086 mode".into());
    }
    let cpl = cx.s.cpl();
    let cs = check_cs(cx, sel, true)?;
    let new_cpl = (cs.0.selector & 3) as u8;
    let outer = if new_cpl > cpl {
        let (sp, ss) = (peek(cx, 3 * sz, size)?, peek(cx, 4 * sz, 2)? as u16);
        Some((sp, check_ss(cx, ss, new_cpl)?))
    } else {
        None
    };
    // The flags are checked against the old CPL (IOPL and IF may only change at CPL 0).
    set_flags_checked(cx, fl & !RF, width);
    commit_cs(cx, cs, ip);
    match outer {
        Some((sp, ss)) => set_stack(cx, ss, sp),
        None => release(cx, 3 * sz),
    }
    Ok(())
}

pub(super) fn stack(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = ins.stack_pointer_increment().unsigned_abs().clamp(2, 4) as u8;
    match ins.mnemonic() {
        M::Push => {
            let v = match ins.op0_kind() {
                OpKind::Register => get_reg(cx.s, ins.op0_register()),
                OpKind::Memory => cx.read_op(ins, 0, size)?,
                _ => ins.immediate(0),
            };
            push_all(cx, &[v], size)
        }
        M::Pop => {
            let v = peek(cx, 0, size)?;
            let old_sp = cx.s.gpr[4];
            release(cx, u64::from(size));
            let r = match ins.op0_kind() {
                OpKind::Register if ins.op0_register().is_segment_register() => {
                    load_seg(cx, ins.op0_register(), v as u16)
                }
                OpKind::Register => {
                    set_reg(cx.s, ins.op0_register(), v);
                    Ok(())
                }
                // The address is computed with the incremented stack pointer.
                _ => {
                    let va = cx.ea(ins);
                    cx.write(va, size, v)
                }
            };
            if r.is_err() {
                cx.s.gpr[4] = old_sp;
            }
            r
        }
        M::Pushf | M::Pushfd => {
            let v = cx.s.rflags() & !(VM | RF);
            push_all(cx, &[v], size)
        }
        M::Popf | M::Popfd => {
            let v = peek(cx, 0, size)?;
            release(cx, u64::from(size));
            set_flags_checked(cx, v, size_mask(size));
            cx.end_block = true;
            Ok(())
        }
        M::Pusha | M::Pushad => {
            let size = if ins.mnemonic() == M::Pusha { 2 } else { 4 };
            let g = cx.s.gpr;
            push_all(cx, &[g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]], size)
        }
        M::Popa | M::Popad => {
            let size = if ins.mnemonic() == M::Popa { 2 } else { 4 };
            let sz = u64::from(size);
            let mut v = [0u64; 8];
            for (i, slot) in v.iter_mut().enumerate() {
                *slot = peek(cx, sz * i as u64, size)?;
            }
            // DI, SI, BP, (SP skipped), BX, DX, CX, AX.
            let regs = [7, 6, 5, 4, 3, 2, 1, 0];
            for (val, r) in v.iter().zip(regs) {
                if r != 4 {
                    let m = size_mask(size);
                    cx.s.gpr[r] = (cx.s.gpr[r] & !m) | (val & m);
                }
            }
            release(cx, 8 * sz);
            Ok(())
        }
        M::Enter => enter(cx, ins),
        _ => {
            // LEAVE: SP = BP, then pop BP.
            let m = sp_mask(cx.s);
            let old_sp = cx.s.gpr[4];
            cx.s.gpr[4] = (cx.s.gpr[4] & !m) | (cx.s.gpr[5] & m);
            let size = opsize(ins);
            match peek(cx, 0, size) {
                Ok(v) => {
                    release(cx, u64::from(size));
                    let bm = size_mask(size);
                    cx.s.gpr[5] = (cx.s.gpr[5] & !bm) | (v & bm);
                    Ok(())
                }
                Err(e) => {
                    cx.s.gpr[4] = old_sp;
                    Err(e)
                }
            }
        }
    }
}

fn enter(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let size = opsize(ins);
    let (sz, bm, m) = (u64::from(size), size_mask(size), sp_mask(cx.s));
    let frame = ins.immediate(0) & 0xFFFF;
    let level = ins.immediate(1) & 0x1F;
    let saved = (cx.s.gpr[4], cx.s.gpr[5]);
    let r = (|| {
        push_all(cx, &[cx.s.gpr[5]], size)?;
        let frame_temp = cx.s.gpr[4] & m;
        let mut bp = cx.s.gpr[5] & m;
        for _ in 1..level {
            bp = bp.wrapping_sub(sz) & m;
            let va = linear(cx, Register::SS, bp);
            let v = cx.read(va, size)?;
            push_all(cx, &[v], size)?;
        }
        if level > 0 {
            push_all(cx, &[frame_temp], size)?;
        }
        cx.s.gpr[5] = (cx.s.gpr[5] & !bm) | (frame_temp & bm);
        let sp = (cx.s.gpr[4] & m).wrapping_sub(frame) & m;
        cx.s.gpr[4] = (cx.s.gpr[4] & !m) | sp;
        Ok(())
    })();
    if r.is_err() {
        (cx.s.gpr[4], cx.s.gpr[5]) = saved;
    }
    r
}

pub(super) fn into(cx: &mut Ctx<'_>, _ins: &Instruction) -> R<()> {
    if cx.s.rflags() & OF == 0 {
        return Ok(());
    }
    interrupt::deliver(cx, vec::OF, None, IntKind::Software, cx.next_rip)?;
    cx.next_rip = cx.s.rip;
    cx.end_block = true;
    Ok(())
}

pub(super) fn load_far_pointer(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let sreg = match ins.mnemonic() {
        M::Lds => Register::DS,
        M::Les => Register::ES,
        M::Lss => Register::SS,
        M::Lfs => Register::FS,
        _ => Register::GS,
    };
    let dst = ins.op0_register();
    let size = reg_size(dst);
    let va = cx.ea(ins);
    let off = cx.read(va, size)?;
    let sel = cx.read(va.wrapping_add(u64::from(size)), 2)? as u16;
    load_seg(cx, sreg, sel)?;
    set_reg(cx.s, dst, off);
    Ok(())
}
