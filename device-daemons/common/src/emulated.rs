//! What the emulated-device daemons (`rqemu-serial`, `rqemu-rtc`) share beyond the common
//! start-up ([`crate::startup`]): the `--base` port argument and the accept loop ([`serve`],
//! which serves only peers of the daemon's uid or `--allow-uid`).

use std::sync::{Arc, Mutex};

use rqemu_protocol::sys::SeqListener;
use rqemu_protocol::{DeviceInfo, EmulatedDevice, Interrupts, ServeError};

use crate::notify;

/// Serves VMM connections one after the other, forever (a VMM restart reattaches), as
/// [`rqemu_protocol::serve`] does, telling the service manager `READY=1` first and a `STATUS=`
/// line as VMMs come and go. Returns only if accepting fails.
pub fn serve<D: EmulatedDevice + 'static>(
    listener: &SeqListener,
    info: &DeviceInfo,
    dev: Arc<Mutex<D>>,
    irqs: &Interrupts,
) -> std::io::Result<()> {
    let waiting = format!("{}: waiting for a VMM", info.name);
    notify::ready(&waiting);
    loop {
        let sock = listener.accept()?;
        // Owner-only service: a peer of another uid (not `--allow-uid`) is dropped unserved.
        if !rqemu_protocol::listen::peer_allowed(std::os::fd::AsRawFd::as_raw_fd(
            &std::os::fd::AsFd::as_fd(&sock),
        )) {
            continue;
        }
        notify::status(&format!("{}: serving a VMM", info.name));
        match rqemu_protocol::serve_connection(sock, info, &dev, irqs) {
            Ok(()) => tracing::info!("VMM disconnected; waiting for the next one"),
            Err(ServeError::Disconnected) => tracing::debug!("probe connection closed"),
            Err(e) => tracing::warn!("connection ended: {e}"),
        }
        notify::status(&waiting);
    }
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
