//! The float instructions of SSE3 (ADDSUB/HADD/HSUB), SSE4.1 (ROUND*, DPPS/DPPD), the SSE
//! compares (CMPPS/PD/SS/SD) and the MMX-SSE conversions (CVT(T)PS2PI, CVT(T)PD2PI,
//! CVTPI2PS), SSE2's packed conversions and RCP/RSQRT on the host's SSE unit, like the SSE/SSE2 arithmetic of [`super::sse_fp`]:
//! each runs natively (`op xmm0, xmm1[, imm8]`) under the guest's rounding/DAZ/FTZ with every
//! exception masked, so results, NaN propagation and the MXCSR exception flags are the
//! hardware's; an unmasked exception raises #XM (#UD without CR4.OSXMMEXCPT) before the
//! destination is written.
//!
//! An immediate is part of the instruction encoding, so each immediate an instruction can
//! take is its own native instruction here; the immediates are narrowed first (compare
//! predicates 0-7; ROUND* takes its rounding from MXCSR.RC, set from imm8 when imm8 bit 2 is
//! clear; DPPS computes into lane 0 and the result is spread over imm8's output lanes).

use super::sse_fp::{host_csr, merge_flags, FLAGS, UE};
use super::{gp, ud, Ctx, R};
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};
use std::arch::asm;

/// `op xmm0, xmm1` with xmm0 = `v[0]`, xmm1 = `v[1]`, under MXCSR `c[0]`: xmm0 is stored in
/// `v[0]`, the MXCSR afterwards in `c[0]`.
macro_rules! native {
    ($v:ident, $c:ident, $text:expr) => {
        // SAFETY: loads/stores only through the two local arrays; the host MXCSR is saved in
        // `c[1]` and restored before the block ends; xmm0/xmm1 are declared clobbered.
        unsafe {
            asm!(
                "stmxcsr [{c} + 4]",
                "ldmxcsr [{c}]",
                "movdqu xmm0, [{v}]",
                "movdqu xmm1, [{v} + 16]",
                $text,
                "movdqu [{v}], xmm0",
                "stmxcsr [{c}]",
                "ldmxcsr [{c} + 4]",
                v = in(reg) $v.as_mut_ptr(),
                c = in(reg) $c.as_mut_ptr(),
                out("xmm0") _,
                out("xmm1") _,
                options(nostack),
            )
        }
    };
}

/// `op xmm0, xmm1, imm` for each of the listed immediates (anything else: None).
macro_rules! native_imm {
    ($v:ident, $c:ident, $op:literal, $imm:expr, [$($i:literal),*]) => {
        match $imm {
            $($i => native!($v, $c, concat!($op, " xmm0, xmm1, ", $i)),)*
            _ => return None,
        }
    };
}

/// Runs `m xmm0, xmm1[, imm]` natively with xmm0 = `a`, xmm1 = `b` under `host_csr(csr)`:
/// xmm0 afterwards and the exception flags raised. `imm` must already be narrowed (see the
/// module documentation).
fn host(m: M, a: u128, b: u128, imm: u8, csr: u32) -> Option<(u128, u32)> {
    let mut v = [a, b];
    let mut c = [host_csr(csr), 0u32];
    match m {
        M::Addsubps => native!(v, c, "addsubps xmm0, xmm1"),
        M::Addsubpd => native!(v, c, "addsubpd xmm0, xmm1"),
        M::Haddps => native!(v, c, "haddps xmm0, xmm1"),
        M::Haddpd => native!(v, c, "haddpd xmm0, xmm1"),
        M::Hsubps => native!(v, c, "hsubps xmm0, xmm1"),
        M::Hsubpd => native!(v, c, "hsubpd xmm0, xmm1"),
        M::Cvtdq2ps => native!(v, c, "cvtdq2ps xmm0, xmm1"),
        M::Cvtps2dq => native!(v, c, "cvtps2dq xmm0, xmm1"),
        M::Cvttps2dq => native!(v, c, "cvttps2dq xmm0, xmm1"),
        M::Cvtpd2dq => native!(v, c, "cvtpd2dq xmm0, xmm1"),
        M::Cvttpd2dq => native!(v, c, "cvttpd2dq xmm0, xmm1"),
        M::Cvtdq2pd => native!(v, c, "cvtdq2pd xmm0, xmm1"),
        M::Cvtps2pd => native!(v, c, "cvtps2pd xmm0, xmm1"),
        M::Cvtpd2ps => native!(v, c, "cvtpd2ps xmm0, xmm1"),
        M::Rcpps => native!(v, c, "rcpps xmm0, xmm1"),
        M::Rsqrtps => native!(v, c, "rsqrtps xmm0, xmm1"),
        M::Rcpss => native!(v, c, "rcpss xmm0, xmm1"),
        M::Rsqrtss => native!(v, c, "rsqrtss xmm0, xmm1"),
        M::Cmpps => native_imm!(v, c, "cmpps", imm, [0, 1, 2, 3, 4, 5, 6, 7]),
        M::Cmppd => native_imm!(v, c, "cmppd", imm, [0, 1, 2, 3, 4, 5, 6, 7]),
        M::Cmpss => native_imm!(v, c, "cmpss", imm, [0, 1, 2, 3, 4, 5, 6, 7]),
        M::Cmpsd => native_imm!(v, c, "cmpsd", imm, [0, 1, 2, 3, 4, 5, 6, 7]),
        M::Roundps => native_imm!(v, c, "roundps", imm, [4, 12]),
        M::Roundpd => native_imm!(v, c, "roundpd", imm, [4, 12]),
        M::Roundss => native_imm!(v, c, "roundss", imm, [4, 12]),
        M::Roundsd => native_imm!(v, c, "roundsd", imm, [4, 12]),
        M::Dpps => native_imm!(
            v,
            c,
            "dpps",
            imm,
            [1, 17, 33, 49, 65, 81, 97, 113, 129, 145, 161, 177, 193, 209, 225, 241]
        ),
        M::Dppd => native_imm!(
            v,
            c,
            "dppd",
            imm,
            [0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51]
        ),
        _ => return None,
    }
    Some((v[0], c[0] & FLAGS))
}

/// Executes float instruction `m` on `a` (the destination's value) and `b` (the source) with
/// immediate `imm` under the guest MXCSR, natively; merges the exception flags into the
/// guest MXCSR (or raises #XM/#UD when one is unmasked) and returns the destination's new
/// value.
pub(super) fn exec(cx: &mut Ctx<'_>, m: M, a: u128, b: u128, imm: u8) -> R<u128> {
    let mut csr = cx.s.mxcsr;
    let out_lanes = imm & 0xF;
    let imm = match m {
        M::Cmpps | M::Cmppd | M::Cmpss | M::Cmpsd => imm & 7,
        M::Roundps | M::Roundpd | M::Roundss | M::Roundsd => {
            if imm & 4 == 0 {
                csr = (csr & !0x6000) | (u32::from(imm & 3) << 13);
            }
            4 | (imm & 8)
        }
        M::Dpps => (imm & 0xF0) | 1,
        M::Dppd => imm & 0x33,
        _ => 0,
    };
    let Some((mut r, mut f)) = host(m, a, b, imm, csr) else {
        return ud();
    };
    if csr & (UE << 7) == 0 && f & UE == 0 {
        // An unmasked underflow is signalled for every tiny result, a masked one only for
        // inexact ones; with FTZ every tiny result reports UE.
        if let Some((_, f2)) = host(m, a, b, imm, csr | 0x8000) {
            f |= f2 & UE;
        }
    }
    merge_flags(cx, f)?;
    if m == M::Dpps {
        let dot = r & 0xFFFF_FFFF;
        r = (0..4)
            .filter(|i| out_lanes & (1 << i) != 0)
            .fold(0, |acc, i| acc | (dot << (32 * i)));
    }
    Ok(r)
}

/// SSE/SSE2 packed conversions (CVTDQ2PS, CVT(T)PS2DQ, CVT(T)PD2DQ, CVTDQ2PD, CVTPS2PD,
/// CVTPD2PS) and the reciprocal approximations RCPPS/RCPSS/RSQRTPS/RSQRTSS (the host's
/// approximation: like KVM, a guest sees its host's tables). Ok(false): not one of these.
pub(super) fn sse2_ops(cx: &mut Ctx<'_>, ins: &Instruction) -> R<bool> {
    let m = ins.mnemonic();
    // Bytes of a memory source (16: aligned).
    let size = match m {
        M::Cvtdq2ps
        | M::Cvtps2dq
        | M::Cvttps2dq
        | M::Cvtpd2dq
        | M::Cvttpd2dq
        | M::Cvtpd2ps
        | M::Rcpps
        | M::Rsqrtps => 16,
        M::Cvtdq2pd | M::Cvtps2pd => 8,
        M::Rcpss | M::Rsqrtss => 4,
        _ => return Ok(false),
    };
    let xi = |r: Register| {
        let (n, b) = (r as usize, Register::XMM0 as usize);
        (b..b + 16).contains(&n).then(|| n - b)
    };
    let Some(d) = xi(ins.op0_register()).filter(|_| ins.op0_kind() == OpKind::Register) else {
        return ud();
    };
    let b = if ins.op1_kind() == OpKind::Register {
        match xi(ins.op1_register()) {
            Some(x) => cx.s.xmm[x],
            None => return ud(),
        }
    } else {
        let va = cx.ea(ins);
        if size == 16 && va & 15 != 0 {
            return gp(0);
        }
        let mut buf = [0u8; 16];
        cx.read_bytes(va, &mut buf[..size])?;
        u128::from_le_bytes(buf)
    };
    let a = cx.s.xmm[d];
    cx.s.xmm[d] = exec(cx, m, a, b, 0)?;
    Ok(true)
}
