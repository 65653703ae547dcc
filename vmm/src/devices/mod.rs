//! In-VMM legacy devices (each in its own file). They move out of process in a later issue.

pub mod acpi_pm;
pub mod i8042;
pub mod ioapic;
pub mod lapic;
pub mod pic8259;
pub mod pit8254;
pub mod rtc;
pub mod serial;
pub mod virtio_empty;
