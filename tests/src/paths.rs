//! Where things are: the repository, the guest assets, project binaries and host tools.
//!
//! Nothing here ever skips: a missing asset, binary or tool is an error whose message says how
//! to provide it.

use std::path::{Path, PathBuf};

/// Environment variable overriding the guest asset directory (default `<repo>/target/guest`).
pub const GUEST_DIR_ENV: &str = "RQEMU_GUEST_DIR";
/// Environment variable overriding the directory holding the project binaries.
pub const BIN_DIR_ENV: &str = "RQEMU_BIN_DIR";

/// Errors locating assets, binaries and tools.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// A guest asset file is missing.
    #[error(
        "guest asset {path} is missing: run `scripts/guest-assets.sh` first \
         (needs `scripts/install-deps.sh`; output dir overridable with {GUEST_DIR_ENV})"
    )]
    MissingAsset {
        /// The missing file.
        path: PathBuf,
    },
    /// A project binary is not built.
    #[error(
        "project binary `{name}` not found at {path}: build it first with \
         `cargo build --workspace --bins` (same CARGO_TARGET_DIR and profile as the tests), \
         or point {BIN_DIR_ENV} at the directory holding it"
    )]
    MissingBinary {
        /// Binary name.
        name: String,
        /// Where it was expected.
        path: PathBuf,
    },
    /// The test executable's location could not be determined.
    #[error("cannot locate the test executable to derive the binary directory: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// A host tool is not in `PATH`.
    #[error("host tool `{0}` not found in PATH: run `scripts/install-deps.sh`")]
    MissingTool(String),
}

/// The repository root (parent of the `tests/` crate).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The guest kernel and initramfs built by `scripts/guest-assets.sh`.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    /// Directory holding the assets.
    pub dir: PathBuf,
    /// The Debian cloud kernel, bzImage.
    pub vmlinuz: PathBuf,
    /// The same kernel as an ELF file with a PVH note.
    pub vmlinux: PathBuf,
    /// busybox initramfs (gzip-compressed newc cpio) with `/init` and the virtio modules.
    pub initramfs: PathBuf,
    /// Kernel package version, e.g. `6.1.192-2`.
    pub kernel_version: String,
}

impl GuestAssets {
    /// Locates the assets in `$RQEMU_GUEST_DIR` or `<repo>/target/guest`.
    pub fn locate() -> Result<Self, PathError> {
        let dir = std::env::var_os(GUEST_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target").join("guest"));
        let need = |name: &str| -> Result<PathBuf, PathError> {
            let path = dir.join(name);
            match std::fs::metadata(&path) {
                Ok(m) if m.len() > 0 => Ok(path),
                _ => Err(PathError::MissingAsset { path }),
            }
        };
        let vmlinuz = need("vmlinuz")?;
        let vmlinux = need("vmlinux")?;
        let initramfs = need("initramfs.cpio.gz")?;
        let version_file = need("kernel-version")?;
        let kernel_version = std::fs::read_to_string(&version_file)
            .map_err(|_| PathError::MissingAsset { path: version_file })?
            .trim()
            .to_string();
        Ok(Self {
            dir,
            vmlinuz,
            vmlinux,
            initramfs,
            kernel_version,
        })
    }
}

/// The directory holding the project binaries: `$RQEMU_BIN_DIR`, else the cargo profile
/// directory of the running test executable (`<target>/<profile>/deps/<test>` → `<target>/<profile>`).
pub fn bin_dir() -> Result<PathBuf, PathError> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().map_err(PathError::CurrentExe)?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of a project binary (e.g. `rqemu-blk`), which must exist.
pub fn project_binary(name: &str) -> Result<PathBuf, PathError> {
    let path = bin_dir()?.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(PathError::MissingBinary {
            name: name.to_string(),
            path,
        })
    }
}

/// Path of a host tool found in `PATH` (e.g. `qemu-system-x86_64`).
pub fn host_tool(name: &str) -> Result<PathBuf, PathError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| PathError::MissingTool(name.to_string()))
}

/// A host program and every shared library `ldd` names for it, as `(guest path, bytes)`: the
/// program at `<guest_dir>/<file name>` (no leading `/`), each library at its own host path
/// (the dynamic loader included), for a test initramfs. Panics naming the Debian package to
/// install when the program is missing.
pub fn host_program_files(
    program: &Path,
    guest_dir: &str,
    package: &str,
) -> Vec<(String, Vec<u8>)> {
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        program.exists(),
        "{} missing: run scripts/install-deps.sh (Debian package {package})",
        program.display()
    );
    let name = program.file_name().unwrap_or_default().to_string_lossy();
    let mut files = vec![(
        format!("{}/{name}", guest_dir.trim_matches('/')),
        read(program),
    )];
    let ldd = std::process::Command::new("ldd")
        .arg(program)
        .output()
        .unwrap_or_else(|e| panic!("ldd {}: {e}", program.display()));
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push((p.trim_start_matches('/').to_string(), read(Path::new(p))));
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_root_holds_the_workspace_manifest() {
        assert!(repo_root().join("Cargo.toml").is_file());
        assert!(repo_root()
            .join("tests")
            .join("guest")
            .join("init.sh")
            .is_file());
    }

    #[test]
    fn missing_binary_is_an_error_naming_the_build_command() {
        let err = project_binary("rqemu-no-such-binary").unwrap_err();
        assert!(
            err.to_string().contains("cargo build --workspace --bins"),
            "{err}"
        );
    }

    #[test]
    fn missing_tool_is_an_error() {
        assert!(host_tool("rqemu-no-such-tool").is_err());
        assert!(host_tool("sh").is_ok());
    }
}
