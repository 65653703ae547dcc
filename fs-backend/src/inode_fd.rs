//! Fresh open file descriptions of a passthrough inode, from inside the confinement.
//!
//! Record locks need one open file description per guest lock owner, and `COPY_FILE_RANGE`
//! needs a readable and a writable fd of the guest's handles; fuse-backend-rs keeps its fds
//! private. [`reopen`] opens the inode anew:
//!
//! 1. by the path the kernel prints for the passthrough's inode fd (through the
//!    `/proc/self/fd` *fd* opened before confinement, relative to the confined root), opened
//!    `O_NOFOLLOW` inside the shared directory;
//! 2. if that path no longer names the inode (renamed concurrently, unlinked but still open):
//!    by scanning the daemon's own fds for one that refers to the inode (same `st_dev` and
//!    `st_ino`) and re-opening it through `/proc/self/fd/N` — as the passthrough itself does.
//!
//! Either way the opened file is checked to be the very inode (`st_dev`, `st_ino` of the
//! passthrough's `getattr`) before it is used, so a rename race can never hand out another
//! file; when nothing matches the answer is `ESTALE`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use fuse_backend_rs::api::filesystem::{Context, FileSystem};

use crate::passthrough::Passthrough;

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn fstat(fd: RawFd) -> io::Result<libc::stat64> {
    let mut st = std::mem::MaybeUninit::<libc::stat64>::zeroed();
    // SAFETY: `st` is a writable stat64; fstat64 only writes it.
    if unsafe { libc::fstat64(fd, st.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat64 succeeded, so `st` is initialised.
    Ok(unsafe { st.assume_init() })
}

fn same_inode(file: &File, dev: u64, ino: u64) -> io::Result<bool> {
    let st = fstat(file.as_raw_fd())?;
    Ok(st.st_dev == dev && st.st_ino == ino)
}

fn openat(dir: RawFd, name: &CString, flags: i32) -> io::Result<File> {
    // SAFETY: `name` is NUL-terminated; the returned fd is owned by the File below.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Opens a new open file description of regular-file `inode` with `flags` (an access mode,
/// `O_RDONLY`/`O_WRONLY`/`O_RDWR`; `O_CLOEXEC` is added). Errors: `EINVAL` for anything but
/// a regular file, `ESTALE` if the inode cannot be reached, or the `open` error.
pub fn reopen(fs: &Passthrough, inode: u64, flags: i32) -> io::Result<File> {
    let (st, _) = fs.getattr(&Context::new(), inode, None)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(errno(libc::EINVAL));
    }
    let (dev, ino) = (st.st_dev, st.st_ino);
    let flags = flags | libc::O_NOCTTY;
    if let Ok(path) = fs.readlinkat_proc_file(inode) {
        let bytes = path.as_os_str().as_bytes();
        if bytes.first() == Some(&b'/') {
            if let Ok(path) = CString::new(bytes) {
                match openat(libc::AT_FDCWD, &path, flags | libc::O_NOFOLLOW) {
                    Ok(f) if same_inode(&f, dev, ino).unwrap_or(false) => return Ok(f),
                    // Permission and read-only errors are the answer (the inode is there).
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EROFS | libc::EACCES | libc::ETXTBSY | libc::EPERM)
                        ) =>
                    {
                        return Err(e)
                    }
                    _ => {}
                }
            }
        }
    }
    scan_own_fds(fs, dev, ino, flags)
}

/// Finds an fd of this process referring to (`dev`, `ino`) and re-opens it through the
/// `/proc/self/fd` directory fd the passthrough opened before confinement.
fn scan_own_fds(fs: &Passthrough, dev: u64, ino: u64, flags: i32) -> io::Result<File> {
    let proc_fd = *fs.keep_fds().first().ok_or_else(|| errno(libc::ESTALE))?;
    let dir = openat(
        proc_fd,
        &CString::from(c"."),
        libc::O_RDONLY | libc::O_DIRECTORY,
    )?;
    let dir_raw = dir.as_raw_fd();
    // SAFETY: `dir` is an open directory fd; fdopendir takes it over (closedir closes it),
    // so ownership moves out of `dir`.
    let stream = unsafe { libc::fdopendir(std::os::fd::IntoRawFd::into_raw_fd(dir)) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so the fd is still ours to close.
        unsafe { libc::close(dir_raw) };
        return Err(e);
    }
    let mut found = Err(errno(libc::ESTALE));
    loop {
        // SAFETY: `stream` is a valid DIR* until closedir below.
        let ent = unsafe { libc::readdir64(stream) };
        if ent.is_null() {
            break;
        }
        // SAFETY: readdir64 returned a valid dirent whose d_name is NUL-terminated.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
        let Some(fd) = name.to_str().ok().and_then(|s| s.parse::<RawFd>().ok()) else {
            continue;
        };
        if fd == dir_raw || fd == proc_fd {
            continue;
        }
        // The fd may be closed (and even reused) concurrently: only an fd that *is* the
        // inode now is re-opened, and the result is checked again.
        let Ok(st) = fstat(fd) else { continue };
        if st.st_dev != dev || st.st_ino != ino || st.st_mode & libc::S_IFMT != libc::S_IFREG {
            continue;
        }
        if let Ok(f) = openat(proc_fd, &name.to_owned(), flags) {
            if same_inode(&f, dev, ino).unwrap_or(false) {
                found = Ok(f);
                break;
            }
        }
    }
    // SAFETY: `stream` came from fdopendir and is closed exactly once.
    unsafe { libc::closedir(stream) };
    found
}

#[cfg(test)]
mod tests {
    use fuse_backend_rs::abi::fuse_abi::ROOT_ID;
    use fuse_backend_rs::api::filesystem::FsOptions;
    use std::io::Read;

    use super::*;
    use crate::{FsParams, FsServer};

    #[test]
    fn reopens_by_path_and_after_unlink() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), b"content").unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        let srv = FsServer::new(&FsParams::default(), t.path()).unwrap();
        let fs = srv.passthrough();
        fs.init(FsOptions::empty()).unwrap();
        let ctx = Context::new();
        let f = fs.lookup(&ctx, ROOT_ID, c"f").unwrap().inode;
        let d = fs.lookup(&ctx, ROOT_ID, c"d").unwrap().inode;
        let mut s = String::new();
        reopen(fs, f, libc::O_RDONLY)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "content");
        assert_eq!(
            reopen(fs, d, libc::O_RDONLY).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        // Renamed on the host: the path is stale, the fd scan finds the inode.
        std::fs::rename(t.path().join("f"), t.path().join("g")).unwrap();
        std::fs::write(t.path().join("f"), b"another file").unwrap();
        let mut s = String::new();
        reopen(fs, f, libc::O_RDONLY)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "content");
        // Unlinked: still reachable while the passthrough holds it.
        std::fs::remove_file(t.path().join("g")).unwrap();
        let mut s = String::new();
        reopen(fs, f, libc::O_RDWR)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "content");
    }

    #[test]
    fn reopens_unlinked_file_inside_the_confinement() {
        assert!(
            crate::confine::is_root(),
            "this test needs root (pivot_root)"
        );
        let outside = tempfile::tempdir().unwrap();
        let shared = outside.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join("f"), b"kept alive").unwrap();
        let got = std::thread::spawn(move || {
            let srv = FsServer::new(&FsParams::default(), std::path::Path::new("/")).unwrap();
            crate::confine::enter(&shared, false).unwrap();
            let fs = srv.passthrough();
            fs.init(FsOptions::empty()).unwrap();
            let f = fs.lookup(&Context::new(), ROOT_ID, c"f").unwrap().inode;
            let by_path = reopen(fs, f, libc::O_RDONLY).map(|_| ());
            // Unlinked: no path names it; only the fd scan through /proc/self/fd (opened
            // before confinement) reaches it.
            std::fs::remove_file("/f").unwrap();
            let mut s = String::new();
            reopen(fs, f, libc::O_RDONLY)
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            (by_path.is_ok(), s)
        })
        .join()
        .unwrap();
        assert_eq!(got, (true, "kept alive".to_string()));
    }
}
