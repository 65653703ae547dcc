//! Exception and interrupt delivery through the 64-bit IDT (interrupt/trap gates, TSS RSP0-2
//! and IST stacks, privilege changes), double-fault escalation and triple fault. Outside long
//! mode `deliver` hands over to `crate::legacy`.

use crate::ctx::{vec, Ctx, Event, R};
use crate::descriptor::read_descriptor;
use crate::flags::{IF, NT, RF, TF, VM};
use crate::platform::{Exit, ShutdownReason};
use crate::state::{SegReg, Segment};

/// How an event was raised (affects privilege checks and the EXT bit of error codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IntKind {
    /// CPU exception (fault or trap).
    Exception,
    /// External interrupt or NMI.
    External,
    /// INT n / INT3 (gate DPL checked against CPL).
    Software,
}

/// Delivers `vector` through the IDT. `ret_rip` is the RIP pushed on the stack. On success the
/// architectural state points at the handler; on failure nothing has been committed.
pub(crate) fn deliver(
    cx: &mut Ctx<'_>,
    vector: u8,
    error: Option<u32>,
    kind: IntKind,
    ret_rip: u64,
) -> R<()> {
    if cx.s.efer & crate::state::efer::LMA == 0 {
        return crate::legacy::deliver(cx, vector, error, kind, ret_rip);
    }
    let ext = u32::from(kind != IntKind::Software);
    let idt_err = u32::from(vector) * 8 + 2 + ext;
    if u64::from(vector) * 16 + 15 > u64::from(cx.s.idtr.limit) {
        return Err(Event::fault(vec::GP, Some(idt_err)));
    }
    let saved = cx.implicit_sup;
    cx.implicit_sup = true;
    let r = deliver_inner(cx, vector, error, kind, ret_rip, idt_err);
    cx.implicit_sup = saved;
    r
}

fn deliver_inner(
    cx: &mut Ctx<'_>,
    vector: u8,
    error: Option<u32>,
    kind: IntKind,
    ret_rip: u64,
    idt_err: u32,
) -> R<()> {
    let gate_va = cx.s.idtr.base.wrapping_add(u64::from(vector) * 16);
    let lo = cx.read(gate_va, 8)?;
    let hi = cx.read(gate_va.wrapping_add(8), 8)?;
    let typ = (lo >> 40) & 0x1F;
    let dpl = ((lo >> 45) & 3) as u8;
    let present = lo & (1 << 47) != 0;
    if typ != 0xE && typ != 0xF {
        return Err(Event::fault(vec::GP, Some(idt_err)));
    }
    let cpl = cx.s.cpl();
    if kind == IntKind::Software && dpl < cpl {
        return Err(Event::fault(vec::GP, Some(idt_err)));
    }
    if !present {
        return Err(Event::fault(vec::NP, Some(idt_err)));
    }
    let sel = ((lo >> 16) & 0xFFFF) as u16;
    let offset = (lo & 0xFFFF) | (((lo >> 48) & 0xFFFF) << 16) | ((hi & 0xFFFF_FFFF) << 32);
    let ist = (lo >> 32) & 7;
    let ext = u32::from(kind != IntKind::Software);
    let mut cs = read_descriptor(cx, sel)
        .map_err(|_| Event::fault(vec::GP, Some(u32::from(sel & 0xFFFC) + ext)))?;
    if cs.attr & Segment::S == 0 || cs.attr & 0x8 == 0 || cs.attr & Segment::L == 0 {
        return Err(Event::fault(vec::GP, Some(u32::from(sel & 0xFFFC) + ext)));
    }
    if cs.attr & Segment::P == 0 {
        return Err(Event::fault(vec::NP, Some(u32::from(sel & 0xFFFC) + ext)));
    }
    let conforming = cs.attr & 0x4 != 0;
    let new_cpl = if conforming { cpl } else { cs.dpl() };
    if new_cpl > cpl {
        return Err(Event::fault(vec::GP, Some(u32::from(sel & 0xFFFC) + ext)));
    }
    cs.selector = (sel & 0xFFFC) | u16::from(new_cpl);
    let tss = cx.s.tr.base;
    let mut rsp = if ist != 0 {
        cx.read(tss.wrapping_add(36 + 8 * (ist - 1)), 8)?
    } else if new_cpl < cpl {
        cx.read(tss.wrapping_add(4 + 8 * u64::from(new_cpl)), 8)?
    } else {
        cx.s.gpr[4]
    };
    rsp &= !0xF;
    let old_ss = cx.s.seg[SegReg::Ss as usize];
    let old_cs = cx.s.seg[SegReg::Cs as usize];
    let rflags = cx.s.rflags();
    let mut frame = [0u64; 6];
    let mut n = 0;
    if let Some(e) = error {
        frame[n] = u64::from(e);
        n += 1;
    }
    for v in [
        ret_rip,
        u64::from(old_cs.selector),
        rflags,
        cx.s.gpr[4],
        u64::from(old_ss.selector),
    ] {
        frame[n] = v;
        n += 1;
    }
    let base = rsp.wrapping_sub(8 * n as u64);
    cx.check_write(base, 8 * n)?;
    for (i, v) in frame[..n].iter().enumerate() {
        cx.write(base.wrapping_add(8 * i as u64), 8, *v)?;
    }
    // Commit.
    cx.s.gpr[4] = base;
    if new_cpl != cpl {
        cx.s.seg[SegReg::Ss as usize] = Segment {
            selector: u16::from(new_cpl),
            base: 0,
            limit: 0,
            attr: 0,
        };
    }
    cx.s.seg[SegReg::Cs as usize] = cs;
    let mut f = rflags & !(TF | NT | RF | VM);
    if typ == 0xE {
        f &= !IF;
    }
    cx.s.set_rflags(f);
    cx.s.rip = offset;
    cx.s.halted = false;
    Ok(())
}

fn contributory(v: u8) -> bool {
    matches!(v, vec::DE | vec::TS | vec::NP | vec::SS | vec::GP)
}

/// Raises a fault at the current instruction (RIP = faulting instruction for faults), with
/// double-fault escalation and triple fault → shutdown.
pub(crate) fn raise(
    cx: &mut Ctx<'_>,
    vector: u8,
    error: Option<u32>,
    kind: IntKind,
    ret_rip: u64,
) -> Result<(), Exit> {
    let (mut v, mut e) = (vector, error);
    let fault_rip = cx.s.rip;
    if vector == vec::UD {
        log_ud(cx);
    }
    loop {
        match deliver(cx, v, e, kind, ret_rip) {
            Ok(()) => return Ok(()),
            Err(Event::Fault {
                vector: v2,
                error: e2,
            }) => {
                if v == vec::DF {
                    return Err(Exit::Shutdown(ShutdownReason::TripleFault {
                        vector: v2,
                        rip: fault_rip,
                    }));
                }
                let df = (contributory(v) && contributory(v2))
                    || (v == vec::PF && (contributory(v2) || v2 == vec::PF));
                if df {
                    v = vec::DF;
                    e = Some(0);
                } else {
                    v = v2;
                    e = e2;
                }
            }
            Err(Event::Exit(x)) => return Err(x),
        }
    }
}

/// With `RQEMU_TCG_LOG_UD` in the environment, reports every #UD on stderr with the bytes at
/// RIP (to find what a guest program needs that this CPU lacks).
fn log_ud(cx: &mut Ctx<'_>) {
    static LOG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*LOG.get_or_init(|| std::env::var_os("RQEMU_TCG_LOG_UD").is_some()) {
        return;
    }
    let rip = cx.s.rip;
    let mut bytes = [0u8; 15];
    let text = match cx.read_bytes(rip, &mut bytes) {
        Ok(()) => {
            let mut d = iced_x86::Decoder::with_ip(64, &bytes, rip, iced_x86::DecoderOptions::NONE);
            format!("{} ({:02x?})", d.decode(), &bytes[..])
        }
        Err(_) => "(not readable)".to_string(),
    };
    eprintln!("rqemu-tcg: #UD at {rip:#x}: {text}");
}
