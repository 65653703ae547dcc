//! The interrupt and timer chips of the software accelerator: what KVM's in-kernel irqchip
//! and PIT provide, written in userspace because the TCG CPU has no kernel to lean on. They
//! belong to the accelerator, not to the machine's devices: a KVM machine never creates them,
//! and they cannot move out of process (every guest instruction may consult them). Combined
//! into one platform by [`super::chip::IrqChip`].

pub mod ioapic;
pub mod lapic;
pub mod pic8259;
pub mod pit8254;
