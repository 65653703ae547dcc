//! Transport-free logic of emulated (non-virtio) devices. `rqemu-rtc` serves it over the
//! forwarding protocol; `rqemu-vmm` maps the same code on its bus as the in-VMM default when
//! no RTC daemon is given, so there is one RTC implementation.
//!
//! (The 16550 UART is `vm-superio`'s, shared the same way by `rqemu-serial` and the VMM.)

pub mod cmos;
