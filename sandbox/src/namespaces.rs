//! Filesystem confinement: namespaces (a user namespace when unprivileged), a private mount
//! namespace whose root is an empty read-only tmpfs or the kept directory (`pivot_root`), or
//! `chroot` into an empty (deleted) directory or the kept directory.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Errors of a namespace or root step.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    /// A step failed.
    #[error("{step}")]
    Step {
        /// What was being done.
        step: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A path holds a NUL byte.
    #[error("path {0:?} holds a NUL byte")]
    Path(PathBuf),
}

fn check(step: &str, r: libc::c_long) -> Result<(), NsError> {
    if r < 0 {
        Err(NsError::Step {
            step: step.to_string(),
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

fn cstring(path: &Path) -> Result<CString, NsError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| NsError::Path(path.to_path_buf()))
}

/// Number of threads of this process (`/proc/self/task`).
pub fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// `unshare(flags)`.
pub fn unshare(flags: libc::c_int, what: &str) -> Result<(), NsError> {
    // SAFETY: unshare takes flags only.
    check(&format!("unshare({what})"), unsafe {
        libc::unshare(flags) as libc::c_long
    })
}

/// Our (uid, gid), to map after entering a user namespace.
pub fn ids() -> (libc::uid_t, libc::gid_t) {
    // SAFETY: getuid/getgid have no preconditions.
    unsafe { (libc::getuid(), libc::getgid()) }
}

/// After `unshare(CLONE_NEWUSER)`: maps `uid` and `gid` (ours, from [`ids`] before) onto
/// themselves: the process keeps its ids and has the capabilities it needs for the other
/// namespaces, inside that namespace only.
pub fn map_ids(uid: libc::uid_t, gid: libc::gid_t) -> Result<(), NsError> {
    let write = |file: &str, text: String| {
        std::fs::write(file, text).map_err(|source| NsError::Step {
            step: format!("writing {file}"),
            source,
        })
    };
    write("/proc/self/setgroups", "deny".to_string())?;
    write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    write("/proc/self/gid_map", format!("{gid} {gid} 1"))?;
    Ok(())
}

/// Makes every mount of the (new) mount namespace private: nothing propagates to the host.
pub fn make_mounts_private() -> Result<(), NsError> {
    // SAFETY: valid NUL-terminated strings (or null where the kernel allows it).
    check("making mounts private", unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) as libc::c_long
    })
}

/// `chdir(dir)`, `pivot_root(".", ".")`, detach the old root, `chdir("/")`: `dir` (a mount
/// point) becomes `/` and nothing outside it is reachable by a path.
fn pivot_into(dir: &CString) -> Result<(), NsError> {
    // SAFETY: valid NUL-terminated path.
    check("chdir to the new root", unsafe {
        libc::chdir(dir.as_ptr()) as libc::c_long
    })?;
    // SAFETY: pivot_root(".", ".") with valid strings: the old root ends up stacked on the new.
    check("pivot_root", unsafe {
        libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr())
    })?;
    // SAFETY: valid string; detaches the old root stacked on ".".
    check("detaching the old root", unsafe {
        libc::umount2(c".".as_ptr(), libc::MNT_DETACH) as libc::c_long
    })?;
    // SAFETY: valid string.
    check("chdir /", unsafe {
        libc::chdir(c"/".as_ptr()) as libc::c_long
    })
}

/// Where the empty tmpfs is mounted before pivoting into it (inside the private mount
/// namespace, so the host never sees it): the first existing directory of these.
const TMPFS_MOUNT_POINTS: [&str; 4] = ["/tmp", "/mnt", "/proc", "/dev"];

fn empty_root_mount_point() -> Result<CString, NsError> {
    let target = TMPFS_MOUNT_POINTS
        .iter()
        .find(|p| Path::new(p).is_dir())
        .ok_or_else(|| NsError::Step {
            step: "finding a directory to mount the empty root on".into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        })?;
    cstring(Path::new(target))
}

/// In a private mount namespace: mounts an empty tmpfs, pivots into it and makes it read-only.
pub fn pivot_into_empty_root() -> Result<(), NsError> {
    let target = empty_root_mount_point()?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: valid NUL-terminated strings.
    check("mounting the empty root tmpfs", unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            flags,
            c"size=4k,nr_inodes=2,mode=0555".as_ptr().cast(),
        ) as libc::c_long
    })?;
    pivot_into(&target)?;
    // SAFETY: valid strings (or null where the kernel allows it).
    check("making the empty root read-only", unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY | flags,
            std::ptr::null(),
        ) as libc::c_long
    })
}

/// In a private mount namespace: pivots into an empty read-only tmpfs that holds, at their
/// own paths, read-only bind mounts (nosuid, nodev, noexec) of `dirs` (absolute, canonical):
/// what a process needs to keep connecting to the UNIX sockets in them by path. A directory
/// beneath another kept one is reached through it.
pub fn pivot_into_root_with_dirs(dirs: &[PathBuf]) -> Result<(), NsError> {
    let mut sorted: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    sorted.sort();
    sorted.dedup();
    let mut kept: Vec<&Path> = Vec::new();
    for d in sorted {
        if !d.is_absolute() || d == Path::new("/") {
            return Err(NsError::Path(d.to_path_buf()));
        }
        if !kept.iter().any(|k| d.starts_with(k)) {
            kept.push(d);
        }
    }
    // Opened before the tmpfs is mounted: a kept directory may be beneath its mount point.
    let step = |step: String| move |source| NsError::Step { step, source };
    let fds = kept
        .iter()
        .map(|d| std::fs::File::open(d).map_err(step(format!("opening {}", d.display()))))
        .collect::<Result<Vec<_>, _>>()?;
    let target = empty_root_mount_point()?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: valid NUL-terminated strings.
    check("mounting the root tmpfs", unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            flags,
            c"size=64k,nr_inodes=1024,mode=0755".as_ptr().cast(),
        ) as libc::c_long
    })?;
    let root = Path::new(std::ffi::OsStr::from_bytes(target.as_bytes()));
    for (d, fd) in kept.iter().zip(&fds) {
        use std::os::fd::AsRawFd;
        let mirror = root.join(d.strip_prefix("/").unwrap_or(d));
        std::fs::create_dir_all(&mirror)
            .map_err(step(format!("creating the mount point of {}", d.display())))?;
        let src = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|_| NsError::Path(d.to_path_buf()))?;
        let cmirror = cstring(&mirror)?;
        // SAFETY: valid NUL-terminated strings (or null where the kernel allows it).
        check(&format!("bind-mounting {}", d.display()), unsafe {
            libc::mount(
                src.as_ptr(),
                cmirror.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ) as libc::c_long
        })?;
        set_mount_attrs(
            &cmirror,
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        )?;
    }
    drop(fds);
    pivot_into(&target)?;
    // SAFETY: valid strings (or null where the kernel allows it).
    check("making the root read-only", unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY | flags,
            std::ptr::null(),
        ) as libc::c_long
    })
}

/// In a private mount namespace: bind-mounts `dir` onto itself (read-only with `readonly`) and
/// pivots into it.
pub fn pivot_into_dir(dir: &Path, readonly: bool) -> Result<(), NsError> {
    let cdir = cstring(dir)?;
    // SAFETY: valid NUL-terminated strings (or null where the kernel allows it).
    check("bind-mounting the kept directory", unsafe {
        libc::mount(
            cdir.as_ptr(),
            cdir.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) as libc::c_long
    })?;
    if readonly {
        make_readonly(&cdir)?;
    }
    pivot_into(&cdir)
}

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// Makes the bind mount at `dir` and every mount below it read-only (`mount_setattr` with
/// `AT_RECURSIVE`); on kernels without it (< 5.12) remounts the top mount only.
fn make_readonly(dir: &CString) -> Result<(), NsError> {
    set_mount_attrs(dir, MOUNT_ATTR_RDONLY)
}

/// Sets `attrs` (`MOUNT_ATTR_*`, read-only among them) on the bind mount at `dir` and every
/// mount below it; on kernels without `mount_setattr` remounts the top mount read-only.
fn set_mount_attrs(dir: &CString, attrs: u64) -> Result<(), NsError> {
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a valid NUL-terminated path and a `struct mount_attr` of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            dir.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
        return check("making the kept directory read-only", r);
    }
    tracing::warn!("mount_setattr unsupported: mounts below the kept directory stay writable");
    // SAFETY: valid NUL-terminated strings (or null where the kernel allows it).
    check("making the kept directory read-only", unsafe {
        libc::mount(
            std::ptr::null(),
            dir.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
            std::ptr::null(),
        ) as libc::c_long
    })
}

/// `chroot(dir)` and `chdir("/")`.
pub fn chroot_into(dir: &Path) -> Result<(), NsError> {
    let cdir = cstring(dir)?;
    // SAFETY: valid NUL-terminated strings.
    check("chroot", unsafe {
        libc::chroot(cdir.as_ptr()) as libc::c_long
    })?;
    // SAFETY: valid string.
    check("chdir /", unsafe {
        libc::chdir(c"/".as_ptr()) as libc::c_long
    })
}

/// `chroot` into a fresh directory that is removed first: the root is empty and stays empty
/// (nothing can be created in a deleted directory), and nothing is left on the host.
pub fn chroot_into_empty() -> Result<(), NsError> {
    let dir = std::env::temp_dir().join(format!("rqemu-sandbox-{}", std::process::id()));
    let step = |step: &str| {
        let step = step.to_string();
        move |source| NsError::Step { step, source }
    };
    std::fs::create_dir(&dir).map_err(step("creating the empty root"))?;
    let cdir = cstring(&dir)?;
    // SAFETY: valid NUL-terminated path.
    let r = unsafe { libc::chdir(cdir.as_ptr()) };
    let chdir_err = io::Error::last_os_error();
    std::fs::remove_dir(&dir).map_err(step("removing the empty root"))?;
    if r != 0 {
        return Err(step("chdir to the empty root")(chdir_err));
    }
    // SAFETY: valid strings; "." is the (now deleted) directory we stand in.
    check("chroot", unsafe {
        libc::chroot(c".".as_ptr()) as libc::c_long
    })?;
    // SAFETY: valid string.
    check("chdir /", unsafe {
        libc::chdir(c"/".as_ptr()) as libc::c_long
    })
}

/// Closes every fd from 3 up that is not in `keep` (`close_range`).
pub fn close_other_fds(keep: &[i32]) -> Result<(), NsError> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|&&fd| fd > 2)
        .map(|&fd| fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut lo = 3u32;
    for fd in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if fd > lo {
            // SAFETY: close_range on a range of fds none of which the policy keeps.
            check("close_range", unsafe {
                libc::syscall(libc::SYS_close_range, lo, fd - 1, 0)
            })?;
        }
        lo = fd.saturating_add(1);
    }
    Ok(())
}
