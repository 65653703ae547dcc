//! `rqemu-vmm` (our VMM; rqemu's software CPU by default) booting the test guest, and the
//! timed run of a VMM process shared with QEMU comparisons.
//!
//! ```no_run
//! use rqemu_e2e::{GuestAssets, vmm::RqemuVm};
//! let assets = GuestAssets::locate()?;
//! let run = RqemuVm::new(&assets)
//!     .device_socket("blk:/tmp/blk.sock")
//!     .run_cmdline("test -b /dev/vda")
//!     .run()?;
//! assert_eq!(run.code(), Some(0), "{}", run.transcript());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::paths::{project_binary, GuestAssets, PathError};
use crate::qemu::{base64, INIT_GREETING};

/// Default time limit of one `rqemu-vmm` guest run: a debug-build VMM around the (always
/// optimised) software CPU takes tens of seconds to boot Linux, more on a loaded host.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// The kernel parameters the guest needs on rqemu's machine model.
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1";

/// Errors running `rqemu-vmm`.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The binary or an asset is missing.
    #[error(transparent)]
    Path(#[from] PathError),
    /// The process could not be started or waited for.
    #[error("{program}: {source}")]
    Io {
        /// Program run.
        program: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A guest to boot under `rqemu-vmm`.
#[derive(Debug, Clone)]
pub struct RqemuVm {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    accel: String,
    memory: String,
    cpus: Option<u32>,
    device_sockets: Vec<String>,
    serial: Option<String>,
    cmdline: Option<String>,
    cmdline_extra: Vec<String>,
    run_cmdline: Option<String>,
    timeout: Duration,
    /// Raw arguments appended to the command line.
    extra_args: Vec<String>,
}

impl RqemuVm {
    /// The test guest (bzImage + initramfs) on `--accel tcg` with 512 MiB and the VMM's
    /// default vCPU count.
    pub fn new(assets: &GuestAssets) -> Self {
        Self {
            kernel: assets.vmlinuz.clone(),
            initrd: Some(assets.initramfs.clone()),
            accel: "tcg".into(),
            memory: "512M".into(),
            cpus: None,
            device_sockets: Vec::new(),
            serial: None,
            cmdline: None,
            cmdline_extra: Vec::new(),
            run_cmdline: None,
            timeout: DEFAULT_TIMEOUT,
            extra_args: Vec::new(),
        }
    }

    /// Adds a raw `rqemu-vmm` argument (e.g. `--tcg-mode`, `interp`).
    pub fn vmm_arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_string());
        self
    }

    /// Boots this kernel instead of the bzImage (e.g. `assets.vmlinux`, the ELF/PVH kernel).
    pub fn kernel(mut self, kernel: &Path) -> Self {
        self.kernel = kernel.to_path_buf();
        self
    }

    /// Boots this initrd instead of the shared one (e.g. built with
    /// [`crate::cpio::test_initramfs`]).
    pub fn initrd(mut self, initrd: &Path) -> Self {
        self.initrd = Some(initrd.to_path_buf());
        self
    }

    /// Boots without an initrd.
    pub fn no_initrd(mut self) -> Self {
        self.initrd = None;
        self
    }

    /// `--accel` (`tcg`, `kvm`).
    pub fn accel(mut self, accel: &str) -> Self {
        self.accel = accel.to_string();
        self
    }

    /// `--memory` (e.g. `512M`).
    pub fn memory(mut self, memory: &str) -> Self {
        self.memory = memory.to_string();
        self
    }

    /// `--cpus`.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = Some(cpus);
        self
    }

    /// Adds a `--device-socket [TYPE:]PATH`.
    pub fn device_socket(mut self, spec: &str) -> Self {
        self.device_sockets.push(spec.to_string());
        self
    }

    /// `--serial` (`stdio`, `file:PATH`, `none`); default: the VMM's (stdio).
    pub fn serial(mut self, serial: &str) -> Self {
        self.serial = Some(serial.to_string());
        self
    }

    /// Replaces the whole kernel command line (no [`BASE_CMDLINE`] or `rqemu.run=`).
    pub fn replace_cmdline(mut self, cmdline: &str) -> Self {
        self.cmdline = Some(cmdline.to_string());
        self
    }

    /// Appends to the kernel command line.
    pub fn cmdline(mut self, s: &str) -> Self {
        self.cmdline_extra.push(s.to_string());
        self
    }

    /// A shell script the guest's `/init` runs (`rqemu.run=<base64>` on the cmdline).
    pub fn run_cmdline(mut self, script: &str) -> Self {
        self.run_cmdline = Some(script.to_string());
        self
    }

    /// Time limit of [`RqemuVm::run`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        if let Some(c) = &self.cmdline {
            return c.clone();
        }
        // No timing flag under `--accel tcg` either: the software CPU reports its TSC and
        // LAPIC-timer rate in CPUID 0x15/0x16, so the kernel does not calibrate.
        let mut cmdline = String::from(BASE_CMDLINE);
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

    /// The `rqemu-vmm` command for this guest (the binary from [`project_binary`]).
    pub fn command(&self) -> Result<Command, VmmError> {
        let mut cmd = Command::new(project_binary("rqemu-vmm")?);
        cmd.args(["--accel", &self.accel, "--memory", &self.memory]);
        if let Some(cpus) = self.cpus {
            cmd.args(["--cpus", &cpus.to_string()]);
        }
        cmd.arg("--kernel").arg(&self.kernel);
        if let Some(initrd) = &self.initrd {
            cmd.arg("--initrd").arg(initrd);
        }
        for s in &self.device_sockets {
            cmd.args(["--device-socket", s]);
        }
        if let Some(serial) = &self.serial {
            cmd.args(["--serial", serial]);
        }
        cmd.arg("--cmdline").arg(self.kernel_cmdline());
        cmd.args(&self.extra_args);
        Ok(cmd)
    }

    /// Starts the VMM (stdin closed, output inherited) and returns it, for tests that watch
    /// a `--serial file:` log while the guest runs.
    pub fn spawn(&self) -> Result<Child, VmmError> {
        let mut cmd = self.command()?;
        cmd.stdin(Stdio::null());
        cmd.spawn().map_err(|source| VmmError::Io {
            program: "rqemu-vmm".into(),
            source,
        })
    }

    /// Boots the guest and waits until the VMM exits or the timeout (the VMM is then killed).
    pub fn run(&self) -> Result<TimedRun, VmmError> {
        timed_run(self.command()?, self.timeout)
    }
}

/// The outcome of one timed VMM run.
#[derive(Debug, Clone)]
pub struct TimedRun {
    /// Exit status; `None` if the process was killed at the time limit.
    pub status: Option<ExitStatus>,
    /// Its stdout (the guest console with `--serial stdio`), lossily decoded.
    pub console: String,
    /// Its stderr.
    pub stderr: String,
    /// Wall time from spawning to the `/init` greeting, if it was seen on stdout.
    pub init_reached: Option<Duration>,
    /// Wall time from spawning to the exit (or the kill).
    pub elapsed: Duration,
}

impl TimedRun {
    /// The exit code (`None` when killed at the time limit or by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// The exit status; panics with the transcript when the VMM was killed at the time limit.
    pub fn finished(&self) -> ExitStatus {
        self.status.unwrap_or_else(|| {
            panic!(
                "rqemu-vmm did not finish (killed after {:?})\n{}",
                self.elapsed,
                self.transcript()
            )
        })
    }

    /// Exit status, console and stderr, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "exit={:?}\n--- console ---\n{}\n--- stderr ---\n{}",
            self.code(),
            self.console,
            self.stderr
        )
    }
}

/// Runs `cmd` (stdin closed, stdout = guest console, both captured), timing the `/init`
/// greeting; kills it after `timeout`.
pub fn timed_run(mut cmd: Command, timeout: Duration) -> Result<TimedRun, VmmError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| VmmError::Io {
            program: program.clone(),
            source,
        })?;
    let out = child.stdout.take();
    let err = child.stderr.take();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let Some(mut out) = out else {
            return String::new();
        };
        let mut buf = [0u8; 4096];
        let mut seen = false;
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.extend_from_slice(buf.get(..n).unwrap_or_default());
            if !seen && String::from_utf8_lossy(&text).contains(INIT_GREETING) {
                seen = true;
                let _ = tx.send(Instant::now());
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut err) = err {
            let _ = err.read_to_string(&mut s);
        }
        s
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(VmmError::Io { program, source });
            }
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    let console = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let init_reached = rx.try_recv().ok().map(|t| t.duration_since(start));
    Ok(TimedRun {
        status,
        console,
        stderr,
        init_reached,
        elapsed,
    })
}

/// True if KVM can be used. If not, prints loudly why, and panics unless
/// `RQEMU_ALLOW_NO_KVM=1` (then the caller returns: the message says the test did not run).
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            let msg =
                format!("\n*** KVM TESTS NOT RUN ({test}): /dev/kvm cannot be opened: {e} ***\n");
            if std::env::var("RQEMU_ALLOW_NO_KVM").as_deref() == Ok("1") {
                eprintln!("{msg}*** passing only because RQEMU_ALLOW_NO_KVM=1 ***\n");
                false
            } else {
                panic!("{msg}set RQEMU_ALLOW_NO_KVM=1 to accept running without KVM");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assets() -> GuestAssets {
        GuestAssets {
            dir: "/g".into(),
            vmlinuz: "/g/vmlinuz".into(),
            vmlinux: "/g/vmlinux".into(),
            initramfs: "/g/initramfs.cpio.gz".into(),
            kernel_version: "x".into(),
        }
    }

    #[test]
    fn tcg_cmdline_is_the_base_one_plus_the_script() {
        let vm = RqemuVm::new(&assets())
            .cmdline("quiet")
            .run_cmdline("echo hi");
        assert_eq!(
            vm.kernel_cmdline(),
            format!("{BASE_CMDLINE} quiet rqemu.run={}", base64(b"echo hi"))
        );
        let kvm = RqemuVm::new(&assets()).accel("kvm");
        assert_eq!(kvm.kernel_cmdline(), BASE_CMDLINE);
        let raw = RqemuVm::new(&assets()).replace_cmdline("console=ttyS0");
        assert_eq!(raw.kernel_cmdline(), "console=ttyS0");
    }

    #[test]
    fn timed_run_captures_output_times_the_greeting_and_kills_at_the_limit() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!("echo early; echo '{INIT_GREETING}'; echo oops >&2; exit 3"),
        ]);
        let r = timed_run(cmd, Duration::from_secs(30)).unwrap();
        assert_eq!(r.code(), Some(3), "{}", r.transcript());
        assert!(r.console.contains("early") && r.stderr.contains("oops"));
        assert!(r.init_reached.is_some());
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let r = timed_run(cmd, Duration::from_millis(200)).unwrap();
        assert_eq!(r.status, None);
        assert!(r.init_reached.is_none());
    }
}
