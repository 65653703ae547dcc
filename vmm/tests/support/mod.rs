//! Shared test support: building the guest payloads from `vmm/payloads/` with the system
//! gcc, wrapping one into a bzImage-like blob, running `rqemu-vmm`; the KVM check and binary
//! lookup are the e2e harness's (`rqemu-e2e`).
//!
//! Payloads (see `payloads/payload.c`):
//! * `payload.elf`     — ELF without PVH note → the VMM uses the Linux 64-bit entry;
//! * `payload-pvh.elf` — ELF with a PVH note → 32-bit PVH entry (`start_pvh.S`);
//! * `payload.bzimage` — setup header + the flat payload, loaded by linux-loader's BzImage.
#![allow(dead_code)]

pub mod daemon;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The built payload files.
pub struct Payloads {
    pub elf: PathBuf,
    pub pvh: PathBuf,
    pub bzimage: PathBuf,
}

fn payload_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("payloads")
}

fn gcc(out: &Path, sources: &[&str]) {
    let dir = payload_dir();
    let mut cmd = Command::new("gcc");
    cmd.args([
        "-ffreestanding",
        "-nostdlib",
        "-static",
        "-m64",
        "-O2",
        "-fno-pic",
        "-no-pie",
        "-mno-red-zone",
        "-mgeneral-regs-only",
        "-fno-stack-protector",
        "-fno-asynchronous-unwind-tables",
        "-Wall",
        "-Werror",
        "-Wl,--build-id=none",
        "-Wl,-z,noexecstack",
        "-Wl,--no-warn-rwx-segments",
    ])
    .arg(format!("-Wl,-T,{}", dir.join("payload.ld").display()))
    .arg("-o")
    .arg(out);
    for s in sources {
        cmd.arg(dir.join(s));
    }
    let st = cmd
        .status()
        .expect("running gcc (the system gcc is needed to build the test payloads)");
    assert!(st.success(), "gcc failed building {}", out.display());
}

/// A bzImage-like blob: one setup sector with a 2.15 header, then the flat payload image
/// whose first 0x200 bytes are padding (the 64-bit entry is at load address + 0x200).
fn make_bzimage(elf: &Path, out: &Path) {
    let flat = out.with_extension("bin");
    let st = Command::new("objcopy")
        .args([
            "-O",
            "binary",
            "--only-section=.text",
            "--only-section=.rodata",
        ])
        .args(["--only-section=.data"])
        .arg(elf)
        .arg(&flat)
        .status()
        .expect("running objcopy");
    assert!(st.success(), "objcopy failed");
    let code = std::fs::read(&flat).unwrap();
    let mut img = vec![0u8; 1024]; // setup_sects = 1 → (1 + 1) * 512 bytes of setup
    let put16 =
        |img: &mut Vec<u8>, off: usize, v: u16| img[off..off + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |img: &mut Vec<u8>, off: usize, v: u32| img[off..off + 4].copy_from_slice(&v.to_le_bytes());
    img[0x1f1] = 1; // setup_sects
    put16(&mut img, 0x1fe, 0xaa55); // boot_flag
    img[0x202..0x206].copy_from_slice(b"HdrS");
    put16(&mut img, 0x206, 0x020f); // protocol 2.15
    img[0x211] = 0x01; // loadflags: LOADED_HIGH
    put32(&mut img, 0x214, 0x10_0000); // code32_start
    put32(&mut img, 0x22c, 0x37ff_ffff); // initrd_addr_max
    put32(&mut img, 0x230, 0x20_0000); // kernel_alignment
    put16(&mut img, 0x236, 0x1); // xloadflags: XLF_KERNEL_64
    put32(&mut img, 0x238, 0xffff); // cmdline_size
    img.extend(std::iter::repeat_n(0u8, 0x200));
    img.extend_from_slice(&code);
    std::fs::write(out, img).unwrap();
}

/// Builds the payloads once per test binary.
pub fn payloads() -> &'static Payloads {
    static P: OnceLock<Payloads> = OnceLock::new();
    P.get_or_init(|| {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("payloads-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = Payloads {
            elf: dir.join("payload.elf"),
            pvh: dir.join("payload-pvh.elf"),
            bzimage: dir.join("payload.bzimage"),
        };
        gcc(
            &p.elf,
            &["start.S", "payload.c", "console.c", "virtio_blk.c"],
        );
        gcc(
            &p.pvh,
            &[
                "start.S",
                "start_pvh.S",
                "payload.c",
                "console.c",
                "virtio_blk.c",
            ],
        );
        make_bzimage(&p.elf, &p.bzimage);
        p
    })
}

/// True if KVM can be used (the e2e harness's check: fails loudly unless
/// `RQEMU_ALLOW_NO_KVM=1`).
pub use rqemu_e2e::vmm::kvm_or_skip;

/// Outcome of one VMM run.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The line starting with `prefix ` (panics with the whole output if missing).
    pub fn line(&self, prefix: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{prefix} ")) || *l == prefix)
            .unwrap_or_else(|| panic!("no {prefix:?} line in guest output:\n{self}"))
    }

    /// Value of `key=` in the line starting with `prefix`.
    pub fn field(&self, prefix: &str, key: &str) -> String {
        let line = self.line(prefix);
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
            .to_string()
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit={:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `rqemu-vmm` with `args`, stdin closed, killing it after `timeout`.
pub fn run_vmm(args: &[&str], timeout: Duration) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rqemu-vmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning rqemu-vmm");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let run = Run {
        code: status.and_then(|s| s.code()),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    };
    assert!(
        status.is_some(),
        "rqemu-vmm did not exit within {timeout:?}:\n{run}"
    );
    run
}

/// A workspace binary (`rqemu-blk`, `rqemu-fs`, ...), located by the e2e harness
/// (`$RQEMU_BIN_DIR`, else beside this test's target directory; the test command builds every
/// workspace binary first). Panics with what to run when it is missing: a test never skips
/// silently.
pub fn project_binary(name: &str) -> PathBuf {
    rqemu_e2e::project_binary(name).unwrap_or_else(|e| panic!("{e}"))
}

/// The `rqemu-blk` daemon binary (see [`project_binary`]).
pub fn rqemu_blk_binary() -> PathBuf {
    project_binary("rqemu-blk")
}

/// The accelerator a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn arg(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// False (after `kvm_or_skip` printed why) if this accelerator cannot run here.
    pub fn usable(self, test: &str) -> bool {
        self == Accel::Tcg || kvm_or_skip(test)
    }
}

/// Generates `<name>_kvm` and `<name>_tcg` tests calling `<name>(Accel)`.
#[allow(unused_macros)]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod on {
            $(
                pub mod $name {
                    #[test]
                    fn kvm() {
                        super::super::$name(super::super::Accel::Kvm);
                    }
                    #[test]
                    fn tcg() {
                        super::super::$name(super::super::Accel::Tcg);
                    }
                }
            )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_both;
