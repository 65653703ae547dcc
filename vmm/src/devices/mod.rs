//! The devices the VMM maps itself. COM1 ([`serial`]) and the RTC ([`rtc`]) are the in-VMM
//! defaults, on the bus when no daemon serves their ports: bus adapters over
//! `rqemu-emulated-backend`, the code `rqemu-serial` and `rqemu-rtc` serve. The i8042
//! ([`i8042`]) and ACPI PM ([`acpi_pm`]) are the machine's reset and power-off controls: their
//! only effect is to end the VMM's run.

pub mod acpi_pm;
pub mod i8042;
pub mod rtc;
pub mod serial;
