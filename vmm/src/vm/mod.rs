//! Assembling the machine (RAM, ACPI, devices, buses, vCPUs) and running it until the guest
//! powers off, resets, crashes or the VMM fails.
//!
//! Thread model: one thread per vCPU runs [`Vcpu::run`] and dispatches port/MMIO exits on
//! the shared [`Bus`]es; devices and vCPUs report the end of the run through an
//! [`ExitRequester`]. The main thread waits for it, then kicks every vCPU thread (signal +
//! immediate exit, see [`crate::accel::kick`]) until all have returned, and joins them all.

mod control;
mod vcpu_thread;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use control::VcpuSync;
pub use control::VmController;

use vmm_sys_util::eventfd::EventFd;

use crate::accel::kvm::KvmAccel;
use crate::accel::tcg::TcgAccel;
use crate::accel::{AccelError, Accelerator, CpuTopology, IoEventAddress, IoEventBinding, Vcpu};
use crate::acpi::{self, AcpiConfig, VirtioWindow};
use crate::boot::{self, BootConfig, LoadedKernel};
use crate::bus::{Bus, BusError};
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::i8042::I8042;
use crate::devices::rtc::Rtc;
use crate::devices::serial::{spawn_stdin_reader, SerialDevice, SerialError, SerialOutput};
use crate::devices::virtio_empty::EmptyVirtioMmio;
use crate::exit::{ExitRequester, GuestExit};
use crate::layout::{
    virtio_mmio_base, ACPI_PM_SIZE, ACPI_PM_START, I8042_PORT, RTC_PORT, SERIAL_GSI, SERIAL_PORT,
    VIRTIO_MMIO_COUNT, VIRTIO_MMIO_GSI_BASE, VIRTIO_MMIO_SIZE,
};
use crate::memory::{GuestRam, MemoryError};
use crate::virtio::mmio::{reg, MmioTransport};
use crate::virtio::vhost_user::{VhostUserDevice, VhostUserKind};
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
    /// More devices than virtio-mmio windows.
    #[error("{0} devices requested but the machine has {VIRTIO_MMIO_COUNT} virtio-mmio windows")]
    TooManyDevices(usize),
    /// Thread or eventfd creation failure.
    #[error("{0}: {1}")]
    Os(&'static str, #[source] std::io::Error),
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

/// Creates the accelerator for `choice` (`Auto`: KVM if usable, else TCG).
pub fn create_accelerator(choice: AccelChoice) -> Result<Arc<dyn Accelerator>, VmError> {
    match choice {
        AccelChoice::Kvm => Ok(Arc::new(KvmAccel::new()?)),
        AccelChoice::Tcg => Ok(Arc::new(TcgAccel::new()?)),
        AccelChoice::Auto => match KvmAccel::new() {
            Ok(k) => Ok(Arc::new(k)),
            Err(e) => {
                tracing::info!("{e}; using TCG");
                Ok(Arc::new(TcgAccel::new()?))
            }
        },
    }
}

/// A vhost-user device to attach on the next free virtio-mmio window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserDeviceConfig {
    /// Device type; `None`: discovered from the daemon's rqemu identity.
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
    /// vhost-user devices, one virtio-mmio window each (in order).
    pub devices: Vec<VhostUserDeviceConfig>,
}

/// A built machine, ready to run.
pub struct Vm {
    accel: Arc<dyn Accelerator>,
    ram: GuestRam,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: ExitRequester,
    vcpus: Vec<Box<dyn Vcpu>>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_irq: EventFd,
    serial_output: SerialOutput,
    kernel: LoadedKernel,
    sync: Arc<VcpuSync>,
    daemon_watches: Vec<(std::path::PathBuf, std::os::unix::net::UnixStream)>,
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
        let (serial, serial_irq) = SerialDevice::new(&cfg.serial)?;
        let serial = Arc::new(Mutex::new(serial));
        accel.register_irqfd(&serial_irq, SERIAL_GSI)?;
        pio.insert(serial.clone(), u64::from(SERIAL_PORT), 8)?;
        pio.insert(Arc::new(Mutex::new(Rtc::new())), u64::from(RTC_PORT), 2)?;
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
        if cfg.devices.len() > windows.len() {
            return Err(VmError::TooManyDevices(cfg.devices.len()));
        }
        let mut watches = Vec::new();
        for (i, w) in windows.iter().enumerate() {
            match cfg.devices.get(i) {
                Some(d) => watches.extend(attach_vhost_user(&*accel, &ram, &mmio, d, w)?),
                None => mmio.insert(Arc::new(Mutex::new(EmptyVirtioMmio)), w.base, w.size)?,
            }
        }

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
            serial,
            serial_irq,
            serial_output: cfg.serial.clone(),
            kernel,
            sync: Arc::new(VcpuSync::default()),
            daemon_watches: watches,
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
        }
    }

    /// Runs all vCPUs until the guest exits; every thread is joined before returning.
    pub fn run(mut self) -> Result<GuestExit, VmError> {
        let mut handles: Vec<JoinHandle<()>> = Vec::with_capacity(self.vcpus.len());
        for vcpu in self.vcpus.drain(..) {
            let ctx = vcpu_thread::VcpuContext {
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                exit: self.exit.clone(),
                sync: self.sync.clone(),
            };
            let name = format!("vcpu{}", vcpu.index());
            let h = std::thread::Builder::new()
                .name(name)
                .spawn(move || vcpu_thread::run_vcpu(vcpu, &ctx))
                .map_err(|e| VmError::Os("spawning a vCPU thread", e));
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.exit.request(GuestExit::Error(e.to_string()));
                    break;
                }
            }
        }
        let stdin = if self.serial_output == SerialOutput::Stdio {
            spawn_stdin_reader(self.serial.clone(), self.exit.clone())
                .map_err(|e| VmError::Os("spawning the stdin thread", e))
                .ok()
        } else {
            None
        };

        let mut watchers = Vec::new();
        for (socket, stream) in std::mem::take(&mut self.daemon_watches) {
            match spawn_daemon_watch(socket, stream, self.exit.clone()) {
                Ok(h) => watchers.push(h),
                Err(e) => self.exit.request(GuestExit::Error(e.to_string())),
            }
        }
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
        let _ = self.accel.unregister_irqfd(&self.serial_irq, SERIAL_GSI);
        if stuck > 0 {
            return Err(VmError::StuckVcpus(stuck, STOP_TIMEOUT));
        }
        Ok(reason)
    }
}

/// Connects a vhost-user daemon and maps its transport at window `w`: QueueNotify → the
/// queue's kick eventfd (ioeventfd or bus ioevent), call eventfds → irqfd on the window's GSI.
fn attach_vhost_user(
    accel: &dyn Accelerator,
    ram: &GuestRam,
    mmio: &Bus,
    d: &VhostUserDeviceConfig,
    w: &VirtioWindow,
) -> Result<Option<(std::path::PathBuf, std::os::unix::net::UnixStream)>, VmError> {
    let mut dev = VhostUserDevice::open(d.kind, &d.socket, ram.memory().clone())?;
    let watch = dev.take_watch_stream();
    let transport = MmioTransport::new(Box::new(dev))?;
    let notify = w.base + reg::QUEUE_NOTIFY;
    for (q, kick) in transport.kick_fds().iter().enumerate() {
        let q = q as u32;
        let binding = accel.register_ioevent(kick, IoEventAddress::Mmio(notify), Some(q))?;
        if binding == IoEventBinding::ViaBus {
            let fd = kick
                .try_clone()
                .map_err(|e| VmError::Os("cloning a kick eventfd", e))?;
            mmio.add_ioevent(notify, Some(u64::from(q)), fd);
        }
    }
    for call in transport.call_fds() {
        accel.register_irqfd(call, w.gsi)?;
    }
    mmio.insert(Arc::new(Mutex::new(transport)), w.base, w.size)?;
    Ok(watch.map(|s| (d.socket.clone(), s)))
}

/// Watches a vhost-user connection: if the daemon hangs up, the VM stops with a clear error
/// (the guest's device would otherwise wait forever).
fn spawn_daemon_watch(
    socket: std::path::PathBuf,
    stream: std::os::unix::net::UnixStream,
    exit: ExitRequester,
) -> Result<JoinHandle<()>, VmError> {
    use std::os::fd::AsRawFd;
    std::thread::Builder::new()
        .name("vhost-watch".into())
        .spawn(move || {
            while !exit.should_stop() {
                let mut pfd = libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events: libc::POLLRDHUP,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                let r = unsafe { libc::poll(&mut pfd, 1, 100) };
                if r > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                    exit.request(GuestExit::Error(format!(
                        "vhost-user daemon {} disconnected",
                        socket.display()
                    )));
                    return;
                }
            }
        })
        .map_err(|e| VmError::Os("spawning a daemon watch thread", e))
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
