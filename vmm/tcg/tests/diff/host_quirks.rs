//! Where the host CPU differs from the CPU the TCG models (GenuineIntel, family 6) in ways
//! that are the host's vendor's or hypervisor's choice rather than the architecture's. Each
//! is probed once on the host, printed, and the cases that would see it are adjusted; on a
//! host without the quirk nothing changes and the full state is compared.
//!
//! - MXCSR_MASK: AMD CPUs with misaligned-SSE support report bit 17 (MM, the misaligned
//!   exception mask) in FXSAVE's MXCSR_MASK and accept it in LDMXCSR/FXRSTOR; the TCG's
//!   mask is Intel's 0xFFFF. Images saved by FXSAVE/XSAVE get the extra bits cleared, and
//!   reserved-bit cases only use bits reserved on both.
//! - FXSAVE pointers: AMD CPUs save FOP, FIP and FDP only while FSW.ES is set (zeros
//!   otherwise, Linux's X86_BUG_FXSAVE_LEAK); Intel always saves them. Images restored with
//!   ES clear get zero pointers, so both sides save zeros.
//! - OF after a shift or rotate by more than 1: undefined by the SDM; the TCG computes it
//!   with the count-1 formulas (SHR: 0; SHL, ROL, ROR: from the result), which some hosts do
//!   not follow. Tests comparing random shifts with such a host shift by 1 only
//!   ([`Quirks::shift_of_differs`]).
//! - ICEBP (INT1, F1): a trap; the #DB reports the next instruction. Some hypervisors
//!   re-inject it as a fault on the F1 byte itself: [`icebp_rip`] takes the host's report
//!   back to the architectural RIP.

use std::arch::x86_64::{_fxrstor64, _fxsave64};
use std::sync::OnceLock;

#[repr(C, align(16))]
struct FxArea([u8; 512]);

pub struct Quirks {
    /// MXCSR_MASK bits the host has beyond the TCG's 0xFFFF.
    pub mxcsr_mask_extra: u32,
    /// FXSAVE stores FOP/FIP/FDP as zero while FSW.ES is clear.
    pub fx_pointers_need_es: bool,
    /// The host's OF after SHL/SHR/ROL/ROR by more than 1 differs from the TCG's.
    pub shift_of_differs: bool,
}

/// OF after `op eax, cl` (0 SHL, 1 SHR, 2 ROL, 3 ROR) of `v` by `c` on the host, and the
/// result.
fn host_shift(op: u8, v: u32, c: u8) -> (bool, u32) {
    let (mut r, f): (u32, u64) = (v, 0);
    let mut f = f;
    // SAFETY: register-only instructions; PUSHFQ/POP use the stack (no `nostack`).
    unsafe {
        match op {
            0 => {
                std::arch::asm!("shl {r:e}, cl", "pushfq", "pop {f}", r = inout(reg) r, f = out(reg) f, in("cl") c)
            }
            1 => {
                std::arch::asm!("shr {r:e}, cl", "pushfq", "pop {f}", r = inout(reg) r, f = out(reg) f, in("cl") c)
            }
            2 => {
                std::arch::asm!("rol {r:e}, cl", "pushfq", "pop {f}", r = inout(reg) r, f = out(reg) f, in("cl") c)
            }
            _ => {
                std::arch::asm!("ror {r:e}, cl", "pushfq", "pop {f}", r = inout(reg) r, f = out(reg) f, in("cl") c)
            }
        }
    }
    (f & 0x800 != 0, r)
}

/// Whether the host's OF after multi-bit shifts and rotates of 32-bit values differs from
/// the TCG's formulas.
fn probe_shift_of() -> bool {
    let msb = |x: u32| x >> 31 != 0;
    for v in [
        0x8000_0000u32,
        0x4000_0000,
        0xC000_0001,
        0x1234_5678,
        0xF0F0_F0F0,
        0x7FFF_FFFF,
    ] {
        for c in 2..8u8 {
            for op in 0..4 {
                let (of, r) = host_shift(op, v, c);
                let model = match op {
                    0 => msb(r) ^ ((v >> (32 - u32::from(c))) & 1 != 0),
                    1 => false,
                    2 => msb(r) ^ (r & 1 != 0),
                    _ => msb(r) ^ ((r >> 30) & 1 != 0),
                };
                if of != model {
                    return true;
                }
            }
        }
    }
    false
}

fn probe() -> Quirks {
    let mut saved = FxArea([0; 512]);
    let mut img = FxArea([0; 512]);
    let mut out = FxArea([0; 512]);
    // SAFETY: 16-byte aligned 512-byte areas; the thread's x87/SSE state is saved first and
    // restored last, the probe image is valid (FCW 0x37F, MXCSR 0x1F80, empty tags, ES clear).
    unsafe {
        _fxsave64(saved.0.as_mut_ptr());
        img.0[0..2].copy_from_slice(&0x037Fu16.to_le_bytes());
        img.0[6..8].copy_from_slice(&0x0123u16.to_le_bytes());
        img.0[8..16].copy_from_slice(&0x1234_5678u64.to_le_bytes());
        img.0[16..24].copy_from_slice(&0x9ABC_DEF0u64.to_le_bytes());
        img.0[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
        _fxrstor64(img.0.as_ptr());
        _fxsave64(out.0.as_mut_ptr());
        _fxrstor64(saved.0.as_ptr());
    }
    let mask = u32::from_le_bytes([saved.0[28], saved.0[29], saved.0[30], saved.0[31]]);
    let mask = if mask == 0 { 0xFFBF } else { mask };
    let q = Quirks {
        mxcsr_mask_extra: mask & !0xFFFF,
        fx_pointers_need_es: out.0[6..24].iter().all(|&b| b == 0),
        shift_of_differs: probe_shift_of(),
    };
    if q.shift_of_differs {
        eprintln!("host quirk: OF after multi-bit shifts/rotates differs from the TCG's");
    }
    if q.mxcsr_mask_extra != 0 {
        eprintln!(
            "host quirk: MXCSR_MASK {mask:#x} (TCG 0xffff): extra bits cleared in saved images"
        );
    }
    if q.fx_pointers_need_es {
        eprintln!("host quirk: FXSAVE stores FOP/FIP/FDP only with FSW.ES set");
    }
    q
}

/// The host's quirks (probed on first use).
pub fn quirks() -> &'static Quirks {
    static Q: OnceLock<Quirks> = OnceLock::new();
    Q.get_or_init(probe)
}

/// Code clearing the host-only MXCSR_MASK bits of an image saved at `[rbx + disp]` (nothing
/// on a host without them): `and dword [rbx+disp32+28], 0xFFFF`.
pub fn clear_mask_extra(disp: u32) -> Vec<u8> {
    if quirks().mxcsr_mask_extra == 0 {
        return Vec::new();
    }
    let mut c = vec![0x81, 0xA3];
    c.extend((disp + 28).to_le_bytes());
    c.extend(0xFFFFu32.to_le_bytes());
    c
}

/// The architectural RIP of a host #DB reported at `rip` in `code` (starting at `start`):
/// past the ICEBP when the host reported it on the F1 byte.
pub fn icebp_rip(vector: u8, rip: u64, code: &[u8], start: u64) -> u64 {
    let at = rip.wrapping_sub(start);
    if vector == 1 && (at as usize) < code.len() && code[at as usize] == 0xF1 {
        static ONCE: OnceLock<()> = OnceLock::new();
        ONCE.get_or_init(|| {
            eprintln!("host quirk: the ICEBP #DB reports the F1 byte, not the next instruction")
        });
        rip + 1
    } else {
        rip
    }
}
