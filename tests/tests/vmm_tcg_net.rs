//! `rqemu-vmm --accel tcg` (our own VMM and software CPU, not QEMU) with a virtio-net device
//! served by `rqemu-net`: the guest's Linux virtio-net driver brings eth0 up and pings the host
//! peer on the daemon's tap, inside a network namespace the test creates (nothing is routed
//! outside it). The socket is given without a type: the VMM discovers virtio-net from the
//! daemon's rqemu identity block.

use std::process::Stdio;
use std::time::{Duration, Instant};

use rqemu_e2e::net::{self, NetDaemonOptions, NetNs, GUEST_IP, HOST_IP};
use rqemu_e2e::{GuestAssets, RqemuVm};

const TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn tcg_linux_pings_through_rqemu_net() {
    let assets = GuestAssets::locate().expect("guest assets (run scripts/guest-assets.sh)");
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::create().expect("network namespace");
    let sock = dir.path().join("net.sock");
    let daemon =
        net::spawn_daemon(&ns, dir.path(), &sock, &NetDaemonOptions::default()).expect("rqemu-net");
    let script = format!(
        "ip link set eth0 up || exit 20\n\
         ip addr add {GUEST_IP}/24 dev eth0 || exit 21\n\
         ping -c 3 -W 10 {HOST_IP} || exit 22\n\
         echo ping-ok\n"
    );
    let console = dir.path().join("console.log");
    let vmm_log = dir.path().join("vmm.log");
    let start = Instant::now();
    let mut child = RqemuVm::new(&assets)
        .device_socket(&sock.display().to_string())
        .serial(&format!("file:{}", console.display()))
        .run_cmdline(&script)
        .command()
        .unwrap_or_else(|e| panic!("{e}"))
        .stdin(Stdio::null())
        .env("RQEMU_LOG", "info")
        .stderr(std::fs::File::create(&vmm_log).expect("creating the VMM log"))
        .spawn()
        .expect("spawning rqemu-vmm");
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "rqemu-vmm did not finish within {TIMEOUT:?}; console:\n{}",
                std::fs::read_to_string(&console).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let log = daemon.log();
    drop(daemon);
    let vlog = std::fs::read_to_string(&vmm_log).unwrap_or_default();
    let report = format!(
        "status {status}\n--- console ---\n{text}\n--- rqemu-vmm ---\n{vlog}\n--- rqemu-net ---\n{log}"
    );
    assert!(vlog.contains("discovered a Net device"), "{report}");
    assert!(text.contains("ping-ok"), "{report}");
    assert!(text.contains("RQEMU-EXIT=0"), "{report}");
    assert!(status.success(), "{report}");
    eprintln!(
        "rqemu-vmm TCG + rqemu-net: ping done, power-off after {:.1} s",
        start.elapsed().as_secs_f64()
    );
}
