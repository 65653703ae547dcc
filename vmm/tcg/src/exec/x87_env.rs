//! The x87 environment and save images: FNSTENV/FLDENV (14/28 bytes), FNSAVE/FRSTOR
//! (94/108 bytes), in the protected-mode formats (16-bit with an operand-size prefix, else
//! 32-bit; the real-mode layouts are not modelled), and the conversion between the CPU state
//! (abridged tags, registers in stack order) and the 108-byte image that `x87_host` runs on
//! the host unit. FFREEP and FNOP too.

use super::x87_stack::{top, valid};
use super::{Ctx, R};
use crate::state::cr0;
use iced_x86::{Instruction, MemorySize, Mnemonic as M, OpKind, Register};

/// An FNSAVE image in the 32-bit protected-mode format.
pub type Image = [u8; 108];

/// FSW exception flags, ES (error summary) and B (busy).
const FLAGS: u16 = 0x3F;
const ES: u16 = 1 << 7;
const B: u16 = 1 << 15;

/// The full two-bit tag of a register holding `v`: valid 0, zero 1, special 2 (empty is 3).
fn tag_of(b: &[u8]) -> u16 {
    let exp = u16::from_le_bytes([b[8], b[9]]) & 0x7FFF;
    let mut m = [0u8; 8];
    m.copy_from_slice(&b[..8]);
    let mant = u64::from_le_bytes(m);
    match (exp, mant) {
        (0, 0) => 1,
        (0, _) | (0x7FFF, _) => 2,
        (_, m) if m >> 63 == 0 => 2,
        _ => 0,
    }
}

/// The full tag word (physical register order) of the current state.
fn full_tags(cx: &Ctx<'_>) -> u16 {
    let t = top(cx);
    let mut ftw = 0u16;
    for p in 0..8 {
        let tag = if valid(cx, p) {
            tag_of(&cx.s.fpu.st[(p + 8 - t) & 7])
        } else {
            3
        };
        ftw |= tag << (2 * p);
    }
    ftw
}

/// The FSW as stored: ES and B follow the unmasked pending exceptions.
fn stored_fsw(fsw: u16, fcw: u16) -> u16 {
    if fsw & FLAGS & !fcw != 0 {
        fsw | ES | B
    } else {
        fsw & !(ES | B)
    }
}

/// The current state as a 108-byte image with every exception masked and ES/B clear, ready
/// for the host unit.
pub fn guest_image(cx: &Ctx<'_>) -> Image {
    let mut img = [0u8; 108];
    let f = &cx.s.fpu;
    img[0..2].copy_from_slice(&(f.fcw | FLAGS).to_le_bytes());
    img[4..6].copy_from_slice(&(f.fsw & !(ES | B)).to_le_bytes());
    img[8..10].copy_from_slice(&full_tags(cx).to_le_bytes());
    for i in 0..8 {
        img[28 + 10 * i..38 + 10 * i].copy_from_slice(&f.st[i][..10]);
    }
    img
}

/// Takes the registers, tags and status word of an image back from the host unit; the
/// guest's control word `fcw` stays (and decides ES/B).
pub fn commit_image(cx: &mut Ctx<'_>, img: &Image, fcw: u16) {
    let fsw = u16::from_le_bytes([img[4], img[5]]);
    let ftw = u16::from_le_bytes([img[8], img[9]]);
    load_regs(cx, img, 28, ftw);
    cx.s.fpu.fsw = stored_fsw(fsw, fcw);
    cx.s.fpu.fcw = fcw;
}

/// Registers (stack order, from `off`) and the abridged form of the full tag word `ftw`.
fn load_regs(cx: &mut Ctx<'_>, img: &[u8], off: usize, ftw: u16) {
    for i in 0..8 {
        let mut r = [0u8; 16];
        r[..10].copy_from_slice(&img[off + 10 * i..off + 10 * (i + 1)]);
        cx.s.fpu.st[i] = r;
    }
    cx.s.fpu.ftw = abridged(ftw);
}

/// Writes the environment (14 or 28 bytes) into `buf`.
fn store_env(cx: &Ctx<'_>, buf: &mut [u8], wide: bool) {
    let f = &cx.s.fpu;
    let words = [f.fcw, stored_fsw(f.fsw, f.fcw), full_tags(cx)];
    if wide {
        for (k, w) in words.iter().enumerate() {
            buf[4 * k..4 * k + 2].copy_from_slice(&w.to_le_bytes());
            buf[4 * k + 2..4 * k + 4].copy_from_slice(&0xFFFFu16.to_le_bytes());
        }
        buf[12..16].copy_from_slice(&(f.fip as u32).to_le_bytes());
        // FCS (stored as 0) and FOP in bits 16..27.
        buf[16..20].copy_from_slice(&(u32::from(f.fop & 0x7FF) << 16).to_le_bytes());
        buf[20..24].copy_from_slice(&(f.fdp as u32).to_le_bytes());
        buf[24..28].copy_from_slice(&0xFFFF_0000u32.to_le_bytes());
    } else {
        for (k, w) in words.iter().enumerate() {
            buf[2 * k..2 * k + 2].copy_from_slice(&w.to_le_bytes());
        }
        buf[6..8].copy_from_slice(&(f.fip as u16).to_le_bytes());
        buf[8..10].copy_from_slice(&0u16.to_le_bytes());
        buf[10..12].copy_from_slice(&(f.fdp as u16).to_le_bytes());
        buf[12..14].copy_from_slice(&0u16.to_le_bytes());
    }
}

/// Loads the environment from `buf` (14 or 28 bytes); registers stay where they are.
fn load_env(cx: &mut Ctx<'_>, buf: &[u8], wide: bool) -> u16 {
    let w = |o: usize| u16::from_le_bytes([buf[o], buf[o + 1]]);
    let (fcw, fsw, ftw) = if wide {
        (w(0), w(4), w(8))
    } else {
        (w(0), w(2), w(4))
    };
    let f = &mut cx.s.fpu;
    if wide {
        f.fip = u64::from(u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]));
        f.fop = w(18) & 0x7FF;
        f.fdp = u64::from(u32::from_le_bytes([buf[20], buf[21], buf[22], buf[23]]));
    } else {
        f.fip = u64::from(w(6));
        f.fdp = u64::from(w(10));
    }
    // The reserved FCW bit 6 reads as 1; ES/B follow the flags and the new masks.
    f.fcw = fcw | 0x40;
    f.fsw = stored_fsw(fsw, f.fcw);
    ftw
}

/// The abridged tag byte of a full tag word: a register is valid unless tagged empty (3); the
/// other tags are recomputed from the contents when needed (as the hardware does).
fn abridged(ftw: u16) -> u8 {
    (0..8)
        .filter(|p| (ftw >> (2 * p)) & 3 != 3)
        .fold(0u8, |a, p| a | (1 << p))
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    if cx.s.cr0 & (cr0::EM | cr0::TS) != 0 {
        return Err(super::Event::fault(super::vec::NM, None));
    }
    let m = ins.mnemonic();
    match m {
        M::Fnop => return Ok(()),
        M::Ffreep => {
            let i = (ins.op0_register() as usize).wrapping_sub(Register::ST0 as usize) & 7;
            let t = top(cx);
            cx.s.fpu.ftw &= !(1 << ((t + i) & 7));
            // Pop: TOP + 1 (ST(0)'s tag was not touched unless i == 0).
            let t0 = top(cx);
            cx.s.fpu.ftw &= !(1 << t0);
            cx.s.fpu.st.rotate_left(1);
            // C1 is cleared, as the hardware does (the manuals leave C0-C3 undefined).
            let fsw = cx.s.fpu.fsw & !((7 << 11) | (1 << 9));
            cx.s.fpu.fsw = fsw | ((((t0 + 1) & 7) as u16) << 11);
            return Ok(());
        }
        _ => {}
    }
    debug_assert_eq!(ins.op0_kind(), OpKind::Memory);
    let va = cx.ea(ins);
    let size = ins.memory_size();
    let wide = matches!(size, MemorySize::FpuEnv28 | MemorySize::FpuState108);
    let env_len = if wide { 28 } else { 14 };
    match m {
        M::Fnstenv | M::Fnsave => {
            let mut buf = [0u8; 108];
            store_env(cx, &mut buf, wide);
            let len = if m == M::Fnsave {
                for i in 0..8 {
                    buf[env_len + 10 * i..env_len + 10 * (i + 1)]
                        .copy_from_slice(&cx.s.fpu.st[i][..10]);
                }
                env_len + 80
            } else {
                env_len
            };
            cx.write_bytes(va, &buf[..len])?;
            if m == M::Fnsave {
                // FNSAVE then initialises the unit, like FNINIT (registers keep contents).
                let st = cx.s.fpu.st;
                cx.s.fpu = crate::state::Fpu {
                    st,
                    ..Default::default()
                };
            } else {
                // FNSTENV masks every exception after storing.
                cx.s.fpu.fcw |= FLAGS;
                cx.s.fpu.fsw = stored_fsw(cx.s.fpu.fsw, cx.s.fpu.fcw);
            }
        }
        _ => {
            // FLDENV / FRSTOR: read everything first so a fault changes nothing.
            let len = if m == M::Frstor {
                env_len + 80
            } else {
                env_len
            };
            let mut buf = [0u8; 108];
            cx.read_bytes(va, &mut buf[..len])?;
            let ftw = load_env(cx, &buf[..env_len], wide);
            if m == M::Frstor {
                load_regs(cx, &buf, env_len, ftw);
            } else {
                cx.s.fpu.ftw = abridged(ftw);
            }
        }
    }
    Ok(())
}
