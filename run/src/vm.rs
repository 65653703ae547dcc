//! The processes behind one container: an `rqemu-vsock` for the control channel, an
//! `rqemu-fs` per share (the rootfs and each directory bind mount), an `rqemu-net` per network
//! interface (over a tap handed over with `--tap-fd`) and `rqemu-vmm` booting the
//! agent initramfs. All are children of the monitor, in one process group of their own, and
//! die with it (`PR_SET_PDEATHSIG`).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::network::{self, Nic};
use crate::spec::Share;

/// The guest's vsock CID (any value above 2; each VM has its own daemon).
pub const GUEST_CID: u32 = 3;
/// Kernel command line of the container VM.
pub const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";
/// Name of the agent initramfs in the guest-assets directory.
pub const AGENT_INITRD: &str = "agent-initramfs.cpio.gz";
/// Name of the kernel in the guest-assets directory.
pub const KERNEL: &str = "vmlinuz";
/// Environment variable naming the guest-assets directory.
pub const GUEST_DIR_ENV: &str = "RQEMU_GUEST_DIR";
/// How long a daemon may take to create its socket.
const SOCKET_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found beside {1} nor in PATH: build it (`cargo build --bins`) or install it (scripts/install.sh)")]
    NoBinary(String, PathBuf),
    #[error("no guest assets: {0} (build them with scripts/guest-assets.sh; set --guest-dir or {GUEST_DIR_ENV})")]
    NoAssets(String),
    #[error("cannot start {0}: {1}")]
    Spawn(String, #[source] std::io::Error),
    #[error("{name} exited ({status}) before creating {socket}; its log:\n{log}")]
    DaemonDied {
        name: String,
        status: String,
        socket: PathBuf,
        log: String,
    },
    #[error("{name} did not create {socket} within {SOCKET_WAIT:?}; its log:\n{log}")]
    DaemonSlow {
        name: String,
        socket: PathBuf,
        log: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The VM's settings (global options of rqemu-run).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSettings {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub accel: String,
    pub memory: String,
    pub cpus: Option<u32>,
    pub debug: bool,
}

/// Finds a daemon binary: beside the running executable first, then in PATH.
pub fn find_binary(name: &str) -> Result<PathBuf, Error> {
    let exe = std::env::current_exe().unwrap_or_default();
    if let Some(dir) = exe.parent() {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::NoBinary(name.into(), exe))
}

/// The guest-assets directories tried, in order: `--guest-dir`, `RQEMU_GUEST_DIR`, then the
/// built-in defaults: `<exe dir>/../guest` (a build tree: `target/debug/rqemu-run` →
/// `target/guest`, where scripts/guest-assets.sh writes), `<exe dir>/../share/rqemu/guest`
/// (scripts/install.sh: `PREFIX/bin` → `PREFIX/share/rqemu/guest`), `/usr/local/share/rqemu/guest`,
/// `/usr/share/rqemu/guest`.
pub fn guest_dirs(flag: Option<&Path>) -> Vec<PathBuf> {
    if let Some(d) = flag {
        return vec![d.to_path_buf()];
    }
    if let Some(d) = std::env::var_os(GUEST_DIR_ENV).filter(|d| !d.is_empty()) {
        return vec![PathBuf::from(d)];
    }
    let mut v = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        v.push(dir.join("../guest"));
        v.push(dir.join("../share/rqemu/guest"));
    }
    v.push("/usr/local/share/rqemu/guest".into());
    v.push("/usr/share/rqemu/guest".into());
    v
}

/// Kernel and agent initramfs: the first directory of [`guest_dirs`] holding the initramfs
/// (the kernel from there too unless `--kernel` names one).
pub fn locate_assets(
    guest_dir: Option<&Path>,
    kernel: Option<&Path>,
) -> Result<(PathBuf, PathBuf), Error> {
    let dirs = guest_dirs(guest_dir);
    for d in &dirs {
        let initrd = d.join(AGENT_INITRD);
        if initrd.is_file() {
            let k = kernel
                .map(Path::to_path_buf)
                .unwrap_or_else(|| d.join(KERNEL));
            if !k.is_file() {
                return Err(Error::NoAssets(format!("kernel {} missing", k.display())));
            }
            let canon = |p: PathBuf| p.canonicalize().unwrap_or(p);
            return Ok((canon(k), canon(initrd)));
        }
    }
    let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(Error::NoAssets(format!(
        "{AGENT_INITRD} is in none of {}",
        list.join(", ")
    )))
}

/// The running children.
#[derive(Debug, Default)]
pub struct Children {
    pub pgid: i32,
    pub daemons: Vec<(String, Child)>,
    pub vmm: Option<Child>,
}

/// Paths of one container's sockets.
#[derive(Debug, Clone)]
pub struct Sockets {
    pub dir: PathBuf,
}

impl Sockets {
    pub fn vsock_vhost(&self) -> PathBuf {
        self.dir.join("vsock.vhost")
    }
    pub fn vsock_uds(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    /// Where the agent's connection arrives (hybrid vsock: `UDS_PORT`).
    pub fn control(&self) -> PathBuf {
        self.dir
            .join(format!("vsock.sock_{}", rqemu_agent_protocol::CONTROL_PORT))
    }
    pub fn start(&self) -> PathBuf {
        self.dir.join("start.sock")
    }
    pub fn fs(&self, tag: &str) -> PathBuf {
        self.dir.join(format!("{tag}.sock"))
    }
    pub fn net(&self, index: usize) -> PathBuf {
        self.dir.join(format!("net{index}.sock"))
    }
}

impl Children {
    fn spawn(&mut self, name: &str, cmd: Command, log: &Path) -> Result<Child, Error> {
        self.spawn_keeping(name, cmd, log, None)
    }

    /// [`Self::spawn`], the child inheriting `keep` (an fd of ours, close-on-exec elsewhere).
    fn spawn_keeping(
        &mut self,
        name: &str,
        mut cmd: Command,
        log: &Path,
        keep: Option<RawFd>,
    ) -> Result<Child, Error> {
        let io = |e| Error::Io {
            path: log.to_path_buf(),
            source: e,
        };
        let out = File::create(log).map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let pgid = self.pgid;
        // SAFETY: getpid before the fork; the closure runs in the child between fork and exec
        // and calls only async-signal-safe functions (setpgid, prctl, getppid, sigprocmask,
        // fcntl).
        let parent = unsafe { libc::getpid() };
        // SAFETY: see above.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setpgid(0, pgid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    // The monitor died between fork and prctl.
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                if let Some(fd) = keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| Error::Spawn(name.into(), e))?;
        if self.pgid == 0 {
            self.pgid = child.id() as i32;
        }
        Ok(child)
    }

    /// Starts a daemon and waits for its socket.
    fn daemon(&mut self, name: &str, cmd: Command, socket: &Path, log: &Path) -> Result<(), Error> {
        self.daemon_keeping(name, cmd, socket, log, None)
    }

    fn daemon_keeping(
        &mut self,
        name: &str,
        cmd: Command,
        socket: &Path,
        log: &Path,
        keep: Option<RawFd>,
    ) -> Result<(), Error> {
        let mut child = self.spawn_keeping(name, cmd, log, keep)?;
        let deadline = Instant::now() + SOCKET_WAIT;
        let read_log = || std::fs::read_to_string(log).unwrap_or_default();
        loop {
            if socket.exists() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(Error::DaemonDied {
                    name: name.into(),
                    status: st.to_string(),
                    socket: socket.into(),
                    log: read_log(),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::DaemonSlow {
                    name: name.into(),
                    socket: socket.into(),
                    log: read_log(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.daemons.push((name.into(), child));
        Ok(())
    }

    /// Starts the daemons, then the VMM. `state_dir` receives the logs. Each of `nics` gets an
    /// `rqemu-net` over its tap (the fd is closed here once handed over).
    pub fn start(
        &mut self,
        vm: &VmSettings,
        shares: &[Share],
        nics: Vec<Nic>,
        socks: &Sockets,
        state_dir: &Path,
    ) -> Result<(), Error> {
        let log_env = if vm.debug { "debug" } else { "info" };
        let vsock_bin = find_binary("rqemu-vsock")?;
        let mut cmd = Command::new(&vsock_bin);
        cmd.arg("--socket")
            .arg(socks.vsock_vhost())
            .args(["--guest-cid", &GUEST_CID.to_string()])
            .arg("--uds-path")
            .arg(socks.vsock_uds())
            .env("RUST_LOG", log_env)
            .env("RQEMU_LOG", log_env);
        self.daemon(
            "rqemu-vsock",
            cmd,
            &socks.vsock_vhost(),
            &state_dir.join("rqemu-vsock.log"),
        )?;
        let fs_bin = find_binary("rqemu-fs")?;
        for s in shares {
            let mut cmd = Command::new(&fs_bin);
            cmd.arg("--socket")
                .arg(socks.fs(&s.tag))
                .arg("--shared-dir")
                .arg(&s.dir)
                .args(["--tag", &s.tag])
                .env("RUST_LOG", log_env)
                .env("RQEMU_LOG", log_env);
            if s.readonly {
                cmd.arg("--readonly");
            }
            self.daemon(
                "rqemu-fs",
                cmd,
                &socks.fs(&s.tag),
                &state_dir.join(format!("rqemu-fs-{}.log", s.tag)),
            )?;
        }
        if !nics.is_empty() {
            let net_bin = find_binary("rqemu-net")?;
            for (i, nic) in nics.iter().enumerate() {
                let fd = nic.tap.as_raw_fd();
                let mut cmd = Command::new(&net_bin);
                cmd.arg("--socket")
                    .arg(socks.net(i))
                    .args(["--tap-fd", &fd.to_string()])
                    .args(["--mac", &network::format_mac(&nic.interface.mac)])
                    .env("RUST_LOG", log_env)
                    .env("RQEMU_LOG", log_env);
                // The guest's NIC takes the interface's MTU as its maximum and its default
                // (outside rqemu-net's range: its 1500, the agent then sets the MTU itself).
                if let Some(mtu) = network::device_mtu(nic.interface.mtu) {
                    cmd.args(["--mtu", &mtu.to_string()]);
                }
                self.daemon_keeping(
                    "rqemu-net",
                    cmd,
                    &socks.net(i),
                    &state_dir.join(format!("rqemu-net-{i}.log")),
                    Some(fd),
                )?;
            }
        }
        let mut cmd = Command::new(find_binary("rqemu-vmm")?);
        cmd.arg("--kernel")
            .arg(&vm.kernel)
            .arg("--initrd")
            .arg(&vm.initrd)
            .args(["--cmdline", CMDLINE])
            .args(["--memory", &vm.memory])
            .args(["--accel", &vm.accel])
            .arg("--serial")
            .arg(format!("file:{}", state_dir.join("console.log").display()))
            .arg("--device-socket")
            .arg(format!("vsock:{}", socks.vsock_vhost().display()))
            .env("RQEMU_LOG", log_env);
        if let Some(n) = vm.cpus {
            cmd.args(["--cpus", &n.to_string()]);
        }
        for s in shares {
            cmd.arg("--device-socket")
                .arg(format!("fs:{}", socks.fs(&s.tag).display()));
        }
        for i in 0..nics.len() {
            cmd.arg("--device-socket")
                .arg(format!("net:{}", socks.net(i).display()));
        }
        drop(nics);
        self.vmm = Some(self.spawn("rqemu-vmm", cmd, &state_dir.join("rqemu-vmm.log"))?);
        Ok(())
    }

    /// Signals every process of the group.
    pub fn signal_all(&self, sig: i32) {
        if self.pgid > 0 {
            // SAFETY: kill(2) on our own children's process group.
            unsafe { libc::kill(-self.pgid, sig) };
        }
    }

    /// Ends everything: SIGTERM (daemons finish in-flight work), then SIGKILL after `grace`;
    /// reaps the children.
    pub fn stop(&mut self, grace: Duration) {
        self.signal_all(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.reap_some() {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal_all(libc::SIGKILL);
        if let Some(v) = self.vmm.as_mut() {
            let _ = v.wait();
        }
        for (_, c) in &mut self.daemons {
            let _ = c.wait();
        }
    }

    /// Reaps finished children; true while some still run.
    fn reap_some(&mut self) -> bool {
        let mut running = false;
        for c in self
            .vmm
            .iter_mut()
            .chain(self.daemons.iter_mut().map(|(_, c)| c))
        {
            if matches!(c.try_wait(), Ok(None)) {
                running = true;
            }
        }
        running
    }

    /// The VMM's exit, if it has exited (reaps it).
    pub fn vmm_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.vmm.as_mut().and_then(|v| v.try_wait().ok().flatten())
    }
}
