//! The OCI `config.json` reduced to what the guest agent needs ([`ContainerSpec`]) and what
//! the host serves ([`Share`]s: the rootfs and each directory bind mount, one rqemu-fs each).
//! Single-file bind mounts (`/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`,
//! `/run/.containerenv`) become [`FileCopy`]s: virtiofs shares directories.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, PosixRlimitType, Spec};
use rqemu_agent_protocol::{ContainerSpec, FileCopy, Mount, Process, Rlimit, Rootfs, VIRTIOFS};

/// Largest single file copied into the guest (engine-made files are a few hundred bytes).
const MAX_COPY: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("config.json has no root.path")]
    NoRoot,
    #[error("config.json has no process (nothing to run)")]
    NoProcess,
    #[error("config.json: process.args is empty")]
    NoArgs,
    #[error("rootfs {path}: {source}")]
    Rootfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bind mount source {path}: {source}")]
    BindSource {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bind mount source {0} is a file over 1 MiB: only directories are shared")]
    BigFile(PathBuf),
}

/// A host directory served to the guest by one rqemu-fs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Share {
    pub tag: String,
    pub dir: PathBuf,
    pub readonly: bool,
}

/// Everything `create` takes from the bundle.
#[derive(Debug, Clone)]
pub struct Reduced {
    pub spec: ContainerSpec,
    pub shares: Vec<Share>,
    pub rootfs: PathBuf,
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Things of the spec the VM does not do, for the log.
    pub ignored: Vec<String>,
    /// The network namespace to join (`linux.namespaces` `network` with a path): its
    /// interfaces become the guest's NICs. None: loopback only.
    pub netns: Option<PathBuf>,
}

/// The tag of the rootfs share.
pub const ROOTFS_TAG: &str = "rootfs";

/// Linux's number of an OCI rlimit name.
pub fn rlimit_number(t: PosixRlimitType) -> u32 {
    use PosixRlimitType::*;
    match t {
        RlimitCpu => 0,
        RlimitFsize => 1,
        RlimitData => 2,
        RlimitStack => 3,
        RlimitCore => 4,
        RlimitRss => 5,
        RlimitNproc => 6,
        RlimitNofile => 7,
        RlimitMemlock => 8,
        RlimitAs => 9,
        RlimitLocks => 10,
        RlimitSigpending => 11,
        RlimitMsgqueue => 12,
        RlimitNice => 13,
        RlimitRtprio => 14,
        RlimitRttime => 15,
    }
}

fn abs(bundle: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        bundle.join(p)
    }
}

/// Loads `bundle/config.json` and reduces it.
pub fn load(bundle: &Path) -> Result<Reduced, Error> {
    let path = bundle.join("config.json");
    let spec = Spec::load(&path).map_err(|source| Error::Load { path, source })?;
    reduce(bundle, &spec)
}

pub fn reduce(bundle: &Path, spec: &Spec) -> Result<Reduced, Error> {
    let root = spec.root().as_ref().ok_or(Error::NoRoot)?;
    let rootfs = abs(bundle, root.path());
    let rootfs = rootfs.canonicalize().map_err(|source| Error::Rootfs {
        path: rootfs.clone(),
        source,
    })?;
    let readonly = root.readonly().unwrap_or(false);
    let mut shares = vec![Share {
        tag: ROOTFS_TAG.into(),
        dir: rootfs.clone(),
        readonly,
    }];
    let mut ignored = Vec::new();
    let mut mounts = Vec::new();
    let mut files = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let dest = m.destination().display().to_string();
        let opts: Vec<String> = m.options().clone().unwrap_or_default();
        let is_bind =
            m.typ().as_deref() == Some("bind") || opts.iter().any(|o| o == "bind" || o == "rbind");
        if !is_bind {
            mounts.push(Mount {
                destination: dest,
                fstype: m.typ().clone().unwrap_or_default(),
                source: m
                    .source()
                    .as_ref()
                    .map(|s| s.display().to_string())
                    .unwrap_or_default(),
                options: opts,
            });
            continue;
        }
        let Some(src) = m.source() else {
            ignored.push(format!("bind mount on {dest} without a source"));
            continue;
        };
        let src = abs(bundle, src);
        let meta = std::fs::metadata(&src).map_err(|source| Error::BindSource {
            path: src.clone(),
            source,
        })?;
        let ro = opts.iter().any(|o| o == "ro");
        if meta.is_dir() {
            let tag = format!("bind{}", shares.len() - 1);
            shares.push(Share {
                tag: tag.clone(),
                dir: src,
                readonly: ro,
            });
            mounts.push(Mount {
                destination: dest,
                fstype: VIRTIOFS.into(),
                source: tag,
                options: opts
                    .into_iter()
                    .filter(|o| o != "bind" && o != "rbind")
                    .collect(),
            });
        } else if meta.is_file() {
            if meta.len() > MAX_COPY {
                return Err(Error::BigFile(src));
            }
            let contents = std::fs::read(&src).map_err(|source| Error::BindSource {
                path: src.clone(),
                source,
            })?;
            use std::os::unix::fs::PermissionsExt;
            files.push(FileCopy {
                destination: dest,
                contents,
                mode: meta.permissions().mode() & 0o7777,
                readonly: ro,
            });
        } else {
            ignored.push(format!(
                "bind mount of {} on {dest}: neither a directory nor a regular file",
                src.display()
            ));
        }
    }
    let p = spec.process().as_ref().ok_or(Error::NoProcess)?;
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(Error::NoArgs);
    }
    let user = p.user();
    let (rows, cols) = p
        .console_size()
        .map(|b| (b.height() as u16, b.width() as u16))
        .unwrap_or((0, 0));
    let process = Process {
        args,
        env: p.env().clone().unwrap_or_default(),
        cwd: p.cwd().display().to_string(),
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        terminal: p.terminal().unwrap_or(false),
        rows,
        cols,
        rlimits: p
            .rlimits()
            .iter()
            .flatten()
            .map(|r| Rlimit {
                resource: rlimit_number(r.typ()),
                soft: r.soft(),
                hard: r.hard(),
            })
            .collect(),
        no_new_privileges: p.no_new_privileges().unwrap_or(false),
        umask: user.umask(),
    };
    let sysctl = spec
        .linux()
        .as_ref()
        .and_then(|l| l.sysctl().clone())
        .map(|m| {
            let mut v: Vec<(String, String)> = m.into_iter().collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    let netns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| {
            ns.iter()
                .find(|n| n.typ() == LinuxNamespaceType::Network)
                .and_then(|n| n.path().clone())
        })
        .map(|p| abs(bundle, &p));
    if spec.hooks().is_some() {
        ignored.push("hooks (they would run on the host, not in the VM)".into());
    }
    Ok(Reduced {
        spec: ContainerSpec {
            rootfs: Rootfs {
                tag: ROOTFS_TAG.into(),
                readonly,
            },
            hostname: spec.hostname().clone(),
            mounts,
            files,
            sysctl,
            process,
            network: Vec::new(),
        },
        shares,
        rootfs,
        annotations: spec
            .annotations()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        ignored,
        netns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_with(config: serde_json::Value) -> tempfile::TempDir {
        let b = tempfile::tempdir().unwrap();
        std::fs::create_dir(b.path().join("rootfs")).unwrap();
        std::fs::write(b.path().join("config.json"), config.to_string()).unwrap();
        b
    }

    #[test]
    fn podman_like_config_is_reduced() {
        let host = tempfile::tempdir().unwrap();
        let hosts = host.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let data = host.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let b = bundle_with(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "c1",
            "process": {
                "terminal": true,
                "consoleSize": {"height": 30, "width": 100},
                "user": {"uid": 1, "gid": 2, "additionalGids": [3], "umask": 18},
                "args": ["/bin/sh", "-c", "echo hi"],
                "env": ["PATH=/bin"],
                "cwd": "/tmp",
                "rlimits": [
                    {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},
                    {"type": "RLIMIT_NPROC", "hard": 512, "soft": 256}
                ],
                "noNewPrivileges": true
            },
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid"]},
                {"destination": "/etc/hosts", "type": "bind", "source": hosts,
                 "options": ["bind", "rprivate", "ro"]},
                {"destination": "/data", "type": "bind", "source": data, "options": ["rbind"]}
            ],
            "linux": {"sysctl": {"net.ipv4.ip_forward": "1"},
                      "namespaces": [{"type": "mount"},
                                     {"type": "network", "path": "/run/netns/n1"}]},
            "annotations": {"a": "b"}
        }));
        let r = load(b.path()).unwrap();
        assert_eq!(r.rootfs, b.path().join("rootfs").canonicalize().unwrap());
        assert_eq!(r.shares.len(), 2);
        assert!(r.shares[0].readonly && r.shares[0].tag == ROOTFS_TAG);
        assert_eq!(r.shares[1].dir, data);
        assert_eq!(r.shares[1].tag, "bind0");
        let s = &r.spec;
        assert!(s.rootfs.readonly);
        assert_eq!(s.hostname.as_deref(), Some("c1"));
        assert_eq!(s.mounts.len(), 2);
        assert_eq!(s.mounts[0].fstype, "proc");
        assert_eq!(s.mounts[1].fstype, VIRTIOFS);
        assert_eq!(s.mounts[1].source, "bind0");
        assert_eq!(s.mounts[1].destination, "/data");
        assert!(s.mounts[1].options.is_empty());
        assert_eq!(s.files.len(), 1);
        assert_eq!(s.files[0].destination, "/etc/hosts");
        assert_eq!(s.files[0].contents, b"127.0.0.1 localhost\n");
        assert!(s.files[0].readonly);
        let p = &s.process;
        assert_eq!(p.args, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!((p.uid, p.gid, p.additional_gids.clone()), (1, 2, vec![3]));
        assert_eq!((p.rows, p.cols, p.terminal), (30, 100, true));
        assert_eq!(p.umask, Some(18));
        assert_eq!(
            p.rlimits,
            [
                Rlimit {
                    resource: 7,
                    soft: 1024,
                    hard: 1024
                },
                Rlimit {
                    resource: 6,
                    soft: 256,
                    hard: 512
                }
            ]
        );
        assert_eq!(s.sysctl, [("net.ipv4.ip_forward".into(), "1".into())]);
        assert_eq!(r.annotations["a"], "b");
        assert_eq!(r.netns.as_deref(), Some(Path::new("/run/netns/n1")));
    }

    #[test]
    fn a_new_network_namespace_is_loopback_only() {
        let b = bundle_with(serde_json::json!({
            "ociVersion": "1.0.2", "root": {"path": "rootfs"},
            "process": {"args": ["x"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "linux": {"namespaces": [{"type": "network"}]}
        }));
        assert_eq!(load(b.path()).unwrap().netns, None);
    }

    #[test]
    fn broken_bundles_are_errors() {
        let b = bundle_with(
            serde_json::json!({"ociVersion": "1.0.2", "root": {"path": "nope"},
            "process": {"args": ["x"], "cwd": "/", "user": {"uid": 0, "gid": 0}}}),
        );
        assert!(matches!(load(b.path()), Err(Error::Rootfs { .. })));
        let b = bundle_with(
            serde_json::json!({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
            "process": {"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}}),
        );
        assert!(matches!(load(b.path()), Err(Error::NoArgs)));
        let b = bundle_with(
            serde_json::json!({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
            "process": {"args": ["x"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                        "rlimits": [{"type": "RLIMIT_BOGUS", "hard": 1, "soft": 1}]}}),
        );
        assert!(matches!(load(b.path()), Err(Error::Load { .. })));
        let b = tempfile::tempdir().unwrap();
        assert!(matches!(load(b.path()), Err(Error::Load { .. })));
    }
}
