//! In-VMM legacy devices (each in its own file). They move out of process in a later issue.

pub mod acpi_pm;
pub mod i8042;
pub mod rtc;
pub mod serial;
pub mod virtio_empty;
