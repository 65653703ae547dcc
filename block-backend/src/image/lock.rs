//! Image locking compatible with QEMU's (`block/file-posix.c`): open-file-description (OFD)
//! byte-range locks on the image file, so QEMU, `qemu-img` and `rqemu-blk` see each other.
//!
//! QEMU describes a user of an image by the permissions it takes (`perm`) and the ones it lets
//! others take (`shared`), one bit each: consistent read, write, write-unchanged, resize. For
//! every bit `i` it holds a shared (read) lock on byte `100 + i` when it takes the permission,
//! and on byte `200 + i` when it does *not* share it. A newcomer first applies its own locks,
//! then tests for a conflict: a permission it wants that someone refuses to share (byte
//! `200 + i` locked by another file description), or a permission someone holds that it does
//! not share (byte `100 + i`).

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;

use super::{ImageError, Result};

/// First lock byte of the permissions taken (QEMU's `RAW_LOCK_PERM_BASE`).
const PERM_BASE: i64 = 100;
/// First lock byte of the permissions not shared (QEMU's `RAW_LOCK_SHARED_BASE`).
const SHARED_BASE: i64 = 200;

/// `BLK_PERM_CONSISTENT_READ`.
pub const PERM_CONSISTENT_READ: u32 = 1 << 0;
/// `BLK_PERM_WRITE`.
pub const PERM_WRITE: u32 = 1 << 1;
/// `BLK_PERM_WRITE_UNCHANGED`.
pub const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
/// `BLK_PERM_RESIZE`.
pub const PERM_RESIZE: u32 = 1 << 3;
/// Every permission bit QEMU locks.
const PERM_ALL: u32 = 0xf;

const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// The permissions a guest disk takes and shares, as QEMU's guest devices do
/// (`share-rw=off`): a writable disk takes read+write and shares only read and
/// write-unchanged (no other writer, no resize, no reader that needs a stable image such as
/// `qemu-img convert`); a read-only disk takes read and shares the same (readers welcome,
/// writers not). Note: QEMU 10's `qemu-img info` takes no lock at all, so no lock refuses it.
pub fn guest_disk_perms(read_only: bool) -> (u32, u32) {
    let shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;
    if read_only {
        (PERM_CONSISTENT_READ, shared)
    } else {
        (PERM_CONSISTENT_READ | PERM_WRITE, shared)
    }
}

fn flock(kind: libc::c_int, start: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct for which all-zeroes is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

fn fcntl_lock(file: &File, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    loop {
        // SAFETY: F_OFD_SETLK/F_OFD_GETLK read (and GETLK writes) the `flock` the pointer
        // refers to, a live exclusive borrow; the fd is owned by `file`.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sets (shared lock) or clears byte `start`.
fn set_byte(file: &File, start: i64, locked: bool) -> io::Result<()> {
    let kind = if locked { libc::F_RDLCK } else { libc::F_UNLCK };
    fcntl_lock(file, libc::F_OFD_SETLK, &mut flock(kind, start))
}

/// Whether another file description holds a lock on byte `start`.
fn byte_held_elsewhere(file: &File, start: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, start);
    fcntl_lock(file, libc::F_OFD_GETLK, &mut fl)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Applies QEMU's lock bytes for `perm`/`shared` on `file` and checks that nobody else
/// conflicts; on conflict the bytes taken are released and [`ImageError::Locked`] names the
/// permission and, where `/proc` shows them, the other processes that have the file open.
/// The locks live as long as the file description (any fd of `file`).
/// A holder that is going away (a daemon just killed, whose confined child follows within
/// milliseconds) is waited for up to [`LOCK_PATIENCE`] before the conflict is reported.
pub fn lock(file: &File, what: &str, perm: u32, shared: u32) -> Result<()> {
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        match try_lock(file, what, perm, shared) {
            Err(ImageError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// How long a conflicting lock is retried: a restart right after a SIGKILL.
pub const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

fn try_lock(file: &File, what: &str, perm: u32, shared: u32) -> Result<()> {
    let ctx = |e| ImageError::io(format!("locking {what}"), e);
    for i in 0..4 {
        let bit = 1u32 << i;
        set_byte(file, PERM_BASE + i64::from(i), perm & bit != 0).map_err(ctx)?;
        set_byte(file, SHARED_BASE + i64::from(i), shared & bit == 0).map_err(ctx)?;
    }
    let conflict = (|| -> io::Result<Option<String>> {
        for i in 0..4 {
            let bit = 1u32 << i;
            let name = PERM_NAMES[i as usize];
            if perm & bit != 0 && byte_held_elsewhere(file, SHARED_BASE + i64::from(i))? {
                return Ok(Some(format!("failed to get \"{name}\" lock")));
            }
            if shared & bit == 0 && byte_held_elsewhere(file, PERM_BASE + i64::from(i))? {
                return Ok(Some(format!("failed to get shared \"{name}\" lock")));
            }
        }
        Ok(None)
    })()
    .map_err(ctx)?;
    let Some(msg) = conflict else {
        return Ok(());
    };
    unlock(file);
    Err(ImageError::Locked(format!(
        "{what}: {msg}: {} (pass --force-share to open it anyway)",
        other_holders(file)
    )))
}

/// Releases every lock byte (best effort).
pub fn unlock(file: &File) {
    for i in 0..PERM_ALL.count_ones() {
        let _ = set_byte(file, PERM_BASE + i64::from(i), false);
        let _ = set_byte(file, SHARED_BASE + i64::from(i), false);
    }
}

/// "in use by pid N (comm), ..." for the other processes with the same file open (those whose
/// `/proc/PID/fd` this process may read), or a generic message.
fn other_holders(file: &File) -> String {
    let Ok(meta) = file.metadata() else {
        return "is another process using the image?".into();
    };
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return "is another process using the image?".into();
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let same = fds.flatten().any(|fd| {
            std::fs::metadata(fd.path())
                .map(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
                .unwrap_or(false)
        });
        if same {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            found.push(format!("pid {pid} ({})", comm.trim()));
        }
    }
    if found.is_empty() {
        "is another process using the image?".into()
    } else {
        format!("the image is in use by {}", found.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn writers_exclude_everyone_but_shared_readers_coexist() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let (a, b, c) = (reopen(f.path()), reopen(f.path()), reopen(f.path()));
        let (rp, rs) = guest_disk_perms(true);
        let (wp, ws) = guest_disk_perms(false);
        lock(&a, "a", rp, rs).unwrap();
        lock(&b, "b", rp, rs).unwrap();
        let e = lock(&c, "c", wp, ws).unwrap_err();
        assert!(matches!(e, ImageError::Locked(_)), "{e}");
        assert!(e.to_string().contains("\"write\" lock"), "{e}");
        unlock(&a);
        drop(b); // closing the description drops its locks
        lock(&c, "c", wp, ws).unwrap();
        let e = lock(&a, "a", rp, rs).unwrap_err();
        assert!(e.to_string().contains("shared \"write\" lock"), "{e}");
        let e = lock(&a, "a", wp, ws).unwrap_err();
        assert!(matches!(e, ImageError::Locked(_)), "{e}");
    }
}
