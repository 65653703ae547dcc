//! Socket activation: the listening socket handed over by systemd (or `systemd-socket-activate`)
//! through the `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES` protocol (`sd_listen_fds(3)`), taken
//! without any flag. `--socket`/`--fd` still win when given.
//!
//! [`init`] reads the variables once, in the still single-threaded start-up, marks the passed
//! fds close-on-exec and removes the variables (a child must not take them for its own);
//! [`inherited`] then answers from that record.

use std::os::fd::RawFd;
use std::sync::OnceLock;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The `FileDescriptorName=` that picks the listening socket when several are passed.
pub const LISTEN_NAME: &str = "listen";

/// Errors reading the socket-activation variables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_PID` or `LISTEN_FDS` is not a number.
    #[error("socket activation: {var}={value:?} is not a number")]
    NotANumber {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// Several sockets were passed and none is named [`LISTEN_NAME`].
    #[error(
        "socket activation passed {count} sockets ({names}) and none is named \
         `{LISTEN_NAME}`: set FileDescriptorName={LISTEN_NAME} on the listening one"
    )]
    Ambiguous {
        /// How many fds were passed.
        count: usize,
        /// Their names, as `LISTEN_FDNAMES` gives them.
        names: String,
    },
}

/// The listening socket systemd passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    /// The fd (validated later, as `--fd N` is: a listening UNIX socket of the right type).
    pub fd: RawFd,
    /// Its name (`FileDescriptorName=`, by default the socket unit's name), if given.
    pub name: Option<String>,
    /// How many fds were passed in all.
    pub count: usize,
}

/// Interprets the activation variables for the process `pid` (`sd_listen_fds` semantics: the
/// variables are for us only if `LISTEN_PID` is our pid; no `LISTEN_FDS` or zero fds is no
/// activation).
pub fn parse(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    fdnames: Option<&str>,
    pid: u32,
) -> Result<Option<Activation>, ActivationError> {
    let number = |var: &'static str, value: &str| -> Result<u64, ActivationError> {
        value
            .trim()
            .parse::<u64>()
            .map_err(|_| ActivationError::NotANumber {
                var,
                value: value.to_string(),
            })
    };
    let (Some(p), Some(n)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    if number("LISTEN_PID", p)? != u64::from(pid) {
        return Ok(None);
    }
    let count = number("LISTEN_FDS", n)?;
    // More fds than any process may hold is nonsense; treat it like a non-number.
    let count = usize::try_from(count)
        .ok()
        .filter(|&c| c <= 65536)
        .ok_or_else(|| ActivationError::NotANumber {
            var: "LISTEN_FDS",
            value: n.to_string(),
        })?;
    if count == 0 {
        return Ok(None);
    }
    let names: Vec<&str> = fdnames.map(|s| s.split(':').collect()).unwrap_or_default();
    let name_of = |i: usize| names.get(i).map(|s| s.to_string());
    let index = if count == 1 {
        0
    } else {
        (0..count)
            .find(|&i| names.get(i) == Some(&LISTEN_NAME))
            .ok_or_else(|| ActivationError::Ambiguous {
                count,
                names: fdnames.unwrap_or("unnamed").to_string(),
            })?
    };
    Ok(Some(Activation {
        fd: LISTEN_FDS_START + index as RawFd,
        name: name_of(index),
        count,
    }))
}

static INHERITED: OnceLock<Option<Activation>> = OnceLock::new();

/// Reads the activation variables of this process (once; later calls return the first answer),
/// marks every passed fd close-on-exec and removes the variables from the environment. Call it
/// before any thread exists (it changes the environment).
pub fn init() -> Result<Option<Activation>, ActivationError> {
    if let Some(a) = INHERITED.get() {
        return Ok(a.clone());
    }
    let var = |k: &str| std::env::var(k).ok();
    let found = parse(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )?;
    if let Some(a) = &found {
        for fd in LISTEN_FDS_START..LISTEN_FDS_START + a.count as RawFd {
            // SAFETY: fcntl on an fd number only changes that fd's flags (EBADF if not open).
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(k);
        }
    }
    Ok(INHERITED.get_or_init(|| found).clone())
}

/// The listening socket passed by socket activation, as [`init`] found it (`None` before
/// `init` or without activation).
pub fn inherited() -> Option<&'static Activation> {
    INHERITED.get().and_then(Option::as_ref)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_variables_for_this_pid_count() {
        assert_eq!(parse(None, None, None, 7), Ok(None));
        assert_eq!(parse(Some("8"), Some("1"), None, 7), Ok(None));
        assert_eq!(parse(Some("7"), None, None, 7), Ok(None));
        assert_eq!(parse(None, Some("1"), None, 7), Ok(None));
        assert_eq!(parse(Some("7"), Some("0"), None, 7), Ok(None));
        let a = parse(Some("7"), Some("1"), None, 7).unwrap().unwrap();
        assert_eq!((a.fd, a.name, a.count), (3, None, 1));
        let a = parse(Some("7"), Some("1"), Some("rqemu-blk@vm1.socket"), 7)
            .unwrap()
            .unwrap();
        assert_eq!(a.name.as_deref(), Some("rqemu-blk@vm1.socket"));
    }

    #[test]
    fn bad_numbers_are_errors_naming_the_variable() {
        let e = parse(Some("x"), Some("1"), None, 7).unwrap_err();
        assert!(e.to_string().contains("LISTEN_PID=\"x\""), "{e}");
        let e = parse(Some("7"), Some("-1"), None, 7).unwrap_err();
        assert!(e.to_string().contains("LISTEN_FDS"), "{e}");
        let e = parse(Some("7"), Some("99999999999"), None, 7).unwrap_err();
        assert!(e.to_string().contains("LISTEN_FDS"), "{e}");
    }

    #[test]
    fn several_sockets_need_one_named_listen() {
        let a = parse(Some("7"), Some("3"), Some("a:listen:b"), 7)
            .unwrap()
            .unwrap();
        assert_eq!((a.fd, a.name.as_deref(), a.count), (4, Some("listen"), 3));
        let e = parse(Some("7"), Some("2"), Some("a:b"), 7).unwrap_err();
        assert!(e.to_string().contains("FileDescriptorName=listen"), "{e}");
        assert!(parse(Some("7"), Some("2"), None, 7).is_err());
    }
}
