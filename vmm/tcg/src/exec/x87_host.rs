//! The rest of the x87 instruction set, executed on the host's own x87 unit: comparisons
//! (FCOM/FCOMP/FCOMPP/FUCOM*/FICOM*/FTST/FXAM), FSQRT, FRNDINT, FSCALE, FXTRACT, FPREM,
//! FPREM1, the transcendentals (F2XM1, FYL2X, FYL2XP1, FPTAN, FPATAN, FSIN, FCOS, FSINCOS),
//! the constants (FLDPI, FLDL2E, FLDL2T, FLDLG2, FLDLN2), FCMOVcc and FBLD/FBSTP.
//!
//! The guest's x87 state is turned into an FNSAVE image (see `x87_env`), loaded with FRSTOR
//! (every exception masked), the one instruction runs, and FNSAVE reads the result back and
//! leaves the host unit initialised, as the ABI expects between calls. The results are the
//! host's to the last bit (80-bit precision, FCW.PC/RC, C0-C3, stack faults, denormals), which
//! a software long-double libm could not match; the host is x86-64, as the rest of the crate
//! already requires. Exceptions are masked-response only, like the other x87 files: ES/B are
//! set from the guest's masks, no #MF is raised.

use super::x87_env::{commit_image, guest_image, Image};
use super::{Ctx, R};
use crate::state::cr0;
use iced_x86::{Instruction, MemorySize, Mnemonic as M, OpKind, Register};

/// One instruction the host runs; `Sti` forms carry the register index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Plain(Plain),
    Sti(StiOp, u8),
    /// A memory-operand form on a host copy of the operand.
    Mem(MemOp),
    /// FCMOVcc ST(0), ST(i): the condition, evaluated on the guest flags, is handed to the
    /// host as CF for FCMOVB/FCMOVNB, so the host applies the stack checks either way.
    Fcmov(bool, u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plain {
    Ftst,
    Fxam,
    Fsqrt,
    Frndint,
    Fscale,
    Fxtract,
    Fprem,
    Fprem1,
    F2xm1,
    Fyl2x,
    Fyl2xp1,
    Fptan,
    Fpatan,
    Fsin,
    Fcos,
    Fsincos,
    Fldpi,
    Fldl2e,
    Fldl2t,
    Fldlg2,
    Fldln2,
    Fcompp,
    Fucompp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StiOp {
    Fcom,
    Fcomp,
    Fucom,
    Fucomp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemOp {
    Fcom32,
    Fcom64,
    Fcomp32,
    Fcomp64,
    Ficom16,
    Ficom32,
    Ficomp16,
    Ficomp32,
    Fbld,
    Fbstp,
}

/// Whether this file executes `m`.
pub fn handles(m: M) -> bool {
    matches!(
        m,
        M::Ftst
            | M::Fxam
            | M::Fsqrt
            | M::Frndint
            | M::Fscale
            | M::Fxtract
            | M::Fprem
            | M::Fprem1
            | M::F2xm1
            | M::Fyl2x
            | M::Fyl2xp1
            | M::Fptan
            | M::Fpatan
            | M::Fsin
            | M::Fcos
            | M::Fsincos
            | M::Fldpi
            | M::Fldl2e
            | M::Fldl2t
            | M::Fldlg2
            | M::Fldln2
            | M::Fcom
            | M::Fcomp
            | M::Fcompp
            | M::Fucom
            | M::Fucomp
            | M::Fucompp
            | M::Ficom
            | M::Ficomp
            | M::Fbld
            | M::Fbstp
            | M::Fcmovb
            | M::Fcmove
            | M::Fcmovbe
            | M::Fcmovu
            | M::Fcmovnb
            | M::Fcmovne
            | M::Fcmovnbe
            | M::Fcmovnu
    )
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    if cx.s.cr0 & (cr0::EM | cr0::TS) != 0 {
        return Err(super::Event::fault(super::vec::NM, None));
    }
    let op = decode(cx, ins);
    let mut mem = [0u8; 10];
    let va = if ins.op0_kind() == OpKind::Memory || ins.op1_kind() == OpKind::Memory {
        Some(cx.ea(ins))
    } else {
        None
    };
    let len = match op {
        Op::Mem(MemOp::Fcom32 | MemOp::Fcomp32 | MemOp::Ficom32 | MemOp::Ficomp32) => 4,
        Op::Mem(MemOp::Fcom64 | MemOp::Fcomp64) => 8,
        Op::Mem(MemOp::Ficom16 | MemOp::Ficomp16) => 2,
        Op::Mem(MemOp::Fbld | MemOp::Fbstp) => 10,
        _ => 0,
    };
    if let (Some(va), true) = (va, op != Op::Mem(MemOp::Fbstp)) {
        cx.read_bytes(va, &mut mem[..len])?;
    }
    let mut img = guest_image(cx);
    let fcw = cx.s.fpu.fcw;
    run(&mut img, &mut mem, op);
    if let (Some(va), Op::Mem(MemOp::Fbstp)) = (va, op) {
        // The store can fault: the register stack is committed only after it.
        cx.write_bytes(va, &mem)?;
    }
    commit_image(cx, &img, fcw);
    Ok(())
}

fn decode(cx: &Ctx<'_>, ins: &Instruction) -> Op {
    let sti = |k: u32| (ins.op_register(k) as u32).wrapping_sub(Register::ST0 as u32) as u8 & 7;
    let m = ins.mnemonic();
    let memory = ins.op0_kind() == OpKind::Memory;
    let size = ins.memory_size();
    match m {
        M::Fcom | M::Fcomp if memory => {
            let pop = m == M::Fcomp;
            Op::Mem(match (size == MemorySize::Float64, pop) {
                (false, false) => MemOp::Fcom32,
                (true, false) => MemOp::Fcom64,
                (false, true) => MemOp::Fcomp32,
                (true, true) => MemOp::Fcomp64,
            })
        }
        M::Ficom | M::Ficomp => {
            let pop = m == M::Ficomp;
            Op::Mem(match (size == MemorySize::Int32, pop) {
                (false, false) => MemOp::Ficom16,
                (true, false) => MemOp::Ficom32,
                (false, true) => MemOp::Ficomp16,
                (true, true) => MemOp::Ficomp32,
            })
        }
        M::Fbld => Op::Mem(MemOp::Fbld),
        M::Fbstp => Op::Mem(MemOp::Fbstp),
        // Register forms: "fcom st(i)" is op0 = ST(i) in iced, or op0 = ST0, op1 = ST(i).
        M::Fcom | M::Fcomp | M::Fucom | M::Fucomp => {
            let i = if ins.op_count() > 1 { sti(1) } else { sti(0) };
            let o = match m {
                M::Fcom => StiOp::Fcom,
                M::Fcomp => StiOp::Fcomp,
                M::Fucom => StiOp::Fucom,
                _ => StiOp::Fucomp,
            };
            Op::Sti(o, i)
        }
        M::Fcmovb
        | M::Fcmove
        | M::Fcmovbe
        | M::Fcmovu
        | M::Fcmovnb
        | M::Fcmovne
        | M::Fcmovnbe
        | M::Fcmovnu => Op::Fcmov(cx.s.flags.cond(fcmov_cc(m)), sti(1)),
        _ => Op::Plain(match m {
            M::Ftst => Plain::Ftst,
            M::Fxam => Plain::Fxam,
            M::Fsqrt => Plain::Fsqrt,
            M::Frndint => Plain::Frndint,
            M::Fscale => Plain::Fscale,
            M::Fxtract => Plain::Fxtract,
            M::Fprem => Plain::Fprem,
            M::Fprem1 => Plain::Fprem1,
            M::F2xm1 => Plain::F2xm1,
            M::Fyl2x => Plain::Fyl2x,
            M::Fyl2xp1 => Plain::Fyl2xp1,
            M::Fptan => Plain::Fptan,
            M::Fpatan => Plain::Fpatan,
            M::Fsin => Plain::Fsin,
            M::Fcos => Plain::Fcos,
            M::Fsincos => Plain::Fsincos,
            M::Fldpi => Plain::Fldpi,
            M::Fldl2e => Plain::Fldl2e,
            M::Fldl2t => Plain::Fldl2t,
            M::Fldlg2 => Plain::Fldlg2,
            M::Fldln2 => Plain::Fldln2,
            M::Fcompp => Plain::Fcompp,
            _ => Plain::Fucompp,
        }),
    }
}

/// The Jcc condition code equal to an FCMOVcc's condition.
fn fcmov_cc(m: M) -> u8 {
    match m {
        M::Fcmovb => 0x2,
        M::Fcmovnb => 0x3,
        M::Fcmove => 0x4,
        M::Fcmovne => 0x5,
        M::Fcmovbe => 0x6,
        M::Fcmovnbe => 0x7,
        M::Fcmovu => 0xA,
        _ => 0xB,
    }
}

/// Loads `img` into the host x87 unit, runs `$ins` (which uses `{m}`, the address of the
/// memory operand copy), and stores the state back into `img` (FNSAVE, which also
/// re-initialises the unit).
macro_rules! host_mem {
    ($img:expr, $mem:expr, $ins:expr) => {
        // SAFETY: FRSTOR reads the 108 bytes of `img` and FNSAVE writes them; the
        // instruction touches at most the 10 bytes of `mem`. The image was built with every
        // x87 exception masked, so no instruction here can raise #MF; FNSAVE leaves the x87
        // unit initialised (empty stack, FCW 0x37F), which is the state the SysV ABI requires
        // across calls. No SSE state, flags the compiler relies on, or stack memory is used.
        unsafe {
            core::arch::asm!(
                "frstor [{img}]",
                $ins,
                "fnsave [{img}]",
                img = in(reg) $img.as_mut_ptr(),
                m = in(reg) $mem.as_mut_ptr(),
                options(nostack),
            )
        }
    };
}

/// `host_mem!` for an instruction without a memory operand.
macro_rules! host {
    ($img:expr, $ins:expr) => {
        // SAFETY: as in `host_mem!`, with no memory operand.
        unsafe {
            core::arch::asm!(
                "frstor [{img}]",
                $ins,
                "fnsave [{img}]",
                img = in(reg) $img.as_mut_ptr(),
                options(nostack),
            )
        }
    };
}

/// Like `host!` with the host's CF set to `cf` right before the instruction (FCMOV).
macro_rules! host_cf {
    ($img:expr, $cf:expr, $ins:expr) => {
        // SAFETY: as in `host_mem!`; `bt` only writes the host flags, declared clobbered by
        // not passing `preserves_flags`.
        unsafe {
            core::arch::asm!(
                "frstor [{img}]",
                "bt {cf:e}, 0",
                $ins,
                "fnsave [{img}]",
                img = in(reg) $img.as_mut_ptr(),
                cf = in(reg) u32::from($cf),
                options(nostack),
            )
        }
    };
}

macro_rules! sti_each {
    ($img:expr, $i:expr, $mn:literal) => {
        match $i {
            0 => host!($img, concat!($mn, " st(0)")),
            1 => host!($img, concat!($mn, " st(1)")),
            2 => host!($img, concat!($mn, " st(2)")),
            3 => host!($img, concat!($mn, " st(3)")),
            4 => host!($img, concat!($mn, " st(4)")),
            5 => host!($img, concat!($mn, " st(5)")),
            6 => host!($img, concat!($mn, " st(6)")),
            _ => host!($img, concat!($mn, " st(7)")),
        }
    };
}

macro_rules! fcmov_each {
    ($img:expr, $cf:expr, $i:expr, $mn:literal) => {
        match $i {
            0 => host_cf!($img, $cf, concat!($mn, " st(0), st(0)")),
            1 => host_cf!($img, $cf, concat!($mn, " st(0), st(1)")),
            2 => host_cf!($img, $cf, concat!($mn, " st(0), st(2)")),
            3 => host_cf!($img, $cf, concat!($mn, " st(0), st(3)")),
            4 => host_cf!($img, $cf, concat!($mn, " st(0), st(4)")),
            5 => host_cf!($img, $cf, concat!($mn, " st(0), st(5)")),
            6 => host_cf!($img, $cf, concat!($mn, " st(0), st(6)")),
            _ => host_cf!($img, $cf, concat!($mn, " st(0), st(7)")),
        }
    };
}

fn run(img: &mut Image, mem: &mut [u8; 10], op: Op) {
    match op {
        Op::Plain(p) => match p {
            Plain::Ftst => host!(img, "ftst"),
            Plain::Fxam => host!(img, "fxam"),
            Plain::Fsqrt => host!(img, "fsqrt"),
            Plain::Frndint => host!(img, "frndint"),
            Plain::Fscale => host!(img, "fscale"),
            Plain::Fxtract => host!(img, "fxtract"),
            Plain::Fprem => host!(img, "fprem"),
            Plain::Fprem1 => host!(img, "fprem1"),
            Plain::F2xm1 => host!(img, "f2xm1"),
            Plain::Fyl2x => host!(img, "fyl2x"),
            Plain::Fyl2xp1 => host!(img, "fyl2xp1"),
            Plain::Fptan => host!(img, "fptan"),
            Plain::Fpatan => host!(img, "fpatan"),
            Plain::Fsin => host!(img, "fsin"),
            Plain::Fcos => host!(img, "fcos"),
            Plain::Fsincos => host!(img, "fsincos"),
            Plain::Fldpi => host!(img, "fldpi"),
            Plain::Fldl2e => host!(img, "fldl2e"),
            Plain::Fldl2t => host!(img, "fldl2t"),
            Plain::Fldlg2 => host!(img, "fldlg2"),
            Plain::Fldln2 => host!(img, "fldln2"),
            Plain::Fcompp => host!(img, "fcompp"),
            Plain::Fucompp => host!(img, "fucompp"),
        },
        Op::Sti(o, i) => match o {
            StiOp::Fcom => sti_each!(img, i, "fcom"),
            StiOp::Fcomp => sti_each!(img, i, "fcomp"),
            StiOp::Fucom => sti_each!(img, i, "fucom"),
            StiOp::Fucomp => sti_each!(img, i, "fucomp"),
        },
        Op::Mem(o) => match o {
            MemOp::Fcom32 => host_mem!(img, mem, "fcom dword ptr [{m}]"),
            MemOp::Fcom64 => host_mem!(img, mem, "fcom qword ptr [{m}]"),
            MemOp::Fcomp32 => host_mem!(img, mem, "fcomp dword ptr [{m}]"),
            MemOp::Fcomp64 => host_mem!(img, mem, "fcomp qword ptr [{m}]"),
            MemOp::Ficom16 => host_mem!(img, mem, "ficom word ptr [{m}]"),
            MemOp::Ficom32 => host_mem!(img, mem, "ficom dword ptr [{m}]"),
            MemOp::Ficomp16 => host_mem!(img, mem, "ficomp word ptr [{m}]"),
            MemOp::Ficomp32 => host_mem!(img, mem, "ficomp dword ptr [{m}]"),
            MemOp::Fbld => host_mem!(img, mem, "fbld tbyte ptr [{m}]"),
            MemOp::Fbstp => host_mem!(img, mem, "fbstp tbyte ptr [{m}]"),
        },
        // CF = the condition: FCMOVB moves when it holds.
        Op::Fcmov(cond, i) => fcmov_each!(img, cond, i, "fcmovb"),
    }
}
