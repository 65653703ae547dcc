//! Logging set-up for daemons.

use tracing_subscriber::EnvFilter;

/// Installs a stderr `tracing` subscriber. The filter comes from `RQEMU_LOG`, then `RUST_LOG`,
/// then defaults to `info`. Safe to call more than once (later calls do nothing).
pub fn init() {
    let filter = std::env::var("RQEMU_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(colour_wanted())
        .try_init();
}

/// Colour codes only on a terminal, and never with `NO_COLOR` set (no-color.org): a log in a
/// file, a pipe or the journal stays plain text.
fn colour_wanted() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
