//! Device daemons under test (`rqemu-blk`, `qemu-storage-daemon`, later `rqemu-net`, `rqemu-fs`):
//! spawned with their output in a log file, considered ready once their UNIX socket is
//! listening, terminated with SIGTERM (or killed on drop).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a daemon may take to start listening.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors running a daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The process could not be started.
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        /// Daemon name.
        name: String,
        /// Program path.
        program: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The log file could not be created or read.
    #[error("daemon log {path}: {source}")]
    Log {
        /// Log path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The daemon exited before listening on its socket.
    #[error("{name} exited with {status} before listening on {socket}; its log:\n{log}")]
    ExitedEarly {
        /// Daemon name.
        name: String,
        /// Exit status.
        status: ExitStatus,
        /// Expected socket.
        socket: PathBuf,
        /// Log contents.
        log: String,
    },
    /// The daemon did not listen in time.
    #[error("{name} did not listen on {socket} within {timeout:?}; its log:\n{log}")]
    NotListening {
        /// Daemon name.
        name: String,
        /// Expected socket.
        socket: PathBuf,
        /// Timeout.
        timeout: Duration,
        /// Log contents.
        log: String,
    },
    /// The daemon did not exit after SIGTERM.
    #[error("{name} still running {timeout:?} after SIGTERM (killed); its log:\n{log}")]
    StopTimeout {
        /// Daemon name.
        name: String,
        /// Timeout.
        timeout: Duration,
        /// Log contents.
        log: String,
    },
    /// Waiting for or signalling the process failed.
    #[error("{name}: {source}")]
    Wait {
        /// Daemon name.
        name: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A running daemon. Dropping it kills the process (SIGKILL) if it is still running.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Daemon {
    /// Spawns `cmd` (stdout and stderr to `log`) and waits until it listens on `socket`.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        socket: &Path,
        log: &Path,
        timeout: Duration,
    ) -> Result<Self, DaemonError> {
        let log_err = |source| DaemonError::Log {
            path: log.to_path_buf(),
            source,
        };
        let out = std::fs::File::create(log).map_err(log_err)?;
        let err = out.try_clone().map_err(log_err)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().map_err(|source| DaemonError::Spawn {
            name: name.to_string(),
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        let mut daemon = Self {
            name: name.to_string(),
            child,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
            exited: None,
        };
        daemon.wait_listening(timeout)?;
        Ok(daemon)
    }

    fn wait_listening(&mut self, timeout: Duration) -> Result<(), DaemonError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Err(DaemonError::ExitedEarly {
                    name: self.name.clone(),
                    status,
                    socket: self.socket.clone(),
                    log: self.log(),
                });
            }
            if is_listening(&self.socket) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DaemonError::NotListening {
                    name: self.name.clone(),
                    socket: self.socket.clone(),
                    timeout,
                    log: self.log(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon's name (for messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, DaemonError> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().map_err(|source| DaemonError::Wait {
                name: self.name.clone(),
                source,
            })?;
        }
        Ok(self.exited)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// The daemon's log so far (stdout and stderr), lossily decoded.
    pub fn log(&self) -> String {
        let mut s = Vec::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    }

    /// Kills the process with SIGKILL (no chance to flush anything) and reaps it.
    pub fn kill(mut self) -> Result<ExitStatus, DaemonError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let wait_err = |name: &str| {
            let name = name.to_string();
            move |source| DaemonError::Wait { name, source }
        };
        self.child.kill().map_err(wait_err(&self.name))?;
        let status = self.child.wait().map_err(wait_err(&self.name))?;
        self.exited = Some(status);
        Ok(status)
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status; kills it on timeout.
    pub fn terminate(mut self, timeout: Duration) -> Result<ExitStatus, DaemonError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.child.id()).unwrap_or(libc::pid_t::MAX);
        // SAFETY: kill(2) on our own child's pid (not yet reaped, so not reused); no memory access.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        if rc != 0 {
            return Err(DaemonError::Wait {
                name: self.name.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Err(DaemonError::StopTimeout {
            name: self.name.clone(),
            timeout,
            log: self.log(),
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether some process listens on the UNIX socket `path` (per `/proc/net/unix`: a line with
/// that path and the `__SO_ACCEPTCON` flag). Unlike a probe connection, this does not disturb
/// a vhost-user backend, which would take any connection for its frontend.
pub fn is_listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode Path
        cols.len() >= 8
            && cols[7..].join(" ") == want
            && u32::from_str_radix(cols[3], 16).is_ok_and(|flags| flags & 0x1_0000 != 0)
    })
}

/// `pid` and its descendants (the pid-namespace parent forks the confined child).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        let tasks = std::fs::read_dir(format!("/proc/{p}/task")).expect("tasks");
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            all.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_socket_is_detected_and_connected_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        assert!(!is_listening(&path));
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(is_listening(&path));
        drop(listener);
        assert!(!is_listening(&path));
    }

    #[test]
    fn early_exit_is_reported_with_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo boom >&2; exit 3"]);
        let err = Daemon::spawn(
            "fake",
            cmd,
            &dir.path().join("never.sock"),
            &dir.path().join("log"),
            Duration::from_secs(5),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("boom") && msg.contains("exited"), "{msg}");
    }

    #[test]
    fn terminate_returns_the_exit_status() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        // The "daemon" is `sleep`; the test itself provides the listening socket.
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let d = Daemon::spawn(
            "sleep",
            cmd,
            &sock,
            &dir.path().join("log"),
            Duration::from_secs(5),
        )
        .unwrap();
        drop(listener);
        let status = d.terminate(Duration::from_secs(5)).unwrap();
        assert!(!status.success());
    }
}
