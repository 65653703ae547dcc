//! Mount points of a read-only rootfs. The guest cannot create a missing mount point in a share
//! that `rqemu-fs --readonly` serves, so, as runc does on the host, `create` makes them in the
//! bundle's rootfs first: a directory per mount, an empty file per copied file, each path
//! resolved inside the rootfs (`openat2(RESOLVE_IN_ROOT)`: a symlink in the image cannot send
//! it out). Destinations under an earlier mount (`/run/.containerenv` under a `/run` tmpfs) are
//! left to the guest, which creates them in that file system.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use rqemu_agent_protocol::ContainerSpec;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mount point {path} in the rootfs: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn cstr(p: &Path) -> CString {
    // Paths from the spec hold no NUL (JSON strings can, then the open fails harmlessly).
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// `openat2(dir, path, O_PATH | extra, RESOLVE_IN_ROOT)`.
fn open_in_root(root: &OwnedFd, path: &Path, extra: i32) -> std::io::Result<OwnedFd> {
    let c = cstr(path);
    // SAFETY: open_how is plain integers; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC | extra) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT;
    // SAFETY: openat2 reads the path and the open_how from valid memory of the given size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes `dest` (absolute, inside the container) exist under `root`; true if it was created.
fn ensure(root: &OwnedFd, dest: &str, file: bool) -> std::io::Result<bool> {
    let rel: Vec<_> = Path::new(dest)
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            _ => None,
        })
        .collect();
    let Some((last, parents)) = rel.split_last() else {
        return Ok(false);
    };
    let mut created = false;
    let mut at = std::path::PathBuf::from(".");
    for comp in parents {
        let parent = open_in_root(root, &at, libc::O_DIRECTORY)?;
        at.push(comp);
        let name = cstr(Path::new(comp));
        // SAFETY: mkdirat on a directory fd with a single-component name.
        if unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755) } == 0 {
            created = true;
        } else {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
    }
    let parent = open_in_root(root, &at, libc::O_DIRECTORY)?;
    let name = cstr(Path::new(last));
    // SAFETY: mkdirat/openat on a directory fd with a single-component name; O_NOFOLLOW and
    // O_EXCL keep an existing entry (symlink included) untouched.
    let rc = unsafe {
        if file {
            let fd = libc::openat(
                parent.as_raw_fd(),
                name.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o644,
            );
            if fd >= 0 {
                libc::close(fd);
            }
            fd.min(0)
        } else {
            libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755)
        }
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::AlreadyExists {
        Ok(created)
    } else {
        Err(e)
    }
}

fn under(dest: &str, covered: &[String]) -> bool {
    covered
        .iter()
        .any(|c| c == "/" || dest.starts_with(&format!("{c}/")))
}

/// Creates the missing mount points of `spec` in `rootfs`; returns those created.
pub fn prepare(rootfs: &Path, spec: &ContainerSpec) -> Result<Vec<String>, Error> {
    let err = |path: &str| {
        let path = path.to_string();
        move |source| Error::Io { path, source }
    };
    let c = cstr(rootfs);
    // SAFETY: open(2) of the rootfs directory.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(err("/")(std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd owned by nobody else.
    let root = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut covered: Vec<String> = Vec::new();
    let mut created = Vec::new();
    let norm = |d: &str| {
        let t = d.trim_end_matches('/');
        if t.is_empty() {
            "/".to_string()
        } else {
            t.to_string()
        }
    };
    for m in &spec.mounts {
        let d = norm(&m.destination);
        if !under(&d, &covered) && ensure(&root, &d, false).map_err(err(&d))? {
            created.push(d.clone());
        }
        covered.push(d);
    }
    for f in &spec.files {
        let d = norm(&f.destination);
        if !under(&d, &covered) && ensure(&root, &d, true).map_err(err(&d))? {
            created.push(d);
        }
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rqemu_agent_protocol::{FileCopy, Mount};

    #[test]
    fn missing_points_are_made_inside_the_root_only() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("rootfs");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), "x").unwrap();
        // A symlink aiming out of the root: resolved inside it.
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        let m = |d: &str| Mount {
            destination: d.into(),
            fstype: "tmpfs".into(),
            ..Default::default()
        };
        let f = |d: &str| FileCopy {
            destination: d.into(),
            ..Default::default()
        };
        let spec = ContainerSpec {
            mounts: vec![m("/proc"), m("/var/tmp"), m("/run")],
            files: vec![f("/etc/hosts"), f("/etc/hostname"), f("/run/.containerenv")],
            ..Default::default()
        };
        let made = prepare(&root, &spec).unwrap();
        assert_eq!(made, ["/proc", "/var/tmp", "/run", "/etc/hosts"]);
        let escaping = ContainerSpec {
            mounts: vec![m("/escape/x")],
            ..Default::default()
        };
        // The link's target is looked up inside the root, where it does not exist.
        assert!(prepare(&root, &escaping).is_err());
        assert!(root.join("var/tmp").is_dir());
        assert!(root.join("etc/hosts").is_file());
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "x"
        );
        // Left to the guest (under the /run tmpfs), and nothing outside the root.
        assert!(!root.join("run/.containerenv").exists());
        assert!(!outside.join("x").exists());
        // Idempotent.
        assert!(prepare(&root, &spec).unwrap().is_empty());
    }
}
