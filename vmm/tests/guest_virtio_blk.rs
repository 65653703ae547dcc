//! A KVM guest payload with a minimal virtio-blk driver (payloads/virtio_blk.c) reads and
//! writes sectors through a real vhost-user-blk daemon: QueueNotify → ioeventfd → daemon,
//! daemon → call eventfd → irqfd → IOAPIC → guest interrupt. Checked from the host.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(child: &mut Child, sock: &Path) {
    let start = Instant::now();
    while !sock.exists() {
        assert!(child.try_wait().unwrap().is_none(), "daemon exited");
        assert!(start.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qsd(image: &Path, sock: &Path) -> Daemon {
    let mut child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning qemu-storage-daemon");
    wait_socket(&mut child, sock);
    Daemon(child)
}

fn rqemu_blk(bin: &Path, image: &Path, sock: &Path) -> Daemon {
    let mut child = Command::new(bin)
        .arg("--socket")
        .arg(sock)
        .arg("--image")
        .arg(image)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning rqemu-blk");
    wait_socket(&mut child, sock);
    Daemon(child)
}

fn guest_disk_io(test: &str, start_daemon: impl FnOnce(&Path, &Path) -> Daemon) {
    if !support::kvm_or_skip(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let mut disk = vec![0u8; 1 << 20];
    let sector3: Vec<u8> = (0..512u32).map(|i| (i * 13 + 5) as u8).collect();
    disk[3 * 512..4 * 512].copy_from_slice(&sector3);
    std::fs::write(&image, &disk).unwrap();
    let hash = sector3
        .iter()
        .fold(0u32, |h, &b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let sock = dir.path().join("blk.sock");
    let _daemon = start_daemon(&image, &sock);
    let dev = format!("blk:{}", sock.display());
    let k = support::payloads().elf.to_str().unwrap().to_string();
    let r = support::run_vmm(
        &[
            "--kernel",
            &k,
            "--accel",
            "kvm",
            "--memory",
            "64M",
            "--cmdline",
            "mode=virtio",
            "--device-socket",
            &dev,
        ],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(r.field("vblk", "window"), "0");
    assert_eq!(r.field("vblk", "write"), "0");
    assert_eq!(r.field("vblk", "read"), "0");
    assert_eq!(r.field("vblk", "hash"), format!("{hash:#x}"), "{r}");
    let irqs: u32 = r.field("vblk", "irqs").parse().unwrap();
    assert!(irqs >= 2, "completions arrive as interrupts: {r}");
    let after = std::fs::read(&image).unwrap();
    let expect: Vec<u8> = b"rqemu-virtio-payload"
        .iter()
        .copied()
        .cycle()
        .take(512)
        .collect();
    assert_eq!(
        &after[2 * 512..3 * 512],
        &expect[..],
        "sector 2 written by the guest"
    );
}

#[test]
fn guest_driver_reads_and_writes_through_qemu_storage_daemon() {
    guest_disk_io(
        "guest_driver_reads_and_writes_through_qemu_storage_daemon",
        qsd,
    );
}

#[test]
fn guest_driver_reads_and_writes_through_rqemu_blk() {
    let bin = support::rqemu_blk_binary();
    guest_disk_io(
        "guest_driver_reads_and_writes_through_rqemu_blk",
        |img, sock| rqemu_blk(&bin, img, sock),
    );
}

/// A daemon that dies no longer stops the VM: the device waits, the VMM reconnects to the
/// daemon started again on the same path, and the VM runs on.
#[test]
fn dying_daemon_is_reconnected_and_the_vm_runs_on() {
    if !support::kvm_or_skip("dying_daemon_is_reconnected_and_the_vm_runs_on") {
        return;
    }
    use std::io::Read;
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("blk.sock");
    let mut daemon = qsd(&image, &sock);
    let dev = format!("blk:{}", sock.display());
    let k = support::payloads().elf.to_str().unwrap().to_string();
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_rqemu-vmm"))
        .args(["--kernel", &k, "--accel", "kvm", "--memory", "64M"])
        .args(["--cmdline", "mode=halt", "--device-socket", &dev])
        .env("RQEMU_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let mut err = vmm.stderr.take().unwrap();
    let sink = log.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = err.read(&mut buf) {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut out = vmm.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("action halt") {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "guest output ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    daemon.0.kill().unwrap();
    let _ = daemon.0.wait();
    let wait_log = |needle: &str, vmm: &mut Child| {
        let start = Instant::now();
        while !log.lock().unwrap().contains(needle) {
            if let Some(st) = vmm.try_wait().unwrap() {
                panic!("VMM exited ({st}):\n{}", log.lock().unwrap());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no {needle:?} in:\n{}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_log("blk.sock lost", &mut vmm);
    // qemu-storage-daemon does not replace a stale socket.
    let _ = std::fs::remove_file(&sock);
    let _daemon = qsd(&image, &sock);
    wait_log("blk.sock reconnected", &mut vmm);
    assert!(vmm.try_wait().unwrap().is_none(), "the VM runs on");
    // SAFETY: plain kill(2) to our child.
    unsafe { libc::kill(vmm.id() as i32, libc::SIGTERM) };
    let st = vmm.wait().unwrap();
    reader.join().unwrap();
    assert_eq!(
        st.code(),
        Some(4),
        "stopped by SIGTERM:\n{}",
        log.lock().unwrap()
    );
}
