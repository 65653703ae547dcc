//! A tiny writer of uncompressed `newc` cpio archives, the format the Linux kernel unpacks into
//! its initramfs. Tests append such an archive (carrying `/test.sh` and data files) to the
//! compressed base initramfs: the kernel accepts concatenated archives.

use std::path::{Path, PathBuf};

/// Errors building an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// A name is empty, absolute after normalisation, or too long.
    #[error("invalid cpio entry name {0:?}")]
    BadName(String),
    /// A file is larger than the 32-bit newc size field.
    #[error("cpio entry {0:?} is larger than 4 GiB")]
    TooLarge(String),
    /// I/O on the base initramfs or the output.
    #[error("initramfs {path}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

/// An in-memory newc archive under construction.
#[derive(Debug, Default)]
pub struct CpioArchive {
    buf: Vec<u8>,
    next_ino: u32,
}

impl CpioArchive {
    /// An empty archive.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            next_ino: 1,
        }
    }

    /// Adds a directory (`mode` = permission bits, e.g. `0o755`).
    pub fn add_dir(&mut self, name: &str, mode: u32) -> Result<(), CpioError> {
        self.entry(name, S_IFDIR | (mode & 0o7777), 2, &[])
    }

    /// Adds a regular file (`mode` = permission bits, e.g. `0o755` for a script).
    pub fn add_file(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<(), CpioError> {
        self.entry(name, S_IFREG | (mode & 0o7777), 1, data)
    }

    /// Adds a symbolic link `name` → `target`.
    pub fn add_symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        self.entry(name, S_IFLNK | 0o777, 1, target.as_bytes())
    }

    /// Terminates the archive (`TRAILER!!!`) and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.next_ino = 0;
        // The trailer name is valid by construction.
        let _ = self.raw_entry("TRAILER!!!", 0, 1, &[]);
        self.buf
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) -> Result<(), CpioError> {
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') || name == "TRAILER!!!" {
            return Err(CpioError::BadName(name.to_string()));
        }
        self.raw_entry(name, mode, nlink, data)
    }

    fn raw_entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        data: &[u8],
    ) -> Result<(), CpioError> {
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge(name.to_string()))?;
        let namesize =
            u32::try_from(name.len() + 1).map_err(|_| CpioError::BadName(name.to_string()))?;
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize, 0];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad4();
        self.buf.extend_from_slice(data);
        self.pad4();
        Ok(())
    }

    fn pad4(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }
}

/// Writes `out` = the base initramfs (any format the kernel accepts, e.g. gzip'd cpio), zero
/// padding to a 512-byte boundary, then `extra` (an uncompressed newc archive).
pub fn append_initramfs(base: &Path, extra: &[u8], out: &Path) -> Result<(), CpioError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CpioError::Io { path, source }
    };
    let mut bytes = std::fs::read(base).map_err(io(base))?;
    // The kernel skips zero bytes between archives but wants each archive 4-byte aligned.
    let padded = bytes.len().div_ceil(512) * 512;
    bytes.resize(padded, 0);
    bytes.extend_from_slice(extra);
    std::fs::write(out, bytes).map_err(io(out))
}

/// Writes `out` = the base initramfs plus an archive holding `files` (`(path, mode, bytes)`,
/// parent directories created) and, when given, `script` as `/test.sh` (a `#!/bin/sh` line
/// added; the guest's `/init` runs it and reports its status as `RQEMU-EXIT=`).
pub fn test_initramfs(
    base: &Path,
    files: &[(String, u32, Vec<u8>)],
    script: Option<&str>,
    out: &Path,
) -> Result<(), CpioError> {
    let mut archive = CpioArchive::new();
    let mut dirs: Vec<String> = Vec::new();
    for (path, _, _) in files {
        let mut parent = Path::new(path.trim_start_matches('/')).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.push(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
    }
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        archive.add_dir(d, 0o755)?;
    }
    for (path, mode, data) in files {
        archive.add_file(path, *mode, data)?;
    }
    if let Some(script) = script {
        let text = format!("#!/bin/sh\n{script}\n");
        archive.add_file("test.sh", 0o755, text.as_bytes())?;
    }
    append_initramfs(base, &archive.finish(), out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_hex(b: &[u8]) -> u32 {
        u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap()
    }

    #[test]
    fn entries_are_aligned_and_parse_back() {
        let mut a = CpioArchive::new();
        a.add_dir("/data", 0o755).unwrap();
        a.add_file("/data/x", 0o644, b"hello").unwrap();
        a.add_symlink("link", "data/x").unwrap();
        let bytes = a.finish();
        assert_eq!(bytes.len() % 4, 0);
        // Walk the archive like the kernel does.
        let mut off = 0;
        let mut names = Vec::new();
        loop {
            let h = &bytes[off..off + 110];
            assert_eq!(&h[..6], b"070701");
            let size = parse_hex(&h[54..62]) as usize;
            let namesize = parse_hex(&h[94..102]) as usize;
            let name = std::str::from_utf8(&bytes[off + 110..off + 110 + namesize - 1]).unwrap();
            names.push(name.to_string());
            let data_off = (off + 110 + namesize).div_ceil(4) * 4;
            if name == "data/x" {
                assert_eq!(&bytes[data_off..data_off + size], b"hello");
                assert_eq!(parse_hex(&h[14..22]), S_IFREG | 0o644);
            }
            off = (data_off + size).div_ceil(4) * 4;
            if name == "TRAILER!!!" {
                break;
            }
        }
        assert_eq!(off, bytes.len());
        assert_eq!(names, ["data", "data/x", "link", "TRAILER!!!"]);
    }

    #[test]
    fn bad_names_are_rejected() {
        let mut a = CpioArchive::new();
        assert!(a.add_file("/", 0o644, b"").is_err());
        assert!(a.add_file("TRAILER!!!", 0o644, b"").is_err());
        assert!(a.add_file("a\0b", 0o644, b"").is_err());
    }

    #[test]
    fn cpio_tool_reads_our_archive() {
        let Ok(cpio) = crate::paths::host_tool("cpio") else {
            panic!("`cpio` is needed for this test: run scripts/install-deps.sh");
        };
        let mut a = CpioArchive::new();
        a.add_file("test.sh", 0o755, b"#!/bin/sh\necho hi\n")
            .unwrap();
        let bytes = a.finish();
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, bytes).unwrap();
        let out = std::process::Command::new(cpio)
            .args(["-t", "-v", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("-rwxr-xr-x"), "{listing}");
        assert!(listing.contains("test.sh"), "{listing}");
    }
}
