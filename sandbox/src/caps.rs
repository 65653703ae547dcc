//! Capabilities: the bounding set reduced to what the policy keeps, ambient cleared, then
//! effective = permitted = the kept set, inheritable empty (raw `capset`, `prctl`).

use std::io;

/// Errors changing capabilities.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// `capset`/`capget` failed.
    #[error("{what}")]
    Syscall {
        /// Which call.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Capability numbers the policies use (linux/capability.h).
pub mod cap {
    /// Change file owners.
    pub const CHOWN: u32 = 0;
    /// Bypass file permission checks.
    pub const DAC_OVERRIDE: u32 = 1;
    /// Bypass read/search permission checks.
    pub const DAC_READ_SEARCH: u32 = 2;
    /// Bypass owner checks (chmod, utimes, ...).
    pub const FOWNER: u32 = 3;
    /// Keep set-user/group-ID bits on write.
    pub const FSETID: u32 = 4;
    /// setgid and friends.
    pub const SETGID: u32 = 6;
    /// setuid and friends.
    pub const SETUID: u32 = 7;
    /// Change the capability bounding set.
    pub const SETPCAP: u32 = 8;
    /// Network administration.
    pub const NET_ADMIN: u32 = 12;
    /// chroot.
    pub const SYS_CHROOT: u32 = 18;
    /// Mounts, namespaces, many more.
    pub const SYS_ADMIN: u32 = 21;
    /// mknod.
    pub const MKNOD: u32 = 27;
    /// Set file capabilities.
    pub const SETFCAP: u32 = 31;
}

const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's (effective, permitted) sets as 64-bit masks.
pub fn current() -> Result<(u64, u64), CapsError> {
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget writes two `Data` (version 3) into the array we pass.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) };
    if r != 0 {
        return Err(CapsError::Syscall {
            what: "capget",
            source: io::Error::last_os_error(),
        });
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(d[0].effective, d[1].effective),
        join(d[0].permitted, d[1].permitted),
    ))
}

/// Whether capability `c` is in the calling thread's effective set.
pub fn has(c: u32) -> bool {
    current().map(|(e, _)| e & (1 << c) != 0).unwrap_or(false)
}

/// Mask of a list of capabilities.
pub fn mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |m, c| m | (1u64 << c))
}

/// What [`drop_to`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dropped {
    /// Whether the bounding set could be reduced (needs CAP_SETPCAP).
    pub bounding_reduced: bool,
    /// The effective set left.
    pub effective: u64,
}

/// Reduces the bounding set to `keep` (when CAP_SETPCAP allows it), clears the ambient set,
/// and sets effective = permitted = `keep` ∩ permitted, inheritable = 0.
pub fn drop_to(keep: u64) -> Result<Dropped, CapsError> {
    let (_, permitted) = current()?;
    let mut bounding_reduced = true;
    for c in 0..64u32 {
        if keep & (1 << c) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, c as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            match io::Error::last_os_error().raw_os_error() {
                // Past the kernel's last capability.
                Some(libc::EINVAL) => break,
                _ => {
                    bounding_reduced = false;
                    break;
                }
            }
        }
    }
    // SAFETY: prctl with integer arguments; clearing the ambient set needs no privilege.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let set = keep & permitted;
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let d = [
        Data {
            effective: set as u32,
            permitted: set as u32,
            inheritable: 0,
        },
        Data {
            effective: (set >> 32) as u32,
            permitted: (set >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads the header and two `Data` (version 3).
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) };
    if r != 0 {
        return Err(CapsError::Syscall {
            what: "capset",
            source: io::Error::last_os_error(),
        });
    }
    Ok(Dropped {
        bounding_reduced,
        effective: current()?.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_sets_the_listed_bits() {
        assert_eq!(mask(&[cap::CHOWN, cap::SETFCAP]), 1 | (1 << 31));
        assert_eq!(mask(&[]), 0);
    }

    #[test]
    fn capget_reads_this_thread() {
        let (e, p) = current().unwrap();
        assert_eq!(e & !p, 0, "effective must be a subset of permitted");
    }
}
