//! QEMU TCG (`-M microvm`, ACPI, memfd shared memory, modern virtio-mmio) as the reference
//! vhost-user frontend, booting the test guest and collecting its console.
//!
//! ```no_run
//! use rqemu_e2e::{GuestAssets, qemu::{QemuVm, VhostUserDevice}};
//! let assets = GuestAssets::locate()?;
//! let dir = tempfile::tempdir()?;
//! let run = QemuVm::new(&assets, dir.path())
//!     .device(VhostUserDevice::blk("/tmp/blk.sock", 1))
//!     .script("cat /sys/block/vda/size")
//!     .run()?;
//! run.expect_success()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cpio::{test_initramfs, CpioError};
use crate::paths::{host_tool, GuestAssets, PathError};

/// The line `/init` prints first.
pub const INIT_GREETING: &str = "rqemu guest: init reached";
/// Prefix of the line carrying the test command's exit status.
pub const EXIT_MARKER: &str = "RQEMU-EXIT=";
/// Default time limit of one guest run (TCG boot is ~3 s; tests do I/O on top).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors running a guest.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A tool or asset is missing.
    #[error(transparent)]
    Path(#[from] PathError),
    /// Building the test initramfs failed.
    #[error(transparent)]
    Cpio(#[from] CpioError),
    /// QEMU could not be started or waited for.
    #[error("qemu-system-x86_64: {0}")]
    Io(#[source] std::io::Error),
    /// The guest did not power off in time.
    #[error("guest did not finish within {timeout:?} (QEMU killed); console:\n{console}")]
    Timeout {
        /// Time limit.
        timeout: Duration,
        /// Console output and QEMU's stderr.
        console: String,
    },
    /// QEMU or the guest test command failed.
    #[error("guest run failed: QEMU {status}, guest exit {guest_exit:?}; console:\n{console}")]
    Failed {
        /// QEMU's exit status.
        status: ExitStatus,
        /// `RQEMU-EXIT=` value, if printed.
        guest_exit: Option<i32>,
        /// Console output and QEMU's stderr.
        console: String,
    },
}

/// A vhost-user device given to QEMU.
#[derive(Debug, Clone)]
pub enum VhostUserDevice {
    /// `vhost-user-blk` (virtio-blk).
    Blk {
        /// Backend socket.
        socket: PathBuf,
        /// `num-queues`.
        num_queues: u16,
    },
    /// `virtio-net-device` on a `-netdev vhost-user`.
    Net {
        /// Backend socket.
        socket: PathBuf,
        /// Queue pairs.
        queues: u16,
        /// Guest MAC address, e.g. `52:54:00:12:34:56`.
        mac: Option<String>,
    },
    /// `vhost-user-fs-device` (virtiofs).
    Fs {
        /// Backend socket.
        socket: PathBuf,
        /// Mount tag.
        tag: String,
    },
}

impl VhostUserDevice {
    /// A vhost-user-blk device with `num_queues` queues.
    pub fn blk(socket: impl Into<PathBuf>, num_queues: u16) -> Self {
        Self::Blk {
            socket: socket.into(),
            num_queues,
        }
    }

    /// QEMU arguments for device number `n`.
    fn args(&self, n: usize, reconnect_ms: Option<u32>) -> Vec<String> {
        let chardev = |socket: &Path| {
            let mut c = format!(
                "socket,id=vhu{n},path={}",
                qemu_escape(&socket.to_string_lossy())
            );
            if let Some(ms) = reconnect_ms {
                c.push_str(&format!(",reconnect-ms={ms}"));
            }
            c
        };
        match self {
            Self::Blk { socket, num_queues } => vec![
                "-chardev".into(),
                chardev(socket),
                "-device".into(),
                format!("vhost-user-blk,chardev=vhu{n},num-queues={num_queues}"),
            ],
            Self::Net {
                socket,
                queues,
                mac,
            } => {
                let mut dev = format!("virtio-net-device,netdev=net{n}");
                if *queues > 1 {
                    dev.push_str(",mq=on");
                }
                if let Some(mac) = mac {
                    dev.push_str(&format!(",mac={mac}"));
                }
                vec![
                    "-chardev".into(),
                    chardev(socket),
                    "-netdev".into(),
                    format!("vhost-user,id=net{n},chardev=vhu{n},queues={queues}"),
                    "-device".into(),
                    dev,
                ]
            }
            Self::Fs { socket, tag } => vec![
                "-chardev".into(),
                chardev(socket),
                "-device".into(),
                format!(
                    "vhost-user-fs-device,chardev=vhu{n},tag={}",
                    qemu_escape(tag)
                ),
            ],
        }
    }
}

/// QEMU option values escape `,` by doubling it.
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// A guest to boot under QEMU TCG.
#[derive(Debug, Clone)]
pub struct QemuVm {
    assets: GuestAssets,
    kernel: PathBuf,
    work_dir: PathBuf,
    memory_mib: u32,
    cpus: u32,
    devices: Vec<VhostUserDevice>,
    extra_args: Vec<OsString>,
    cmdline_extra: Vec<String>,
    run_cmdline: Option<String>,
    script: Option<String>,
    files: Vec<(String, u32, Vec<u8>)>,
    timeout: Duration,
    kill_on: Option<(String, u32)>,
    reconnect_ms: Option<u32>,
}

impl QemuVm {
    /// A 512 MiB, 1-vCPU guest; `work_dir` receives the test initramfs (use a temp dir).
    pub fn new(assets: &GuestAssets, work_dir: &Path) -> Self {
        Self {
            assets: assets.clone(),
            kernel: assets.vmlinuz.clone(),
            work_dir: work_dir.to_path_buf(),
            memory_mib: 512,
            cpus: 1,
            devices: Vec::new(),
            extra_args: Vec::new(),
            cmdline_extra: Vec::new(),
            run_cmdline: None,
            script: None,
            files: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            kill_on: None,
            reconnect_ms: None,
        }
    }

    /// Boots this kernel instead of the bzImage (e.g. `assets.vmlinux`, the ELF/PVH kernel).
    pub fn kernel(mut self, kernel: &Path) -> Self {
        self.kernel = kernel.to_path_buf();
        self
    }

    /// Guest RAM in MiB (memfd-backed, shared with the daemons).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Number of vCPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Adds a vhost-user device (the first blk device is `/dev/vda` in the guest).
    pub fn device(mut self, dev: VhostUserDevice) -> Self {
        self.devices.push(dev);
        self
    }

    /// Adds raw QEMU arguments.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Appends to the kernel command line.
    pub fn cmdline(mut self, s: &str) -> Self {
        self.cmdline_extra.push(s.to_string());
        self
    }

    /// A shell script passed on the kernel cmdline (`rqemu.run=<base64>`; keep it short: the
    /// whole cmdline is limited to 2 KiB). Runs before `/test.sh`.
    pub fn run_cmdline(mut self, script: &str) -> Self {
        self.run_cmdline = Some(script.to_string());
        self
    }

    /// The guest test script, shipped as `/test.sh` (a `#!/bin/sh` line is added). Its exit
    /// status is reported as `RQEMU-EXIT=`.
    pub fn script(mut self, script: &str) -> Self {
        self.script = Some(script.to_string());
        self
    }

    /// Adds a file to the guest's root filesystem (parent directories are created).
    pub fn file(mut self, path: &str, mode: u32, data: Vec<u8>) -> Self {
        self.files.push((path.to_string(), mode, data));
        self
    }

    /// Time limit for the whole run.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// When the console shows `marker`, SIGKILLs process `pid` (a device daemon), waits until
    /// it is dead, then kills QEMU: the daemon dies while its frontend is still connected
    /// (no disconnect path runs in it). [`GuestRun::killed_at_marker`] tells whether it
    /// happened.
    pub fn kill_on_console(mut self, marker: &str, pid: u32) -> Self {
        self.kill_on = Some((marker.to_string(), pid));
        self
    }

    /// Makes every vhost-user chardev reconnect (`reconnect-ms=`): QEMU then survives its
    /// daemon's death and connects again to whatever listens on the path.
    pub fn reconnect_ms(mut self, ms: u32) -> Self {
        self.reconnect_ms = Some(ms);
        self
    }

    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut cmdline = String::from("console=ttyS0 quiet panic=-1");
        if let Some(khz) = host_tsc_khz() {
            // qboot leaves the PIT unusable for TSC calibration; without a hint the kernel
            // hangs in timer setup. Under TCG the guest TSC is the host's.
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
        for s in &self.cmdline_extra {
            cmdline.push(' ');
            cmdline.push_str(s);
        }
        if let Some(run) = &self.run_cmdline {
            cmdline.push_str(" rqemu.run=");
            cmdline.push_str(&base64(run.as_bytes()));
        }
        cmdline
    }

    /// Writes the test initramfs (base + appended archive) and returns its path.
    fn build_initramfs(&self) -> Result<PathBuf, QemuError> {
        if self.script.is_none() && self.files.is_empty() {
            return Ok(self.assets.initramfs.clone());
        }
        let out = self.work_dir.join("initramfs-test.img");
        test_initramfs(
            &self.assets.initramfs,
            &self.files,
            self.script.as_deref(),
            &out,
        )?;
        Ok(out)
    }

    /// The QEMU command for this guest using `initrd`.
    fn command(&self, initrd: &Path) -> Result<Command, QemuError> {
        let mut cmd = Command::new(host_tool("qemu-system-x86_64")?);
        let mem = format!("{}M", self.memory_mib);
        // qboot, not the default SeaBIOS: SeaBIOS drives virtio-mmio disks itself with rings in
        // 0xe0000..0x100000, which is ROM to QEMU and so missing from the vhost-user memory
        // table — vhost-user-blk backends then see invalid addresses before Linux even starts.
        cmd.args(["-bios", &firmware()?.to_string_lossy()]);
        cmd.args([
            "-accel",
            "tcg",
            "-M",
            "microvm,memory-backend=mem,acpi=on",
            "-m",
            &mem,
        ])
        .args(["-smp", &self.cpus.to_string()])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        ])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(&self.kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(self.kernel_cmdline());
        for (n, dev) in self.devices.iter().enumerate() {
            cmd.args(dev.args(n, self.reconnect_ms));
        }
        cmd.args(&self.extra_args);
        Ok(cmd)
    }

    /// Boots the guest and waits until QEMU exits (the guest powers off) or the timeout.
    pub fn run(&self) -> Result<GuestRun, QemuError> {
        self.run_inner(None)
    }

    /// [`run`](Self::run), calling `watch` with the console so far every 20 ms while the
    /// guest runs (to act on its progress: kill a daemon, start it again).
    pub fn run_watching(&self, mut watch: impl FnMut(&str)) -> Result<GuestRun, QemuError> {
        self.run_inner(Some(&mut watch))
    }

    fn run_inner(&self, mut watch: Option<&mut dyn FnMut(&str)>) -> Result<GuestRun, QemuError> {
        let initrd = self.build_initramfs()?;
        let mut cmd = self.command(&initrd)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn().map_err(QemuError::Io)?;
        let console = Arc::new(Mutex::new(Vec::<u8>::new()));
        let greeting_at = Arc::new(Mutex::new(None::<Duration>));
        let marker_seen = Arc::new(AtomicBool::new(false));
        let stdout = child.stdout.take();
        let out_thread = {
            let console = Arc::clone(&console);
            let greeting_at = Arc::clone(&greeting_at);
            let marker_seen = Arc::clone(&marker_seen);
            let marker = self.kill_on.as_ref().map(|(m, _)| m.clone());
            std::thread::spawn(move || {
                let Some(mut stdout) = stdout else { return };
                let mut buf = [0u8; 4096];
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut c = console.lock().unwrap_or_else(|e| e.into_inner());
                    c.extend_from_slice(buf.get(..n).unwrap_or_default());
                    let mut g = greeting_at.lock().unwrap_or_else(|e| e.into_inner());
                    if g.is_none() && contains(&c, INIT_GREETING.as_bytes()) {
                        *g = Some(start.elapsed());
                    }
                    if let Some(m) = &marker {
                        if !marker_seen.load(Ordering::Relaxed) && contains(&c, m.as_bytes()) {
                            marker_seen.store(true, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        let stderr = child.stderr.take();
        let err_thread = std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut e) = stderr {
                let _ = e.read_to_end(&mut s);
            }
            s
        });
        let deadline = start + self.timeout;
        let mut killed_at_marker = false;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(QemuError::Io)? {
                break Some(status);
            }
            if let Some((_, pid)) = &self.kill_on {
                if marker_seen.load(Ordering::Relaxed) {
                    let dead = kill_and_wait_dead(*pid);
                    let _ = child.kill();
                    let status = child.wait().map_err(QemuError::Io)?;
                    dead.map_err(QemuError::Io)?;
                    killed_at_marker = true;
                    break Some(status);
                }
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            if let Some(watch) = watch.as_mut() {
                let c = console.lock().unwrap_or_else(|e| e.into_inner()).clone();
                watch(&String::from_utf8_lossy(&c));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = start.elapsed();
        let _ = out_thread.join();
        let stderr = err_thread.join().unwrap_or_default();
        let mut text = String::from_utf8_lossy(&console.lock().unwrap_or_else(|e| e.into_inner()))
            .replace('\r', "");
        let stderr = String::from_utf8_lossy(&stderr).into_owned();
        let init_reached = *greeting_at.lock().unwrap_or_else(|e| e.into_inner());
        let Some(status) = status else {
            text.push_str("\n--- qemu stderr ---\n");
            text.push_str(&stderr);
            return Err(QemuError::Timeout {
                timeout: self.timeout,
                console: text,
            });
        };
        Ok(GuestRun {
            console: text,
            qemu_stderr: stderr,
            status,
            elapsed,
            init_reached,
            killed_at_marker,
        })
    }
}

/// SIGKILLs `pid` (a child of this process, not reaped yet: its pid cannot be reused) and
/// waits until it is a zombie, i.e. dead with nothing left to run.
fn kill_and_wait_dead(pid: u32) -> std::io::Result<()> {
    let pid_t = libc::pid_t::try_from(pid).unwrap_or(libc::pid_t::MAX);
    // SAFETY: kill(2) on a pid; no memory is accessed.
    if unsafe { libc::kill(pid_t, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let stat = format!("/proc/{pid}/stat");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = std::fs::read_to_string(&stat).ok().and_then(|s| {
            // "pid (comm) S ...": the state follows the last ')'.
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
        });
        match state {
            None | Some('Z') | Some('X') => return Ok(()),
            Some(_) if Instant::now() >= deadline => {
                return Err(std::io::Error::other(format!(
                    "process {pid} still alive 10 s after SIGKILL"
                )))
            }
            Some(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// QEMU's qboot firmware (package qemu-system-data).
pub fn firmware() -> Result<PathBuf, PathError> {
    let path = PathBuf::from(QBOOT);
    if path.is_file() {
        Ok(path)
    } else {
        Err(PathError::MissingTool(QBOOT.to_string()))
    }
}

const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// The host TSC frequency in kHz from `/proc/cpuinfo` (`cpu MHz`), if known.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz >= 1.0).then(|| (mhz * 1000.0).round() as u64)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Standard base64 (with padding).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The outcome of one guest run.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// Everything the guest printed on its serial console (`\r` removed).
    pub console: String,
    /// QEMU's own stderr.
    pub qemu_stderr: String,
    /// QEMU's exit status.
    pub status: ExitStatus,
    /// Wall time from spawning QEMU to its exit.
    pub elapsed: Duration,
    /// Wall time from spawning QEMU to the `/init` greeting, if it was seen.
    pub init_reached: Option<Duration>,
    /// The [`QemuVm::kill_on_console`] marker was seen and the process killed (then QEMU).
    pub killed_at_marker: bool,
}

impl GuestRun {
    /// The `RQEMU-EXIT=` status printed by `/init`.
    pub fn guest_exit(&self) -> Option<i32> {
        self.console
            .lines()
            .filter_map(|l| l.trim().strip_prefix(EXIT_MARKER))
            .filter_map(|v| v.trim().parse().ok())
            .next_back()
    }

    /// Console plus QEMU stderr, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "{}\n--- qemu stderr ---\n{}",
            self.console, self.qemu_stderr
        )
    }

    /// Ok when QEMU exited with status 0 and the guest test command reported 0.
    pub fn expect_success(&self) -> Result<&Self, QemuError> {
        if self.status.success() && self.guest_exit() == Some(0) {
            Ok(self)
        } else {
            Err(QemuError::Failed {
                status: self.status,
                guest_exit: self.guest_exit(),
                console: self.transcript(),
            })
        }
    }

    /// The rest of every console line starting with `prefix` (after trimming), in order.
    pub fn lines_with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.console
            .lines()
            .filter_map(move |l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    }

    /// `value` of the last console line `RQEMU-VAL <key>=<value>` (see `rqemu_val` in guest
    /// scripts: `echo "RQEMU-VAL key=$(...)"`).
    pub fn value(&self, key: &str) -> Option<&str> {
        self.lines_with_prefix("RQEMU-VAL ")
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .last()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe, 0xfd, 0x00]), "//79AA==");
    }

    #[test]
    fn device_args_escape_commas() {
        let args = VhostUserDevice::blk("/tmp/a,b.sock", 2).args(3, None);
        assert_eq!(args[1], "socket,id=vhu3,path=/tmp/a,,b.sock");
        assert_eq!(args[3], "vhost-user-blk,chardev=vhu3,num-queues=2");
        let net = VhostUserDevice::Net {
            socket: "/s".into(),
            queues: 2,
            mac: Some("52:54:00:00:00:01".into()),
        }
        .args(0, Some(500));
        assert!(net.contains(&"vhost-user,id=net0,chardev=vhu0,queues=2".to_string()));
        assert!(net.contains(&"socket,id=vhu0,path=/s,reconnect-ms=500".to_string()));
        assert!(
            net.contains(&"virtio-net-device,netdev=net0,mq=on,mac=52:54:00:00:00:01".to_string())
        );
    }
}
