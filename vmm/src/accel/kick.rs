//! Kicking vCPU threads out of `run()` with a real-time signal.
//!
//! The handler only stores 1 into a byte registered by the *receiving* thread (thread-local),
//! so it never touches another thread's memory and is async-signal-safe.

use std::cell::Cell;
use std::sync::Once;

use super::{AccelError, Result};

thread_local! {
    static KICK_TARGET: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads (SIGRTMIN + 0).
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Alias kept for documentation links.
pub const KICK_SIGNAL: &str = "SIGRTMIN";

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let target = KICK_TARGET.with(|t| t.get());
    if !target.is_null() {
        // SAFETY: the pointer was registered by this very thread via `arm_thread`, whose
        // contract requires it to stay valid until `disarm_thread` runs on this thread.
        unsafe { std::ptr::write_volatile(target, 1) };
    }
}

static INSTALL: Once = Once::new();

/// Installs the process-wide kick handler (idempotent).
pub fn install_handler() -> Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick) {
            result = Err(AccelError::Hypervisor {
                op: "installing the vCPU kick signal handler",
                source: std::io::Error::from_raw_os_error(e.errno()),
            });
        }
    });
    result
}

/// Registers `target` as the byte the kick signal sets on the calling thread.
///
/// # Safety
/// `target` must stay valid for writes until [`disarm_thread`] is called on this thread.
pub unsafe fn arm_thread(target: *mut u8) {
    KICK_TARGET.with(|t| t.set(target));
}

/// Unregisters the calling thread's kick target.
pub fn disarm_thread() {
    KICK_TARGET.with(|t| t.set(std::ptr::null_mut()));
}

/// Sends the kick signal to thread `tid`.
///
/// # Safety
/// `tid` must identify a thread that has not exited yet (e.g. one that registered itself in
/// a registry and only unregisters under the same lock the caller holds).
pub unsafe fn kick_thread(tid: libc::pthread_t) {
    // SAFETY: the caller guarantees the thread is alive, so `tid` is valid.
    unsafe {
        libc::pthread_kill(tid, kick_signal());
    }
}
