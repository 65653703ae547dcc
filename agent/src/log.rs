//! Logging to the kernel console: every line is `rqemu-agent: <message>` on `/dev/console`
//! (the VM's serial port), so a failed container start is readable in the VMM's console log.
//! `/dev/kmsg` is not used: the kernel rate-limits user writes to it.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::OnceLock;

static CONSOLE: OnceLock<File> = OnceLock::new();

/// Opens `/dev/console` (after devtmpfs is mounted); until then, and if it cannot be opened,
/// lines go to standard error.
pub fn init() {
    if let Ok(f) = OpenOptions::new().write(true).open("/dev/console") {
        let _ = CONSOLE.set(f);
    }
}

/// Writes one line (one `write`, so lines of the agent and the kernel do not interleave).
pub fn line(args: fmt::Arguments<'_>) {
    let text = format!("rqemu-agent: {args}\n");
    let _ = match CONSOLE.get() {
        Some(mut f) => f.write_all(text.as_bytes()),
        None => std::io::stderr().write_all(text.as_bytes()),
    };
}

/// `alog!("format", args...)`: one console line with the agent's prefix.
#[macro_export]
macro_rules! alog {
    ($($arg:tt)*) => { $crate::log::line(format_args!($($arg)*)) };
}
