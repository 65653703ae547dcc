//! Logging set-up for daemons (`--log-format text|json`).
//!
//! On a terminal: coloured, timestamped lines. Elsewhere: plain text. When stderr is the
//! systemd journal (`JOURNAL_STREAM` names it), lines carry no timestamp (the journal adds its
//! own) and start with the syslog priority of their level (`<3>` error ... `<7>` debug), which
//! the journal turns into the entry's priority (`SyslogLevelPrefix=`, on by default).

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable text (journal-aware).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs a stderr `tracing` subscriber writing text. The filter comes from `RQEMU_LOG`, then
/// `RUST_LOG`, then defaults to `info`. Safe to call more than once (later calls do nothing).
pub fn init() {
    init_with(LogFormat::Text);
}

/// [`init`] with the given line format.
pub fn init_with(format: LogFormat) {
    let filter = std::env::var("RQEMU_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false);
    if format == LogFormat::Json {
        let _ = builder.event_format(crate::log_json::Json).try_init();
    } else if stderr_is_journal() {
        let format = tracing_subscriber::fmt::format()
            .with_target(false)
            .without_time()
            .with_ansi(false);
        let _ = builder
            .with_ansi(false)
            .event_format(JournalPriority(format))
            .try_init();
    } else {
        let _ = builder.with_ansi(colour_wanted()).try_init();
    }
}

/// Colour codes only on a terminal, and never with `NO_COLOR` set (no-color.org): a log in a
/// file, a pipe or the journal stays plain text.
fn colour_wanted() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Whether stderr is the journal stream systemd connected (`JOURNAL_STREAM=DEV:INODE` of it).
fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    // SAFETY: an all-zero `stat` is a valid out-buffer for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on fd 2 writes into `st`, which outlives the call.
    if unsafe { libc::fstat(libc::STDERR_FILENO, &mut st) } != 0 {
        return false;
    }
    names_stream(&value, st.st_dev, st.st_ino)
}

/// Whether `JOURNAL_STREAM`'s value names the file `dev`:`ino`.
fn names_stream(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

/// The syslog priority of a `tracing` level.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Prefixes each line of the wrapped format with `<priority>`.
struct JournalPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for JournalPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_this_very_file() {
        assert!(names_stream("8:1234", 8, 1234));
        assert!(!names_stream("8:1234", 8, 1235));
        assert!(!names_stream("9:1234", 8, 1234));
        assert!(!names_stream("garbage", 8, 1234));
        assert!(!names_stream("", 0, 0));
    }

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
        assert_eq!(priority(&Level::TRACE), 7);
    }
}
