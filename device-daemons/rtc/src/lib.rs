//! `rqemu-rtc`: the MC146818 CMOS RTC (`rqemu-emulated-backend`) served over the rqemu
//! forwarding protocol.

pub mod cmos;

pub use cmos::{device_info, DateTime, RtcDevice};
