//! What the emulated-device daemons (`rqemu-serial`, `rqemu-rtc`) share beyond the common
//! start-up ([`crate::startup`]): the `--base` port argument and the accept loop ([`serve`]).

use std::sync::{Arc, Mutex};

use rqemu_protocol::sys::SeqListener;
use rqemu_protocol::{DeviceInfo, EmulatedDevice, Interrupts};

/// Tells the service manager the daemon is ready (`READY=1`), then serves VMM connections one
/// after the other with [`rqemu_protocol::serve`] (returns only if accepting fails).
pub fn serve<D: EmulatedDevice + 'static>(
    listener: &SeqListener,
    info: &DeviceInfo,
    dev: Arc<Mutex<D>>,
    irqs: &Interrupts,
) -> std::io::Result<()> {
    crate::notify::ready(&format!("{}: waiting for a VMM", info.name));
    rqemu_protocol::serve(listener, info, dev, irqs)
}

/// Parses a port number, decimal or `0x` hexadecimal (clap `value_parser`).
pub fn parse_port(s: &str) -> Result<u16, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u16::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?} is not a port number: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_in_decimal_and_hex() {
        assert_eq!(parse_port("0x3f8"), Ok(0x3f8));
        assert_eq!(parse_port("0X70"), Ok(0x70));
        assert_eq!(parse_port("1016"), Ok(1016));
        for bad in ["0x10000", "com1", "", "-1"] {
            let err = parse_port(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }
}
