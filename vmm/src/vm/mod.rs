//! Assembling the machine (RAM, ACPI, devices, buses, vCPUs) and running it until the guest
//! powers off, resets, crashes or the VMM fails.
//!
//! Thread model: one thread per vCPU runs [`Vcpu::run`] and dispatches port/MMIO exits on
//! the shared [`Bus`]es; devices and vCPUs report the end of the run through an
//! [`ExitRequester`]. The main thread waits for it, then kicks every vCPU thread (signal +
//! immediate exit, see [`crate::accel::kick`]) until all have returned, and joins them all.

mod attach;
mod control;
mod counted;
mod vcpu_thread;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use control::VmController;
use control::{ApiCounters, MachineFacts, VcpuSync};

use crate::accel::kvm::KvmAccel;
use crate::accel::tcg::{TcgAccel, TcgOptions};
use crate::accel::{AccelError, Accelerator, CpuTopology, Vcpu};
use crate::acpi::{self, AcpiConfig, VirtioWindow};
use crate::boot::{self, BootConfig, LoadedKernel};
use crate::bus::{Bus, BusError};
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::i8042::I8042;
use crate::devices::serial::{spawn_stdin_reader, SerialError, SerialOutput};
use crate::exit::{ExitRequester, GuestExit};
use crate::forwarded::{ForwardError, Link};
use crate::layout::{
    virtio_mmio_base, ACPI_PM_SIZE, ACPI_PM_START, GED_SIZE, GED_START, I8042_PORT, SERIAL_GSI,
    VIRTIO_MMIO_COUNT, VIRTIO_MMIO_GSI_BASE, VIRTIO_MMIO_SIZE,
};
use crate::memory::{GuestRam, MemoryError};
use crate::virtio::vhost_user::VhostUserKind;
use crate::virtio::VirtioError;

/// How long the main thread keeps kicking vCPUs before giving up on joining them.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors from building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Accelerator failure.
    #[error(transparent)]
    Accel(#[from] AccelError),
    /// Guest memory failure.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel loading failure.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// ACPI table failure.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Bus layout conflict (a machine-model bug).
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Serial setup failure.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// A virtio device failed.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// A forwarded device failed.
    #[error(transparent)]
    Forwarded(#[from] ForwardError),
    /// A daemon was granted the GSI of an in-VMM default device that still runs.
    #[error("GSI {0} of the in-VMM COM1 was granted to device daemon {1}; give that daemon another line")]
    GsiTaken(u32, String),
    /// A `--device-socket` path that exists but is not a UNIX socket.
    #[error("device socket {0} is not a UNIX socket but a {1}: start the device daemon there")]
    NotASocket(std::path::PathBuf, &'static str),
    /// More devices than virtio-mmio windows.
    #[error("{0} devices requested but the machine has {VIRTIO_MMIO_COUNT} virtio-mmio windows")]
    TooManyDevices(usize),
    /// Thread or eventfd creation failure.
    #[error("{0}: {1}")]
    Os(&'static str, #[source] std::io::Error),
    /// More vCPUs asked for than the accelerator can run.
    #[error("--cpus {asked}: the {accel} accelerator runs at most {max} vCPU(s); ask for fewer")]
    TooManyVcpus {
        /// `--cpus`.
        asked: u32,
        /// The accelerator's limit.
        max: u32,
        /// Its name.
        accel: &'static str,
    },
    /// vCPU threads did not stop.
    #[error("{0} vCPU thread(s) did not stop within {1:?}")]
    StuckVcpus(usize, Duration),
}

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM (error if unavailable).
    Kvm,
    /// The software CPU.
    Tcg,
    /// KVM if `/dev/kvm` works, else TCG.
    Auto,
}

/// Why this host's KVM cannot run a stock Linux kernel though `/dev/kvm` opens, from the
/// kernel modules loaded (`sys_module`: `/sys/module`): KVM-PVM (nested, module `kvm_pvm`) runs
/// only guest kernels built for PVM. `--accel auto` then takes the software CPU;
/// `--accel kvm` still uses it (small payloads run).
pub fn kvm_cannot_boot_linux(sys_module: &std::path::Path) -> Option<&'static str> {
    sys_module.join("kvm_pvm").exists().then_some(
        "it is KVM-PVM (module kvm_pvm), which runs only guest kernels built for PVM, not stock \
         Linux; --accel kvm uses it anyway",
    )
}

/// Creates the accelerator for `choice` (`Auto`: KVM if usable, else TCG).
pub fn create_accelerator(choice: AccelChoice) -> Result<Arc<dyn Accelerator>, VmError> {
    create_accelerator_with(choice, TcgOptions::default())
}

/// Creates the accelerator for `choice`; the software CPU gets `tcg`.
pub fn create_accelerator_with(
    choice: AccelChoice,
    tcg: TcgOptions,
) -> Result<Arc<dyn Accelerator>, VmError> {
    match choice {
        AccelChoice::Kvm => Ok(Arc::new(KvmAccel::new()?)),
        AccelChoice::Tcg => Ok(Arc::new(TcgAccel::with_options(tcg)?)),
        AccelChoice::Auto => match KvmAccel::new().map_err(|e| e.to_string()).and_then(|k| {
            match kvm_cannot_boot_linux(std::path::Path::new("/sys/module")) {
                Some(why) => Err(why.to_string()),
                None => Ok(k),
            }
        }) {
            Ok(k) => Ok(Arc::new(k)),
            Err(e) => {
                tracing::warn!(
                    "KVM is not usable ({e}): using the software CPU (TCG); guests boot and run \
                     much more slowly"
                );
                Ok(Arc::new(TcgAccel::with_options(tcg)?))
            }
        },
    }
}

/// A `--device-socket`: a vhost-user device (on the next free virtio-mmio window) or, when
/// probing finds a forwarding daemon there, an emulated device on the windows it is granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSocketConfig {
    /// vhost-user device type; `None`: probed (forwarding daemon, or a vhost-user daemon whose
    /// type comes from its rqemu identity).
    pub kind: Option<VhostUserKind>,
    /// Daemon socket.
    pub socket: std::path::PathBuf,
}

/// Machine configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel, initrd, command line.
    pub boot: BootConfig,
    /// RAM size in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Serial console.
    pub serial: SerialOutput,
    /// Device sockets: vhost-user devices take one virtio-mmio window each, in order.
    pub devices: Vec<DeviceSocketConfig>,
    /// Forwarded accesses may use shared-memory rings (else the socket only).
    pub forward_rings: bool,
}

/// A built machine, ready to run.
pub struct Vm {
    accel: Arc<dyn Accelerator>,
    ram: GuestRam,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: ExitRequester,
    vcpus: Vec<Box<dyn Vcpu>>,
    serial: Option<attach::InVmmSerial>,
    serial_output: SerialOutput,
    links: Vec<Arc<Link>>,
    kernel: LoadedKernel,
    sync: Arc<VcpuSync>,
    vhost_controls: Vec<crate::virtio::vhost_user::Control>,
    facts: Arc<MachineFacts>,
    api_counters: Arc<ApiCounters>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("accel", &self.accel.name())
            .field("ram", &self.ram.size())
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

/// The virtio-mmio windows the machine declares.
pub fn virtio_windows() -> Vec<VirtioWindow> {
    (0..VIRTIO_MMIO_COUNT)
        .map(|i| VirtioWindow {
            base: virtio_mmio_base(i),
            size: VIRTIO_MMIO_SIZE,
            gsi: VIRTIO_MMIO_GSI_BASE + i,
        })
        .collect()
}

impl Vm {
    /// Builds the machine on `accel`: RAM, ACPI tables, kernel, devices, vCPUs.
    pub fn new(cfg: &VmConfig, accel: Arc<dyn Accelerator>) -> Result<Self, VmError> {
        if cfg.vcpus > accel.max_vcpus() {
            return Err(VmError::TooManyVcpus {
                asked: cfg.vcpus,
                max: accel.max_vcpus(),
                accel: accel.name(),
            });
        }
        let ram = GuestRam::new(cfg.memory)?;
        accel.map_ram(&ram)?;
        let exit = ExitRequester::new();

        let windows = virtio_windows();
        let tables = acpi::build(&AcpiConfig {
            vcpus: cfg.vcpus,
            virtio: windows.clone(),
        })?;
        tables.write(ram.memory())?;
        let kernel = boot::load(&ram, &cfg.boot, tables.rsdp_addr())?;

        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        accel.attach_buses(&pio, &mmio, &exit)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            u64::from(I8042_PORT),
            5,
        )?;
        mmio.insert(
            Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
            ACPI_PM_START,
            ACPI_PM_SIZE,
        )?;
        let (ged, ged_handle) = acpi::ged::GedDevice::new();
        mmio.insert(Arc::new(Mutex::new(ged)), GED_START, GED_SIZE)?;
        let devices = attach::attach_devices(&*accel, &ram, &pio, &mmio, &windows, cfg)?;

        let topo = CpuTopology { count: cfg.vcpus };
        let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
        for i in 0..cfg.vcpus {
            let mut v = accel.create_vcpu(i, &topo)?;
            if i == 0 {
                v.set_boot_state(&kernel.state)?;
            }
            vcpus.push(v);
        }
        Ok(Vm {
            accel,
            ram,
            pio,
            mmio,
            exit,
            vcpus,
            serial: devices.serial,
            serial_output: cfg.serial.clone(),
            links: devices.links,
            kernel,
            sync: Arc::new(VcpuSync::default()),
            vhost_controls: devices.controls,
            facts: Arc::new(MachineFacts {
                vcpus: cfg.vcpus,
                memory: cfg.memory,
                devices: devices.devices,
                ged: ged_handle,
            }),
            api_counters: Arc::default(),
        })
    }

    /// Guest RAM (for device daemons: regions with fd + offset).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The loaded kernel's entry facts.
    pub fn kernel(&self) -> &LoadedKernel {
        &self.kernel
    }

    /// The port I/O bus.
    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// Handle to request the VM to stop (e.g. from a signal handler thread).
    pub fn exit_requester(&self) -> ExitRequester {
        self.exit.clone()
    }

    /// Host-side control (pause/resume/stop), usable from other threads while `run` runs.
    pub fn controller(&self) -> VmController {
        VmController {
            sync: self.sync.clone(),
            exit: self.exit.clone(),
            accel: self.accel.clone(),
            facts: self.facts.clone(),
            counters: self.api_counters.clone(),
        }
    }

    /// Runs all vCPUs until the guest exits; every thread is joined before returning.
    pub fn run(mut self) -> Result<GuestExit, VmError> {
        self.accel.start_threads()?;
        let mut handles: Vec<JoinHandle<()>> = Vec::with_capacity(self.vcpus.len());
        for mut vcpu in self.vcpus.drain(..) {
            if let Err(e) = vcpu.start_helpers() {
                tracing::warn!("vCPU {}: {e}", vcpu.index());
            }
            let ctx = vcpu_thread::VcpuContext {
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                exit: self.exit.clone(),
                sync: self.sync.clone(),
            };
            let name = format!("vcpu{}", vcpu.index());
            let h = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    crate::sandbox::confine_current(crate::sandbox::VmmThread::Vcpu);
                    vcpu_thread::run_vcpu(vcpu, &ctx)
                })
                .map_err(|e| VmError::Os("spawning a vCPU thread", e));
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.exit.request(GuestExit::Error(e.to_string()));
                    break;
                }
            }
        }
        let stdin = match &self.serial {
            Some((dev, _)) if self.serial_output == SerialOutput::Stdio => {
                spawn_stdin_reader(dev.clone(), self.exit.clone())
                    .map_err(|e| VmError::Os("spawning the stdin thread", e))
                    .ok()
            }
            _ => None,
        };

        let mut watchers = Vec::new();
        for control in std::mem::take(&mut self.vhost_controls) {
            match control.spawn(self.exit.clone()) {
                Ok(h) => watchers.push(h),
                Err(e) => self.exit.request(GuestExit::Error(format!(
                    "spawning a vhost-user control thread: {e}"
                ))),
            }
        }
        if !self.links.is_empty() {
            match crate::forwarded::supervisor::spawn(
                self.accel.clone(),
                self.links.clone(),
                self.exit.clone(),
            ) {
                Ok(h) => watchers.push(h),
                Err(e) => self.exit.request(GuestExit::Error(format!(
                    "spawning the device supervisor: {e}"
                ))),
            }
        }
        // Every thread is started: the main thread keeps only what it does from now on.
        crate::sandbox::confine_current(crate::sandbox::VmmThread::Main);
        let reason = self.exit.wait();
        self.sync.wake();
        let stuck = stop_vcpus(&self.sync, &handles);
        for h in handles.into_iter().filter(|h| h.is_finished()) {
            let _ = h.join();
        }
        if let Some(h) = stdin {
            let _ = h.join();
        }
        for h in watchers {
            let _ = h.join();
        }
        if let Some((_, irq)) = &self.serial {
            let _ = self.accel.unregister_irqfd(irq, SERIAL_GSI);
        }
        for l in &self.links {
            l.shutdown();
        }
        if stuck > 0 {
            return Err(VmError::StuckVcpus(stuck, STOP_TIMEOUT));
        }
        Ok(reason)
    }
}

/// Kicks vCPU threads until all have finished; returns how many are still running.
fn stop_vcpus(sync: &VcpuSync, handles: &[JoinHandle<()>]) -> usize {
    let start = Instant::now();
    loop {
        sync.kick_all();
        let running = handles.iter().filter(|h| !h.is_finished()).count();
        if running == 0 {
            return 0;
        }
        if start.elapsed() > STOP_TIMEOUT {
            return running;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kvm_pvm_is_no_kvm_for_stock_linux() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("kvm")).unwrap();
        assert_eq!(super::kvm_cannot_boot_linux(dir.path()), None);
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        let why = super::kvm_cannot_boot_linux(dir.path()).unwrap();
        assert!(why.contains("KVM-PVM"), "{why}");
    }
}
