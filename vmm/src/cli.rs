//! Command line of `rqemu-vmm` (clap derive) and conversion into a [`VmConfig`].

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::accel::tcg::{TcgMode, TcgOptions};
use crate::boot::BootConfig;
use crate::devices::serial::SerialOutput;
use crate::virtio::vhost_user::VhostUserKind;
use crate::vm::{AccelChoice, DeviceSocketConfig, VmConfig};

/// Default kernel command line when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";

/// Accelerator names on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelArg {
    /// Linux KVM.
    Kvm,
    /// rqemu's software CPU.
    Tcg,
    /// KVM when /dev/kvm works, otherwise TCG.
    Auto,
}

/// `--tcg-mode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TcgModeArg {
    /// Interpret every instruction (the reference).
    Interp,
    /// Translate hot blocks to host code (needs the `jit` build feature, on by default).
    Jit,
}

/// `--tcg-jit-compile` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JitCompileArg {
    /// On the vCPU's compile thread; the vCPU interprets the block meanwhile.
    Background,
    /// The vCPU waits for each translation (deterministic: for comparisons and debugging).
    Sync,
}

/// Transport of forwarded register accesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ForwardVia {
    /// Shared-memory rings, the socket as fallback.
    Ring,
    /// The socket only.
    Socket,
}

/// The kind of a vhost-user device socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk.
    Blk,
    /// virtio-net.
    Net,
    /// virtio-fs.
    Fs,
    /// virtio-vsock.
    Vsock,
    /// Discovered by the rqemu handshake.
    Auto,
}

/// A `--device-socket [TYPE:]PATH` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSocket {
    /// Device kind.
    pub kind: DeviceKind,
    /// UNIX socket path.
    pub path: PathBuf,
}

/// Parses `[TYPE:]PATH`; a prefix that is not a known type is part of the path.
pub fn parse_device_socket(s: &str) -> Result<DeviceSocket, String> {
    let (kind, path) = match s.split_once(':') {
        Some(("blk", p)) => (DeviceKind::Blk, p),
        Some(("net", p)) => (DeviceKind::Net, p),
        Some(("fs", p)) => (DeviceKind::Fs, p),
        Some(("vsock", p)) => (DeviceKind::Vsock, p),
        Some(("auto", p)) => (DeviceKind::Auto, p),
        _ => (DeviceKind::Auto, s),
    };
    if path.is_empty() {
        return Err(format!("empty socket path in {s:?}"));
    }
    Ok(DeviceSocket {
        kind,
        path: PathBuf::from(path),
    })
}

/// Parses a memory size: a number with optional K/M/G/T suffix (binary); no suffix = MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (&s[..i], shift)
        }
        _ => (s, 20),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid memory size {s:?}"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("memory size {s:?} is too large"))
}

/// Parses `stdio`, `none` or `file:PATH`.
pub fn parse_serial(s: &str) -> Result<SerialOutput, String> {
    match s {
        "stdio" => Ok(SerialOutput::Stdio),
        "none" => Ok(SerialOutput::None),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialOutput::File(PathBuf::from(p))),
            _ => Err(format!("expected stdio, none or file:PATH, got {s:?}")),
        },
    }
}

/// `rqemu-vmm` arguments.
#[derive(Debug, Parser)]
#[command(name = "rqemu-vmm", version, about = "rqemu virtual machine monitor")]
pub struct Cli {
    /// Kernel: bzImage or ELF vmlinux (PVH entry used when the ELF has a PVH note).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initramfs.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest RAM (e.g. 512M, 2G; no suffix = MiB).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=254))]
    pub cpus: u32,
    /// CPU accelerator.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// How the software CPU (TCG) runs guest code (default: jit when built with it).
    #[arg(long = "tcg-mode", value_enum)]
    pub tcg_mode: Option<TcgModeArg>,
    /// TCG JIT: interpreted runs of a block before it is translated.
    #[arg(long = "tcg-jit-threshold", default_value_t = rqemu_tcg::DEFAULT_JIT_THRESHOLD)]
    pub tcg_jit_threshold: u32,
    /// TCG JIT: translate on a compile thread while the vCPU goes on interpreting
    /// (`background`), or make the vCPU wait for each translation (`sync`).
    #[arg(long = "tcg-jit-compile", value_enum, default_value_t = JitCompileArg::Background)]
    pub tcg_jit_compile: JitCompileArg,
    /// Print the software CPU's execution counters (instructions, translated blocks, compile
    /// time, share run in translated code) to stderr when the VM ends; also RQEMU_TCG_STATS=1.
    #[arg(long = "tcg-stats")]
    pub tcg_stats: bool,
    /// Device daemon socket, `[blk|net|fs|vsock|auto:]PATH` (repeatable). Without a type the
    /// daemon is probed: a forwarding daemon (rqemu-serial, rqemu-rtc, ...) gets the windows
    /// it claims; a vhost-user daemon takes the next virtio-mmio window, its type read from
    /// its rqemu identity (third-party daemons need `blk:`, `net:`, `fs:` or `vsock:`).
    #[arg(long = "device-socket", value_parser = parse_device_socket)]
    pub device_sockets: Vec<DeviceSocket>,
    /// How register accesses reach forwarding daemons: per-vCPU shared-memory rings (the
    /// fast path) or the socket only (diagnostics, benchmarks).
    #[arg(long = "forward-via", value_enum, default_value_t = ForwardVia::Ring)]
    pub forward_via: ForwardVia,
    /// Serial console: stdio, file:PATH or none.
    #[arg(long, default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialOutput,
    /// Serve the management API (HTTP/1.1 + JSON, Cloud Hypervisor's shape: vmm.ping,
    /// vm.info, vm.pause, vm.resume, vm.shutdown, ...) on this UNIX socket; see `rqemu-ctl`.
    #[arg(long = "api-socket")]
    pub api_socket: Option<PathBuf>,
    /// `--sandbox namespace|chroot|none` (default: the strongest the privileges allow;
    /// `chroot` cannot keep the device socket directories, so it is refused with device
    /// sockets) and `--seccomp kill|log|trap|none` (default kill), entered once the machine is
    /// built and its devices attached.
    #[command(flatten)]
    pub sandbox: rqemu_sandbox::SandboxArgs,
    /// Test hook: once confined, make a syscall no thread of the VMM is allowed (`openat`);
    /// with `--seccomp kill` the VMM dies of SIGSYS there.
    #[arg(long = "sandbox-selftest", hide = true)]
    pub sandbox_selftest: bool,
}

impl Cli {
    /// Options of the software CPU.
    pub fn tcg_options(&self) -> TcgOptions {
        let d = TcgOptions::default();
        TcgOptions {
            mode: match self.tcg_mode {
                Some(TcgModeArg::Interp) => TcgMode::Interp,
                Some(TcgModeArg::Jit) => TcgMode::Jit,
                None => d.mode,
            },
            jit_threshold: self.tcg_jit_threshold,
            jit_background: self.tcg_jit_compile == JitCompileArg::Background,
            stats: self.tcg_stats || d.stats,
        }
    }

    /// The accelerator choice.
    pub fn accel_choice(&self) -> AccelChoice {
        match self.accel {
            AccelArg::Kvm => AccelChoice::Kvm,
            AccelArg::Tcg => AccelChoice::Tcg,
            AccelArg::Auto => AccelChoice::Auto,
        }
    }

    /// The machine configuration. Device sockets without a type are discovered when the VM
    /// connects them.
    pub fn vm_config(&self) -> Result<VmConfig, String> {
        let devices = self
            .device_sockets
            .iter()
            .map(|d| {
                let kind = match d.kind {
                    DeviceKind::Blk => Some(VhostUserKind::Blk),
                    DeviceKind::Net => Some(VhostUserKind::Net),
                    DeviceKind::Fs => Some(VhostUserKind::Fs),
                    DeviceKind::Vsock => Some(VhostUserKind::Vsock),
                    DeviceKind::Auto => None,
                };
                Ok(DeviceSocketConfig {
                    kind,
                    socket: d.path.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(VmConfig {
            boot: BootConfig {
                kernel: self.kernel.clone(),
                initrd: self.initrd.clone(),
                cmdline: self.cmdline.clone(),
            },
            memory: self.memory,
            vcpus: self.cpus,
            serial: self.serial.clone(),
            devices,
            forward_rings: self.forward_via == ForwardVia::Ring,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("rqemu-vmm").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let c = parse(&["--kernel", "k"]).unwrap();
        assert_eq!(c.memory, 512 << 20);
        assert_eq!(c.cpus, 1);
        assert_eq!(c.accel, AccelArg::Auto);
        assert_eq!(c.serial, SerialOutput::Stdio);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert!(c.device_sockets.is_empty());
        assert_eq!(c.api_socket, None);
        rejects(&[], &["required", "--kernel"]);
    }

    #[test]
    fn full_command_line() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--cmdline",
            "quiet",
            "--memory",
            "2G",
            "--cpus",
            "4",
            "--accel",
            "tcg",
            "--device-socket",
            "blk:/a.sock",
            "--device-socket",
            "/b:c.sock",
            "--serial",
            "file:/tmp/s",
        ])
        .unwrap();
        assert_eq!(c.memory, 2 << 30);
        assert_eq!(c.cpus, 4);
        assert_eq!(c.accel_choice(), AccelChoice::Tcg);
        assert_eq!(c.device_sockets[0].kind, DeviceKind::Blk);
        assert_eq!(c.device_sockets[1].kind, DeviceKind::Auto);
        assert_eq!(c.device_sockets[1].path, PathBuf::from("/b:c.sock"));
        assert_eq!(c.serial, SerialOutput::File("/tmp/s".into()));
        let cfg = c.vm_config().unwrap();
        assert_eq!(cfg.devices[0].kind, Some(VhostUserKind::Blk));
        // No type: discovered from the daemon's identity when the VM connects it.
        assert_eq!(cfg.devices[1].kind, None);
        let c = parse(&[
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--device-socket",
            "fs:/f",
            "--device-socket",
            "vsock:/v",
        ])
        .unwrap();
        let cfg = c.vm_config().unwrap();
        assert_eq!(cfg.devices[1].kind, Some(VhostUserKind::Vsock));
        assert_eq!(cfg.devices[1].socket, PathBuf::from("/v"));
        assert_eq!(cfg.boot.initrd, Some(PathBuf::from("/i")));
        assert_eq!(cfg.devices[0].kind, Some(VhostUserKind::Fs));
    }

    /// `args` must be refused with a message containing every one of `needles` (the bad
    /// value and the option it was given to, or the missing/conflicting option).
    #[track_caller]
    fn rejects(args: &[&str], needles: &[&str]) {
        let msg = match parse(args) {
            Ok(c) => panic!("{args:?} accepted: {c:?}"),
            Err(e) => e.to_string(),
        };
        for n in needles {
            assert!(
                msg.contains(n),
                "{args:?}: message does not name {n:?}:\n{msg}"
            );
        }
    }

    #[test]
    fn rejects_bad_values() {
        rejects(
            &["--kernel", "k", "--cpus", "0"],
            &["'0'", "--cpus", "1..=254"],
        );
        rejects(
            &["--kernel", "k", "--cpus", "255"],
            &["'255'", "--cpus", "1..=254"],
        );
        rejects(
            &["--kernel", "k", "--accel", "hvf"],
            &["'hvf'", "--accel", "kvm", "tcg", "auto"],
        );
        rejects(
            &["--kernel", "k", "--serial", "file:"],
            &["'file:'", "--serial", "file:PATH"],
        );
        rejects(
            &["--kernel", "k", "--memory", "12X"],
            &["'12X'", "--memory", "unknown size suffix"],
        );
        rejects(
            &["--kernel", "k", "--memory", "lots"],
            &["'lots'", "--memory", "unknown size suffix"],
        );
        rejects(
            &["--kernel", "k", "--memory", "1.5G"],
            &["'1.5G'", "--memory", "invalid memory size"],
        );
        rejects(
            &["--kernel", "k", "--memory", "99999999999999G"],
            &["'99999999999999G'", "too large"],
        );
        rejects(
            &["--kernel", "k", "--device-socket", "net:"],
            &["'net:'", "--device-socket", "empty socket path"],
        );
        rejects(
            &["--kernel", "k", "--forward-via", "pigeon"],
            &["'pigeon'", "--forward-via", "ring", "socket"],
        );
    }

    #[test]
    fn rejects_missing_and_conflicting_options() {
        // Required option and option values missing.
        rejects(&["--memory", "1G"], &["required", "--kernel"]);
        rejects(&["--kernel"], &["--kernel", "a value is required"]);
        rejects(
            &["--kernel", "k", "--cpus"],
            &["--cpus", "a value is required"],
        );
        // Single-valued options given twice with different values.
        rejects(
            &["--kernel", "k", "--accel", "kvm", "--accel", "tcg"],
            &["--accel", "cannot be used multiple times"],
        );
        rejects(
            &["--kernel", "a", "--kernel", "b"],
            &["--kernel", "cannot be used multiple times"],
        );
        rejects(
            &["--kernel", "k", "--serial", "none", "--serial", "stdio"],
            &["--serial", "cannot be used multiple times"],
        );
        // Unknown options and stray arguments.
        rejects(&["--kernel", "k", "--smp", "2"], &["'--smp'"]);
        rejects(&["--kernel", "k", "extra"], &["'extra'"]);
    }

    #[test]
    fn sandbox_defaults_to_the_strongest_mode_and_kill() {
        let cli = parse(&["--kernel", "k"]).unwrap();
        assert_eq!(cli.sandbox, rqemu_sandbox::SandboxArgs::default());
        assert!(!cli.sandbox_selftest);
        let cli = parse(&["--kernel", "k", "--sandbox", "none", "--seccomp", "log"]).unwrap();
        assert_eq!(cli.sandbox.sandbox, Some(rqemu_sandbox::SandboxMode::None));
        assert_eq!(cli.sandbox.seccomp, rqemu_sandbox::SeccompAction::Log);
        assert!(parse(&["--kernel", "k", "--seccomp", "allow"]).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64"), Ok(64 << 20));
        assert_eq!(parse_size("4096k"), Ok(4 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(
            parse_size("99999999999999G"),
            Err("memory size \"99999999999999G\" is too large".into())
        );
        assert_eq!(parse_size(""), Err("invalid memory size \"\"".into()));
        assert_eq!(parse_size("M"), Err("invalid memory size \"M\"".into()));
    }
}
