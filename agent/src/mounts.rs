//! The spec's mounts: OCI options to mount(2) flags and data, and one mount inside the root.

use std::io;
use std::path::Path;

use rqemu_agent_protocol::{Mount, VIRTIOFS};

use crate::root::{self, Root};
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount point {dest}: {source}")]
    MountPoint { dest: String, source: io::Error },
    #[error("mount {fstype} {source_name:?} on {dest}: {source}")]
    Mount {
        fstype: String,
        source_name: String,
        dest: String,
        source: io::Error,
    },
    #[error("remount {dest} read-only: {source}")]
    Remount { dest: String, source: io::Error },
    #[error("propagation {option} on {dest}: {source}")]
    Propagation {
        option: String,
        dest: String,
        source: io::Error,
    },
    #[error("bind source {0:?}: {1}")]
    BindSource(String, io::Error),
}

/// Mount flags, propagation changes and file-system data of a list of OCI options.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub flags: libc::c_ulong,
    pub propagation: Vec<(String, libc::c_ulong)>,
    pub data: Vec<String>,
}

impl Options {
    pub fn bind(&self) -> bool {
        self.flags & libc::MS_BIND != 0
    }
    pub fn data(&self) -> String {
        self.data.join(",")
    }
}

/// Parses OCI mount options (`ro`, `nosuid`, `bind`, `rprivate`, `mode=755`, ...); unknown
/// options are file-system data.
pub fn parse_options(options: &[String]) -> Options {
    let mut o = Options::default();
    for opt in options {
        let (set, clear): (libc::c_ulong, libc::c_ulong) = match opt.as_str() {
            "ro" => (libc::MS_RDONLY, 0),
            "rw" => (0, libc::MS_RDONLY),
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "async" => (0, libc::MS_SYNCHRONOUS),
            "dirsync" => (libc::MS_DIRSYNC, 0),
            "mand" => (libc::MS_MANDLOCK, 0),
            "nomand" => (0, libc::MS_MANDLOCK),
            "noatime" => (libc::MS_NOATIME, 0),
            "atime" => (0, libc::MS_NOATIME),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "diratime" => (0, libc::MS_NODIRATIME),
            "relatime" => (libc::MS_RELATIME, 0),
            "norelatime" => (0, libc::MS_RELATIME),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "nostrictatime" => (0, libc::MS_STRICTATIME),
            "bind" => (libc::MS_BIND, 0),
            "rbind" => (libc::MS_BIND | libc::MS_REC, 0),
            // Options of runtimes, not of the kernel.
            "tmpcopyup" | "defaults" | "idmap" | "ridmap" | "copy-symlink" => (0, 0),
            p @ ("private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave"
            | "unbindable" | "runbindable") => {
                let base = match p.trim_start_matches('r') {
                    "private" => libc::MS_PRIVATE,
                    "shared" => libc::MS_SHARED,
                    "slave" => libc::MS_SLAVE,
                    _ => libc::MS_UNBINDABLE,
                };
                let rec = if p.starts_with('r') { libc::MS_REC } else { 0 };
                o.propagation.push((p.to_string(), base | rec));
                continue;
            }
            _ => {
                o.data.push(opt.clone());
                continue;
            }
        };
        o.flags = (o.flags | set) & !clear;
    }
    o
}

/// Whether a failed mount of `fstype` is only logged: cgroup file systems, which a guest
/// kernel may lack (or, for v1, not offer beside v2) and which nothing in the container
/// needs to start.
pub fn optional(fstype: &str) -> bool {
    fstype.starts_with("cgroup")
}

/// Performs one spec mount inside `root`. A `bind` of a non-virtiofs source binds a path of
/// the container (`source` resolved inside the root); virtiofs mounts the share `source`.
pub fn mount_one(root: &Root, m: &Mount) -> Result<(), MountError> {
    let opts = parse_options(&m.options);
    let dest = m.destination.clone();
    let point_err = |source| MountError::MountPoint {
        dest: dest.clone(),
        source,
    };
    let is_virtiofs = m.fstype == VIRTIOFS;
    let bind = opts.bind() && !is_virtiofs;
    // A file bind needs a file mount point; everything else a directory.
    let bind_src = if bind {
        let src = root
            .resolve(&root::components(&m.source), libc::O_PATH)
            .map_err(|e| MountError::BindSource(m.source.clone(), e))?;
        Some(src)
    } else {
        None
    };
    let src_is_file = match &bind_src {
        Some(fd) => std::fs::metadata(root::fd_path(fd))
            .map(|md| !md.is_dir())
            .unwrap_or(false),
        None => false,
    };
    let target = if src_is_file {
        root.ensure_file(&m.destination).map_err(point_err)?
    } else {
        root.mkdir_all(&m.destination, 0o755).map_err(point_err)?
    };
    let target_path = root::fd_path(&target);
    let mut data = opts.data();
    if m.fstype == "devpts" {
        for needed in ["newinstance", "ptmxmode=0666"] {
            let key = needed.split('=').next().unwrap_or(needed);
            if !opts.data.iter().any(|d| d.split('=').next() == Some(key)) {
                if !data.is_empty() {
                    data.push(',');
                }
                data.push_str(needed);
            }
        }
    }
    let mount_err = |source| MountError::Mount {
        fstype: m.fstype.clone(),
        source_name: m.source.clone(),
        dest: m.destination.clone(),
        source,
    };
    if let Some(src) = &bind_src {
        let flags = opts.flags & (libc::MS_BIND | libc::MS_REC);
        let src_path = root::fd_path(src);
        sys::mount(
            Some(&src_path.to_string_lossy()),
            &target_path,
            None,
            flags,
            None,
        )
        .map_err(mount_err)?;
        // The other flags only take effect on a remount of the bind.
        let rest = opts.flags & !(libc::MS_BIND | libc::MS_REC);
        if rest != 0 {
            // The descriptor opened before the bind names what is under it: open the mount.
            let bound = root
                .resolve(&root::components(&m.destination), libc::O_PATH)
                .map_err(point_err)?;
            remount(&root::fd_path(&bound), rest, &m.destination)?;
        }
    } else {
        let flags = opts.flags & !(libc::MS_BIND | libc::MS_REC);
        let source = if m.source.is_empty() {
            m.fstype.as_str()
        } else {
            m.source.as_str()
        };
        sys::mount(
            Some(source),
            &target_path,
            Some(&m.fstype),
            flags,
            Some(&data),
        )
        .map_err(mount_err)?;
    }
    for (option, flag) in &opts.propagation {
        // The new mount is reached through the same mount point path.
        let point = root
            .resolve(&root::components(&m.destination), libc::O_PATH)
            .map_err(point_err)?;
        sys::mount(None, &root::fd_path(&point), None, *flag, None).map_err(|source| {
            MountError::Propagation {
                option: option.clone(),
                dest: m.destination.clone(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Remounts the bind mount at `path` with `flags` (`MS_RDONLY`, `MS_NOSUID`, ...).
pub fn remount(path: &Path, flags: libc::c_ulong, dest: &str) -> Result<(), MountError> {
    sys::mount(
        None,
        path,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | flags,
        None,
    )
    .map_err(|source| MountError::Remount {
        dest: dest.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_become_flags_propagation_and_data() {
        let o = parse_options(&strs(&[
            "nosuid",
            "noexec",
            "rbind",
            "ro",
            "rprivate",
            "mode=755",
            "size=65536k",
            "rw",
        ]));
        assert_eq!(
            o.flags,
            libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_BIND | libc::MS_REC
        );
        assert_eq!(
            o.propagation,
            vec![("rprivate".to_string(), libc::MS_PRIVATE | libc::MS_REC)]
        );
        assert_eq!(o.data(), "mode=755,size=65536k");
        assert!(optional("cgroup") && optional("cgroup2") && !optional("proc"));
    }
}
