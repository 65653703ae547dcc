//! The seam to the VMM: MMIO, port I/O and interrupt delivery, and the reasons `run` returns.

/// What the VMM provides to the CPU. All methods are called on the vCPU thread.
pub trait Platform {
    /// MMIO read of `data.len()` bytes (1, 2, 4, 8 or 16) at guest-physical `gpa`.
    /// Unclaimed addresses should read as all ones.
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]);
    /// MMIO write of `data.len()` bytes (1, 2, 4, 8 or 16) at guest-physical `gpa`.
    fn mmio_write(&mut self, gpa: u64, data: &[u8]);
    /// Port input of `data.len()` bytes (1, 2 or 4).
    fn pio_read(&mut self, port: u16, data: &mut [u8]);
    /// Port output of `data.len()` bytes (1, 2 or 4).
    fn pio_write(&mut self, port: u16, data: &[u8]);
    /// Whether a maskable external interrupt is pending. Polled when RFLAGS.IF=1: on entry
    /// to `run`, at least every 16 blocks, and after every block that ended on a system
    /// instruction (STI, POPF, IRET, HLT, I/O, ...). Keep it cheap (an atomic load).
    fn interrupt_pending(&mut self) -> bool;
    /// Acknowledges the highest-priority pending external interrupt and returns its vector
    /// (INTA cycle). `None` if it vanished meanwhile (spurious).
    fn acknowledge_interrupt(&mut self) -> Option<u8>;
    /// Whether an NMI is pending; consumed by this call when it returns true.
    fn take_nmi(&mut self) -> bool {
        false
    }
    /// Polled after every port I/O or MMIO access: a device may ask the CPU loop to stop
    /// (reset, power-off). Returning `Some` makes `run` return [`Exit::Stop`].
    fn stop_requested(&mut self) -> Option<StopReason> {
        None
    }
    /// Writes to the local APIC TPR through CR8 (value 0..=15). Default: ignored.
    fn set_tpr(&mut self, _tpr: u8) {}
}

/// Why a device asked the CPU to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// System reset (i8042, 0xCF9, ACPI reset register).
    Reset,
    /// Power-off (ACPI sleep S5).
    PowerOff,
    /// Any other device-defined reason.
    Other(u32),
}

/// Why the CPU stopped with a triple fault or another unrecoverable condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShutdownReason {
    /// An exception happened while delivering a double fault.
    TripleFault {
        /// The vector of the fault that could not be delivered.
        vector: u8,
        /// RIP of the instruction that faulted.
        rip: u64,
    },
    /// Something this CPU does not support (e.g. executing from MMIO, real mode).
    Unsupported(String),
}

/// Why [`crate::Cpu::run`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `HLT` executed: the CPU waits for an interrupt. Call `run` again once
    /// `Platform::interrupt_pending` may be true (or for an NMI). With
    /// `interrupts_enabled == false` only an NMI or reset can wake it.
    Halted {
        /// RFLAGS.IF at the time.
        interrupts_enabled: bool,
    },
    /// Triple fault or unsupported state: the machine should reset or stop.
    Shutdown(ShutdownReason),
    /// The instruction budget given to `run` was used up.
    BudgetExhausted,
    /// A device requested a stop (see [`Platform::stop_requested`]).
    Stop(StopReason),
}
