//! containerd driving `rqemu-run` through its runc shim (`io.containerd.runc.v2`, rqemu-run as
//! the runc binary: `ctr run --runc-binary`, what `BinaryName` sets in config.toml): the output
//! reaches ctr, `uname -r` is the guest kernel's, a write lands in the host rootfs, ctr's exit
//! code is the container's; then nothing is left (no process mentions the container, the
//! runtime root is empty).
//!
//! The test starts its own containerd (root, state, sockets and opt dir under a temporary
//! directory, the CRI plugin disabled) and stops it at the end. One boot on the software CPU.
//! Needs containerd + ctr + containerd-shim-runc-v2 (scripts/install-deps.sh),
//! scripts/guest-assets.sh, `cargo build -p rqemu-run -p rqemu-vmm -p rqemu-fs -p rqemu-vsock`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rqemu_e2e::oci::{
    agent_assets, assert_nothing_left, guest_kernel_release, host_kernel_release, make_rootfs,
    output_within, require_tool, runtime_wrapper,
};

const LIMIT: Duration = Duration::from_secs(600);

/// A private containerd, stopped on drop.
struct Containerd {
    child: Child,
    address: String,
    log: std::path::PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Self {
        let toml = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/c.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
            d = dir.display()
        );
        let config = dir.join("config.toml");
        std::fs::write(&config, toml).unwrap();
        let log = dir.join("containerd.log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting containerd");
        let sock = dir.join("c.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not create {}: {}",
                sock.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            address: sock.display().to_string(),
            log,
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the containerd this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

#[test]
fn ctr_run_with_rqemu_run_as_the_runc_binary() {
    let how = "run scripts/install-deps.sh (containerd)";
    require_tool("containerd", how);
    require_tool("ctr", how);
    require_tool("containerd-shim-runc-v2", how);
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test drives containerd as root");
    let assets = agent_assets();
    let dir = tempfile::tempdir().unwrap();
    let rroot = dir.path().join("rqemu-run");
    // The shim passes `--root` (ctr's --runc-root) itself; the wrapper adds the VM options.
    let guest = format!("--guest-dir {}", assets.dir.display());
    let runtime = runtime_wrapper(dir.path(), &rroot, &["--accel tcg", &guest]);
    let rootfs = dir.path().join("rootfs");
    make_rootfs(&rootfs);
    let ctd = Containerd::start(dir.path());

    let t = Instant::now();
    let id = format!("rqemu-ctr-{}", std::process::id());
    let out = output_within(
        Command::new("ctr")
            .args([
                "--address",
                &ctd.address,
                "-n",
                "rqemu-test",
                "run",
                "--rm",
                "--rootfs",
            ])
            .arg("--runc-binary")
            .arg(&runtime)
            .arg("--runc-root")
            .arg(&rroot)
            .arg(&rootfs)
            .arg(&id)
            .args([
                "/bin/sh",
                "-c",
                "echo out; echo kernel=$(uname -r); echo from-guest > /written; exit 5",
            ]),
        LIMIT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = || {
        format!(
            "status {:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}\n--- containerd ---\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&ctd.log).unwrap_or_default()
        )
    };
    assert_eq!(out.status.code(), Some(5), "{}", report());
    assert!(stdout.contains("out\n"), "{}", report());
    let guest = guest_kernel_release(&assets);
    assert_ne!(guest, host_kernel_release());
    assert!(
        stdout.contains(&format!("kernel={guest}\n")),
        "{}",
        report()
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("written"))
            .ok()
            .as_deref(),
        Some("from-guest\n"),
        "{}",
        report()
    );
    eprintln!(
        "ctr run (boot + run + power-off): {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // The shim keeps a directory per namespace under --runc-root; no container in it.
    let ns_root = rroot.join("rqemu-test");
    let root = rroot.display().to_string();
    assert_nothing_left(&ns_root, &[&id, &root], Duration::from_secs(30));
    drop(ctd);
}
