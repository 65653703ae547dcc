//! Paths inside the container root, resolved by the kernel as if the root were `/`
//! (openat2 `RESOLVE_IN_ROOT`): a symlink in the image (`/proc -> /`) cannot send a mount or a
//! file of the spec outside the container. Operations then go through `/proc/self/fd/N`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::sys::{self, check, cstr};

/// An open container root.
pub struct Root {
    fd: OwnedFd,
}

/// `rel` split into normal components: `.` dropped, `..` applied lexically and clamped at the
/// root (the kernel clamps the symlinks it follows).
pub fn components(rel: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for c in rel.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// The `/proc/self/fd/N` path of an open descriptor.
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

impl Root {
    /// Opens the directory at `path` (an agent path) as a root.
    pub fn open(path: &Path) -> io::Result<Self> {
        let c = sys::cpath(path)?;
        // SAFETY: `c` is a NUL-terminated path.
        let fd = sys::owned(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        Ok(Self { fd })
    }

    /// Opens `rel` (relative to the root, symlinks resolved inside it) with `flags`
    /// (`O_PATH` for a mount target).
    pub fn resolve(&self, rel: &[&str], flags: libc::c_int) -> io::Result<OwnedFd> {
        let joined = if rel.is_empty() {
            ".".to_string()
        } else {
            rel.join("/")
        };
        let c = cstr(&joined)?;
        // SAFETY: open_how is plain old data; all-zero is valid.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: openat2 with a valid directory descriptor, a NUL-terminated path and an
        // `open_how` whose size is passed.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        sys::owned(ret as libc::c_int)
    }

    /// Creates the directory `rel` and its missing parents (mode `mode`), returns it opened
    /// with `O_PATH`.
    pub fn mkdir_all(&self, rel: &str, mode: u32) -> io::Result<OwnedFd> {
        let parts = components(rel);
        let mut dir = self.resolve(&[], libc::O_PATH | libc::O_DIRECTORY)?;
        for i in 0..parts.len() {
            match self.resolve(&parts[..=i], libc::O_PATH | libc::O_DIRECTORY) {
                Ok(fd) => dir = fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let name = cstr(parts[i])?;
                    // SAFETY: mkdirat in an open directory with a NUL-terminated name.
                    let r = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) };
                    if let Err(e) = check(r) {
                        if e.raw_os_error() != Some(libc::EEXIST) {
                            return Err(e);
                        }
                    }
                    dir = self.resolve(&parts[..=i], libc::O_PATH | libc::O_DIRECTORY)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(dir)
    }

    /// Makes sure the file `rel` exists (creating an empty one and its parent directories),
    /// returns it opened with `O_PATH` (a mount point for a file bind mount).
    pub fn ensure_file(&self, rel: &str) -> io::Result<OwnedFd> {
        let parts = components(rel);
        let Some((name, parent)) = parts.split_last() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the root is not a file",
            ));
        };
        if let Ok(fd) = self.resolve(&parts, libc::O_PATH) {
            return Ok(fd);
        }
        let dir = self.mkdir_all(&parent.join("/"), 0o755)?;
        let c: CString = cstr(name)?;
        // SAFETY: openat in an open directory, a NUL-terminated name; O_NOFOLLOW refuses a
        // symlink placed there.
        let f = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o644,
            )
        };
        drop(sys::owned(f)?);
        self.resolve(&parts, libc::O_PATH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_clamped_at_the_root() {
        assert_eq!(components("/proc/../../etc/./hosts"), vec!["etc", "hosts"]);
        assert_eq!(components("dev//pts/"), vec!["dev", "pts"]);
        assert!(components("/").is_empty());
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let dir = std::env::temp_dir().join(format!("rqemu-agent-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("real")).unwrap();
        std::os::unix::fs::symlink("/", dir.join("escape")).unwrap();
        std::os::unix::fs::symlink("../../..", dir.join("up")).unwrap();
        let root = Root::open(&dir).unwrap();
        // `escape/new` and `up/new2` are created inside the root, not at the host's `/`.
        root.mkdir_all("escape/new", 0o755).unwrap();
        assert!(dir.join("new").is_dir());
        root.mkdir_all("up/new2/x", 0o755).unwrap();
        assert!(dir.join("new2/x").is_dir());
        root.ensure_file("escape/etc-file").unwrap();
        assert!(dir.join("etc-file").is_file());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
