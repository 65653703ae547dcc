//! Confinement: make the shared directory the whole filesystem view of a thread (and of the
//! threads it spawns later). rqemu-fs itself is confined by its `sandbox.rs` (the same steps in
//! new user/mount/pid/net/ipc namespaces, with a private procfs for the passthrough); it uses
//! [`canonical_dir`] from here. [`enter`]:
//!
//! 1. `unshare(CLONE_NEWNS)`: a private mount namespace; the host's mounts are not changed;
//! 2. `mount("/", MS_REC | MS_PRIVATE)`: nothing we do propagates back to the host;
//! 3. bind-mount `DIR` (recursively) onto itself (pivot_root needs a mount point), then with
//!    `--readonly` make it and every mount below it read-only (`mount_setattr(AT_RECURSIVE,
//!    MOUNT_ATTR_RDONLY)`) — the kernel itself answers every write with `EROFS`;
//! 4. `chdir(DIR)`, `pivot_root(".", ".")`, `umount2(".", MNT_DETACH)`, `chdir("/")`: the old
//!    root is stacked under the new one and then detached, so nothing outside `DIR` is
//!    reachable by any path any more.
//!
//! After that `/` *is* the shared directory: `..` of the root is the root (also for a hostile
//! `LOOKUP ".."` that fuse-backend-rs's passthrough accepts), an absolute or `../..` symlink
//! resolves inside it, `/proc` does not exist, and rename races cannot carry a path above the
//! root. (A `/proc/self/fd` fd opened before `enter` is the host's procfs: it leads outside;
//! rqemu-fs opens it on a private procfs of a new pid namespace instead.)

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Errors setting up the confinement.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// Not running as root (mount namespaces and pivot_root need CAP_SYS_ADMIN).
    #[error(
        "confining the shared directory needs root (CAP_SYS_ADMIN for a mount namespace and \
         pivot_root); run rqemu-fs as root"
    )]
    NotRoot,
    /// The shared directory is not usable.
    #[error("shared directory {path}")]
    SharedDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A set-up step failed.
    #[error("{step}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn check(step: &'static str, r: libc::c_int) -> Result<(), ConfineError> {
    if r < 0 {
        Err(ConfineError::Step {
            step,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

/// Resolves `dir` to an absolute, symlink-free path of an existing directory.
pub fn canonical_dir(dir: &Path) -> Result<PathBuf, ConfineError> {
    let err = |source| ConfineError::SharedDir {
        path: dir.to_path_buf(),
        source,
    };
    let path = std::fs::canonicalize(dir).map_err(err)?;
    let meta = std::fs::metadata(&path).map_err(err)?;
    if !meta.is_dir() {
        return Err(err(io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    Ok(path)
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
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// Makes the bind mount at `dir` and every mount below it read-only (`mount_setattr` with
/// `AT_RECURSIVE`); on kernels without it (< 5.12) remounts the top mount only.
fn make_readonly(dir: &CString) -> Result<(), ConfineError> {
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: valid NUL-terminated path and a `struct mount_attr` of the size passed.
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
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(ConfineError::Step {
            step: "making the shared directory read-only",
            source: err,
        });
    }
    tracing::warn!("mount_setattr unsupported: mounts below the shared directory stay writable");
    // SAFETY: valid NUL-terminated strings (or null where the kernel allows it).
    check("remounting the shared directory read-only", unsafe {
        libc::mount(
            std::ptr::null(),
            dir.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
            std::ptr::null(),
        )
    })
}

/// Whether the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn cstring(path: &Path) -> Result<CString, ConfineError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ConfineError::SharedDir {
        path: path.to_path_buf(),
        source: io::Error::from_raw_os_error(libc::EINVAL),
    })
}

/// Confines the calling thread — and every thread it spawns later — to `dir` (see the module
/// docs). With `readonly`, the kernel refuses all writes below `dir` with `EROFS`.
///
/// Call it from a single-threaded process (or from a thread that alone must be confined).
pub fn enter(dir: &Path, readonly: bool) -> Result<(), ConfineError> {
    if !is_root() {
        return Err(ConfineError::NotRoot);
    }
    let dir = canonical_dir(dir)?;
    let cdir = cstring(&dir)?;
    let root = c"/";
    let dot = c".";
    // SAFETY: unshare takes flags only.
    check("unshare(CLONE_NEWNS)", unsafe {
        libc::unshare(libc::CLONE_NEWNS)
    })?;
    // SAFETY: valid NUL-terminated strings (or null where the kernel allows it).
    check("making mounts private", unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    // SAFETY: as above.
    check("bind-mounting the shared directory", unsafe {
        libc::mount(
            cdir.as_ptr(),
            cdir.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    })?;
    if readonly {
        make_readonly(&cdir)?;
    }
    // SAFETY: valid NUL-terminated path.
    check("chdir to the shared directory", unsafe {
        libc::chdir(cdir.as_ptr())
    })?;
    // SAFETY: pivot_root(".", ".") with valid strings: the old root ends up stacked on the new.
    check("pivot_root", unsafe {
        libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int
    })?;
    // SAFETY: valid string; detaches the old root stacked on ".".
    check("detaching the old root", unsafe {
        libc::umount2(dot.as_ptr(), libc::MNT_DETACH)
    })?;
    // SAFETY: valid string.
    check("chdir /", unsafe { libc::chdir(root.as_ptr()) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_dir_rejects_files_and_missing_paths() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        assert!(canonical_dir(&f).is_err());
        assert!(canonical_dir(&t.path().join("missing")).is_err());
        let link = t.path().join("l");
        std::os::unix::fs::symlink(t.path(), &link).unwrap();
        assert_eq!(
            canonical_dir(&link).unwrap(),
            std::fs::canonicalize(t.path()).unwrap()
        );
    }

    #[test]
    fn confined_thread_sees_only_the_shared_dir() {
        assert!(
            is_root(),
            "this test needs root (mount namespace + pivot_root)"
        );
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        let shared = outside.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join("inside"), b"inside").unwrap();
        std::os::unix::fs::symlink("/", shared.join("abs")).unwrap();
        std::os::unix::fs::symlink("../..", shared.join("up")).unwrap();
        // A mount below the shared directory (made in this, the host's, namespace).
        let sub = shared.join("sub");
        std::fs::create_dir(&sub).unwrap();
        let csub = cstring(&sub).unwrap();
        // SAFETY: valid NUL-terminated strings.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                csub.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "mounting a tmpfs: {}", io::Error::last_os_error());
        let s = shared.clone();
        // The confinement applies to the thread that enters it (own mount namespace and root).
        let names = std::thread::spawn(move || {
            enter(&s, true).unwrap();
            let mut names: Vec<String> = std::fs::read_dir("/")
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            let via_abs = std::fs::read("/abs/inside").unwrap();
            let via_up = std::fs::read("/up/../../inside").unwrap();
            let secret = std::fs::read("/../secret").is_err();
            let ro = std::fs::write("/new", b"x").unwrap_err().raw_os_error();
            let ro_sub = std::fs::write("/sub/new", b"x").unwrap_err().raw_os_error();
            (names, via_abs, via_up, secret, ro, ro_sub)
        })
        .join();
        // The host's submount is still writable; then clean it up.
        std::fs::write(sub.join("host"), b"x").unwrap();
        // SAFETY: valid NUL-terminated path.
        unsafe { libc::umount2(csub.as_ptr(), libc::MNT_DETACH) };
        let names = names.unwrap();
        assert_eq!(names.0, vec!["abs", "inside", "sub", "up"]);
        assert_eq!(names.1, b"inside");
        assert_eq!(names.2, b"inside");
        assert!(names.3, "the file outside the shared dir was reachable");
        assert_eq!(names.4, Some(libc::EROFS));
        assert_eq!(
            names.5,
            Some(libc::EROFS),
            "a mount below the shared dir stayed writable"
        );
        // The host (this thread) is untouched.
        assert!(outside.path().join("secret").exists());
    }
}
