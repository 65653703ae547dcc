//! Interrupt and exception delivery outside long mode: through the real-mode vector table,
//! or through a protected-mode IDT of 32-bit interrupt and trap gates.

use super::flow::{check_cs, commit_cs, not_modelled, push_all};
use crate::ctx::{vec, Ctx, Event, R};
use crate::descriptor::read_descriptor;
use crate::flags::{AC, IF, NT, RF, TF, VM};
use crate::interrupt::IntKind;
use crate::state::{cr0, SegReg, Segment};

/// Delivers `vector` (EFER.LMA clear); `ret_ip` is the IP pushed. Nothing is committed on a
/// fault.
pub(crate) fn deliver(
    cx: &mut Ctx<'_>,
    vector: u8,
    error: Option<u32>,
    kind: IntKind,
    ret_ip: u64,
) -> R<()> {
    if cx.s.cr0 & cr0::PE == 0 {
        real(cx, vector, ret_ip)
    } else {
        protected(cx, vector, error, kind, ret_ip)
    }
}

/// Real mode: IP and CS from the 4-byte vector at IDTR.base + 4 * vector; FLAGS, CS and IP
/// pushed; IF, TF and AC cleared.
fn real(cx: &mut Ctx<'_>, vector: u8, ret_ip: u64) -> R<()> {
    let at = u64::from(vector) * 4;
    if at + 3 > u64::from(cx.s.idtr.limit) {
        return Err(Event::fault(vec::GP, Some(0)));
    }
    let v = cx.read(cx.s.idtr.base.wrapping_add(at) & 0xFFFF_FFFF, 4)?;
    let cs = check_cs(cx, (v >> 16) as u16, false)?;
    let flags = cx.s.rflags();
    let old_cs = u64::from(cx.s.seg[SegReg::Cs as usize].selector);
    push_all(cx, &[flags, old_cs, ret_ip], 2)?;
    cx.s.set_rflags(flags & !(IF | TF | AC | RF));
    commit_cs(cx, cs, v & 0xFFFF);
    cx.s.rip = cx.next_rip;
    cx.s.halted = false;
    Ok(())
}

/// Protected mode, 32-bit interrupt/trap gates: EFLAGS, CS, EIP (and the error code) pushed
/// on the current stack, or on the TSS's SS:ESP for the handler's privilege level with the
/// old SS:ESP first.
fn protected(
    cx: &mut Ctx<'_>,
    vector: u8,
    error: Option<u32>,
    kind: IntKind,
    ret_ip: u64,
) -> R<()> {
    let ext = u32::from(kind != IntKind::Software);
    let idt_err = u32::from(vector) * 8 + 2 + ext;
    if u64::from(vector) * 8 + 7 > u64::from(cx.s.idtr.limit) {
        return Err(Event::fault(vec::GP, Some(idt_err)));
    }
    let saved = cx.implicit_sup;
    cx.implicit_sup = true;
    let gate = cx.read(cx.s.idtr.base.wrapping_add(u64::from(vector) * 8), 8);
    cx.implicit_sup = saved;
    let gate = gate?;
    let typ = (gate >> 40) & 0x1F;
    if typ != 0xE && typ != 0xF {
        return not_modelled(format!("interrupt {vector} through IDT gate type {typ:#x}"));
    }
    let cpl = cx.s.cpl();
    if kind == IntKind::Software && ((gate >> 45) & 3) < u64::from(cpl) {
        return Err(Event::fault(vec::GP, Some(idt_err)));
    }
    if gate & (1 << 47) == 0 {
        return Err(Event::fault(vec::NP, Some(idt_err)));
    }
    let sel = ((gate >> 16) & 0xFFFF) as u16;
    let offset = (gate & 0xFFFF) | (((gate >> 48) & 0xFFFF) << 16);
    let d = read_descriptor(cx, sel)?;
    if d.attr & Segment::S == 0 || d.attr & 0x8 == 0 {
        return Err(Event::fault(vec::GP, Some(u32::from(sel & 0xFFFC) + ext)));
    }
    let new_cpl = if d.attr & 0x4 != 0 { cpl } else { d.dpl() };
    if new_cpl > cpl {
        return Err(Event::fault(vec::GP, Some(u32::from(sel & 0xFFFC) + ext)));
    }
    if d.attr & Segment::P == 0 {
        return Err(Event::fault(vec::NP, Some(u32::from(sel & 0xFFFC) + ext)));
    }
    if new_cpl < cpl {
        return inner(cx, error, d, sel, new_cpl, offset, ret_ip, typ);
    }
    let flags = cx.s.rflags();
    let old_cs = u64::from(cx.s.seg[SegReg::Cs as usize].selector);
    let mut frame = vec![flags, old_cs, ret_ip];
    frame.extend(error.map(u64::from));
    push_all(cx, &frame, 4)?;
    finish(cx, flags, typ);
    enter(cx, d, sel, new_cpl, offset);
    Ok(())
}

/// Continues at the handler `cs:offset` at privilege `cpl`.
fn enter(cx: &mut Ctx<'_>, mut cs: Segment, sel: u16, cpl: u8, offset: u64) {
    cs.selector = (sel & 0xFFFC) | u16::from(cpl);
    let attr = cs.attr;
    cx.s.seg[SegReg::Cs as usize] = cs;
    cx.s.rip = offset & super::ip_mask(cx.s, attr);
    cx.next_rip = cx.s.rip;
}

/// Clears the flags an interrupt clears (IF too for an interrupt gate).
fn finish(cx: &mut Ctx<'_>, flags: u64, typ: u64) {
    let mut f = flags & !(TF | NT | RF | VM);
    if typ == 0xE {
        f &= !IF;
    }
    cx.s.set_rflags(f);
    cx.s.halted = false;
}

/// Delivery to a more privileged handler: the stack comes from the 32-bit TSS.
#[allow(clippy::too_many_arguments)]
fn inner(
    cx: &mut Ctx<'_>,
    error: Option<u32>,
    cs: Segment,
    sel: u16,
    new_cpl: u8,
    offset: u64,
    ret_ip: u64,
    typ: u64,
) -> R<()> {
    let tss = cx.s.tr.base;
    let at = 4 + 8 * u64::from(new_cpl);
    if at + 5 > u64::from(cx.s.tr.limit) {
        return Err(Event::fault(
            vec::TS,
            Some(u32::from(cx.s.tr.selector & 0xFFFC)),
        ));
    }
    let saved = cx.implicit_sup;
    cx.implicit_sup = true;
    let stack = cx
        .read(tss.wrapping_add(at), 4)
        .and_then(|esp| Ok((esp, cx.read(tss.wrapping_add(at + 4), 2)? as u16)));
    cx.implicit_sup = saved;
    let (esp, ss_sel) = stack?;
    let ss = read_descriptor(cx, ss_sel)?;
    if ss_sel & 3 != u16::from(new_cpl) || ss.dpl() != new_cpl || ss.attr & 0xA != 0x2 {
        return Err(Event::fault(vec::TS, Some(u32::from(ss_sel & 0xFFFC))));
    }
    let (old_ss, old_sp) = (cx.s.seg[SegReg::Ss as usize], cx.s.gpr[4]);
    let flags = cx.s.rflags();
    let old_cs = u64::from(cx.s.seg[SegReg::Cs as usize].selector);
    let mut frame = vec![
        u64::from(old_ss.selector),
        old_sp & 0xFFFF_FFFF,
        flags,
        old_cs,
        ret_ip,
    ];
    frame.extend(error.map(u64::from));
    cx.s.seg[SegReg::Ss as usize] = ss;
    cx.s.gpr[4] = esp;
    if let Err(e) = push_all(cx, &frame, 4) {
        cx.s.seg[SegReg::Ss as usize] = old_ss;
        cx.s.gpr[4] = old_sp;
        return Err(e);
    }
    finish(cx, flags, typ);
    enter(cx, cs, sel, new_cpl, offset);
    Ok(())
}
