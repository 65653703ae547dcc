//! KVM accelerator: in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT, KVM irqfd/ioeventfd,
//! one [`KvmVcpu`] per vCPU thread.

mod cpuid;
mod regs;
mod vcpu;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, NoDatamatch, VmFd};
use vm_memory::{GuestMemory as _, GuestMemoryRegion as _};
use vmm_sys_util::eventfd::EventFd;

pub use vcpu::KvmVcpu;

use super::{AccelError, Accelerator, CpuTopology, IoEventAddress, IoEventBinding, Result, Vcpu};
use crate::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::memory::GuestRam;

const KVM_PIT_SPEAKER_DUMMY: u32 = 1;

fn hv(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> AccelError {
    move |e| AccelError::Hypervisor {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// The KVM VM.
pub struct KvmAccel {
    kvm: Kvm,
    vm: VmFd,
    supported_cpuid: CpuId,
}

impl std::fmt::Debug for KvmAccel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmAccel").finish_non_exhaustive()
    }
}

impl KvmAccel {
    /// Opens `/dev/kvm` and creates a VM with the in-kernel irqchip, PIT, TSS and identity map.
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| {
            AccelError::Unavailable(format!(
                "KVM is not available: opening /dev/kvm: {}",
                std::io::Error::from_raw_os_error(e.errno())
            ))
        })?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(AccelError::Unavailable(format!("KVM lacks {name}")));
            }
        }
        let vm = kvm
            .create_vm()
            .map_err(|e| AccelError::Unavailable(format!("KVM_CREATE_VM failed: {e}")))?;
        vm.set_tss_address(KVM_TSS_START as usize)
            .map_err(hv("KVM_SET_TSS_ADDR"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(hv("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.create_irq_chip().map_err(hv("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(hv("KVM_CREATE_PIT2"))?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(hv("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(KvmAccel {
            kvm,
            vm,
            supported_cpuid,
        })
    }

    /// The VM file descriptor (for features not in the seam yet).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }
}

fn datamatch_call<R>(
    datamatch: Option<u32>,
    with: impl FnOnce(u32) -> R,
    without: impl FnOnce(NoDatamatch) -> R,
) -> R {
    match datamatch {
        Some(v) => with(v),
        None => without(NoDatamatch),
    }
}

fn kvm_addr(addr: IoEventAddress) -> kvm_ioctls::IoEventAddress {
    match addr {
        IoEventAddress::Pio(p) => kvm_ioctls::IoEventAddress::Pio(u64::from(p)),
        IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
    }
}

impl Accelerator for KvmAccel {
    fn name(&self) -> &'static str {
        "kvm"
    }

    /// kvmclock (the guest's clock source under KVM) is set back by the pause, so the guest
    /// sees no time pass; the raw TSC keeps running (documented limitation).
    fn hold_clock(&self, paused: std::time::Duration) {
        let held = match self.vm.get_clock() {
            Ok(mut c) => {
                let ns = u64::try_from(paused.as_nanos()).unwrap_or(u64::MAX);
                c.clock = c.clock.saturating_sub(ns);
                c.flags = 0;
                self.vm.set_clock(&c)
            }
            Err(e) => Err(e),
        };
        if let Err(e) = held {
            tracing::warn!("KVM_GET/SET_CLOCK: the guest clock jumps by the pause: {e}");
        }
    }

    fn map_ram(&self, ram: &GuestRam) -> Result<()> {
        for (slot, region) in ram.memory().iter().enumerate() {
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `ram`, which the VMM keeps alive
            // (and unmodified in layout) for as long as the VM exists.
            unsafe { self.vm.set_user_memory_region(mr) }
                .map_err(hv("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    fn create_vcpu(&self, index: u32, topology: &CpuTopology) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .vm
            .create_vcpu(u64::from(index))
            .map_err(hv("KVM_CREATE_VCPU"))?;
        let tsc_deadline = self.kvm.check_extension(Cap::TscDeadlineTimer);
        let cpuid = cpuid::vcpu_cpuid(&self.supported_cpuid, index, topology, tsc_deadline)?;
        fd.set_cpuid2(&cpuid).map_err(hv("KVM_SET_CPUID2"))?;
        regs::setup_msrs(&fd)?;
        regs::setup_fpu(&fd)?;
        regs::setup_lapic(&fd)?;
        Ok(Box::new(KvmVcpu::new(fd, index)))
    }

    fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()> {
        self.vm.set_irq_line(gsi, level).map_err(hv("KVM_IRQ_LINE"))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.vm.register_irqfd(fd, gsi).map_err(hv("KVM_IRQFD"))
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.vm
            .unregister_irqfd(fd, gsi)
            .map_err(hv("KVM_IRQFD (deassign)"))
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<IoEventBinding> {
        let a = kvm_addr(addr);
        datamatch_call(
            datamatch,
            |v| self.vm.register_ioevent(fd, &a, v),
            |n| self.vm.register_ioevent(fd, &a, n),
        )
        .map_err(hv("KVM_IOEVENTFD"))?;
        Ok(IoEventBinding::InKernel)
    }

    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let a = kvm_addr(addr);
        datamatch_call(
            datamatch,
            |v| self.vm.unregister_ioevent(fd, &a, v),
            |n| self.vm.unregister_ioevent(fd, &a, n),
        )
        .map_err(hv("KVM_IOEVENTFD (deassign)"))
    }
}
