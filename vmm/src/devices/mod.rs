//! The in-VMM default devices, on the buses when no daemon serves them. Each is a bus adapter:
//! the register logic lives in `rqemu-emulated-backend`, shared with the daemons.

pub mod acpi_pm;
pub mod i8042;
pub mod rtc;
pub mod serial;
