//! Signal names and numbers as `kill` takes them (runc's forms: `TERM`, `SIGTERM`, `15`).

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown signal {0:?}")]
    Unknown(String),
}

const NAMES: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("IOT", libc::SIGIOT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("POLL", libc::SIGPOLL),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

/// Largest signal number (Linux x86-64 `SIGRTMAX`).
pub const MAX_SIGNAL: i32 = 64;

/// Parses a signal name (with or without `SIG`, any case) or number (1..=64).
pub fn parse(s: &str) -> Result<i32, Error> {
    let unknown = || Error::Unknown(s.to_string());
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=MAX_SIGNAL).contains(&n) {
            Ok(n)
        } else {
            Err(unknown())
        };
    }
    let up = s.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .ok_or_else(unknown)
}

/// Whether the default action of `sig` leaves the process running (so a container that is
/// not running yet need not end for it).
pub fn harmless_by_default(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGCHLD | libc::SIGCONT | libc::SIGURG | libc::SIGWINCH
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(parse("TERM").unwrap(), 15);
        assert_eq!(parse("SIGTERM").unwrap(), 15);
        assert_eq!(parse("sigkill").unwrap(), 9);
        assert_eq!(parse("9").unwrap(), 9);
        assert_eq!(parse("WINCH").unwrap(), 28);
        assert_eq!(parse("64").unwrap(), 64);
        for bad in ["0", "65", "-1", "FOO", "SIG", ""] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
