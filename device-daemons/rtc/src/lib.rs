//! `rqemu-rtc`: the MC146818 CMOS RTC served over the rqemu forwarding protocol. The register
//! logic is in [`cmos`], usable in-process too.

pub mod cmos;

pub use cmos::{device_info, DateTime, Rtc};
