//! The state directory of each container under `--root`, and the OCI state derived from it.
//!
//! `ROOT/ID/` holds `state.json` (written by `create`), `started` (the monitor records that
//! `start` arrived), `exit.json` (the monitor's last act: the container's exit code), `pgid`
//! (the process group of the VM's processes), the logs of every child, and `console.log` (the
//! guest's serial console). Sockets live in `sock_dir` (the state directory when its paths fit
//! in a `sockaddr_un`, else a short directory under the temporary directory).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// OCI runtime-spec version reported in `state` and `features`.
pub const OCI_VERSION: &str = "1.2.0";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid container id {0:?}: use letters, digits, '_', '-' and '.', starting with a letter or digit")]
    BadId(String),
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: corrupt state: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks a container id: no path separators, no `.`/`..`, printable ASCII.
pub fn validate_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::BadId(id.to_string()))
    }
}

/// What `create` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// The monitor process.
    pub pid: i32,
    /// Its start time (`/proc/PID/stat` field 22), so a reused pid is not mistaken for it.
    pub pid_start: u64,
    pub created: String,
    pub annotations: BTreeMap<String, String>,
    pub sock_dir: PathBuf,
}

/// How the monitor ended, as it recorded it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ExitRecord {
    pub code: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Stopped => "stopped",
        }
    }
}

/// One container's directory.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub dir: PathBuf,
}

impl Container {
    pub fn new(root: &Path, id: &str) -> Result<Self, Error> {
        validate_id(id)?;
        Ok(Self {
            id: id.to_string(),
            dir: root.join(id),
        })
    }

    /// Creates the directory (0700); fails if the container exists.
    pub fn create_dir(&self, root: &Path) -> Result<(), Error> {
        use std::os::unix::fs::DirBuilderExt;
        if !root.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(io_err(root))?;
        }
        match fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(Error::Exists(self.id.clone()))
            }
            Err(e) => Err(io_err(&self.dir)(e)),
        }
    }

    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn load(&self) -> Result<Record, Error> {
        let path = self.path("state.json");
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound(self.id.clone()))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        serde_json::from_slice(&text).map_err(|source| Error::Corrupt { path, source })
    }

    pub fn save(&self, rec: &Record) -> Result<(), Error> {
        // serde_json cannot fail on this struct (string keys, no floats).
        let text = serde_json::to_vec_pretty(rec).unwrap_or_default();
        write_atomic(&self.path("state.json"), &text)
    }

    pub fn exit_record(&self) -> Option<ExitRecord> {
        let text = fs::read(self.path("exit.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn started(&self) -> bool {
        self.path("started").exists()
    }

    pub fn pgid(&self) -> Option<i32> {
        fs::read_to_string(self.path("pgid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The container's status, derived from the monitor's liveness and its records.
    pub fn status(&self, rec: &Record) -> Status {
        if self.exit_record().is_some() || !process_alive(rec.pid, rec.pid_start) {
            Status::Stopped
        } else if self.started() {
            Status::Running
        } else {
            Status::Created
        }
    }

    /// The OCI state document.
    pub fn oci_state(&self, rec: &Record) -> serde_json::Value {
        let status = self.status(rec);
        let pid = if status == Status::Stopped {
            0
        } else {
            rec.pid
        };
        serde_json::json!({
            "ociVersion": OCI_VERSION,
            "id": rec.id,
            "status": status.as_str(),
            "pid": pid,
            "bundle": rec.bundle,
            "rootfs": rec.rootfs,
            "created": rec.created,
            "owner": "",
            "annotations": rec.annotations,
        })
    }
}

/// Writes `path` through a temporary file and a rename, so readers never see half a file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Start time and state letter of a process (`/proc/PID/stat` fields 22 and 3).
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// Start time of a live process.
pub fn process_start(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|(_, s)| s)
}

/// Whether `pid` is still the process that started at `start` and is not a zombie.
pub fn process_alive(pid: i32, start: u64) -> bool {
    pid > 0 && matches!(proc_stat(pid), Some((st, s)) if s == start && st != 'Z' && st != 'X')
}

/// Now, as RFC 3339 UTC with nanoseconds (Go's `time.RFC3339Nano`, as runc writes it).
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

/// Where the container's sockets go: the state directory if the longest socket path
/// (`vsock.sock_1024`, `bindNN.sock`) fits in a `sockaddr_un`, else a short directory named
/// by a hash of the state directory under the temporary directory.
pub fn sock_dir_for(state_dir: &Path) -> PathBuf {
    const LONGEST: usize = "/vsock.sock_1024".len();
    if state_dir.as_os_str().len() + LONGEST < 100 {
        return state_dir.to_path_buf();
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    state_dir.hash(&mut h);
    std::env::temp_dir().join(format!("rqemu-run-{:016x}", h.finish()))
}

/// Creates the socket directory 0700, or takes an existing one only if it is a real directory
/// of ours that nobody else may enter (it may sit in a shared temporary directory, under a
/// predictable name).
pub fn private_dir(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let m = fs::symlink_metadata(path).map_err(io_err(path))?;
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            if m.is_dir() && m.uid() == me && m.mode() & 0o077 == 0 {
                Ok(())
            } else {
                Err(io_err(path)(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "exists and is not a private directory of this user: remove it",
                )))
            }
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["a", "abc-DEF_1.2", &"f".repeat(64)] {
            validate_id(ok).unwrap();
        }
        for bad in ["", ".", "..", "../x", "a/b", "-a", ".hidden", "a b", "a\0"] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rfc3339_shape() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 30, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T",
            "{t}"
        );
    }

    #[test]
    fn own_process_is_alive_and_status_follows_records() {
        let me = std::process::id() as i32;
        let start = process_start(me).unwrap();
        assert!(process_alive(me, start));
        assert!(!process_alive(me, start + 1));
        let root = tempfile::tempdir().unwrap();
        let c = Container::new(root.path(), "c1").unwrap();
        c.create_dir(root.path()).unwrap();
        assert!(matches!(c.create_dir(root.path()), Err(Error::Exists(_))));
        let rec = Record {
            id: "c1".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            pid: me,
            pid_start: start,
            created: now_rfc3339(),
            annotations: BTreeMap::new(),
            sock_dir: c.dir.clone(),
        };
        c.save(&rec).unwrap();
        let rec = c.load().unwrap();
        assert_eq!(c.status(&rec), Status::Created);
        fs::write(c.path("started"), b"").unwrap();
        assert_eq!(c.status(&rec), Status::Running);
        assert_eq!(c.oci_state(&rec)["pid"], me);
        fs::write(c.path("exit.json"), br#"{"code":3}"#).unwrap();
        assert_eq!(c.status(&rec), Status::Stopped);
        assert_eq!(c.oci_state(&rec)["status"], "stopped");
    }

    #[test]
    fn socket_dirs_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("s");
        private_dir(&d).unwrap();
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        private_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(private_dir(&d).is_err());
        let l = t.path().join("link");
        std::os::unix::fs::symlink(t.path(), &l).unwrap();
        assert!(private_dir(&l).is_err());
    }

    #[test]
    fn long_state_dirs_get_short_socket_dirs() {
        let short = Path::new("/run/rqemu-run/c1");
        assert_eq!(sock_dir_for(short), short);
        let long = PathBuf::from(format!("/tmp/.tmpABCDEF/root/{}", "f".repeat(64)));
        let s = sock_dir_for(&long);
        assert_ne!(s, long);
        assert_eq!(s, sock_dir_for(&long));
        assert!(s.as_os_str().len() < 80);
    }
}
