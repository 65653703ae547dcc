//! rqemu-net SIGKILLed under a running Linux guest (`rqemu-vmm --accel tcg`) and started again
//! on the same socket path: the VMM reconnects each new daemon and the guest's link comes back
//! (its pings to the host peer on the daemon's tap succeed again after every restart). The
//! tap is the daemon's (`--tap`): it goes with the daemon and the new daemon makes a new one,
//! which the test gives the host address again; the guest forgets the old peer's MAC.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rqemu_e2e::net::{self, NetDaemonOptions, NetNs, GUEST_IP, HOST_IP};
use rqemu_e2e::{Daemon, GuestAssets, RqemuVm};

const TIMEOUT: Duration = Duration::from_secs(900);
/// Daemon restarts.
const KILLS: usize = 3;
const TAP: &str = "tap0";

fn read(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

/// Starts rqemu-net on `sock` once the previous one's tap is gone (a daemon just killed keeps
/// it a moment: its sandboxed child is still exiting).
fn start_net(ns: &NetNs, dir: &Path, sock: &Path) -> Daemon {
    let start = Instant::now();
    loop {
        while ns.ip(&["link", "show", TAP]).is_ok() {
            assert!(start.elapsed() < Duration::from_secs(60), "old tap stays");
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(sock);
        match net::spawn_daemon(ns, dir, sock, &NetDaemonOptions::default()) {
            Ok(d) => return d,
            Err(e) if start.elapsed() < Duration::from_secs(60) => {
                eprintln!("rqemu-net did not start, again: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn tcg_linux_link_survives_rqemu_net_sigkills() {
    let assets = GuestAssets::locate().expect("guest assets (run scripts/guest-assets.sh)");
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::create().expect("network namespace");
    let sock = dir.path().join("net.sock");
    let mut daemon = start_net(&ns, dir.path(), &sock);
    // Each phase: ping until the peer answers (forgetting its MAC between tries: a new tap
    // has a new one), report, then give the host time to kill and restart the daemon.
    let script = format!(
        "ip link set eth0 up || exit 20\n\
         ip addr add {GUEST_IP}/24 dev eth0 || exit 21\n\
         p=0\n\
         while [ $p -le {KILLS} ]; do\n\
           n=0\n\
           until ping -c 1 -W 2 {HOST_IP} >/dev/null 2>&1; do\n\
             n=$((n+1)); [ $n -gt 150 ] && {{ echo \"NET-FAIL phase $p\"; exit 22; }}\n\
             ip neigh flush dev eth0\n\
             sleep 1\n\
           done\n\
           echo \"NET-UP $p after $n failed pings\"\n\
           [ $p -lt {KILLS} ] && sleep 5\n\
           p=$((p+1))\n\
         done\n\
         echo NET-END\n"
    );
    let console = dir.path().join("console.log");
    let vmm_log = dir.path().join("vmm.log");
    let start = Instant::now();
    let mut vmm = RqemuVm::new(&assets)
        .device_socket(&format!("net:{}", sock.display()))
        .serial(&format!("file:{}", console.display()))
        .run_cmdline(&script)
        .command()
        .unwrap_or_else(|e| panic!("{e}"))
        .stdin(Stdio::null())
        .env("RQEMU_LOG", "info")
        .stderr(std::fs::File::create(&vmm_log).expect("creating the VMM log"))
        .spawn()
        .expect("spawning rqemu-vmm");
    let report = || {
        format!(
            "--- console ---\n{}\n--- rqemu-vmm ---\n{}",
            read(&console),
            read(&vmm_log)
        )
    };
    let mut wait = |what: &str, cond: &dyn Fn(&str) -> bool| loop {
        if cond(&read(&console)) {
            return;
        }
        if let Some(st) = vmm.try_wait().unwrap() {
            panic!("rqemu-vmm exited ({st}) before {what}\n{}", report());
        }
        assert!(start.elapsed() < TIMEOUT, "no {what}\n{}", report());
        std::thread::sleep(Duration::from_millis(50));
    };
    for k in 0..KILLS {
        wait(&format!("NET-UP {k}"), &|c| {
            c.contains(&format!("NET-UP {k} "))
        });
        daemon.kill().expect("killing rqemu-net");
        daemon = start_net(&ns, dir.path(), &sock);
    }
    wait("NET-END", &|c| c.contains("RQEMU-EXIT="));
    let status = vmm.wait().unwrap();
    drop(daemon);
    let text = read(&console);
    let vlog = read(&vmm_log);
    let report = report();
    assert!(text.contains("NET-END"), "{report}");
    assert!(text.contains("RQEMU-EXIT=0"), "{report}");
    assert!(status.success(), "{status}\n{report}");
    assert_eq!(
        vlog.matches("net.sock reconnected").count(),
        KILLS,
        "{report}"
    );
    for l in text.lines().filter(|l| l.contains("NET-UP")) {
        eprintln!("{}", l.trim());
    }
    eprintln!(
        "rqemu-vmm TCG: link back after each of {KILLS} rqemu-net SIGKILLs, power-off after {:.1} s",
        start.elapsed().as_secs_f64()
    );
}
