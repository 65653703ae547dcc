//! What vsock guests need, shared by the QEMU and rqemu-vmm tests of `rqemu-vsock`: the guest
//! kernel's vsock modules and Debian's `socat` (dynamically linked, with its libraries) as
//! files for the test initramfs, the script lines loading the modules, and the host side of
//! Firecracker's hybrid vsock (`CONNECT <port>\n` on the daemon's `--uds-path`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::paths::GuestAssets;

/// The guest kernel's vsock modules, in load order.
pub const MODULES: [&str; 3] = [
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// Where the files of [`guest_files`] go in the guest (`socat` is `/opt/vsock/socat`).
pub const GUEST_DIR: &str = "/opt/vsock";

/// The vsock modules of the guest kernel, as `(name, bytes)` (`.ko` or `.ko.xz`, unpacked).
pub fn modules(assets: &GuestAssets) -> Vec<(String, Vec<u8>)> {
    let tree = assets.dir.join("kernel-tree/lib/modules");
    let kver = std::fs::read_dir(&tree)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/guest-assets.sh)", tree.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .next()
        .unwrap_or_else(|| panic!("no kernel version under {}", tree.display()));
    let dir = kver.join("kernel/net/vmw_vsock");
    MODULES
        .iter()
        .map(|m| {
            let ko = dir.join(format!("{m}.ko"));
            let bytes = if ko.exists() {
                std::fs::read(&ko).unwrap()
            } else {
                let xz = dir.join(format!("{m}.ko.xz"));
                let out = Command::new("xz")
                    .arg("-dc")
                    .arg(&xz)
                    .output()
                    .unwrap_or_else(|e| panic!("xz -dc {}: {e}", xz.display()));
                assert!(
                    out.status.success(),
                    "module {m} is in neither {} nor {}",
                    ko.display(),
                    xz.display()
                );
                out.stdout
            };
            (m.to_string(), bytes)
        })
        .collect()
}

/// `/usr/bin/socat` and its shared libraries, as `(guest path, bytes)`.
pub fn socat_files() -> Vec<(String, Vec<u8>)> {
    crate::paths::host_program_files(Path::new("/usr/bin/socat"), GUEST_DIR, "socat")
}

/// Every file a vsock guest needs, as `(guest path, mode, bytes)`: the modules and `socat`
/// with its libraries.
pub fn guest_files(assets: &GuestAssets) -> Vec<(String, u32, Vec<u8>)> {
    let dir = GUEST_DIR.trim_start_matches('/');
    let mut files: Vec<(String, u32, Vec<u8>)> = modules(assets)
        .into_iter()
        .map(|(m, bytes)| (format!("{dir}/{m}.ko"), 0o644, bytes))
        .collect();
    files.extend(socat_files().into_iter().map(|(p, b)| (p, 0o755, b)));
    files
}

/// Guest script lines loading [`MODULES`] (exit 10 when one fails).
pub fn insmod_script() -> String {
    MODULES
        .iter()
        .map(|m| format!("insmod {GUEST_DIR}/{m}.ko || {{ echo 'insmod {m} failed'; exit 10; }}\n"))
        .collect()
}

/// `CONNECT port` on the daemon's socket until the guest accepts (its listener may not be up
/// yet: a refusal closes the socket without `OK`). Returns the stream and the host port.
pub fn host_connect(
    path: &Path,
    port: u32,
    deadline: Instant,
) -> Result<(UnixStream, u32), String> {
    loop {
        let mut s = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        // One byte at a time would do too; BufReader may not read past the line since the
        // guest sends nothing before the host does.
        if r.read_line(&mut line).map_err(|e| e.to_string())? > 0 {
            let host_port = line
                .trim_end()
                .strip_prefix("OK ")
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| format!("bad answer {line:?}"))?;
            return Ok((s, host_port));
        }
        if Instant::now() >= deadline {
            return Err(format!("guest port {port} never accepted"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
