//! System instructions: CPUID, MSRs, TSC, descriptor tables, control registers, port I/O,
//! segment loads.

use super::operand::{get_reg, set_reg};
use super::{gp, ud, vec, Ctx, Event, R};
use crate::cpuid;
use crate::flags::{IOPL, ZF};
use crate::state::{cr0, cr4, efer, SegReg, Segment};
use iced_x86::{Code, Instruction, Mnemonic as M, OpKind, Register};

pub use crate::descriptor::read_descriptor;

/// Loads a data/stack segment register (MOV Sreg, POP Sreg).
pub fn load_seg(cx: &mut Ctx<'_>, r: Register, sel: u16) -> R<()> {
    let idx = r as usize - Register::ES as usize;
    if idx == SegReg::Cs as usize {
        return ud();
    }
    if cx.s.cr0 & cr0::PE == 0 {
        // Real mode: the base is the selector times 16; limit and attributes stay.
        let s = &mut cx.s.seg[idx];
        s.selector = sel;
        s.base = u64::from(sel) << 4;
        if idx == SegReg::Ss as usize {
            cx.irq_shadow = true;
        }
        return Ok(());
    }
    let cpl = cx.s.cpl();
    if sel & 0xFFFC == 0 {
        if idx == SegReg::Ss as usize && cpl == 3 {
            return gp(0);
        }
        let s = &mut cx.s.seg[idx];
        s.selector = sel;
        s.attr = 0;
        if idx >= SegReg::Fs as usize {
            s.base = 0;
        }
        return Ok(());
    }
    let seg = read_descriptor(cx, sel)?;
    let code = seg.attr & 0x8 != 0;
    let writable = seg.attr & 0x2 != 0;
    if seg.attr & Segment::S == 0 || (idx == SegReg::Ss as usize && (code || !writable)) {
        return gp(u32::from(sel & 0xFFFC));
    }
    if seg.attr & Segment::P == 0 {
        let v = if idx == SegReg::Ss as usize {
            vec::SS
        } else {
            vec::NP
        };
        return Err(Event::fault(v, Some(u32::from(sel & 0xFFFC))));
    }
    cx.s.seg[idx] = seg;
    if idx == SegReg::Ss as usize {
        cx.irq_shadow = true;
    }
    Ok(())
}

/// MOV to/from CRn, DRn, and to a segment register.
pub fn mov_special(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let dst = ins.op0_register();
    if ins.op0_kind() == OpKind::Register && dst.is_segment_register() {
        let v = cx.read_op(ins, 1, 2)?;
        return load_seg(cx, dst, v as u16);
    }
    if cx.s.cpl() != 0 {
        return gp(0);
    }
    if dst.is_cr() || dst.is_dr() {
        let v = get_reg(cx.s, ins.op1_register());
        if dst.is_dr() {
            return Ok(());
        }
        let n = dst as usize - Register::CR0 as usize;
        write_cr(cx, n, v)?;
        cx.end_block = true;
        return Ok(());
    }
    let src = ins.op1_register();
    let v = if src.is_dr() {
        match src as usize - Register::DR0 as usize {
            6 => 0xFFFF_0FF0,
            7 => 0x400,
            _ => 0,
        }
    } else {
        match src as usize - Register::CR0 as usize {
            0 => cx.s.cr0,
            2 => cx.s.cr2,
            3 => cx.s.cr3,
            4 => cx.s.cr4,
            8 => cx.s.cr8,
            _ => return ud(),
        }
    };
    set_reg(cx.s, dst, v);
    Ok(())
}

fn write_cr(cx: &mut Ctx<'_>, n: usize, v: u64) -> R<()> {
    match n {
        0 => {
            let changed = cx.s.cr0 ^ v;
            let (pg, pe) = (v & cr0::PG != 0, v & cr0::PE != 0);
            if v >> 32 != 0 || (pg && !pe) || (v & cr0::NW != 0 && v & cr0::CD == 0) {
                return gp(0);
            }
            if changed & cr0::PG != 0 {
                // Paging on with EFER.LME enters long mode (compatibility mode until a far
                // jump to a 64-bit code segment); off leaves it, only from outside 64-bit code.
                if pg && cx.s.efer & efer::LME != 0 {
                    if cx.s.cr4 & cr4::PAE == 0 {
                        return gp(0);
                    }
                    cx.s.efer |= efer::LMA;
                } else if !pg && cx.s.efer & efer::LMA != 0 {
                    if cx.s.long_mode_64() {
                        return gp(0);
                    }
                    cx.s.efer &= !efer::LMA;
                }
            }
            cx.s.cr0 = v | cr0::ET;
            if changed & (cr0::PG | cr0::WP | cr0::PE) != 0 {
                cx.tlb.flush_all();
            }
        }
        2 => cx.s.cr2 = v,
        3 => {
            cx.s.cr3 = v & 0x000F_FFFF_FFFF_F018;
            cx.tlb.flush_non_global();
        }
        4 => {
            if v & !cr4::SUPPORTED != 0 || v & cr4::PAE == 0 && cx.s.efer & efer::LMA != 0 {
                return gp(0);
            }
            let changed = cx.s.cr4 ^ v;
            cx.s.cr4 = v;
            if changed & (cr4::PGE | cr4::PAE | cr4::PSE) != 0 {
                cx.tlb.flush_all();
            }
        }
        8 => {
            if v > 15 {
                return gp(0);
            }
            cx.s.cr8 = v;
            cx.plat.set_tpr(v as u8);
        }
        _ => return ud(),
    }
    Ok(())
}

/// Virtual TSC: nanoseconds since the CPU was created (1 GHz) plus the guest-set offset.
pub fn tsc(cx: &Ctx<'_>) -> u64 {
    (cx.clock.elapsed().as_nanos() as u64).wrapping_add(cx.s.tsc_offset)
}

fn rdmsr(cx: &mut Ctx<'_>, idx: u32) -> R<u64> {
    let m = &cx.s.msr;
    Ok(match idx {
        0x10 => tsc(cx),
        0x3B => m.tsc_adjust,
        0x1B => m.apic_base,
        0x8B | 0xFE | 0x17 | 0x79 => 0,
        0x10A => crate::cpuid::ARCH_CAPABILITIES,
        // IA32_FEAT_CTL: locked by the "firmware" with VMX and SGX off.
        0x3A => 1,
        0x174..=0x176 => m.sysenter[(idx - 0x174) as usize],
        0x1A0 => m.misc_enable,
        0x277 => m.pat,
        0x2FF => m.mtrr_def_type,
        0xC000_0080 => cx.s.efer,
        0xC000_0081 => m.star,
        0xC000_0082 => m.lstar,
        0xC000_0083 => m.cstar,
        0xC000_0084 => m.fmask,
        0xC000_0100 => cx.s.seg[SegReg::Fs as usize].base,
        0xC000_0101 => cx.s.seg[SegReg::Gs as usize].base,
        0xC000_0102 => m.kernel_gs_base,
        0xC000_0103 => m.tsc_aux,
        _ => return gp(0),
    })
}

fn canonical_or_gp(v: u64) -> R<u64> {
    if ((v as i64) << 16 >> 16) as u64 == v {
        Ok(v)
    } else {
        gp(0)
    }
}

fn wrmsr(cx: &mut Ctx<'_>, idx: u32, v: u64) -> R<()> {
    match idx {
        0x10 => {
            let old = tsc(cx);
            let now = old.wrapping_sub(cx.s.tsc_offset);
            cx.s.tsc_offset = v.wrapping_sub(now);
            // A TSC write moves IA32_TSC_ADJUST by the same amount (SDM 17.17.3).
            cx.s.msr.tsc_adjust = cx.s.msr.tsc_adjust.wrapping_add(v.wrapping_sub(old));
        }
        0x3B => {
            let delta = v.wrapping_sub(cx.s.msr.tsc_adjust);
            cx.s.tsc_offset = cx.s.tsc_offset.wrapping_add(delta);
            cx.s.msr.tsc_adjust = v;
        }
        0x1B => cx.s.msr.apic_base = v,
        0x8B | 0x79 => {}
        0x174..=0x176 => cx.s.msr.sysenter[(idx - 0x174) as usize] = v,
        0x1A0 => cx.s.msr.misc_enable = v,
        0x277 => cx.s.msr.pat = v,
        0x2FF => cx.s.msr.mtrr_def_type = v,
        0xC000_0080 => {
            if v & !(efer::SCE | efer::LME | efer::LMA | efer::NXE) != 0 {
                return gp(0);
            }
            let lma = cx.s.efer & efer::LMA;
            cx.s.efer = (v & !efer::LMA) | lma;
            cx.tlb.flush_all();
        }
        0xC000_0081 => cx.s.msr.star = v,
        0xC000_0082 => cx.s.msr.lstar = canonical_or_gp(v)?,
        0xC000_0083 => cx.s.msr.cstar = canonical_or_gp(v)?,
        0xC000_0084 => cx.s.msr.fmask = v & 0xFFFF_FFFF,
        0xC000_0100 => cx.s.seg[SegReg::Fs as usize].base = canonical_or_gp(v)?,
        0xC000_0101 => cx.s.seg[SegReg::Gs as usize].base = canonical_or_gp(v)?,
        0xC000_0102 => cx.s.msr.kernel_gs_base = canonical_or_gp(v)?,
        0xC000_0103 => cx.s.msr.tsc_aux = v & 0xFFFF_FFFF,
        _ => return gp(0),
    }
    Ok(())
}

fn io_allowed(cx: &Ctx<'_>) -> bool {
    // No TSS I/O permission bitmap: CPL > IOPL always faults.
    cx.s.cpl() <= ((cx.s.flags.other() & IOPL) >> 12) as u8
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    let cpl = cx.s.cpl();
    let m = ins.mnemonic();
    let privileged = matches!(
        m,
        M::Rdmsr | M::Wrmsr | M::Lgdt | M::Lidt | M::Lldt | M::Ltr | M::Invlpg | M::Lmsw | M::Clts
    );
    if privileged && cpl != 0 {
        return gp(0);
    }
    match m {
        M::Cpuid => {
            let r = cpuid::cpuid_for(cx.s, cx.s.gpr[0] as u32, cx.s.gpr[1] as u32);
            let g = &mut cx.s.gpr;
            g[0] = u64::from(r[0]);
            g[3] = u64::from(r[1]);
            g[1] = u64::from(r[2]);
            g[2] = u64::from(r[3]);
        }
        M::Rdmsr => {
            let v = rdmsr(cx, cx.s.gpr[1] as u32)?;
            cx.s.gpr[0] = v & 0xFFFF_FFFF;
            cx.s.gpr[2] = v >> 32;
        }
        M::Wrmsr => {
            let v = (cx.s.gpr[0] & 0xFFFF_FFFF) | (cx.s.gpr[2] << 32);
            wrmsr(cx, cx.s.gpr[1] as u32, v)?;
            cx.end_block = true;
        }
        M::Rdtsc | M::Rdtscp => {
            if cx.s.cr4 & cr4::TSD != 0 && cpl != 0 {
                return gp(0);
            }
            let t = tsc(cx);
            cx.s.gpr[0] = t & 0xFFFF_FFFF;
            cx.s.gpr[2] = t >> 32;
            if m == M::Rdtscp {
                cx.s.gpr[1] = cx.s.msr.tsc_aux & 0xFFFF_FFFF;
            }
        }
        M::Lgdt | M::Lidt => {
            let va = cx.ea(ins);
            let limit = cx.read(va, 2)? as u16;
            let base = match ins.code() {
                // Outside 64-bit mode the base is 32 bits, 24 with a 16-bit operand size.
                Code::Lgdt_m1632_16 | Code::Lidt_m1632_16 => {
                    cx.read(va.wrapping_add(2), 4)? & 0xFF_FFFF
                }
                Code::Lgdt_m1632 | Code::Lidt_m1632 => cx.read(va.wrapping_add(2), 4)?,
                _ => cx.read(va.wrapping_add(2), 8)?,
            };
            let t = if m == M::Lgdt {
                &mut cx.s.gdtr
            } else {
                &mut cx.s.idtr
            };
            t.base = base;
            t.limit = limit;
        }
        M::Sgdt | M::Sidt => {
            let t = if m == M::Sgdt { cx.s.gdtr } else { cx.s.idtr };
            let va = cx.ea(ins);
            // 10 bytes in 64-bit mode, else 6 (a 32-bit base).
            let wide = !cx.legacy;
            cx.check_write(va, if wide { 10 } else { 6 })?;
            cx.write(va, 2, u64::from(t.limit))?;
            if wide {
                cx.write(va.wrapping_add(2), 8, t.base)?;
            } else {
                cx.write(va.wrapping_add(2), 4, t.base & 0xFFFF_FFFF)?;
            }
        }
        M::Lldt => {
            let sel = cx.read_op(ins, 0, 2)? as u16;
            if sel & 0xFFFC == 0 {
                cx.s.ldtr = Segment {
                    selector: sel,
                    ..Segment::default()
                };
            } else {
                let d = read_descriptor(cx, sel)?;
                if d.attr & Segment::S != 0 || d.attr & 0xF != 2 || sel & 4 != 0 {
                    return gp(u32::from(sel & 0xFFFC));
                }
                cx.s.ldtr = d;
            }
        }
        M::Ltr => {
            let sel = cx.read_op(ins, 0, 2)? as u16;
            let d = read_descriptor(cx, sel)?;
            if d.attr & Segment::S != 0 || d.attr & 0xF != 9 || sel & 4 != 0 {
                return gp(u32::from(sel & 0xFFFC));
            }
            // Mark the descriptor busy.
            let va = cx.s.gdtr.base.wrapping_add(u64::from(sel & 0xFFF8)) + 5;
            cx.implicit_sup = true;
            let r = cx.read(va, 1).and_then(|b| cx.write(va, 1, b | 2));
            cx.implicit_sup = false;
            r?;
            cx.s.tr = Segment {
                attr: d.attr | 2,
                ..d
            };
        }
        M::Sldt | M::Str => {
            let v = if m == M::Sldt {
                cx.s.ldtr.selector
            } else {
                cx.s.tr.selector
            };
            let size = cx.op_size(ins, 0);
            cx.write_op(ins, 0, size, u64::from(v))?;
        }
        M::Smsw => {
            let size = cx.op_size(ins, 0);
            cx.write_op(ins, 0, size, cx.s.cr0 & 0xFFFF_FFFF)?;
        }
        M::Lmsw => {
            let v = cx.read_op(ins, 0, 2)?;
            let keep_pe = cx.s.cr0 & cr0::PE;
            cx.s.cr0 = (cx.s.cr0 & !0xE) | (v & 0xF) | keep_pe;
        }
        M::Clts => cx.s.cr0 &= !cr0::TS,
        M::Invlpg => {
            let va = cx.ea(ins);
            cx.tlb.flush_page(va);
            cx.end_block = true;
        }
        M::In | M::Out => {
            if !io_allowed(cx) {
                return gp(0);
            }
            let (port_op, data_op) = if m == M::In { (1, 0) } else { (0, 1) };
            let port = match ins.op_kind(port_op) {
                OpKind::Register => cx.s.gpr[2] as u16,
                _ => ins.immediate(port_op) as u16,
            };
            let r = ins.op_register(data_op);
            let size = super::operand::reg_size(r) as usize;
            if m == M::In {
                let mut b = [0u8; 4];
                cx.plat.pio_read(port, &mut b[..size]);
                set_reg(cx.s, r, u64::from(u32::from_le_bytes(b)));
            } else {
                let b = (get_reg(cx.s, r) as u32).to_le_bytes();
                cx.plat.pio_write(port, &b[..size]);
            }
            cx.poll_stop();
        }
        M::Lsl | M::Lar | M::Verr | M::Verw => {
            let sel = cx.read_op(ins, if matches!(m, M::Verr | M::Verw) { 0 } else { 1 }, 2)?;
            let d = read_descriptor(cx, sel as u16).ok().filter(|d| {
                d.attr & Segment::P != 0 && (d.attr & Segment::S != 0 || d.attr & 0xF == 9)
            });
            let ok = match (m, d) {
                (M::Lsl, Some(d)) => {
                    set_reg(cx.s, ins.op0_register(), u64::from(d.limit));
                    true
                }
                (M::Lar, Some(d)) => {
                    let v = (u64::from(d.attr & 0xFF) << 8) | (u64::from(d.attr >> 8) << 20);
                    set_reg(cx.s, ins.op0_register(), v);
                    true
                }
                (M::Verr, Some(d)) => d.attr & Segment::S != 0,
                (M::Verw, Some(d)) => d.attr & 0xA == 0x2,
                _ => false,
            };
            cx.s.flags.update_arith(ZF, if ok { ZF } else { 0 });
        }
        _ => return ud(),
    }
    Ok(())
}
