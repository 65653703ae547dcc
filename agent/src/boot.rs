//! PID 1's start: the kernel file systems, standard descriptors on the console, the kernel
//! modules of `/etc/rqemu-modules`, the control channel; and the end: power off.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use crate::alog;
use crate::sys::{self, check, cpath};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        source: io::Error,
    },
    #[error("vsock socket: {0}")]
    Socket(io::Error),
    #[error(
        "cannot connect to the host (vsock CID 2 port {port}) after {attempts} attempts: {source}"
    )]
    Connect {
        port: u32,
        attempts: u32,
        source: io::Error,
    },
}

/// Mounts `/proc`, `/sys`, `/dev` (devtmpfs) and `/dev/pts`; already mounted is fine.
pub fn early_mounts() -> Result<(), BootError> {
    const MOUNTS: [(&str, &str, &str); 4] = [
        ("proc", "/proc", ""),
        ("sysfs", "/sys", ""),
        ("devtmpfs", "/dev", "mode=0755"),
        ("devpts", "/dev/pts", "newinstance,ptmxmode=0666,mode=0620"),
    ];
    for (fstype, target, data) in MOUNTS {
        let _ = std::fs::create_dir_all(target);
        let flags = libc::MS_NOSUID
            | if fstype == "devtmpfs" {
                0
            } else {
                libc::MS_NOEXEC
            };
        match sys::mount(
            Some(fstype),
            Path::new(target),
            Some(fstype),
            flags,
            Some(data),
        ) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(source) => {
                return Err(BootError::Mount {
                    fstype,
                    target,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Makes sure descriptors 0, 1 and 2 are open (on `/dev/console`, else `/dev/null`): the
/// kernel leaves them closed when the initramfs has no `/dev/console`, and a pipe created
/// later must never land on them.
pub fn ensure_stdio() {
    for path in ["/dev/console", "/dev/null"] {
        let Ok(c) = cpath(Path::new(path)) else {
            continue;
        };
        for fd in 0..3 {
            // SAFETY: F_GETFD on an integer descriptor only queries it.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
                continue;
            }
            // SAFETY: `c` is a NUL-terminated path.
            let new = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
            if new < 0 {
                break;
            }
            if new != fd {
                // SAFETY: dup2/close on descriptors this function just opened.
                unsafe {
                    libc::dup2(new, fd);
                    libc::close(new);
                }
            }
        }
    }
}

/// Loads, in order, the modules named in `list` (one per line) from `dir/<name>.ko` with
/// finit_module(2). A module already present (built in or loaded) is fine; any other failure
/// is logged and the next module tried (the channel's connect says whether vsock came up).
pub fn load_modules(list: &Path, dir: &Path) {
    let names = match std::fs::read_to_string(list) {
        Ok(s) => s,
        Err(e) => {
            alog!("{}: {e} (no modules loaded)", list.display());
            return;
        }
    };
    let mut loaded = Vec::new();
    for name in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
        let path = dir.join(format!("{name}.ko"));
        match load_module(&path) {
            Ok(()) => loaded.push(name),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => loaded.push(name),
            Err(e) => alog!("module {name} ({}): {e}", path.display()),
        }
    }
    alog!("modules loaded: {}", loaded.join(" "));
}

fn load_module(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    let params = c"";
    // SAFETY: finit_module with an open descriptor and a NUL-terminated empty parameter string.
    let ret = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Connects to the host (CID 2) on `port`, retrying while the vsock device settles.
pub fn connect_host(port: u32) -> Result<File, BootError> {
    const ATTEMPTS: u32 = 50;
    let mut last = io::Error::from_raw_os_error(libc::ENODEV);
    for attempt in 1..=ATTEMPTS {
        let fd = sys::owned(
            // SAFETY: socket(2) with integer arguments.
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) },
        )
        .map_err(BootError::Socket)?;
        // SAFETY: sockaddr_vm is plain old data; all-zero is valid.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = libc::VMADDR_CID_HOST;
        addr.svm_port = port;
        // SAFETY: `addr` is a valid sockaddr_vm and its size is passed.
        let ret = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        match check(ret) {
            Ok(_) => return Ok(File::from(fd)),
            Err(e) => {
                if attempt == 1 || attempt % 10 == 0 {
                    alog!("connect to host port {port} (attempt {attempt}): {e}");
                }
                last = e;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(BootError::Connect {
        port,
        attempts: ATTEMPTS,
        source: last,
    })
}

/// Ends every other process, syncs and powers the machine off. Only as PID 1 (never the
/// host's machine when run by mistake elsewhere); otherwise exits.
pub fn power_off() -> ! {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        std::process::exit(1);
    }
    // SAFETY: kill(-1) from PID 1 signals every process but itself; sync flushes the file
    // systems (virtiofs writes reach the host); reboot(RB_POWER_OFF) as PID 1 ends the VM.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot only returns on failure: nothing else to do but exit (the kernel panics).
    std::process::exit(1)
}
