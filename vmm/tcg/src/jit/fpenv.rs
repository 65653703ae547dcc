//! The host MXCSR while translated code runs: the guest's control bits (rounding, DAZ, FTZ)
//! with every exception masked and no flags (`exec::sse_fp::host_csr`, what the interpreter's
//! SSE handlers run each instruction under), so that floating point translated to host
//! instructions (`insn::fp`) computes the guest's results and raises its flags. Those flags
//! accumulate in the host register and are merged into the guest's MXCSR when the run ends
//! ([`leave`]) — and before an interpreter handler called from translated code reads or
//! writes the guest's MXCSR ([`sync_before`], [`sync_after`]). Rust code called from
//! translated code (helpers, handlers) runs under that MXCSR too: it is the host's usual one
//! unless the guest changed rounding, DAZ or FTZ, and never traps.

use crate::exec::sse_fp::{host_csr, FLAGS};
use crate::state::ArchState;
use core::arch::asm;
use iced_x86::Mnemonic as M;

/// The host MXCSR.
#[inline]
fn get() -> u32 {
    let mut v = 0u32;
    // SAFETY: STMXCSR writes the 4 bytes of `v`.
    unsafe { asm!("stmxcsr [{}]", in(reg) &mut v, options(nostack, preserves_flags)) };
    v
}

/// Sets the host MXCSR to `v` (a valid value: reserved bits clear, as `host_csr` makes).
#[inline]
fn set(v: u32) {
    // SAFETY: LDMXCSR reads the 4 bytes of `v`; only values `host_csr` made or `get` read are
    // loaded (no reserved bit set, so no #GP), and they mask every exception or are the
    // host's own.
    unsafe { asm!("ldmxcsr [{}]", in(reg) &v, options(nostack, readonly, preserves_flags)) };
}

/// Before translated code runs for `s`: loads the guest's control bits; returns the host's
/// MXCSR, for [`leave`].
#[inline]
pub(crate) fn enter(s: &ArchState) -> u32 {
    let host = get();
    let want = host_csr(s.mxcsr);
    if host != want {
        set(want);
    }
    host
}

/// After translated code ran: merges the flags it raised into the guest's MXCSR and restores
/// the host's `host`.
#[inline]
pub(crate) fn leave(s: &mut ArchState, host: u32) {
    let now = get();
    s.mxcsr |= now & FLAGS;
    if now != host {
        set(host);
    }
}

/// Whether `m`'s interpreter handler reads or writes the guest's MXCSR as a whole.
pub(crate) fn touches_mxcsr(m: M) -> bool {
    matches!(
        m,
        M::Ldmxcsr
            | M::Vldmxcsr
            | M::Stmxcsr
            | M::Vstmxcsr
            | M::Fxsave
            | M::Fxsave64
            | M::Fxrstor
            | M::Fxrstor64
            | M::Xsave
            | M::Xsave64
            | M::Xsaveopt
            | M::Xsaveopt64
            | M::Xsavec
            | M::Xsavec64
            | M::Xsaves
            | M::Xsaves64
            | M::Xrstor
            | M::Xrstor64
            | M::Xrstors
            | M::Xrstors64
    )
}

/// Before such a handler runs from translated code: the flags raised so far go to the guest.
pub(crate) fn sync_before(s: &mut ArchState) {
    let now = get();
    if now & FLAGS != 0 {
        s.mxcsr |= now & FLAGS;
        set(now & !FLAGS);
    }
}

/// After it: the host runs under the guest's (possibly new) control bits again.
pub(crate) fn sync_after(s: &ArchState) {
    let want = host_csr(s.mxcsr);
    if get() != want {
        set(want);
    }
}
