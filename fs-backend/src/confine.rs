//! The shared directory: [`canonical_dir`] resolves it for rqemu-fs, which confines itself to
//! it in its `sandbox.rs` (new user/mount/pid/net/ipc namespaces, a private procfs for the
//! passthrough, then `rqemu_sandbox::namespaces::pivot_into_dir`).
//!
//! Once pivoted, `/` *is* the shared directory: `..` of the root is the root (also for a
//! hostile `LOOKUP ".."` that fuse-backend-rs's passthrough accepts), an absolute or `../..`
//! symlink resolves inside it, `/proc` does not exist, and rename races cannot carry a path
//! above the root. The tests of this crate show it with `enter` (test builds only), the same
//! steps for one thread. (A `/proc/self/fd` fd opened before pivoting is the host's procfs: it
//! leads outside; rqemu-fs opens it on a private procfs of a new pid namespace instead.)

use std::io;
use std::path::{Path, PathBuf};

/// Errors resolving the shared directory.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// The shared directory is not usable.
    #[error("shared directory {path}")]
    SharedDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
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

/// Whether the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Confines the calling thread — and every thread it spawns later — to `dir` with the sandbox
/// crate's steps (a private mount namespace, `dir` bind-mounted and pivoted into): what
/// rqemu-fs's sandbox does, for the tests that show the path confinement.
#[cfg(test)]
pub(crate) fn enter(dir: &Path, readonly: bool) -> Result<(), rqemu_sandbox::namespaces::NsError> {
    use rqemu_sandbox::namespaces;
    namespaces::unshare(libc::CLONE_NEWNS, "mnt")?;
    namespaces::make_mounts_private()?;
    namespaces::pivot_into_dir(dir, readonly)
}
