//! Resource limits, set deliberately before anything else.
//!
//! - `RLIMIT_CORE` 0: a core dump would hold guest memory.
//! - `RLIMIT_NOFILE`: what the process needs (rqemu-fs keeps one fd per inode it knows, so it
//!   asks for many; the others few); clamped to the hard limit when raising it is not allowed.
//! - `RLIMIT_NPROC` only when the policy asks: it counts every thread of the *user*, so a low
//!   value would stop thread creation of an unprivileged daemon; new processes are forbidden by
//!   seccomp anyway (`clone` only with thread flags).

use std::io;

/// Errors setting a limit.
#[derive(Debug, thiserror::Error)]
pub enum RlimitError {
    /// `setrlimit` failed.
    #[error("setrlimit({resource}, {value})")]
    Set {
        /// The resource.
        resource: &'static str,
        /// The value asked.
        value: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The limits a policy sets (`None`: left as inherited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimits {
    /// `RLIMIT_NOFILE` (soft and hard).
    pub nofile: Option<u64>,
    /// `RLIMIT_NPROC` (soft and hard).
    pub nproc: Option<u64>,
    /// `RLIMIT_CORE` (soft and hard).
    pub core: Option<u64>,
}

impl Default for Rlimits {
    fn default() -> Self {
        Rlimits {
            nofile: Some(1024),
            nproc: None,
            core: Some(0),
        }
    }
}

fn get(resource: libc::__rlimit_resource_t) -> libc::rlimit {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    unsafe { libc::getrlimit(resource, &mut r) };
    r
}

fn set(
    resource: libc::__rlimit_resource_t,
    name: &'static str,
    value: u64,
) -> Result<u64, RlimitError> {
    let mut value = value;
    let r = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the struct we pass.
    let mut rc = unsafe { libc::setrlimit(resource, &r) };
    if rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
        // Raising above the hard limit needs CAP_SYS_RESOURCE: take the hard limit.
        let hard = get(resource).rlim_max;
        if hard < value {
            value = hard;
            let r = libc::rlimit {
                rlim_cur: hard,
                rlim_max: hard,
            };
            // SAFETY: as above.
            rc = unsafe { libc::setrlimit(resource, &r) };
        }
    }
    if rc != 0 {
        return Err(RlimitError::Set {
            resource: name,
            value,
            source: io::Error::last_os_error(),
        });
    }
    Ok(value)
}

/// Applies the limits; returns a description of what was set.
pub fn apply(limits: &Rlimits) -> Result<Vec<String>, RlimitError> {
    let mut done = Vec::new();
    for (res, name, v) in [
        (libc::RLIMIT_CORE, "RLIMIT_CORE", limits.core),
        (libc::RLIMIT_NOFILE, "RLIMIT_NOFILE", limits.nofile),
        (libc::RLIMIT_NPROC, "RLIMIT_NPROC", limits.nproc),
    ] {
        if let Some(v) = v {
            let got = set(res, name, v)?;
            done.push(format!("{name}={got}"));
        }
    }
    Ok(done)
}
