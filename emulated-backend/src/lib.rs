//! Transport-free logic of emulated (non-virtio) devices: each is written once, served by its
//! daemon over the forwarding protocol and mapped by `rqemu-vmm` on its bus as the in-VMM
//! default when no daemon is given.
//!
//! * [`cmos`] — the MC146818 CMOS RTC (`rqemu-rtc`, the in-VMM RTC);
//! * [`uart16550`] — the 16550A UART (`rqemu-serial`, the in-VMM COM1).

pub mod cmos;
pub mod uart16550;
