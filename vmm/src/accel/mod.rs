//! The accelerator seam: what the machine model needs from a CPU backend.
//!
//! Two traits, implemented by KVM ([`kvm`]) and by the software CPU ([`tcg`], over `rqemu-tcg`):
//!
//! * [`Accelerator`] — VM-wide: map guest RAM, create vCPUs, raise interrupts by **GSI**
//!   (KVM: the in-kernel IOAPIC/PIC via `KVM_IRQ_LINE`; TCG: its userspace IOAPIC),
//!   bind **irqfds** (an eventfd that raises a GSI when signalled — KVM: `KVM_IRQFD`; TCG: a
//!   thread polling the eventfds) and **ioevents** (a guest write to an address signals an
//!   eventfd without a userspace exit — KVM: `KVM_IOEVENTFD`, reported as
//!   [`IoEventBinding::InKernel`]; TCG: [`IoEventBinding::ViaBus`], the VMM then registers the
//!   same binding on its [`crate::bus::Bus`], which signals the eventfd itself).
//! * [`Vcpu`] — one per vCPU thread: load the boot state computed by the machine model
//!   ([`BootState`]: full architectural state for the 64-bit Linux entry or the 32-bit PVH
//!   entry; the page tables and GDT it points to are already in guest RAM), and `run()` until
//!   an exit the VMM must handle ([`VcpuExit`]: port/MMIO accesses that the VMM dispatches on
//!   its buses, shutdown, reset, power-off, or `Interrupted` after a kick).
//!
//! ## Kicking vCPUs out of `run()`
//! The VMM stops vCPUs by setting its exit flag and sending [`kick::KICK_SIGNAL`] to every
//! vCPU thread. Each `Vcpu` calls [`kick::arm_thread`] from [`Vcpu::bind_to_thread`] (on its
//! own thread) with a byte the signal handler sets to 1: KVM passes `kvm_run.immediate_exit`,
//! so a kick that lands just before `KVM_RUN` still makes it return at once; a software CPU
//! passes a flag it checks between translated blocks. `run()` then returns
//! [`VcpuExit::Interrupted`] and the vCPU loop re-checks the exit flag.
//!
//! Secondary vCPUs are created but not given a [`BootState`]: they wait for INIT/SIPI from
//! the boot vCPU like on real hardware.

pub mod kick;
pub mod kvm;
pub mod tcg;

use vmm_sys_util::eventfd::EventFd;

use std::sync::Arc;
use std::time::Duration;

use crate::bus::Bus;
use crate::exit::ExitRequester;
use crate::memory::GuestRam;

/// Errors from an accelerator.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// The accelerator cannot be used on this host.
    #[error("{0}")]
    Unavailable(String),
    /// A hypervisor call failed.
    #[error("{op}: {source}")]
    Hypervisor {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The guest did something the accelerator cannot continue from.
    #[error("vCPU {vcpu}: {msg}")]
    Guest {
        /// vCPU index.
        vcpu: u32,
        /// Description.
        msg: String,
    },
}

/// Result alias for accelerator operations.
pub type Result<T> = std::result::Result<T, AccelError>;

/// CPU topology of the machine: `count` vCPUs, one socket, one thread per core;
/// vCPU `i` has APIC ID `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTopology {
    /// Number of vCPUs.
    pub count: u32,
}

impl CpuTopology {
    /// APIC ID of vCPU `index`.
    pub fn apic_id(&self, index: u32) -> u32 {
        index
    }
}

/// A segment register's hidden state (as in `kvm_segment`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit (byte granular, already expanded).
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Type field (4 bits).
    pub type_: u8,
    /// Present.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (32-bit).
    pub db: bool,
    /// Code/data (true) or system (false) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity (4 KiB).
    pub g: bool,
}

/// A descriptor table register.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Base address.
    pub base: u64,
    /// Limit.
    pub limit: u16,
}

/// Complete architectural state of the boot vCPU at the kernel's entry point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootState {
    /// Entry point.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// RSI (Linux 64-bit entry: address of `boot_params`).
    pub rsi: u64,
    /// RBX (PVH entry: address of `hvm_start_info`).
    pub rbx: u64,
    /// RFLAGS (bit 1 always set).
    pub rflags: u64,
    /// CR0.
    pub cr0: u64,
    /// CR3 (page-table root, 0 with paging off).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// CS.
    pub cs: Segment,
    /// DS, ES, FS, GS, SS.
    pub data: Segment,
    /// TR (a busy TSS descriptor; VMX requires a usable TR).
    pub tr: Segment,
    /// GDTR.
    pub gdt: DescriptorTable,
    /// IDTR.
    pub idt: DescriptorTable,
}

/// Address of an ioevent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEventAddress {
    /// Port I/O.
    Pio(u16),
    /// MMIO.
    Mmio(u64),
}

/// Who signals an ioevent's eventfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEventBinding {
    /// The accelerator does it (no userspace exit).
    InKernel,
    /// The VMM's bus must do it: call [`crate::bus::Bus::add_ioevent`].
    ViaBus,
}

/// Why [`Vcpu::run`] returned.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// `in` from `port`: fill `data`, which holds `data.len() / size` consecutive accesses
    /// of `size` bytes (more than one for `rep ins`).
    IoIn {
        /// Port.
        port: u16,
        /// Size of one access (1, 2 or 4).
        size: u8,
        /// Buffer to fill.
        data: &'a mut [u8],
    },
    /// `out` of `data` to `port`, as `data.len() / size` accesses of `size` bytes.
    IoOut {
        /// Port.
        port: u16,
        /// Size of one access (1, 2 or 4).
        size: u8,
        /// Written bytes.
        data: &'a [u8],
    },
    /// MMIO read at `addr`: fill `data`.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Buffer to fill.
        data: &'a mut [u8],
    },
    /// MMIO write of `data` at `addr`.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Written bytes.
        data: &'a [u8],
    },
    /// Kicked (signal / immediate exit): re-check the VMM's exit flag and run again.
    Interrupted,
    /// The vCPU halted with nothing to wake it (never returned by an in-kernel irqchip).
    Halted,
    /// Triple fault / shutdown.
    Shutdown,
    /// The platform asked for a reset (e.g. KVM system event).
    Reset,
    /// The platform asked for power-off (e.g. KVM system event).
    PowerOff,
}

/// One virtual CPU. Moved to, and used only on, its own thread.
pub trait Vcpu: Send {
    /// Index of this vCPU (0 = boot CPU).
    fn index(&self) -> u32;
    /// Loads the boot CPU's entry state (only called for vCPU 0).
    fn set_boot_state(&mut self, state: &BootState) -> Result<()>;
    /// Starts the vCPU's own helper threads (the TCG JIT's compile thread); called once on
    /// the main thread, confined, before the vCPU thread is spawned (vCPU threads may not
    /// create threads).
    fn start_helpers(&mut self) -> Result<()> {
        Ok(())
    }
    /// Arms kick handling; called once on the vCPU thread before the first `run`.
    fn bind_to_thread(&mut self) -> Result<()>;
    /// Runs the guest until the next exit the VMM must handle.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    /// Current instruction pointer, for diagnostics.
    fn instruction_pointer(&mut self) -> Option<u64>;
}

/// A VM-wide CPU backend.
pub trait Accelerator: Send + Sync {
    /// Short name ("kvm", "tcg").
    fn name(&self) -> &'static str;
    /// How many vCPUs this accelerator can run in parallel: a machine asking for more is
    /// refused, never run with fewer CPUs than asked.
    fn max_vcpus(&self) -> u32 {
        u32::MAX
    }
    /// Makes guest RAM visible to the vCPUs.
    fn map_ram(&self, ram: &GuestRam) -> Result<()>;
    /// Gives the accelerator the VMM's buses and exit flag before vCPUs are created
    /// (accelerators that dispatch port/MMIO accesses themselves, like TCG, need them and
    /// stop right after an access that requested the VM's exit; KVM exits instead).
    fn attach_buses(&self, _pio: &Arc<Bus>, _mmio: &Arc<Bus>, _exit: &ExitRequester) -> Result<()> {
        Ok(())
    }
    /// The VM was paused for `paused` (every vCPU parked): the guest clock must continue
    /// from where it stopped, not jump ahead. Called before the vCPUs run again.
    fn hold_clock(&self, _paused: Duration) {}
    /// Starts the accelerator's helper threads (TCG: the irqfd poller). Called by the VM once
    /// the process is confined (a sandbox is entered while the process has one thread):
    /// irqfds registered before are served from then on.
    fn start_threads(&self) -> Result<()> {
        Ok(())
    }
    /// Creates vCPU `index` of `topology` with CPUID, MSRs, FPU and LAPIC set up like a
    /// real boot (boot state comes separately, see [`Vcpu::set_boot_state`]).
    fn create_vcpu(&self, index: u32, topology: &CpuTopology) -> Result<Box<dyn Vcpu>>;
    /// Sets the level of interrupt line `gsi`.
    fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()>;
    /// Makes a signal on `fd` raise (edge) `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    /// Undoes [`Accelerator::register_irqfd`].
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    /// Binds 4-byte guest writes to `addr` (of `datamatch`, if given) to `fd`.
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<IoEventBinding>;
    /// Undoes [`Accelerator::register_ioevent`].
    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()>;
}
