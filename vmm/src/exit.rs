//! How a guest run ends, and the shared "request exit" handle devices and vCPUs use.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Why the guest stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// ACPI S5 power-off (exit status 0).
    PowerOff,
    /// The guest asked for a reset (source given); rqemu does not reboot in place.
    Reset(&'static str),
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// vCPU index.
        vcpu: u32,
        /// Guest RIP at the fault, if known.
        rip: u64,
    },
    /// The host asked the VM to stop (signal), not the guest.
    Stopped,
    /// The management API's `vm.shutdown`: the VM stopped on request (exit status 0).
    HostShutdown,
    /// The VMM or a vCPU failed.
    Error(String),
}

impl GuestExit {
    /// The process exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            GuestExit::PowerOff => 0,
            GuestExit::Reset(_) => 2,
            GuestExit::TripleFault { .. } => 3,
            GuestExit::Stopped => 4,
            GuestExit::HostShutdown => 0,
            GuestExit::Error(_) => 1,
        }
    }
}

impl std::fmt::Display for GuestExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestExit::PowerOff => write!(f, "guest powered off"),
            GuestExit::Reset(src) => write!(f, "guest requested a reset via {src}"),
            GuestExit::TripleFault { vcpu, rip } => {
                write!(f, "vCPU {vcpu} triple-faulted (shutdown) at rip={rip:#x}")
            }
            GuestExit::Stopped => write!(f, "VM stopped by the host"),
            GuestExit::HostShutdown => write!(f, "VM shut down through the management API"),
            GuestExit::Error(e) => write!(f, "VM error: {e}"),
        }
    }
}

/// Shared, cloneable: the first requested exit wins; `wait` blocks until one arrives.
#[derive(Clone, Default)]
pub struct ExitRequester {
    inner: Arc<ExitInner>,
}

#[derive(Default)]
struct ExitInner {
    reason: Mutex<Option<GuestExit>>,
    cv: Condvar,
    stop: AtomicBool,
}

impl std::fmt::Debug for ExitRequester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitRequester")
            .field("stopping", &self.should_stop())
            .finish()
    }
}

impl ExitRequester {
    /// A fresh requester with no exit pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests that the VM stop with `reason` (ignored if another reason came first).
    pub fn request(&self, reason: GuestExit) {
        let mut r = self.inner.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.cv.notify_all();
    }

    /// True once any exit was requested (vCPU loops poll this before entering the guest).
    pub fn should_stop(&self) -> bool {
        self.inner.stop.load(Ordering::SeqCst)
    }

    /// Blocks until an exit is requested and returns it.
    pub fn wait(&self) -> GuestExit {
        let mut r = self.inner.reason.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(reason) = r.clone() {
                return reason;
            }
            r = self.inner.cv.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes_waiter() {
        let ex = ExitRequester::new();
        let ex2 = ex.clone();
        let t = std::thread::spawn(move || ex2.wait());
        ex.request(GuestExit::Reset("i8042"));
        ex.request(GuestExit::PowerOff);
        assert_eq!(t.join().unwrap(), GuestExit::Reset("i8042"));
        assert!(ex.should_stop());
        assert_ne!(GuestExit::Reset("x").exit_code(), 0);
        assert_eq!(GuestExit::PowerOff.exit_code(), 0);
    }
}
