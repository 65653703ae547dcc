//! Host-side image helpers built on `qemu-img` (create, convert, check) and `sha256sum`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::paths::{host_tool, PathError};

/// Errors of image helpers.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// `qemu-img` or `sha256sum` missing.
    #[error(transparent)]
    Path(#[from] PathError),
    /// File I/O.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("`{cmd}` failed ({status}):\n{output}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Its stdout and stderr.
        output: String,
    },
}

/// Image formats the tests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Raw.
    Raw,
    /// qcow2.
    Qcow2,
}

impl Format {
    /// The name qemu-img and the daemons use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs `qemu-img <args>`, returning stdout; an error carries the full output.
pub fn qemu_img(args: &[&str]) -> Result<String, ImageError> {
    let tool = host_tool("qemu-img")?;
    let out = Command::new(&tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(&tool))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ImageError::Failed {
            cmd: format!("qemu-img {}", args.join(" ")),
            status: out.status,
            output: text,
        })
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Creates an empty image of `size` bytes, optionally on a backing file.
pub fn create(
    path: &Path,
    format: Format,
    size: u64,
    backing: Option<(&Path, Format)>,
) -> Result<(), ImageError> {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", format.name()];
    let (b, bf);
    if let Some((backing, backing_format)) = backing {
        b = s(backing);
        bf = backing_format.name();
        args.extend(["-b", &b, "-F", bf]);
    }
    let p = s(path);
    args.extend([p.as_str(), size.as_str()]);
    qemu_img(&args).map(drop)
}

/// Writes `bytes` as an image: raw directly, qcow2 through `qemu-img convert` (all-zero
/// clusters stay unallocated; `compress` makes compressed clusters).
pub fn write_image(
    path: &Path,
    format: Format,
    bytes: &[u8],
    compress: bool,
) -> Result<(), ImageError> {
    match format {
        Format::Raw => std::fs::write(path, bytes).map_err(io_err(path)),
        Format::Qcow2 => {
            let raw = path.with_extension("src.raw");
            std::fs::write(&raw, bytes).map_err(io_err(&raw))?;
            let (r, p) = (s(&raw), s(path));
            let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2"];
            if compress {
                args.push("-c");
            }
            args.extend([r.as_str(), p.as_str()]);
            let res = qemu_img(&args).map(drop);
            let _ = std::fs::remove_file(&raw);
            res
        }
    }
}

/// The guest-visible contents of an image (qcow2 through `qemu-img convert -O raw`, which also
/// resolves backing files).
pub fn read_image(path: &Path, format: Format) -> Result<Vec<u8>, ImageError> {
    match format {
        Format::Raw => std::fs::read(path).map_err(io_err(path)),
        Format::Qcow2 => {
            let raw = path.with_extension("converted.raw");
            let (p, r) = (s(path), s(&raw));
            qemu_img(&["convert", "-q", "-f", "qcow2", "-O", "raw", &p, &r])?;
            let bytes = std::fs::read(&raw).map_err(io_err(&raw));
            let _ = std::fs::remove_file(&raw);
            bytes
        }
    }
}

/// `qemu-img check` (fails on any corruption or leak); returns its report.
pub fn check(path: &Path) -> Result<String, ImageError> {
    qemu_img(&["check", "-f", "qcow2", &s(path)])
}

/// SHA-256 of `bytes` as lowercase hex, computed by the host's `sha256sum`.
pub fn sha256(bytes: &[u8]) -> Result<String, ImageError> {
    let tool = host_tool("sha256sum")?;
    let mut child = Command::new(&tool)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(io_err(&tool))?;
    let stdin = child.stdin.take();
    let (_, out) = std::thread::scope(|scope| {
        // The writer owns stdin and closes it when done, so sha256sum sees EOF.
        let w = scope.spawn(move || stdin.map(|mut i| i.write_all(bytes)));
        let out = child.wait_with_output();
        (w.join(), out)
    });
    let out = out.map_err(io_err(&tool))?;
    let digest = String::from_utf8_lossy(&out.stdout);
    let digest = digest.split_whitespace().next().unwrap_or_default();
    if !out.status.success() || digest.len() != 64 {
        return Err(ImageError::Failed {
            cmd: "sha256sum".into(),
            status: out.status,
            output: digest.to_string(),
        });
    }
    Ok(digest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(
            sha256(b"abc").unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn qcow2_round_trip_and_check() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = crate::disk::pattern(5, 1 << 20);
        data[..65536].fill(0);
        let img = dir.path().join("a.qcow2");
        write_image(&img, Format::Qcow2, &data, true).unwrap();
        check(&img).unwrap();
        assert_eq!(read_image(&img, Format::Qcow2).unwrap(), data);
        let overlay = dir.path().join("b.qcow2");
        create(
            &overlay,
            Format::Qcow2,
            2 << 20,
            Some((&img, Format::Qcow2)),
        )
        .unwrap();
        let seen = read_image(&overlay, Format::Qcow2).unwrap();
        assert_eq!(&seen[..1 << 20], &data[..]);
        assert!(seen[1 << 20..].iter().all(|&b| b == 0));
    }
}
