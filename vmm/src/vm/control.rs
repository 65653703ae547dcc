//! vCPU thread control: a registry of live vCPU threads (so kicks never target an exited
//! thread), pause/resume, and the host-side [`VmController`] (also the management API's
//! [`VmApi`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::accel::{kick, Accelerator};
use crate::acpi::ged::GedHandle;
use crate::api::{ApiError, Counters, DeviceInfo, VmApi, VmInfo, VmState};
use crate::exit::{ExitRequester, GuestExit};
use crate::forwarded::Link;
use crate::virtio::vhost_user::ControlStatus;

use super::counted::AccessCounts;

use super::VmError;

#[derive(Default)]
struct PauseState {
    requested: bool,
    parked: usize,
    /// When the current pause began (the guest clock is held from then until resume).
    since: Option<Instant>,
}

/// A device of the machine, as the management API describes it.
pub(super) enum DeviceEntry {
    /// A vhost-user daemon on a virtio-mmio window.
    VhostUser {
        /// virtio device ID (1 net, 2 blk, 26 fs).
        virtio_id: u32,
        /// Its socket.
        socket: PathBuf,
        /// Its connection state (kept by the device's control thread).
        status: Arc<ControlStatus>,
        /// Register accesses of its virtio-mmio transport.
        counts: Arc<AccessCounts>,
    },
    /// A forwarding-protocol daemon and its socket.
    Forwarded(Arc<Link>, PathBuf),
    /// An in-VMM default device (`serial`, `rtc`) and its register accesses.
    InVmm(&'static str, Arc<AccessCounts>),
}

/// What the VM is made of, fixed when it is built.
pub(super) struct MachineFacts {
    pub(super) vcpus: u32,
    pub(super) memory: u64,
    pub(super) devices: Vec<DeviceEntry>,
    /// The ACPI Generic Event Device (power button).
    pub(super) ged: GedHandle,
}

/// Host-side actions counted for `vm.counters`.
#[derive(Default)]
pub(super) struct ApiCounters {
    pauses: AtomicU64,
    resumes: AtomicU64,
    power_button: AtomicU64,
    paused_ns: AtomicU64,
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
    pub(super) accel: Arc<dyn Accelerator>,
    pub(super) facts: Arc<MachineFacts>,
    pub(super) counters: Arc<ApiCounters>,
}

impl std::fmt::Debug for VmController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmController").finish_non_exhaustive()
    }
}

impl VmController {
    /// Pauses every vCPU (each parks outside the guest); waits up to `timeout`.
    /// The guest clock is held from now until [`VmController::resume`].
    pub fn pause(&self, timeout: Duration) -> Result<(), VmError> {
        {
            let mut st = self.sync.pause.lock().unwrap_or_else(|e| e.into_inner());
            st.requested = true;
            st.since.get_or_insert_with(Instant::now);
        }
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

    /// Resumes paused vCPUs; the guest clock continues from where the pause held it.
    pub fn resume(&self) {
        let since = self
            .sync
            .pause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .since
            .take();
        if let Some(t) = since {
            // The vCPUs are still parked: the clock moves before any guest code sees it.
            let held = t.elapsed();
            self.accel.hold_clock(held);
            self.counters
                .paused_ns
                .fetch_add(held.as_nanos() as u64, Ordering::Relaxed);
        }
        self.sync.wake();
    }

    /// Whether a pause is in effect.
    pub fn is_paused(&self) -> bool {
        self.sync
            .pause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requested
    }

    /// Stops the VM: `Vm::run` returns [`GuestExit::Stopped`] once all vCPUs have joined.
    pub fn stop(&self) {
        self.exit.request(GuestExit::Stopped);
    }
}

/// How long a `vm.pause` waits for every vCPU to park.
const API_PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

fn virtio_name(id: u32) -> &'static str {
    match id {
        1 => "virtio-net",
        2 => "virtio-blk",
        26 => "virtio-fs",
        _ => "virtio",
    }
}

fn connection(up: bool) -> String {
    if up { "connected" } else { "disconnected" }.to_string()
}

impl VmController {
    fn state(&self) -> VmState {
        if self.exit.should_stop() {
            VmState::Shutdown
        } else if self.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    fn require_running_or_paused(&self) -> Result<(), ApiError> {
        if self.exit.should_stop() {
            return Err(ApiError::Conflict("the VM is shutting down".into()));
        }
        Ok(())
    }
}

impl VmApi for VmController {
    fn info(&self) -> VmInfo {
        let devices = self
            .facts
            .devices
            .iter()
            .map(|d| match d {
                DeviceEntry::VhostUser {
                    virtio_id,
                    socket,
                    status,
                    ..
                } => DeviceInfo {
                    kind: virtio_name(*virtio_id).to_string(),
                    socket: Some(socket.display().to_string()),
                    connection: connection(status.connected()),
                },
                DeviceEntry::Forwarded(l, socket) => DeviceInfo {
                    kind: format!("{:?}", l.class()).to_lowercase(),
                    socket: Some(socket.display().to_string()),
                    connection: connection(l.handle().is_alive()),
                },
                DeviceEntry::InVmm(kind, _) => DeviceInfo {
                    kind: (*kind).to_string(),
                    socket: None,
                    connection: "in-vmm".to_string(),
                },
            })
            .collect();
        VmInfo {
            state: self.state(),
            vcpus: self.facts.vcpus,
            memory: self.facts.memory,
            accelerator: self.accel.name().to_string(),
            devices,
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
        self.require_running_or_paused()?;
        if self.is_paused() {
            return Err(ApiError::Conflict("the VM is already paused".into()));
        }
        match VmController::pause(self, API_PAUSE_TIMEOUT) {
            Ok(()) => {
                self.counters.pauses.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // Do not leave some vCPUs parked and others running.
                VmController::resume(self);
                Err(ApiError::Internal(e.to_string()))
            }
        }
    }

    fn resume(&self) -> Result<(), ApiError> {
        self.require_running_or_paused()?;
        if !self.is_paused() {
            return Err(ApiError::Conflict("the VM is not paused".into()));
        }
        VmController::resume(self);
        self.counters.resumes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        self.exit.request(GuestExit::HostShutdown);
        Ok(())
    }

    fn reboot(&self) -> Result<(), ApiError> {
        self.require_running_or_paused()?;
        self.exit
            .request(GuestExit::Reset("the management API (vm.reboot)"));
        Ok(())
    }

    fn power_button(&self) -> Result<(), ApiError> {
        self.require_running_or_paused()?;
        self.facts
            .ged
            .power_button(&*self.accel)
            .map_err(|e| ApiError::Internal(format!("raising the GED interrupt: {e}")))?;
        self.counters.power_button.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn counters(&self) -> Counters {
        let mut all = Counters::new();
        let vm = all.entry("vm".to_string()).or_default();
        let c = &self.counters;
        vm.insert("pauses".into(), c.pauses.load(Ordering::Relaxed));
        vm.insert("resumes".into(), c.resumes.load(Ordering::Relaxed));
        vm.insert("paused_ns".into(), c.paused_ns.load(Ordering::Relaxed));
        vm.insert("vcpus_running".into(), self.running_vcpus() as u64);
        let ged = all.entry("ged".to_string()).or_default();
        ged.insert(
            "power_button".into(),
            c.power_button.load(Ordering::Relaxed),
        );
        ged.insert("pending_events".into(), u64::from(self.facts.ged.pending()));
        for (i, d) in self.facts.devices.iter().enumerate() {
            let mut m = std::collections::BTreeMap::new();
            let name = match d {
                DeviceEntry::VhostUser {
                    virtio_id,
                    status,
                    counts,
                    ..
                } => {
                    let (r, w) = counts.get();
                    m.insert("mmio_reads".into(), r);
                    m.insert("mmio_writes".into(), w);
                    m.insert("connected".into(), u64::from(status.connected()));
                    m.insert("reconnects".into(), status.reconnects());
                    m.insert("refusals".into(), status.refusals());
                    format!("{}{i}", virtio_name(*virtio_id))
                }
                DeviceEntry::Forwarded(l, _) => {
                    m.insert("connected".into(), u64::from(l.handle().is_alive()));
                    m.insert("reattaches".into(), l.reattach_count());
                    format!("{}{i}", l.name())
                }
                DeviceEntry::InVmm(kind, counts) => {
                    let (r, w) = counts.get();
                    m.insert("reads".into(), r);
                    m.insert("writes".into(), w);
                    format!("{kind}{i}")
                }
            };
            all.insert(name, m);
        }
        all
    }
}
