//! Slow paths called from translated code: soft-MMU accesses that missed the inline TLB
//! lookup, flag evaluation when the lazy-flag record is not known at translation time, and
//! instructions the translator does not know, run by their interpreter handler.
//!
//! Every helper is `extern "C"` and never unwinds: on a fault it sets
//! [`JitCtx::status`] to [`STATUS_FAULT`] and returns, leaving the fault for the interpreter
//! to raise again when it re-executes the instruction.

use super::{InterpOp, JitCtx, STATUS_END, STATUS_FAULT};
use crate::ctx::{Ctx, Event, R};
use crate::state::ArchState;

/// The interpreter context of a run of translated code.
///
/// # Safety
/// `jc` must be the live `JitCtx` built by `Cpu::exec_fetch` for the current call, whose
/// `cx` points to the `Ctx` of that call (valid and not otherwise borrowed while host code
/// runs).
unsafe fn ctx<'a>(jc: *mut JitCtx) -> &'a mut Ctx<'a> {
    // SAFETY: per the function contract.
    unsafe { &mut *((*jc).cx as *mut Ctx<'a>) }
}

/// Records the outcome of an access in `jc.status`; returns the value (0 on a fault).
fn outcome(jc: *mut JitCtx, end: bool, r: R<u64>) -> u64 {
    let (status, v) = match r {
        Ok(v) => (if end { STATUS_END } else { 0 }, v),
        Err(Event::Fault { .. }) | Err(Event::Exit(_)) => (STATUS_FAULT, 0),
    };
    // SAFETY: `jc` is live for the call (helper contract).
    unsafe { (*jc).status = status };
    v
}

/// Reads `size` bytes at `va`.
///
/// # Safety
/// Called only by translated code with its live `JitCtx`.
pub(crate) unsafe extern "C" fn read(jc: *mut JitCtx, va: u64, size: u64) -> u64 {
    // SAFETY: per the helper contract.
    let cx = unsafe { ctx(jc) };
    let r = cx.read(va, size as u8);
    let end = cx.end_block;
    outcome(jc, end, r)
}

/// Checks that `size` bytes at `va` are writable, then reads them (read-modify-write).
///
/// # Safety
/// Called only by translated code with its live `JitCtx`.
pub(crate) unsafe extern "C" fn read_rmw(jc: *mut JitCtx, va: u64, size: u64) -> u64 {
    // SAFETY: per the helper contract.
    let cx = unsafe { ctx(jc) };
    let r = cx
        .check_write(va, size as usize)
        .and_then(|()| cx.read(va, size as u8));
    let end = cx.end_block;
    outcome(jc, end, r)
}

/// Writes `size` bytes of `v` at `va`.
///
/// # Safety
/// Called only by translated code with its live `JitCtx`.
pub(crate) unsafe extern "C" fn write(jc: *mut JitCtx, va: u64, size: u64, v: u64) {
    // SAFETY: per the helper contract.
    let cx = unsafe { ctx(jc) };
    let r = cx.write(va, size as u8, v).map(|()| 0);
    let end = cx.end_block;
    outcome(jc, end, r);
}

/// Runs `op` through its interpreter handler, as the run loop would (RIP and the flag record
/// are committed by the caller). On a fault the handler left the state as before the
/// instruction (the handlers' contract) and `STATUS_FAULT` makes the code return before it,
/// for the interpreter to raise the fault again. When the handler ended the block (a code-page
/// write, a device stop, a string instruction to be resumed) or moved RIP elsewhere than the
/// next instruction, `STATUS_END` makes the code return with the RIP the handler set.
///
/// # Safety
/// Called only by translated code with its live `JitCtx`; `op` is one of the [`InterpOp`]s
/// the JIT keeps for the code that calls it.
pub(crate) unsafe extern "C" fn interp(jc: *mut JitCtx, op: *const InterpOp) -> u64 {
    // SAFETY: per the helper contract.
    let (cx, op, delta) = unsafe { (ctx(jc), &*op, (*jc).delta) };
    cx.delta = delta;
    let next = op.ins.next_ip().wrapping_add(delta);
    cx.next_rip = next;
    if op.mxcsr {
        super::fpenv::sync_before(cx.s);
    }
    let r = (op.handler)(cx, &op.ins);
    if op.mxcsr {
        super::fpenv::sync_after(cx.s);
    }
    let status = match r {
        Ok(()) => {
            cx.s.rip = cx.next_rip;
            if cx.end_block || cx.next_rip != next {
                STATUS_END
            } else {
                0
            }
        }
        Err(_) => STATUS_FAULT,
    };
    // SAFETY: `jc` is live for the call (helper contract).
    unsafe { (*jc).status = status };
    status
}

/// The quotient of the 128-bit `hi:lo` by `d` (the caller guarantees `hi < d`, so it fits);
/// the remainder goes to `jc.scratch`.
///
/// # Safety
/// Called only by translated code with its live `JitCtx`.
pub(crate) unsafe extern "C" fn udiv128(jc: *mut JitCtx, hi: u64, lo: u64, d: u64) -> u64 {
    let n = (u128::from(hi) << 64) | u128::from(lo);
    let d = u128::from(d.max(1));
    // SAFETY: `jc` is live for the call (helper contract).
    unsafe { (*jc).scratch = (n % d) as u64 };
    (n / d) as u64
}

/// Condition `cc` (0..=15) of the flags in the architectural state.
///
/// # Safety
/// `arch` must point to the live architectural state.
pub(crate) unsafe extern "C" fn cond(arch: *const ArchState, cc: u64) -> u64 {
    // SAFETY: per the function contract.
    u64::from(unsafe { (*arch).flags.cond(cc as u8) })
}

/// The arithmetic flags (CF, PF, AF, ZF, SF, OF bits) of the architectural state.
///
/// # Safety
/// `arch` must point to the live architectural state.
pub(crate) unsafe extern "C" fn arith(arch: *const ArchState) -> u64 {
    // SAFETY: per the function contract.
    unsafe { (*arch).flags.arith() }
}

/// The carry flag of the flags in the architectural state.
///
/// # Safety
/// `arch` must point to the live architectural state.
pub(crate) unsafe extern "C" fn carry(arch: *const ArchState) -> u64 {
    // SAFETY: per the function contract.
    u64::from(unsafe { (*arch).flags.cf() })
}
