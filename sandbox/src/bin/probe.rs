//! rqemu-sandbox-probe: a stand-in daemon for the sandbox tests (and a way to see what a
//! policy leaves a process). It opens what a daemon opens at start-up (a data file, a
//! vhost-user-like socket pair, a memfd, an eventfd), enters a policy, starts one thread per
//! thread kind of the policy — each narrows itself and performs that kind's representative
//! syscalls — then does the control thread's vhost-user work (a message with SCM_RIGHTS, a
//! shared mapping of the received memfd), prints `ready`, and executes commands read from
//! stdin (`forbidden`, `open PATH`, `read-held`, `queue-accept`, `fork`, `exec-map`,
//! `socket-inet`, `exit`), answering each with one line.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{self, BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use clap::Parser;
use rqemu_sandbox::{policies, SandboxArgs, SandboxMode, ThreadKind};

#[derive(Parser)]
struct Cli {
    /// blk, net, fs, serial, rtc, vmm-kvm, vmm-tcg.
    #[arg(long)]
    policy: String,
    #[command(flatten)]
    sandbox: SandboxArgs,
    /// The shared directory (fs).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// A data file opened read-write at start-up (the "image").
    #[arg(long)]
    file: PathBuf,
    /// Drop to this uid/gid first (as an unprivileged daemon would run).
    #[arg(long)]
    setuid: Option<u32>,
    /// Keep the shared directory read-only (fs).
    #[arg(long)]
    readonly: bool,
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn check(what: &str, r: i64) -> Result<i64, String> {
    if r < 0 {
        Err(format!("{what}: {}", io::Error::last_os_error()))
    } else {
        Ok(r)
    }
}

fn drop_to_uid(uid: u32) -> Result<(), String> {
    // SAFETY: plain credential syscalls, single-threaded.
    unsafe {
        check("setgroups", libc::setgroups(0, std::ptr::null()) as i64)?;
        check("setgid", libc::setgid(uid) as i64)?;
        check("setuid", libc::setuid(uid) as i64)?;
        // Changing uid made us non-dumpable (/proc/self owned by root); a daemon started
        // unprivileged is dumpable and may write its own /proc/self/uid_map.
        check(
            "PR_SET_DUMPABLE",
            libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) as i64,
        )?;
    }
    Ok(())
}

fn new_fd(what: &str, r: i32) -> Result<OwnedFd, String> {
    check(what, r as i64)?;
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

fn eventfd() -> Result<OwnedFd, String> {
    // SAFETY: eventfd with constant flags.
    new_fd("eventfd", unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) })
}

/// epoll on a fresh eventfd: write it, wait, read it back (a queue worker's kick path).
fn epoll_kick() -> Result<(), String> {
    let kick = eventfd()?;
    // SAFETY: epoll_create1 with constant flags.
    let ep = new_fd("epoll_create1", unsafe {
        libc::epoll_create1(libc::EPOLL_CLOEXEC)
    })?;
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 7,
    };
    // SAFETY: valid fds and event.
    check("epoll_ctl", unsafe {
        libc::epoll_ctl(
            ep.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            kick.as_raw_fd(),
            &mut ev,
        )
    } as i64)?;
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing 8 bytes from a valid buffer.
    check(
        "eventfd write",
        // SAFETY: a raw syscall with valid arguments (buffers and fds owned here).
        unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), 8) } as i64,
    )?;
    let mut out = [libc::epoll_event { events: 0, u64: 0 }];
    // SAFETY: valid buffer of one event.
    let n =
        check(
            "epoll_wait",
            unsafe { libc::epoll_wait(ep.as_raw_fd(), out.as_mut_ptr(), 1, 5000) } as i64,
        )?;
    let mut buf = [0u8; 8];
    // SAFETY: reading 8 bytes into a valid buffer.
    check(
        "eventfd read",
        // SAFETY: a raw syscall with valid arguments (buffers and fds owned here).
        unsafe { libc::read(kick.as_raw_fd(), buf.as_mut_ptr().cast(), 8) } as i64,
    )?;
    if n != 1 || u64::from_ne_bytes(buf) != 1 {
        return Err(format!(
            "epoll/eventfd: {n} events, value {}",
            u64::from_ne_bytes(buf)
        ));
    }
    Ok(())
}

/// preadv/pwritev on the held data file, then fdatasync and fallocate(PUNCH_HOLE).
fn block_io(file: RawFd) -> Result<(), String> {
    let data = *b"sector!!";
    let iov = [libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    }];
    // SAFETY: a valid iovec over `data`.
    check(
        "pwritev",
        // SAFETY: a raw syscall with valid arguments (buffers and fds owned here).
        unsafe { libc::pwritev(file, iov.as_ptr(), 1, 4096) } as i64,
    )?;
    let mut back = [0u8; 8];
    let iov = [libc::iovec {
        iov_base: back.as_mut_ptr().cast(),
        iov_len: back.len(),
    }];
    // SAFETY: a valid iovec over `back`.
    check(
        "preadv",
        // SAFETY: a raw syscall with valid arguments (buffers and fds owned here).
        unsafe { libc::preadv(file, iov.as_ptr(), 1, 4096) } as i64,
    )?;
    // SAFETY: plain syscalls on a held fd.
    unsafe {
        check("fdatasync", libc::fdatasync(file) as i64)?;
        check(
            "fallocate",
            libc::fallocate(
                file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                8192,
                4096,
            ) as i64,
        )?;
    }
    if back != data {
        return Err("preadv read back something else".into());
    }
    Ok(())
}

/// The passthrough's calls beneath the shared directory's view `root`.
fn fs_ops(root: &Path, readonly: bool) -> Result<(), String> {
    let c = |p: &str| CString::new(p).map_err(|e| e.to_string());
    let croot = c(root.to_str().ok_or("root")?)?;
    // SAFETY: valid strings, fds we own; the calls fuse-backend-rs's passthrough makes.
    unsafe {
        let dir = new_fd(
            "open root",
            libc::openat(
                libc::AT_FDCWD,
                croot.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            ),
        )?;
        let d = dir.as_raw_fd();
        if readonly {
            let mut st: libc::statx = std::mem::zeroed();
            let r = libc::statx(d, c"inside".as_ptr(), 0, libc::STATX_BASIC_STATS, &mut st);
            check("statx inside", r as i64)?;
            let all = new_fd(
                "openat root",
                libc::openat(
                    d,
                    c".".as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                ),
            )?;
            let mut buf = [0u8; 1024];
            let n = libc::syscall(
                libc::SYS_getdents64,
                all.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            );
            check("getdents64", n)?;
            return Ok(());
        }
        let name = c(&format!("probe-{}", libc::gettid()))?;
        check("mkdirat", libc::mkdirat(d, name.as_ptr(), 0o755) as i64)?;
        let sub = new_fd(
            "openat dir",
            libc::openat(
                d,
                name.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            ),
        )?;
        let f = new_fd(
            "openat create",
            libc::openat(
                sub.as_raw_fd(),
                c"f".as_ptr(),
                libc::O_CREAT | libc::O_RDWR | libc::O_CLOEXEC,
                0o644,
            ),
        )?;
        check(
            "write",
            libc::write(f.as_raw_fd(), b"x".as_ptr().cast(), 1) as i64,
        )?;
        let mut st: libc::statx = std::mem::zeroed();
        check(
            "statx",
            libc::statx(
                sub.as_raw_fd(),
                c"f".as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                libc::STATX_BASIC_STATS,
                &mut st,
            ) as i64,
        )?;
        if st.stx_size != 1 {
            return Err(format!("statx size {}", st.stx_size));
        }
        let mut buf = [0u8; 1024];
        let n = check(
            "getdents64",
            libc::syscall(
                libc::SYS_getdents64,
                sub.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            ),
        )?;
        if n == 0 {
            return Err("getdents64: empty".into());
        }
        check(
            "renameat2",
            libc::syscall(
                libc::SYS_renameat2,
                sub.as_raw_fd(),
                c"f".as_ptr(),
                sub.as_raw_fd(),
                c"g".as_ptr(),
                0,
            ),
        )?;
        check(
            "unlinkat file",
            libc::unlinkat(sub.as_raw_fd(), c"g".as_ptr(), 0) as i64,
        )?;
        check(
            "unlinkat dir",
            libc::unlinkat(d, name.as_ptr(), libc::AT_REMOVEDIR) as i64,
        )?;
    }
    Ok(())
}

/// SIGTERM, blocked in every thread since start-up, taken here as the daemons' signal thread
/// does: say so and leave with [`TERM_EXIT`] (distinct, to see it come through the pid-1
/// parent).
fn wait_for_sigterm() {
    let set = sigterm_set();
    // SAFETY: a valid set; a null info pointer is allowed.
    if unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) } == libc::SIGTERM {
        println!("terminated");
        std::process::exit(TERM_EXIT);
    }
}

/// Exit code after SIGTERM.
const TERM_EXIT: i32 = 7;

fn sigterm_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset; valid signal number.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// What a thread of `kind` does in steady state, under `policy`.
fn thread_work(
    policy: &str,
    kind: ThreadKind,
    file: RawFd,
    root: Option<&Path>,
    readonly: bool,
) -> Result<(), String> {
    match kind {
        ThreadKind::Compiler => {
            // Memory for code (executable only under a JIT policy), handed back.
            // SAFETY: a fresh anonymous mapping, unmapped again; nothing else refers to it.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    return Err(format!("mmap: errno {}", errno()));
                }
                check("munmap", i64::from(libc::munmap(p, 4096)))?;
            }
            Ok(())
        }
        ThreadKind::Signal => {
            // A sigwait with nothing pending (zero timeout), then the flush on the way out.
            // SAFETY: an empty, initialised set and a zero timeout.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGUSR2);
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                let r = libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
                if r >= 0 || errno() != libc::EAGAIN {
                    return Err(format!("sigtimedwait: {r}"));
                }
                if policy == "blk" || policy == "fs" {
                    check("fdatasync", libc::fdatasync(file) as i64)?;
                }
            }
            Ok(())
        }
        _ => {
            epoll_kick()?;
            if kind == ThreadKind::Vcpu && policy == "vmm-kvm" {
                // KVM_RUN is listed for vCPU threads: on a non-KVM fd the kernel answers ENOTTY.
                let fd = eventfd()?;
                // SAFETY: an ioctl on our eventfd; it does not touch the (null) argument.
                let r =
                    unsafe { libc::ioctl(fd.as_raw_fd(), policies::KVM_RUN as libc::c_ulong, 0) };
                if r != -1 || errno() != libc::ENOTTY {
                    return Err(format!("KVM_RUN on an eventfd: {r}, errno {}", errno()));
                }
            }
            if kind == ThreadKind::Queue && (policy == "blk" || policy == "fs") {
                block_io(file)?;
            }
            if kind == ThreadKind::Helper && policy == "blk" {
                inflight_region()?;
            }
            if policy == "fs" && matches!(kind, ThreadKind::Queue | ThreadKind::Helper) {
                fs_ops(root.ok_or("no shared dir")?, readonly)?;
            }
            Ok(())
        }
    }
}

/// rqemu-blk's relay answering GET_INFLIGHT_FD: a memfd, sized, mapped shared, written.
fn inflight_region() -> Result<(), String> {
    // SAFETY: a static NUL-terminated name; the fd is closed below.
    let fd = unsafe { libc::memfd_create(c"inflight".as_ptr(), libc::MFD_CLOEXEC) };
    check("memfd_create", i64::from(fd))?;
    // SAFETY: ftruncate on our memfd.
    let r = unsafe { libc::ftruncate(fd, 4096) };
    // SAFETY: a shared mapping of our memfd, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    check("ftruncate", i64::from(r))?;
    if p == libc::MAP_FAILED {
        return Err(format!("mmap of the inflight memfd: errno {}", errno()));
    }
    // SAFETY: the page just mapped.
    unsafe {
        p.cast::<u8>().write_volatile(1);
        libc::munmap(p, 4096);
    }
    Ok(())
}

/// The control thread's vhost-user part: a message carrying a memfd and an eventfd
/// (SCM_RIGHTS) from the "frontend" end, received on the daemon end, the memfd mapped shared.
fn vhost_message(front: RawFd, back: RawFd, memfd: RawFd, kick: RawFd) -> Result<(), String> {
    let fds = [memfd, kick];
    let payload = *b"SET_MEM_TABLE";
    // SAFETY: cmsg buffers sized with CMSG_SPACE, valid iovecs, fds we hold.
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of_val(&fds) as u32) as usize;
        let mut cbuf = vec![0u8; space];
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr() as *mut _,
            iov_len: payload.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cm = libc::CMSG_FIRSTHDR(&msg);
        (*cm).cmsg_level = libc::SOL_SOCKET;
        (*cm).cmsg_type = libc::SCM_RIGHTS;
        (*cm).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(&fds) as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cm).cast(), 2);
        check("sendmsg", libc::sendmsg(front, &msg, 0) as i64)?;

        let mut rbuf = [0u8; 64];
        let mut rcbuf = vec![0u8; space];
        let mut riov = libc::iovec {
            iov_base: rbuf.as_mut_ptr().cast(),
            iov_len: rbuf.len(),
        };
        let mut rmsg: libc::msghdr = std::mem::zeroed();
        rmsg.msg_iov = &mut riov;
        rmsg.msg_iovlen = 1;
        rmsg.msg_control = rcbuf.as_mut_ptr().cast();
        rmsg.msg_controllen = space;
        let n = check(
            "recvmsg",
            libc::recvmsg(back, &mut rmsg, libc::MSG_CMSG_CLOEXEC) as i64,
        )?;
        let cm = libc::CMSG_FIRSTHDR(&rmsg);
        if n as usize != payload.len() || cm.is_null() || (*cm).cmsg_type != libc::SCM_RIGHTS {
            return Err("recvmsg: no SCM_RIGHTS".into());
        }
        let mut got = [0 as RawFd; 2];
        std::ptr::copy_nonoverlapping(libc::CMSG_DATA(cm).cast(), got.as_mut_ptr(), 2);
        let mem = OwnedFd::from_raw_fd(got[0]);
        let _kick = OwnedFd::from_raw_fd(got[1]);
        let len = 65536;
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap of the received memfd: {}",
                io::Error::last_os_error()
            ));
        }
        *(p as *mut u8).add(100) = 0x5a;
        let mut b = [0u8; 1];
        check(
            "pread memfd",
            libc::pread(memfd, b.as_mut_ptr().cast(), 1, 100) as i64,
        )?;
        check("munmap", libc::munmap(p, len) as i64)?;
        if b[0] != 0x5a {
            return Err("the shared mapping is not shared".into());
        }
    }
    Ok(())
}

fn command(cmd: &str, file: RawFd, sandbox: &rqemu_sandbox::Sandbox) -> String {
    // Each arm makes a syscall a policy may forbid: the point is whether the filter lets it
    // through.
    match cmd.split_once(' ').unwrap_or((cmd, "")) {
        ("forbidden", _) => {
            // SAFETY: utsname is plain data; all zeroes is a valid value.
            let mut u: libc::utsname = unsafe { std::mem::zeroed() };
            // SAFETY: a raw syscall with valid arguments (buffers and fds owned here).
            let r = unsafe { libc::syscall(libc::SYS_uname, &mut u) };
            format!("uname {r}")
        }
        ("open", path) => match std::fs::File::open(path) {
            Ok(_) => "opened".to_string(),
            Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(0)),
        },
        ("churn", _) => std::thread::scope(|s| {
            // Grow and shrink a thread arena: glibc's heap_trim reads
            // /proc/sys/vm/overcommit_memory the first time it shrinks one.
            s.spawn(|| {
                if let Err(e) = sandbox.confine_thread(ThreadKind::Queue) {
                    return format!("confine: {e}");
                }
                let blocks: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 100 << 10]).collect();
                let sum: usize = blocks.iter().map(|b| b[0] as usize).sum();
                drop(blocks);
                format!("churned {sum}")
            })
            .join()
            .unwrap_or_default()
        }),
        ("create", path) => match std::fs::File::create(path) {
            Ok(_) => "created".to_string(),
            Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(0)),
        },
        ("read-held", _) => {
            // SAFETY: the held fd, wrapped so that it is never closed here.
            let f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(file) });
            let mut b = [0u8; 8];
            match f.read_at(&mut b, 4096) {
                Ok(n) => format!("held {}", String::from_utf8_lossy(&b[..n])),
                Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(0)),
            }
        }
        ("queue-accept", _) => {
            let r = std::thread::scope(|s| {
                s.spawn(|| {
                    if let Err(e) = sandbox.confine_thread(ThreadKind::Queue) {
                        return format!("confine: {e}");
                    }
                    println!("narrowed");
                    let r =
                        // SAFETY: a raw syscall with valid arguments (buffers and fds owned here).
                        unsafe { libc::accept4(-1, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
                    format!("accept4 {r} errno {}", errno())
                })
                .join()
                .unwrap_or_default()
            });
            r
        }
        ("fork", _) => {
            // SAFETY: a raw syscall with valid arguments (buffers and fds owned here).
            let r = unsafe {
                libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0)
            };
            if r == 0 {
                // SAFETY: a raw syscall with valid arguments (buffers and fds owned here).
                unsafe { libc::_exit(0) };
            }
            format!("clone {r}")
        }
        ("exec-map", _) => {
            // SAFETY: a raw syscall with valid arguments (buffers and fds owned here).
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            format!(
                "mmap-exec {}",
                if p == libc::MAP_FAILED {
                    "failed"
                } else {
                    "mapped"
                }
            )
        }
        ("ioctl-other", _) => {
            // KVM_GET_API_VERSION: listed nowhere.
            // SAFETY: an ioctl on stdin that takes no argument.
            let r = unsafe { libc::ioctl(0, 0xae00 as libc::c_ulong, 0) };
            format!("ioctl {r}")
        }
        ("socket-inet", _) => {
            // SAFETY: a raw syscall with valid arguments (buffers and fds owned here).
            let r = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            format!("socket {r}")
        }
        ("exit", _) => std::process::exit(0),
        _ => format!("unknown command {cmd}"),
    }
}

fn run(cli: Cli) -> Result<(), String> {
    if let Some(uid) = cli.setuid {
        drop_to_uid(uid)?;
    }
    // Start-up: everything the "daemon" needs is opened now.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&cli.file)
        .map_err(|e| format!("{}: {e}", cli.file.display()))?;
    let mut pair = [0; 2];
    // SAFETY: socketpair writes two fds.
    check("socketpair", unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    } as i64)?;
    // SAFETY: two new fds.
    let (front, back) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    // SAFETY: constant name and flags.
    let memfd = new_fd("memfd_create", unsafe {
        libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC)
    })?;
    // SAFETY: plain ftruncate on our memfd.
    check(
        "ftruncate",
        // SAFETY: a raw syscall with valid arguments (buffers and fds owned here).
        unsafe { libc::ftruncate(memfd.as_raw_fd(), 65536) } as i64,
    )?;
    let kick = eventfd()?;
    // A stray fd the policy does not list: closed by `enter`.
    let stray = std::fs::File::open("/").map_err(|e| e.to_string())?;
    let stray_fd = stray.as_raw_fd();
    std::mem::forget(stray);

    let dir = match &cli.dir {
        Some(d) => Some(std::fs::canonicalize(d).map_err(|e| e.to_string())?),
        None => None,
    };
    let mut policy = policies::by_name(&cli.policy, dir.as_deref())
        .ok_or_else(|| format!("unknown policy {} (or fs without --dir)", cli.policy))?
        .keep_fds([
            file.as_raw_fd(),
            front.as_raw_fd(),
            back.as_raw_fd(),
            memfd.as_raw_fd(),
            kick.as_raw_fd(),
        ]);
    if let Some(d) = policy.keep_dir.as_mut() {
        d.writable = !cli.readonly;
    }
    // As the daemons do: termination signals blocked everywhere, taken by the signal thread.
    let term = sigterm_set();
    // SAFETY: a valid set, for this (only) thread; threads inherit the mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &term, std::ptr::null_mut()) };
    let sandbox = rqemu_sandbox::enter(&policy, &cli.sandbox).map_err(|e| {
        let mut s = e.to_string();
        let mut cur = std::error::Error::source(&e);
        while let Some(c) = cur {
            s += &format!(": {c}");
            cur = c.source();
        }
        s
    })?;
    let mut out = io::stdout().lock();
    let r = &sandbox.report;
    let _ = writeln!(out, "report {r}");
    let _ = writeln!(out, "mode {}", r.mode.name());
    let _ = writeln!(out, "user-namespace {}", r.user_namespace);
    let _ = writeln!(
        out,
        "stray-fd-closed {}",
        // SAFETY: fcntl(F_GETFD) on an fd number: it only reports whether it is open.
        unsafe { libc::fcntl(stray_fd, libc::F_GETFD) } < 0
    );
    drop(out);
    let root = dir.map(|d| match r.mode {
        SandboxMode::None => d,
        _ => PathBuf::from("/"),
    });

    let (tx, rx) = mpsc::channel::<String>();
    let mut expected = 0;
    let kinds: Vec<ThreadKind> = policy
        .threads
        .keys()
        .copied()
        .filter(|k| *k != ThreadKind::Control)
        .collect();
    let sandbox = std::sync::Arc::new(sandbox);
    for kind in kinds {
        let (tx, sandbox, root, name) = (
            tx.clone(),
            sandbox.clone(),
            root.clone(),
            cli.policy.clone(),
        );
        let fd = file.as_raw_fd();
        let readonly = cli.readonly;
        expected += 1;
        std::thread::Builder::new()
            .name(kind.name().into())
            .spawn(move || {
                // Twice: the second call must not stack another filter (see the tests).
                let res = sandbox
                    .confine_thread_once(kind)
                    .and_then(|()| sandbox.confine_thread_once(kind))
                    .map_err(|e| e.to_string())
                    .and_then(|()| thread_work(&name, kind, fd, root.as_deref(), readonly));
                let _ = tx.send(match res {
                    Ok(()) => format!("ok {}", kind.name()),
                    Err(e) => format!("fail {}: {e}", kind.name()),
                });
                if kind == ThreadKind::Signal {
                    wait_for_sigterm();
                }
                loop {
                    std::thread::park();
                }
            })
            .map_err(|e| e.to_string())?;
    }
    sandbox
        .confine_thread(ThreadKind::Control)
        .map_err(|e| e.to_string())?;
    let control = vhost_message(
        front.as_raw_fd(),
        back.as_raw_fd(),
        memfd.as_raw_fd(),
        kick.as_raw_fd(),
    )
    .and_then(|()| epoll_kick());
    let mut results: BTreeMap<String, ()> = BTreeMap::new();
    for _ in 0..expected {
        let line = rx.recv().map_err(|e| e.to_string())?;
        results.insert(line, ());
    }
    let mut out = io::stdout().lock();
    for line in results.keys() {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "{}",
        match control {
            Ok(()) => "ok control".to_string(),
            Err(e) => format!("fail control: {e}"),
        }
    );
    let _ = writeln!(out, "ready");
    drop(out);
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let answer = command(line.trim(), file.as_raw_fd(), &sandbox);
        println!("done {answer}");
    }
    Ok(())
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("rqemu-sandbox-probe: {e}");
        std::process::exit(1);
    }
}
