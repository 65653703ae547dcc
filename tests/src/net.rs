//! Network test rig: a private network namespace holding `rqemu-net` and its tap, a host peer
//! (TCP upload sink / download source) running on a thread that entered the namespace, and
//! the guest script that talks to it.
//!
//! Nothing is routed outside the namespace: the tap only exists inside it, and the namespace
//! is deleted when [`NetNs`] is dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, DaemonError, DEFAULT_START_TIMEOUT};
use crate::paths::{host_tool, project_binary, PathError};

/// Host (peer) address on the tap, inside the namespace.
pub const HOST_IP: &str = "10.77.0.1";
/// Guest address.
pub const GUEST_IP: &str = "10.77.0.2";
/// Tap name inside the namespace.
pub const TAP: &str = "rqt0";
/// Port of the upload sink (guest → host).
pub const UP_PORT: u16 = 5001;
/// Port of the download source (host → guest).
pub const DOWN_PORT: u16 = 5002;

/// Errors of the network rig.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A tool or binary is missing.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A command failed.
    #[error("`{cmd}` failed: {why}")]
    Command {
        /// The command line.
        cmd: String,
        /// Exit status and stderr, or the spawn error.
        why: String,
    },
    /// The daemon could not be started.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// Socket or thread trouble on the host side.
    #[error("host peer: {0}")]
    Io(#[from] std::io::Error),
    /// The tap did not appear.
    #[error("tap {TAP} did not appear in namespace {ns} within {timeout:?}; daemon log:\n{log}")]
    NoTap {
        /// Namespace.
        ns: String,
        /// Time waited.
        timeout: Duration,
        /// Daemon log.
        log: String,
    },
}

fn run(cmd: &mut Command) -> Result<String, NetError> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetError::Command {
            cmd: line.clone(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(NetError::Command {
            cmd: line,
            why: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `rqemu-test-<pid>-<n>` with its loopback up.
    pub fn create() -> Result<Self, NetError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "rqemu-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let ip = host_tool("ip")?;
        run(Command::new(&ip).args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetError> {
        run(Command::new(host_tool("ip")?)
            .args(["-n", &self.name])
            .args(args))
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &Path) -> Result<Command, NetError> {
        let mut cmd = Command::new(host_tool("ip")?);
        cmd.args(["netns", "exec", &self.name]).arg(program);
        Ok(cmd)
    }

    /// Runs `f` on a new thread that first joins the namespace (`setns` only affects that
    /// thread, so sockets it creates live in the namespace).
    pub fn spawn<T, F>(&self, f: F) -> Result<JoinHandle<std::io::Result<T>>, NetError>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        let file = std::fs::File::open(format!("/var/run/netns/{}", self.name))?;
        Ok(std::thread::spawn(move || {
            // SAFETY: setns(2) on an open namespace fd; affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            f()
        }))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Ok(ip) = host_tool("ip") {
            let _ = Command::new(ip)
                .args(["netns", "del", &self.name])
                .stdin(Stdio::null())
                .output();
        }
    }
}

/// Options of one `rqemu-net` instance.
#[derive(Debug, Clone)]
pub struct NetDaemonOptions {
    /// Queue pairs.
    pub queues: u16,
    /// Guest MAC.
    pub mac: String,
    /// Open the tap here (as a privileged parent would) and hand its fds over with
    /// `--tap-fd`, instead of letting the daemon create it with `--tap`.
    pub inherit_tap: bool,
}

impl Default for NetDaemonOptions {
    fn default() -> Self {
        NetDaemonOptions {
            queues: 1,
            mac: "52:54:00:12:34:56".into(),
            inherit_tap: false,
        }
    }
}

/// Starts `rqemu-net` inside `ns` on an inherited listening socket bound at `socket` (bound
/// here, in the test's namespace, so QEMU and the harness see it), waits for its tap and
/// gives the tap the host address.
pub fn spawn_daemon(
    ns: &NetNs,
    dir: &Path,
    socket: &Path,
    opts: &NetDaemonOptions,
) -> Result<Daemon, NetError> {
    spawn(ns, dir, socket, opts, None)
}

/// Like [`spawn_daemon`], on taps the caller holds (opened in `ns` with [`open_tap`], one per
/// queue pair), handed over with `--tap-fd`: the tap outlives the daemon, as when a
/// supervisor keeps it across daemon restarts. The host address is added once.
pub fn spawn_daemon_on_taps(
    ns: &NetNs,
    dir: &Path,
    socket: &Path,
    opts: &NetDaemonOptions,
    taps: &[OwnedFd],
) -> Result<Daemon, NetError> {
    spawn(ns, dir, socket, opts, Some(taps))
}

fn spawn(
    ns: &NetNs,
    dir: &Path,
    socket: &Path,
    opts: &NetDaemonOptions,
    held: Option<&[OwnedFd]>,
) -> Result<Daemon, NetError> {
    let listener = UnixListener::bind(socket)?;
    let mut keep: Vec<RawFd> = vec![listener.as_raw_fd()];
    let mut cmd = ns.command(&project_binary("rqemu-net")?)?;
    cmd.args([
        "--fd",
        &listener.as_raw_fd().to_string(),
        "--mac",
        &opts.mac,
    ])
    .args(["--queues", &opts.queues.to_string()])
    .env(
        "RQEMU_LOG",
        std::env::var("RQEMU_LOG").unwrap_or_else(|_| "info".into()),
    );
    let queues = usize::from(opts.queues);
    let taps = if let Some(held) = held {
        let list: Vec<String> = held.iter().map(|t| t.as_raw_fd().to_string()).collect();
        cmd.args(["--tap-fd", &list.join(",")]);
        keep.extend(held.iter().map(AsRawFd::as_raw_fd));
        Vec::new()
    } else if opts.inherit_tap {
        let taps = ns
            .spawn(move || open_tap(TAP, queues))?
            .join()
            .map_err(|_| NetError::Io(std::io::Error::other("tap thread panicked")))??;
        let list: Vec<String> = taps.iter().map(|t| t.as_raw_fd().to_string()).collect();
        cmd.args(["--tap-fd", &list.join(",")]);
        keep.extend(taps.iter().map(AsRawFd::as_raw_fd));
        taps
    } else {
        cmd.args(["--tap", TAP]);
        Vec::new()
    };
    // SAFETY: pre_exec runs in the forked child before exec; fcntl is async-signal-safe and
    // `keep` is only read.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let daemon = Daemon::spawn(
        "rqemu-net",
        cmd,
        socket,
        &dir.join("rqemu-net.log"),
        DEFAULT_START_TIMEOUT,
    )?;
    drop(listener);
    drop(taps);
    let timeout = Duration::from_secs(20);
    let deadline = Instant::now() + timeout;
    while ns.ip(&["link", "show", TAP]).is_err() {
        if Instant::now() > deadline {
            return Err(NetError::NoTap {
                ns: ns.name().into(),
                timeout,
                log: daemon.log(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !ns
        .ip(&["-4", "addr", "show", "dev", TAP])?
        .contains(&format!("{HOST_IP}/"))
    {
        ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP])?;
    }
    ns.ip(&["link", "set", TAP, "up"])?;
    Ok(daemon)
}

/// Opens (creating it) tap `name` with `queues` queues in the calling thread's network
/// namespace: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (+ `IFF_MULTI_QUEUE`), as a privileged
/// parent of `rqemu-net --tap-fd` would.
pub fn open_tap(name: &str, queues: usize) -> std::io::Result<Vec<OwnedFd>> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const FLAGS: libc::c_short = 0x0002 | 0x1000 | 0x4000; // TAP | NO_PI | VNET_HDR
    const MULTI_QUEUE: libc::c_short = 0x0100;
    let mut out = Vec::new();
    for _ in 0..queues {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // struct ifreq: 16-byte name, then the flags (short) in a 24-byte union.
        let mut req = [0u8; 40];
        req[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
        let flags = if queues > 1 {
            FLAGS | MULTI_QUEUE
        } else {
            FLAGS
        };
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; `req` is 40 bytes, its size.
        if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, req.as_mut_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        out.push(OwnedFd::from(f));
    }
    Ok(out)
}

/// Deterministic pseudo-random bytes (xorshift64).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 (hex) of `data`, computed by `sha256sum`.
pub fn sha256_hex(data: &[u8]) -> Result<String, NetError> {
    let mut child = Command::new(host_tool("sha256sum")?)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(data)?;
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn accept_until(l: &TcpListener, deadline: Instant) -> std::io::Result<std::net::TcpStream> {
    l.set_nonblocking(true)?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(Duration::from_secs(120)))?;
                s.set_write_timeout(Some(Duration::from_secs(120)))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no connection from the guest",
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The host end of one guest session: an upload sink and a download source, each serving
/// `sessions` connections in turn.
pub struct HostPeer {
    /// Bytes received per upload connection.
    pub uploads: JoinHandle<std::io::Result<Vec<Vec<u8>>>>,
    /// Completes when every download was sent.
    pub downloads: JoinHandle<std::io::Result<()>>,
}

impl HostPeer {
    /// Listens on [`HOST_IP`] in `ns`; `down` is sent to each downloading guest.
    pub fn start(
        ns: &NetNs,
        sessions: usize,
        down: Vec<u8>,
        timeout: Duration,
    ) -> Result<Self, NetError> {
        let (up_tx, up_rx) = std::sync::mpsc::channel();
        let (down_tx, down_rx) = std::sync::mpsc::channel();
        let uploads = ns.spawn(move || {
            let l = TcpListener::bind((HOST_IP, UP_PORT));
            let _ = up_tx.send(l.as_ref().map(|_| ()).map_err(|e| e.to_string()));
            let l = l?;
            let deadline = Instant::now() + timeout;
            let mut got = Vec::new();
            for _ in 0..sessions {
                let mut s = accept_until(&l, deadline)?;
                let mut buf = Vec::new();
                s.read_to_end(&mut buf)?;
                got.push(buf);
            }
            Ok(got)
        })?;
        let downloads = ns.spawn(move || {
            let l = TcpListener::bind((HOST_IP, DOWN_PORT));
            let _ = down_tx.send(l.as_ref().map(|_| ()).map_err(|e| e.to_string()));
            let l = l?;
            let deadline = Instant::now() + timeout;
            for _ in 0..sessions {
                let mut s = accept_until(&l, deadline)?;
                s.write_all(&down)?;
                s.shutdown(Shutdown::Write)?;
                // Wait for the guest to close its side (it has read everything then).
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            }
            Ok(())
        })?;
        for rx in [up_rx, down_rx] {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(NetError::Io(std::io::Error::other(format!(
                        "binding the peer: {e}"
                    ))))
                }
                Err(e) => {
                    return Err(NetError::Io(std::io::Error::other(format!(
                        "peer thread: {e}"
                    ))))
                }
            }
        }
        Ok(HostPeer { uploads, downloads })
    }
}

/// Guest script: configure eth0, ping the host, upload `up_mib` MiB of random data, download
/// the host's data; report `RQEMU-VAL up-sha256=`, `down-sha256=`, `down-len=`, `queues=`.
/// With `cpu_mask`, the transfers run pinned (`taskset`) to those CPUs, which selects the
/// queue pair through the driver's XPS map (CPU i → pair i).
pub fn guest_script(up_mib: u32, cpu_mask: Option<u32>) -> String {
    let pin = cpu_mask
        .map(|m| format!("taskset {m:x} "))
        .unwrap_or_default();
    format!(
        r#"ip link set eth0 up || exit 20
ip addr add {GUEST_IP}/24 dev eth0 || exit 21
echo "RQEMU-VAL queues=$(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
ping -c 3 -W 10 {HOST_IP} || exit 22
dd if=/dev/urandom of=/tmp/up bs=1M count={up_mib} 2>/dev/null || exit 23
echo "RQEMU-VAL up-sha256=$(sha256sum /tmp/up | cut -d' ' -f1)"
{pin}nc {HOST_IP} {UP_PORT} < /tmp/up || exit 24
{pin}nc {HOST_IP} {DOWN_PORT} < /dev/null > /tmp/down || exit 25
echo "RQEMU-VAL down-sha256=$(sha256sum /tmp/down | cut -d' ' -f1)"
echo "RQEMU-VAL down-len=$(wc -c < /tmp/down)"
"#
    )
}

/// `(rx packets, tx chains)` of queue pair `pair` from the last per-pair line of a daemon log.
pub fn logged_pair(log: &str, pair: usize) -> Option<(u64, u64)> {
    let prefix = format!("queue pair {pair}: rx ");
    let line = log.lines().rev().find(|l| l.contains(&prefix))?;
    let rest = line.split(&prefix).nth(1)?;
    let mut nums = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    Some((nums.next()?.parse().ok()?, nums.next()?.parse().ok()?))
}

/// Device counters from the last `stats:` line of a daemon log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoggedStats {
    /// Frames written to the tap.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Dropped guest frames.
    pub tx_dropped: u64,
    /// Frames given to the guest.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Segmentation-offload frames from the guest.
    pub tx_gso_frames: u64,
    /// Segmentation-offload frames to the guest.
    pub rx_gso_frames: u64,
}

/// Parses the last `StatsSnapshot { ... }` in `log`.
pub fn logged_stats(log: &str) -> Option<LoggedStats> {
    let line = log.lines().rev().find(|l| l.contains("StatsSnapshot {"))?;
    let field = |name: &str| -> Option<u64> {
        let rest = line.split(&format!("{name}: ")).nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    Some(LoggedStats {
        tx_frames: field("tx_frames")?,
        tx_bytes: field("tx_bytes")?,
        tx_dropped: field("tx_dropped")?,
        rx_frames: field("rx_frames")?,
        rx_bytes: field("rx_bytes")?,
        tx_gso_frames: field("tx_gso_frames")?,
        rx_gso_frames: field("rx_gso_frames")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_lines_parse() {
        let log = "x\n INFO stats: StatsSnapshot { tx_frames: 30, tx_bytes: 3180, tx_dropped: 2, \
                   tx_errors: 0, tx_gso_frames: 4, rx_frames: 37, rx_bytes: 272954, \
                   rx_gso_frames: 5, rx_dropped: 0 }\n";
        assert_eq!(
            logged_stats(log),
            Some(LoggedStats {
                tx_frames: 30,
                tx_bytes: 3180,
                tx_dropped: 2,
                rx_frames: 37,
                rx_bytes: 272954,
                tx_gso_frames: 4,
                rx_gso_frames: 5,
            })
        );
        assert_eq!(logged_stats("nothing"), None);
        let log = "INFO queue pair 1: rx 12 packets, tx 7 chains\nINFO queue pair 0: rx 1 packets, tx 2 chains";
        assert_eq!(logged_pair(log, 1), Some((12, 7)));
        assert_eq!(logged_pair(log, 0), Some((1, 2)));
        assert_eq!(logged_pair(log, 2), None);
    }

    #[test]
    fn pattern_is_deterministic() {
        assert_eq!(pattern(1000, 7), pattern(1000, 7));
        assert_ne!(pattern(1000, 7), pattern(1000, 8));
        assert_eq!(pattern(13, 1).len(), 13);
    }
}
