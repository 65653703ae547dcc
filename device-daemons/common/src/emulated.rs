//! Start-up shared by the emulated-device daemons (`rqemu-serial`, `rqemu-rtc`): the
//! seqpacket listening socket of the forwarding protocol and the exit on a termination
//! signal, plus the `--base` port argument.

use std::io;
use std::os::fd::RawFd;
use std::path::Path;

use rqemu_protocol::sys::SeqListener;

/// Parses a port number, decimal or `0x` hexadecimal (clap `value_parser`).
pub fn parse_port(s: &str) -> Result<u16, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u16::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?} is not a port number: {e}"))
}

/// Blocks the termination signals in every thread, listens on `--socket PATH` or the
/// inherited `--fd N`, and exits 0 on SIGTERM/SIGINT/SIGHUP (removing the socket file it
/// bound). Emulated devices hold no data to flush: the VMM keeps their state.
pub fn listen(socket: Option<&Path>, fd: Option<RawFd>) -> io::Result<SeqListener> {
    crate::signals::block_termination_signals()?;
    let listener = SeqListener::from_args(socket, fd)?;
    let path = socket.map(Path::to_path_buf);
    crate::signals::spawn_handler(move |sig| {
        tracing::info!("signal {sig}: exiting");
        if let Some(p) = path {
            let _ = std::fs::remove_file(p);
        }
        std::process::exit(0);
    })?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_in_decimal_and_hex() {
        assert_eq!(parse_port("0x3f8"), Ok(0x3f8));
        assert_eq!(parse_port("0X70"), Ok(0x70));
        assert_eq!(parse_port("1016"), Ok(1016));
        assert!(parse_port("0x10000").is_err());
        assert!(parse_port("com1").is_err());
        assert!(parse_port("").is_err());
    }
}
