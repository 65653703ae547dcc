//! One KVM vCPU.

use kvm_ioctls::VcpuFd;

use super::{hv, regs};
use crate::accel::{kick, AccelError, BootState, Result, Vcpu, VcpuExit};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// A KVM vCPU; `run()` maps KVM exits to [`VcpuExit`].
pub struct KvmVcpu {
    fd: VcpuFd,
    index: u32,
    /// `&mut kvm_run.immediate_exit` inside the vCPU's `kvm_run` mapping (owned by `fd`).
    immediate_exit: *mut u8,
    armed: bool,
}

// SAFETY: `immediate_exit` points into the kvm_run mapping owned by `fd`, which moves with
// the struct; it is only dereferenced by the thread that currently owns the struct (and by
// that thread's kick signal handler once armed).
unsafe impl Send for KvmVcpu {}

impl KvmVcpu {
    pub(super) fn new(mut fd: VcpuFd, index: u32) -> Self {
        let immediate_exit = std::ptr::addr_of_mut!(fd.get_kvm_run().immediate_exit);
        KvmVcpu {
            fd,
            index,
            immediate_exit,
            armed: false,
        }
    }

    fn clear_immediate_exit(&self) {
        // SAFETY: see the field comment: valid for the lifetime of `self.fd`.
        unsafe { std::ptr::write_volatile(self.immediate_exit, 0) };
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        if self.armed {
            kick::disarm_thread();
        }
    }
}

impl Vcpu for KvmVcpu {
    fn index(&self) -> u32 {
        self.index
    }

    fn set_boot_state(&mut self, state: &BootState) -> Result<()> {
        regs::load_boot_state(&self.fd, state)
    }

    fn bind_to_thread(&mut self) -> Result<()> {
        kick::install_handler()?;
        // SAFETY: `immediate_exit` stays valid until `self` is dropped, and `Drop` disarms
        // the thread first. The struct is not moved to another thread after binding (the
        // vCPU loop owns it on this thread until it returns).
        unsafe { kick::arm_thread(self.immediate_exit) };
        self.armed = true;
        Ok(())
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        let index = self.index;
        match self.fd.run() {
            Ok(_) => {}
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.clear_immediate_exit();
                return Ok(VcpuExit::Interrupted);
            }
            Err(e) => return Err(hv("KVM_RUN")(e)),
        }
        // Decode the exit from kvm_run ourselves: kvm-ioctls' exit drops the I/O size.
        let run = self.fd.get_kvm_run();
        let reason = run.exit_reason;
        match reason {
            kvm_bindings::KVM_EXIT_IO => {
                // SAFETY: exit_reason says `io` is the active union member.
                let io = unsafe { run.__bindgen_anon_1.io };
                let len = usize::from(io.size) * io.count as usize;
                let off = io.data_offset as usize;
                let page = std::mem::size_of::<kvm_bindings::kvm_run>().max(4096);
                if off.checked_add(len).is_none_or(|end| end > page * 2) {
                    return Err(AccelError::Guest {
                        vcpu: index,
                        msg: "KVM_EXIT_IO data outside kvm_run".into(),
                    });
                }
                let base = run as *mut kvm_bindings::kvm_run as *mut u8;
                // SAFETY: the kernel placed `len` bytes of I/O data at `data_offset` inside
                // the kvm_run mapping (at least 2 pages on x86 incl. the PIO page); the slice
                // lives no longer than the `&mut self` borrow.
                let data = unsafe { std::slice::from_raw_parts_mut(base.add(off), len) };
                Ok(if u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_IN {
                    VcpuExit::IoIn {
                        port: io.port,
                        size: io.size,
                        data,
                    }
                } else {
                    VcpuExit::IoOut {
                        port: io.port,
                        size: io.size,
                        data,
                    }
                })
            }
            kvm_bindings::KVM_EXIT_MMIO => {
                // SAFETY: exit_reason says `mmio` is the active union member.
                let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
                let len = (mmio.len as usize).min(mmio.data.len());
                if mmio.is_write != 0 {
                    Ok(VcpuExit::MmioWrite {
                        addr: mmio.phys_addr,
                        data: &mmio.data[..len],
                    })
                } else {
                    Ok(VcpuExit::MmioRead {
                        addr: mmio.phys_addr,
                        data: &mut mmio.data[..len],
                    })
                }
            }
            kvm_bindings::KVM_EXIT_HLT => Ok(VcpuExit::Halted),
            kvm_bindings::KVM_EXIT_SHUTDOWN => Ok(VcpuExit::Shutdown),
            kvm_bindings::KVM_EXIT_INTR => Ok(VcpuExit::Interrupted),
            kvm_bindings::KVM_EXIT_SYSTEM_EVENT => {
                // SAFETY: exit_reason says `system_event` is the active union member.
                let ty = unsafe { run.__bindgen_anon_1.system_event.type_ };
                match ty {
                    KVM_SYSTEM_EVENT_SHUTDOWN => Ok(VcpuExit::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => Ok(VcpuExit::Reset),
                    t => Err(AccelError::Guest {
                        vcpu: index,
                        msg: format!("KVM system event {t}"),
                    }),
                }
            }
            kvm_bindings::KVM_EXIT_FAIL_ENTRY => {
                // SAFETY: exit_reason says `fail_entry` is the active union member.
                let fe = unsafe { run.__bindgen_anon_1.fail_entry };
                Err(AccelError::Guest {
                    vcpu: index,
                    msg: format!(
                        "VM entry failed (hardware reason {:#x})",
                        fe.hardware_entry_failure_reason
                    ),
                })
            }
            kvm_bindings::KVM_EXIT_INTERNAL_ERROR => {
                // SAFETY: exit_reason says `internal` is the active union member.
                let ie = unsafe { run.__bindgen_anon_1.internal };
                Err(AccelError::Guest {
                    vcpu: index,
                    msg: format!("KVM internal error (suberror {})", ie.suberror),
                })
            }
            other => Err(AccelError::Guest {
                vcpu: index,
                msg: format!("unhandled KVM exit reason {other}"),
            }),
        }
    }

    fn instruction_pointer(&mut self) -> Option<u64> {
        self.fd.get_regs().ok().map(|r| r.rip)
    }
}
