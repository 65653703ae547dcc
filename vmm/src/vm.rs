//! Assembling the machine (RAM, ACPI, devices, buses, vCPUs) and running it until the guest
//! powers off, resets, crashes or the VMM fails.
//!
//! Thread model: one thread per vCPU runs [`Vcpu::run`] and dispatches port/MMIO exits on
//! the shared [`Bus`]es; devices and vCPUs report the end of the run through an
//! [`ExitRequester`]. The main thread waits for it, then kicks every vCPU thread (signal +
//! immediate exit, see [`crate::accel::kick`]) until all have returned, and joins them all.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::accel::kvm::KvmAccel;
use crate::accel::{kick, AccelError, Accelerator, CpuTopology, Vcpu, VcpuExit};
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

/// Creates the accelerator for `choice`.
pub fn create_accelerator(choice: AccelChoice) -> Result<Arc<dyn Accelerator>, VmError> {
    const TCG_MISSING: &str = "TCG accelerator not available yet";
    match choice {
        AccelChoice::Kvm => Ok(Arc::new(KvmAccel::new()?)),
        AccelChoice::Tcg => Err(AccelError::Unavailable(TCG_MISSING.into()).into()),
        AccelChoice::Auto => match KvmAccel::new() {
            Ok(k) => Ok(Arc::new(k)),
            Err(e) => Err(AccelError::Unavailable(format!(
                "{e}; and the fallback failed: {TCG_MISSING}"
            ))
            .into()),
        },
    }
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
        for w in &windows {
            mmio.insert(Arc::new(Mutex::new(EmptyVirtioMmio)), w.base, w.size)?;
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

    /// Runs all vCPUs until the guest exits; every thread is joined before returning.
    pub fn run(mut self) -> Result<GuestExit, VmError> {
        let mut handles: Vec<JoinHandle<()>> = Vec::with_capacity(self.vcpus.len());
        for vcpu in self.vcpus.drain(..) {
            let (pio, mmio, exit) = (self.pio.clone(), self.mmio.clone(), self.exit.clone());
            let name = format!("vcpu{}", vcpu.index());
            let h = std::thread::Builder::new()
                .name(name)
                .spawn(move || vcpu_thread(vcpu, &pio, &mmio, &exit))
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

        let reason = self.exit.wait();
        let stuck = stop_vcpus(&handles);
        for h in handles.into_iter().filter(|h| h.is_finished()) {
            let _ = h.join();
        }
        if let Some(h) = stdin {
            let _ = h.join();
        }
        let _ = self.accel.unregister_irqfd(&self.serial_irq, SERIAL_GSI);
        if stuck > 0 {
            return Err(VmError::StuckVcpus(stuck, STOP_TIMEOUT));
        }
        Ok(reason)
    }
}

/// Kicks vCPU threads until all have finished; returns how many are still running.
fn stop_vcpus(handles: &[JoinHandle<()>]) -> usize {
    let start = Instant::now();
    loop {
        let running: Vec<&JoinHandle<()>> = handles.iter().filter(|h| !h.is_finished()).collect();
        if running.is_empty() {
            return 0;
        }
        if start.elapsed() > STOP_TIMEOUT {
            return running.len();
        }
        for h in running {
            kick::kick(h);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Requests an error exit if the vCPU thread ends without one (including by panic).
struct ExitGuard<'a>(&'a ExitRequester, u32);

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        self.0.request(GuestExit::Error(format!(
            "vCPU {} thread ended unexpectedly",
            self.1
        )));
    }
}

fn vcpu_thread(mut vcpu: Box<dyn Vcpu>, pio: &Bus, mmio: &Bus, exit: &ExitRequester) {
    let index = vcpu.index();
    let _guard = ExitGuard(exit, index);
    if let Err(e) = vcpu.bind_to_thread() {
        exit.request(GuestExit::Error(e.to_string()));
        return;
    }
    while !exit.should_stop() {
        let mut shutdown = false;
        match vcpu.run() {
            Ok(VcpuExit::IoIn { port, size, data }) => {
                for chunk in data.chunks_mut(usize::from(size.max(1))) {
                    pio.read(u64::from(port), chunk);
                }
            }
            Ok(VcpuExit::IoOut { port, size, data }) => {
                for chunk in data.chunks(usize::from(size.max(1))) {
                    if !pio.write(u64::from(port), chunk) {
                        tracing::trace!(port, ?chunk, "unhandled port write");
                    }
                }
            }
            Ok(VcpuExit::MmioRead { addr, data }) => {
                mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite { addr, data }) => {
                mmio.write(addr, data);
            }
            Ok(VcpuExit::Interrupted) | Ok(VcpuExit::Halted) => {}
            Ok(VcpuExit::Shutdown) => shutdown = true,
            Ok(VcpuExit::Reset) => exit.request(GuestExit::Reset("platform reset")),
            Ok(VcpuExit::PowerOff) => {
                tracing::debug!(vcpu = index, "platform power-off event");
                exit.request(GuestExit::PowerOff)
            }
            Err(e) => exit.request(GuestExit::Error(e.to_string())),
        }
        if shutdown {
            let rip = vcpu.instruction_pointer().unwrap_or(0);
            exit.request(GuestExit::TripleFault { vcpu: index, rip });
        }
    }
}
