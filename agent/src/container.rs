//! `Create`: the container's root on its virtiofs share, the spec's mounts in order, a `/dev`
//! as runc populates it, the copied files, hostname, the network interfaces and sysctls (after
//! the interfaces: `net.*` keys may name them); the root is made read-only
//! last (mount points are created first, as runc does).

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use rqemu_agent_protocol::{ContainerSpec, FileCopy, Mount, VIRTIOFS};

use crate::alog;
use crate::mounts::{self, MountError};
use crate::root::{self, Root};
use crate::sys::{self, check, cstr};

/// Where the container's root is mounted in the agent's file system.
pub const ROOT_DIR: &str = "/run/rqemu-agent/rootfs";
/// Where copied files are staged (a tmpfs) before being bound onto their destination.
const FILES_DIR: &str = "/run/rqemu-agent/files";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("the rootfs has no virtiofs tag")]
    NoTag,
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("sysctl key {0:?} is not a sysctl name")]
    SysctlKey(String),
    #[error("network: {0}")]
    Network(#[from] crate::network::NetError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SetupError {
    let what = what.into();
    move |source| SetupError::Io { what, source }
}

/// A container set up and ready to start.
pub struct Container {
    pub root: PathBuf,
    pub spec: ContainerSpec,
}

/// Sets the container of `spec` up.
pub fn create(spec: ContainerSpec) -> Result<Container, SetupError> {
    if spec.rootfs.tag.is_empty() {
        return Err(SetupError::NoTag);
    }
    let root_dir = Path::new(ROOT_DIR);
    std::fs::create_dir_all(root_dir).map_err(io_err(format!("mkdir {ROOT_DIR}")))?;
    sys::mount(Some(&spec.rootfs.tag), root_dir, Some(VIRTIOFS), 0, None).map_err(io_err(
        format!("mount virtiofs tag {:?} on {ROOT_DIR}", spec.rootfs.tag),
    ))?;
    let root = Root::open(root_dir).map_err(io_err(format!("open {ROOT_DIR}")))?;

    let has_dev = spec
        .mounts
        .iter()
        .any(|m| root::components(&m.destination) == ["dev"]);
    if !has_dev {
        // No /dev in the spec: a tmpfs all the same, never device nodes on the share.
        let dev = Mount {
            destination: "/dev".into(),
            fstype: "tmpfs".into(),
            source: "tmpfs".into(),
            options: ["nosuid", "strictatime", "mode=755", "size=65536k"]
                .map(String::from)
                .to_vec(),
        };
        mounts::mount_one(&root, &dev)?;
    }
    for m in &spec.mounts {
        match mounts::mount_one(&root, m) {
            Ok(()) => {}
            Err(e) if mounts::optional(&m.fstype) => {
                alog!("skipped (optional): {e}");
            }
            Err(e) => return Err(e.into()),
        }
    }
    populate_dev(&root)?;
    for (i, f) in spec.files.iter().enumerate() {
        copy_file(&root, i, f)?;
    }
    if let Some(name) = &spec.hostname {
        let c = cstr(name).map_err(io_err("hostname"))?;
        // SAFETY: `c` is valid for `name.len()` bytes.
        check(unsafe { libc::sethostname(c.as_ptr(), name.len()) })
            .map_err(io_err(format!("sethostname {name:?}")))?;
    }
    crate::network::configure(&spec.network)?;
    for (key, value) in &spec.sysctl {
        set_sysctl(key, value)?;
    }
    if spec.rootfs.readonly {
        mounts::remount(root_dir, libc::MS_RDONLY, "/")?;
    }
    alog!(
        "created: rootfs tag {:?}{}, {} mounts, {} files, {} network interfaces",
        spec.rootfs.tag,
        if spec.rootfs.readonly { " (ro)" } else { "" },
        spec.mounts.len(),
        spec.files.len(),
        spec.network.len()
    );
    Ok(Container {
        root: root_dir.to_path_buf(),
        spec,
    })
}

/// The devices, links and directories runc gives every container's `/dev`.
fn populate_dev(root: &Root) -> Result<(), SetupError> {
    const NODES: [(&str, u32, u32); 6] = [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ];
    const LINKS: [(&str, &str); 6] = [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ];
    let dev = root
        .mkdir_all("dev", 0o755)
        .map_err(io_err("container /dev"))?;
    for (name, major, minor) in NODES {
        let c = cstr(name).map_err(io_err(name))?;
        // SAFETY: mknodat/fchmodat in an open directory with a NUL-terminated name.
        let r = unsafe {
            libc::mknodat(
                dev.as_raw_fd(),
                c.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            )
        };
        match check(r) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            Err(e) => return Err(io_err(format!("mknod /dev/{name}"))(e)),
        }
        // SAFETY: as above (the umask may have masked the mode).
        check(unsafe { libc::fchmodat(dev.as_raw_fd(), c.as_ptr(), 0o666, 0) })
            .map_err(io_err(format!("chmod /dev/{name}")))?;
    }
    for (name, target) in LINKS {
        let (c, t) = (
            cstr(name).map_err(io_err(name))?,
            cstr(target).map_err(io_err(name))?,
        );
        // SAFETY: symlinkat in an open directory with NUL-terminated strings.
        let r = unsafe { libc::symlinkat(t.as_ptr(), dev.as_raw_fd(), c.as_ptr()) };
        if let Err(e) = check(r) {
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(io_err(format!("symlink /dev/{name}"))(e));
            }
        }
    }
    for d in ["dev/pts", "dev/shm"] {
        root.mkdir_all(d, 0o755)
            .map_err(io_err(format!("mkdir /{d}")))?;
    }
    Ok(())
}

/// Writes `f` to a staging tmpfs and binds it onto its destination (the share is not
/// modified but for an empty mount point), read-only if asked.
fn copy_file(root: &Root, index: usize, f: &FileCopy) -> Result<(), SetupError> {
    let files = Path::new(FILES_DIR);
    if !files.exists() {
        std::fs::create_dir_all(files).map_err(io_err(format!("mkdir {FILES_DIR}")))?;
        sys::mount(
            Some("tmpfs"),
            files,
            Some("tmpfs"),
            libc::MS_NOSUID,
            Some("mode=0700"),
        )
        .map_err(io_err(format!("tmpfs on {FILES_DIR}")))?;
    }
    let staged = files.join(index.to_string());
    std::fs::write(&staged, &f.contents).map_err(io_err(format!("stage {}", f.destination)))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(f.mode & 0o7777))
            .map_err(io_err(format!("chmod {}", f.destination)))?;
    }
    let target = root
        .ensure_file(&f.destination)
        .map_err(io_err(format!("mount point {}", f.destination)))?;
    let target_path = root::fd_path(&target);
    sys::mount(
        Some(&staged.to_string_lossy()),
        &target_path,
        None,
        libc::MS_BIND,
        None,
    )
    .map_err(io_err(format!("bind {}", f.destination)))?;
    if f.readonly {
        // The descriptor opened before the bind names the file under it: open the new mount.
        let bound = root
            .resolve(&root::components(&f.destination), libc::O_PATH)
            .map_err(io_err(format!("reopen {}", f.destination)))?;
        mounts::remount(&root::fd_path(&bound), libc::MS_RDONLY, &f.destination)?;
    }
    Ok(())
}

/// `net.ipv4.ip_forward` → `/proc/sys/net/ipv4/ip_forward`.
fn set_sysctl(key: &str, value: &str) -> Result<(), SetupError> {
    let valid = !key.is_empty()
        && key
            .split(['.', '/'])
            .all(|c| !c.is_empty() && c != ".." && c.bytes().all(|b| b.is_ascii_graphic()));
    if !valid {
        return Err(SetupError::SysctlKey(key.to_string()));
    }
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(&path, value).map_err(io_err(format!("sysctl {key}={value}")))
}
