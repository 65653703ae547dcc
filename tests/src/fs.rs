//! virtiofs with `rqemu-fs`: spawning the daemon on a shared directory, guest script pieces
//! (mount, tree manifest) and the host-side manifest of the same tree, so a test can check the
//! host sees exactly what the guest made.
//!
//! A manifest maps each path below the mount (`./a/b`, sorted) to `d` (directory),
//! `l:<target>` (symlink) or `f:<sha256>` (regular file).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::daemon::{Daemon, DaemonError, DEFAULT_START_TIMEOUT};
use crate::paths::{host_tool, project_binary, repo_root, PathError};
use crate::qemu::{GuestRun, VhostUserDevice};

/// Errors of the virtiofs helpers.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A binary or tool is missing.
    #[error(transparent)]
    Path(#[from] PathError),
    /// The daemon failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// Host-side file access failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `sha256sum` failed.
    #[error("sha256sum {0} failed")]
    Sha(PathBuf),
    /// Compiling a guest tool failed.
    #[error("building guest tool {name}: {detail}")]
    GuestTool {
        /// The tool.
        name: String,
        /// What the compiler said.
        detail: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FsError + '_ {
    move |source| FsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Options of an `rqemu-fs` instance.
#[derive(Debug, Clone)]
pub struct FsDaemonOptions {
    /// Mount tag.
    pub tag: String,
    /// `--readonly`.
    pub readonly: bool,
    /// `--cache` value (`auto`, `always`, `never`).
    pub cache: String,
    /// `--queues`.
    pub queues: u16,
    /// `RQEMU_LOG` filter for the daemon (e.g. `info,rqemu_fs_backend=debug`); inherited if
    /// `None`.
    pub log_filter: Option<String>,
}

impl Default for FsDaemonOptions {
    fn default() -> Self {
        Self {
            tag: "rqemu".into(),
            readonly: false,
            cache: "auto".into(),
            queues: 1,
            log_filter: None,
        }
    }
}

/// Spawns `rqemu-fs` sharing `shared`, its socket and log in `work`.
pub fn spawn_rqemu_fs(
    work: &Path,
    shared: &Path,
    opts: &FsDaemonOptions,
) -> Result<(Daemon, VhostUserDevice), FsError> {
    let socket = work.join("rqemu-fs.sock");
    let log = work.join("rqemu-fs.log");
    let mut cmd = Command::new(project_binary("rqemu-fs")?);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--shared-dir")
        .arg(shared)
        .args(["--tag", &opts.tag, "--cache", &opts.cache])
        .args(["--queues", &opts.queues.to_string()]);
    if opts.readonly {
        cmd.arg("--readonly");
    }
    if let Some(filter) = &opts.log_filter {
        cmd.env("RQEMU_LOG", filter);
    }
    let daemon = Daemon::spawn("rqemu-fs", cmd, &socket, &log, DEFAULT_START_TIMEOUT)?;
    let dev = VhostUserDevice::Fs {
        socket,
        tag: opts.tag.clone(),
    };
    Ok((daemon, dev))
}

/// Compiles the guest tool `tests/guest-tools/<name>.c` into a static x86-64 binary in
/// `work` (host `gcc -static`, glibc's `libc.a`) and returns its bytes, for
/// [`crate::QemuVm::file`]. The guest's busybox has no `flock`, `fcntl` locks or
/// `copy_file_range`.
pub fn build_guest_tool(name: &str, work: &Path) -> Result<Vec<u8>, FsError> {
    let src = repo_root().join(format!("tests/guest-tools/{name}.c"));
    let out = work.join(name);
    let fail = |detail: String| FsError::GuestTool {
        name: name.to_string(),
        detail,
    };
    let res = Command::new(host_tool("gcc")?)
        .args(["-static", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !res.status.success() {
        return Err(fail(format!(
            "gcc -static failed (is glibc's libc.a installed?): {}",
            String::from_utf8_lossy(&res.stderr)
        )));
    }
    std::fs::read(&out).map_err(io_err(&out))
}

/// Guest shell lines printing the manifest of the tree at `dir` as
/// `RQEMU-VAL <prefix><path>=<entry>` lines.
pub fn manifest_script(dir: &str, prefix: &str) -> String {
    format!(
        r#"( cd {dir} && find . -mindepth 1 | sort | while read -r p; do
  if [ -L "$p" ]; then echo "RQEMU-VAL {prefix}$p=l:$(readlink "$p")"
  elif [ -d "$p" ]; then echo "RQEMU-VAL {prefix}$p=d"
  else echo "RQEMU-VAL {prefix}$p=f:$(sha256sum "$p" | cut -d' ' -f1)"; fi
done )
"#
    )
}

/// The manifest the guest printed with [`manifest_script`].
pub fn guest_manifest(run: &GuestRun, prefix: &str) -> BTreeMap<String, String> {
    run.lines_with_prefix("RQEMU-VAL ")
        .filter_map(|kv| kv.strip_prefix(prefix))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// SHA-256 (hex) of a host file, by `sha256sum`.
pub fn sha256_file(path: &Path) -> Result<String, FsError> {
    let out = Command::new(host_tool("sha256sum")?)
        .arg(path)
        .output()
        .map_err(io_err(path))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().next() {
        Some(h) if out.status.success() && h.len() == 64 => Ok(h.to_string()),
        _ => Err(FsError::Sha(path.to_path_buf())),
    }
}

/// The host-side manifest of `dir` (same format as [`manifest_script`]).
pub fn host_manifest(dir: &Path) -> Result<BTreeMap<String, String>, FsError> {
    let mut out = BTreeMap::new();
    walk(dir, ".", &mut out)?;
    Ok(out)
}

fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, String>) -> Result<(), FsError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let name = format!("{rel}/{}", entry.file_name().to_string_lossy());
        let meta = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
        let value = if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).map_err(io_err(&path))?;
            format!("l:{}", target.display())
        } else if meta.is_dir() {
            walk(&path, &name, out)?;
            "d".to_string()
        } else {
            format!("f:{}", sha256_file(&path)?)
        };
        out.insert(name, value);
    }
    Ok(())
}
