//! Device daemons as real processes for the VMM tests: spawned with `--socket`, waited for,
//! killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::project_binary;

/// How long a daemon (or anything `wait_until` waits for) may take.
const T: Duration = Duration::from_secs(120);

/// A daemon process, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    pub fn spawn(bin: &str, socket: &Path, extra: &[&str]) -> Daemon {
        let child = Command::new(project_binary(bin))
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {bin}: {e}"));
        let d = Daemon {
            child,
            socket: socket.to_path_buf(),
        };
        wait_until(&format!("{bin} listening"), || d.socket.exists());
        d
    }

    pub fn serial(dir: &Path, console: &Path) -> Daemon {
        let c = format!("file:{}", console.display());
        Daemon::spawn("rqemu-serial", &dir.join("serial.sock"), &["--console", &c])
    }

    pub fn rtc(dir: &Path) -> Daemon {
        Daemon::spawn("rqemu-rtc", &dir.join("rtc.sock"), &[])
    }

    pub fn arg(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (at most two minutes) until `cond` holds.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A file's contents, lossily, or "" if unreadable.
pub fn read(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}
