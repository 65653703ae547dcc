//! Service-manager notification (`sd_notify(3)`): `READY=1` once a daemon can serve, `STATUS=`
//! lines (serving, frontend connected), `STOPPING=1` when a signal ends it, and `WATCHDOG=1`
//! every half `WATCHDOG_USEC` when the unit has `WatchdogSec=`.
//!
//! [`init`] connects a datagram socket to `$NOTIFY_SOCKET` (a path, or `@name` for an abstract
//! socket) during start-up, before any confinement: every later message goes through that
//! connected socket ([`fd`] — a sandbox policy keeps it), so nothing is looked up by path after
//! the daemon has lost its filesystem. Without `NOTIFY_SOCKET` every call does nothing.
//! Sending is best effort and never blocks: a lost notification is logged, never fatal.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Once, OnceLock};
use std::time::Duration;

/// Errors connecting to the service manager.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The socket could not be created or connected.
    #[error("cannot connect to NOTIFY_SOCKET {path}")]
    Connect {
        /// `$NOTIFY_SOCKET`.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `WATCHDOG_USEC` is not a positive number.
    #[error("WATCHDOG_USEC={0:?} is not a positive number")]
    Watchdog(String),
}

/// A connection to the service manager.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Connects to `path` (`@name`: an abstract socket).
    pub fn connect(path: &str) -> Result<Self, NotifyError> {
        let err = |source| NotifyError::Connect {
            path: path.to_string(),
            source,
        };
        let sock = UnixDatagram::unbound().map_err(err)?;
        if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr =
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)?;
            sock.connect_addr(&addr).map_err(err)?;
        } else {
            sock.connect(path).map_err(err)?;
        }
        // A manager that does not read (a full queue: 10 datagrams by default) must never
        // block the serving thread: the notification is then dropped and logged.
        sock.set_nonblocking(true).map_err(err)?;
        Ok(Self {
            sock,
            watchdog: None,
        })
    }

    /// Sends one notification (`KEY=VALUE` lines) as one datagram. It uses `write(2)`, which a
    /// connected datagram socket takes as `send(2)`: every confined thread kind may `write`
    /// (the signal thread, which says `STOPPING=1`, may not `sendto`).
    pub fn send(&self, state: &str) -> io::Result<()> {
        let b = state.as_bytes();
        // SAFETY: `b` is valid for reads of `b.len()` bytes; the fd is our connected socket.
        let n = unsafe { libc::write(self.sock.as_raw_fd(), b.as_ptr().cast(), b.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The connected socket's fd.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// The keep-alive interval: half the watchdog timeout, if the manager set one for us.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }
}

/// The keep-alive interval for `WATCHDOG_USEC`/`WATCHDOG_PID` as seen by process `pid`: half
/// the timeout, `None` if the watchdog is for another process or unset.
pub fn watchdog_interval(
    usec: Option<&str>,
    watchdog_pid: Option<&str>,
    pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec else { return Ok(None) };
    if let Some(p) = watchdog_pid {
        if p.trim().parse::<u32>().ok() != Some(pid) {
            return Ok(None);
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(u) if u > 0 => Ok(Some(Duration::from_micros(u) / 2)),
        _ => Err(NotifyError::Watchdog(usec.to_string())),
    }
}

static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();

/// Connects to `$NOTIFY_SOCKET` (once) and reads the watchdog variables, then removes them from
/// the environment (children must not notify in our name). Call it before any thread exists.
pub fn init() -> Result<(), NotifyError> {
    if NOTIFIER.get().is_some() {
        return Ok(());
    }
    let n = match std::env::var("NOTIFY_SOCKET") {
        Ok(path) if !path.is_empty() => {
            let mut n = Notifier::connect(&path)?;
            n.watchdog = watchdog_interval(
                std::env::var("WATCHDOG_USEC").ok().as_deref(),
                std::env::var("WATCHDOG_PID").ok().as_deref(),
                std::process::id(),
            )?;
            Some(n)
        }
        _ => None,
    };
    for k in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        std::env::remove_var(k);
    }
    let _ = NOTIFIER.set(n);
    Ok(())
}

/// The fd of the connection to the service manager, if any (to keep across confinement).
pub fn fd() -> Option<RawFd> {
    NOTIFIER.get().and_then(Option::as_ref).map(Notifier::fd)
}

/// Sends `state` if a service manager listens (best effort: the first failure is a warning,
/// later ones debug messages).
pub fn send(state: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Some(n) = NOTIFIER.get().and_then(Option::as_ref) {
        if let Err(e) = n.send(state) {
            if WARNED.swap(true, Ordering::Relaxed) {
                tracing::debug!("notifying the service manager ({state:?}): {e}");
            } else {
                tracing::warn!("notifying the service manager ({state:?}): {e}");
            }
        }
    }
}

/// `STATUS=<status>`: one line the service manager shows (`systemctl status`).
pub fn status(status: &str) {
    send(&format!("STATUS={}", status.replace('\n', " ")));
}

/// `READY=1` with a status line, and (once) the watchdog keep-alive thread when the manager
/// asked for one. Call it when the daemon can serve: listening, confined, signal thread up.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={}", status.replace('\n', " ")));
    static WATCHDOG: Once = Once::new();
    let Some(every) = NOTIFIER
        .get()
        .and_then(Option::as_ref)
        .and_then(Notifier::watchdog_interval)
    else {
        return;
    };
    WATCHDOG.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || loop {
                send("WATCHDOG=1");
                std::thread::sleep(every);
            });
        if let Err(e) = spawned {
            tracing::error!("starting the watchdog thread: {e}");
        }
    });
}

/// `STOPPING=1`: the daemon is shutting down.
pub fn stopping() {
    send("STOPPING=1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_arrive_on_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notify");
        let manager = UnixDatagram::bind(&p).unwrap();
        let n = Notifier::connect(p.to_str().unwrap()).unwrap();
        n.send("READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let len = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("rqemu-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let manager = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::connect(&format!("@{name}")).unwrap();
        n.send("STOPPING=1").unwrap();
        let len = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1");
    }

    #[test]
    fn a_manager_that_does_not_read_never_blocks_the_sender() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notify");
        let _manager = UnixDatagram::bind(&p).unwrap();
        let n = Notifier::connect(p.to_str().unwrap()).unwrap();
        let refused = (0..1000).map(|_| n.send("STATUS=x")).find_map(Result::err);
        let e = refused.expect("a full queue refuses instead of blocking");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
    }

    #[test]
    fn a_missing_manager_socket_is_an_error_naming_it() {
        let e = Notifier::connect("/nonexistent/notify").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/notify"), "{e}");
    }

    #[test]
    fn the_watchdog_pings_at_half_the_timeout_of_its_own_process() {
        assert_eq!(watchdog_interval(None, None, 5).unwrap(), None);
        assert_eq!(
            watchdog_interval(Some("2000000"), None, 5).unwrap(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some("5"), 5).unwrap(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some("6"), 5).unwrap(),
            None
        );
        assert!(watchdog_interval(Some("0"), None, 5).is_err());
        assert!(watchdog_interval(Some("soon"), None, 5).is_err());
    }
}
