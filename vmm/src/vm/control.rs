//! vCPU thread control: a registry of live vCPU threads (so kicks never target an exited
//! thread), pause/resume, and the host-side [`VmController`].

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::accel::kick;
use crate::exit::{ExitRequester, GuestExit};

use super::VmError;

#[derive(Default)]
struct PauseState {
    requested: bool,
    parked: usize,
}

/// Shared between the vCPU threads and the controller.
#[derive(Default)]
pub(super) struct VcpuSync {
    /// `(vcpu index, pthread)` of every vCPU thread currently inside its loop.
    threads: Mutex<Vec<(u32, libc::pthread_t)>>,
    pause: Mutex<PauseState>,
    cv: Condvar,
}

impl VcpuSync {
    /// Registers the calling vCPU thread for kicks.
    pub(super) fn register(&self, index: u32) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((index, me));
    }

    /// Unregisters the calling vCPU thread (before it exits).
    pub(super) fn unregister(&self, index: u32) {
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(i, _)| *i != index);
        self.cv.notify_all();
    }

    /// Kicks every registered vCPU thread out of `run()`; returns how many are running.
    pub(super) fn kick_all(&self) -> usize {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for (_, tid) in threads.iter() {
            // SAFETY: threads unregister under this lock before exiting, so every listed
            // pthread is alive while we hold it.
            unsafe { kick::kick_thread(*tid) };
        }
        threads.len()
    }

    fn running(&self) -> usize {
        self.threads.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Called by a vCPU thread between exits: parks it while a pause is requested.
    pub(super) fn maybe_park(&self, exit: &ExitRequester) {
        let mut st = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        if !st.requested {
            return;
        }
        st.parked += 1;
        self.cv.notify_all();
        while st.requested && !exit.should_stop() {
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.parked -= 1;
    }

    /// Wakes parked vCPUs (used on resume and when the VM stops).
    pub(super) fn wake(&self) {
        let mut st = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        st.requested = false;
        self.cv.notify_all();
    }
}

/// Host-side control of a running VM: pause/resume all vCPUs, or stop the VM.
#[derive(Clone)]
pub struct VmController {
    pub(super) sync: Arc<VcpuSync>,
    pub(super) exit: ExitRequester,
}

impl std::fmt::Debug for VmController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmController").finish_non_exhaustive()
    }
}

impl VmController {
    /// Pauses every vCPU (each parks outside the guest); waits up to `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<(), VmError> {
        self.sync
            .pause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requested = true;
        let start = Instant::now();
        loop {
            let running = self.sync.kick_all();
            let parked = self.paused_vcpus();
            if parked >= running {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(VmError::StuckVcpus(running - parked, timeout));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Number of vCPUs currently parked by [`VmController::pause`].
    pub fn paused_vcpus(&self) -> usize {
        self.sync
            .pause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .parked
    }

    /// Number of vCPU threads currently running their loop.
    pub fn running_vcpus(&self) -> usize {
        self.sync.running()
    }

    /// Resumes paused vCPUs.
    pub fn resume(&self) {
        self.sync.wake();
    }

    /// Stops the VM: `Vm::run` returns [`GuestExit::Stopped`] once all vCPUs have joined.
    pub fn stop(&self) {
        self.exit.request(GuestExit::Stopped);
    }
}
