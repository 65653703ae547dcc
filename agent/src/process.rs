//! `Start`: the container process. Everything it needs is prepared before fork(2) (C strings,
//! descriptors); the child then makes only system calls: new session, stdio (pipes or the
//! pty slave as controlling terminal), its own mount namespace with the container root moved
//! onto `/` and chrooted into (as switch_root does; plain chroot if that fails), cwd, rlimits,
//! umask, groups/gid/uid, no_new_privs, execve along the container's `PATH`. A failure is
//! written to a close-on-exec pipe as (step, errno) and the child exits 127.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use rqemu_agent_protocol::Process;

use crate::root::Root;
use crate::sys::{self, check, cpath, cstr};

/// `PATH` when the environment has none (runc's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("process.args is empty")]
    NoArgs,
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("{step} failed in the container process: {source}")]
    Child {
        step: &'static str,
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> SpawnError {
    move |source| SpawnError::Io { what, source }
}

/// The agent's ends of the process's stdio.
pub enum Stdio {
    Pipes {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// The pty master (input and output).
    Pty(OwnedFd),
}

/// A started process.
pub struct Child {
    pub pid: libc::pid_t,
    pub stdio: Stdio,
}

/// The child's ends of stdio.
enum ChildStdio {
    Pipes([OwnedFd; 3]),
    Pty(OwnedFd),
}

/// Steps reported by a failing child (index into [`STEPS`]).
const STEPS: [&str; 9] = [
    "setsid",
    "controlling terminal",
    "stdio",
    "entering the container root",
    "chdir to cwd",
    "setrlimit",
    "setgroups/setgid/setuid",
    "no_new_privs",
    "execve",
];

struct Prepared {
    root: CString,
    cwd: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    candidates: Vec<CString>,
    rlimits: Vec<(u32, libc::rlimit)>,
    umask: libc::mode_t,
    groups: Vec<libc::gid_t>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    no_new_privs: bool,
}

fn prepare(root: &Path, p: &Process) -> Result<Prepared, SpawnError> {
    let arg0 = p.args.first().ok_or(SpawnError::NoArgs)?;
    let bad = |e| SpawnError::Io {
        what: "argument, environment or path",
        source: e,
    };
    let argv = p
        .args
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    let mut env = p.env.clone();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        // As runc: HOME from the container's /etc/passwd, else `/`.
        env.push(format!(
            "HOME={}",
            home_of(root, p.uid).unwrap_or_else(|| "/".into())
        ));
    }
    let envp = env
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    let path = p
        .env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let candidates = if arg0.contains('/') {
        vec![cstr(arg0).map_err(bad)?]
    } else {
        path.split(':')
            .map(|d| if d.is_empty() { "." } else { d })
            .map(|d| cstr(&format!("{}/{arg0}", d.trim_end_matches('/'))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?
    };
    let cwd = if p.cwd.is_empty() { "/" } else { &p.cwd };
    // As runc: the supplementary groups are exactly `additional_gids` (none if empty).
    let groups = p.additional_gids.clone();
    Ok(Prepared {
        root: cpath(root).map_err(bad)?,
        cwd: cstr(cwd).map_err(bad)?,
        argv,
        envp,
        candidates,
        rlimits: p
            .rlimits
            .iter()
            .map(|r| {
                (
                    r.resource,
                    libc::rlimit {
                        rlim_cur: r.soft,
                        rlim_max: r.hard,
                    },
                )
            })
            .collect(),
        umask: p.umask.unwrap_or(0o022) as libc::mode_t,
        groups,
        uid: p.uid,
        gid: p.gid,
        no_new_privs: p.no_new_privileges,
    })
}

/// The home directory of `uid` in the container's `/etc/passwd` (read inside the root).
fn home_of(root: &Path, uid: u32) -> Option<String> {
    let root = Root::open(root).ok()?;
    let fd = root.resolve(&["etc", "passwd"], libc::O_RDONLY).ok()?;
    let mut text = String::new();
    File::from(fd)
        .take(1 << 20)
        .read_to_string(&mut text)
        .ok()?;
    passwd_home(&text, uid)
}

/// `name:x:uid:gid:gecos:home:shell` → the home of the first line with `uid`.
fn passwd_home(text: &str, uid: u32) -> Option<String> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[2].parse() == Ok(uid) && !f[5].is_empty()).then(|| f[5].to_string())
    })
}

fn null_terminated(v: &[CString]) -> Vec<*const libc::c_char> {
    v.iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Opens a pty pair on the container's devpts instance (its `/dev/ptmx`; the agent's when
/// the container has none) with the initial size.
fn open_pty(root: &Path, rows: u16, cols: u16) -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let ptmx = [root.join("dev/pts/ptmx"), "/dev/ptmx".into()];
    let mut last = io::Error::from_raw_os_error(libc::ENOENT);
    let mut master = None;
    for p in &ptmx {
        let c = cpath(p).map_err(io_err("ptmx path"))?;
        // SAFETY: `c` is a NUL-terminated path.
        match sys::owned(unsafe {
            libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC)
        }) {
            Ok(fd) => {
                master = Some(fd);
                break;
            }
            Err(e) => last = e,
        }
    }
    let master = master.ok_or_else(|| io_err("open ptmx")(last))?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from the pointer.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })
        .map_err(io_err("unlock pty"))?;
    // SAFETY: TIOCGPTPEER returns a new descriptor of the slave.
    let slave = sys::owned(unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })
    .map_err(io_err("open pty slave"))?;
    resize(&master, rows, cols).map_err(io_err("set terminal size"))?;
    Ok((master, slave))
}

/// TIOCSWINSZ on the pty (a zero size is left alone).
pub fn resize(master: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    if rows == 0 && cols == 0 {
        return Ok(());
    }
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// Starts the process of `p` in the container at `root`.
pub fn spawn(root: &Path, p: &Process) -> Result<Child, SpawnError> {
    let prep = prepare(root, p)?;
    let (stdio, child_stdio) = if p.terminal {
        let (master, slave) = open_pty(root, p.rows, p.cols)?;
        (Stdio::Pty(master), ChildStdio::Pty(slave))
    } else {
        let (in_r, in_w) = sys::pipe().map_err(io_err("pipe"))?;
        let (out_r, out_w) = sys::pipe().map_err(io_err("pipe"))?;
        let (err_r, err_w) = sys::pipe().map_err(io_err("pipe"))?;
        (
            Stdio::Pipes {
                stdin: in_w,
                stdout: out_r,
                stderr: err_r,
            },
            ChildStdio::Pipes([in_r, out_w, err_w]),
        )
    };
    let (report_r, report_w) = sys::pipe().map_err(io_err("pipe"))?;
    let argv = null_terminated(&prep.argv);
    let envp = null_terminated(&prep.envp);

    // SAFETY: the agent is single-threaded; the child only makes system calls on data
    // prepared above and ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io_err("fork")(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: in the child of fork, with everything prepared; never returns.
        unsafe { child(&prep, &child_stdio, &argv, &envp, report_w.as_raw_fd()) }
    }
    drop(child_stdio);
    drop(report_w);
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match sys::read(&report_r, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("reading the child's report")(e)),
        }
    }
    if got == 0 {
        return Ok(Child { pid, stdio });
    }
    let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
    Err(SpawnError::Child {
        step: STEPS.get(step).copied().unwrap_or("unknown step"),
        source: io::Error::from_raw_os_error(errno),
    })
}

/// The child's side of [`spawn`].
///
/// # Safety
/// Only to be called in the child of fork(2) of a single-threaded process.
unsafe fn child(
    p: &Prepared,
    stdio: &ChildStdio,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    report: libc::c_int,
) -> ! {
    let fail = |step: usize| -> ! {
        // SAFETY: errno location, write of a local buffer and _exit are async-signal-safe.
        unsafe {
            let errno = *libc::__errno_location();
            let mut buf = [0u8; 8];
            buf[..4].copy_from_slice(&(step as u32).to_ne_bytes());
            buf[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(report, buf.as_ptr().cast(), buf.len());
            libc::_exit(127)
        }
    };
    // SAFETY: every call below is a system call on values prepared before fork.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        if libc::setsid() < 0 {
            fail(0);
        }
        match stdio {
            ChildStdio::Pty(slave) => {
                if libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) < 0 {
                    fail(1);
                }
                for fd in 0..3 {
                    if libc::dup2(slave.as_raw_fd(), fd) < 0 {
                        fail(2);
                    }
                }
            }
            ChildStdio::Pipes(fds) => {
                for (fd, own) in fds.iter().enumerate() {
                    if libc::dup2(own.as_raw_fd(), fd as libc::c_int) < 0 {
                        fail(2);
                    }
                }
            }
        }
        // Own mount namespace: the root moves onto `/` for this process only.
        let moved = libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::chdir(p.root.as_ptr()) == 0
            && libc::mount(
                c".".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            ) == 0
            && libc::chroot(c".".as_ptr()) == 0;
        if !moved && libc::chroot(p.root.as_ptr()) < 0 {
            fail(3);
        }
        if libc::chdir(c"/".as_ptr()) < 0 || libc::chdir(p.cwd.as_ptr()) < 0 {
            fail(4);
        }
        for (res, lim) in &p.rlimits {
            if libc::setrlimit(*res as _, lim) < 0 {
                fail(5);
            }
        }
        libc::umask(p.umask);
        if libc::setgroups(p.groups.len(), p.groups.as_ptr()) < 0
            || libc::setgid(p.gid) < 0
            || libc::setuid(p.uid) < 0
        {
            fail(6);
        }
        if p.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            fail(7);
        }
        // execvpe's rule: ENOENT/ENOTDIR go on to the next directory; EACCES is remembered.
        let mut saw_eacces = false;
        for c in &p.candidates {
            libc::execve(c.as_ptr(), argv.as_ptr(), envp.as_ptr());
            match *libc::__errno_location() {
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                libc::EACCES => saw_eacces = true,
                _ => fail(8),
            }
        }
        if saw_eacces {
            *libc::__errno_location() = libc::EACCES;
        }
        fail(8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_is_looked_up_along_the_path_of_the_environment() {
        let p = Process {
            args: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec!["PATH=/bin:/usr/bin/".into(), "HOME=/h".into()],
            ..Default::default()
        };
        let prep = prepare(Path::new("/nonexistent"), &p).unwrap();
        let c: Vec<_> = prep
            .candidates
            .iter()
            .map(|c| c.to_str().unwrap())
            .collect();
        assert_eq!(c, ["/bin/sh", "/usr/bin/sh"]);
        assert_eq!(prep.cwd.to_str().unwrap(), "/");
        assert_eq!(prep.umask, 0o022);

        let p = Process {
            args: vec!["./run".into()],
            ..Default::default()
        };
        let prep = prepare(Path::new("/nonexistent"), &p).unwrap();
        assert_eq!(prep.candidates.len(), 1);
        assert_eq!(prep.envp.last().unwrap().to_str().unwrap(), "HOME=/");
        let none = Process::default();
        assert!(matches!(
            prepare(Path::new("/"), &none),
            Err(SpawnError::NoArgs)
        ));
        let nul = Process {
            args: vec!["a\0b".into()],
            ..Default::default()
        };
        assert!(prepare(Path::new("/"), &nul).is_err());
    }

    #[test]
    fn home_comes_from_passwd() {
        let text = "root:x:0:0:root:/root:/bin/sh\nbad line\nu:x:1000:1000::/home/u:/bin/sh\n";
        assert_eq!(passwd_home(text, 1000).as_deref(), Some("/home/u"));
        assert_eq!(passwd_home(text, 0).as_deref(), Some("/root"));
        assert_eq!(passwd_home(text, 5), None);
    }
}
