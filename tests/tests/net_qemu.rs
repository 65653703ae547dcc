//! `rqemu-net` with QEMU TCG (`-M microvm`, modern virtio-mmio, memfd memory) as the
//! vhost-user frontend and the Linux virtio-net driver in the guest. The daemon and its tap
//! live in a private network namespace; the guest pings the host end of the tap and moves
//! several MiB each way over TCP (busybox nc), checksums compared on both sides. Runs with
//! offloads on (TSO/checksum/merged buffers), off, with two queue pairs, and across a
//! frontend reconnect.
//!
//! Needs root (network namespaces, taps), `scripts/install-deps.sh`,
//! `scripts/guest-assets.sh`, `cargo build --workspace --bins`.

use std::time::Duration;

use rqemu_e2e::net::{
    guest_script, logged_pair, logged_stats, pattern, sha256_hex, spawn_daemon, HostPeer,
    NetDaemonOptions, NetNs, GUEST_IP, HOST_IP,
};
use rqemu_e2e::qemu::{GuestRun, QemuError, QemuVm, VhostUserDevice};
use rqemu_e2e::{Daemon, GuestAssets};

const MIB: usize = 1 << 20;
/// TCG under load is slow: be generous.
const TIMEOUT: Duration = Duration::from_secs(900);
/// Largest frame without segmentation offload (MTU 1500 + Ethernet header).
const MAX_PLAIN_FRAME: u64 = 1514;

/// QEMU virtio-net properties that turn every offload and merged RX buffers off.
const NO_OFFLOADS: &[&str] = &[
    "csum",
    "guest_csum",
    "gso",
    "host_tso4",
    "host_tso6",
    "host_ecn",
    "host_ufo",
    "guest_tso4",
    "guest_tso6",
    "guest_ecn",
    "guest_ufo",
    "mrg_rxbuf",
];

struct Case {
    queues: u16,
    cpus: u32,
    offloads: bool,
    inherit_tap: bool,
}

fn fail(what: &str, run: Option<&GuestRun>, daemon: &Daemon) -> ! {
    panic!(
        "{what}\n--- guest ---\n{}\n--- rqemu-net log ---\n{}",
        run.map(GuestRun::transcript).unwrap_or_default(),
        daemon.log()
    )
}

fn vm(
    assets: &GuestAssets,
    dir: &std::path::Path,
    daemon: &Daemon,
    case: &Case,
    up_mib: u32,
) -> QemuVm {
    let mut vm = QemuVm::new(assets, dir)
        .cpus(case.cpus)
        .timeout(TIMEOUT)
        .device(VhostUserDevice::Net {
            socket: daemon.socket().to_path_buf(),
            queues: case.queues,
            mac: Some(NetDaemonOptions::default().mac),
        })
        .script(&guest_script(
            up_mib,
            (case.queues > 1 && case.cpus > 1).then_some(0b10),
        ));
    if !case.offloads {
        for p in NO_OFFLOADS {
            vm = vm.arg("-global").arg(format!("virtio-net-device.{p}=off"));
        }
    }
    vm
}

/// Checks one guest session against what the host peer saw.
/// Joins the host peer: what each guest uploaded (fails the test, with the guest's and the
/// daemon's logs, if the peer failed).
fn join_peer(peer: HostPeer, run: Option<&GuestRun>, daemon: &Daemon) -> Vec<Vec<u8>> {
    let uploads = match peer.uploads.join() {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => fail(&format!("upload sink: {e}"), run, daemon),
        Err(_) => fail("upload sink panicked", run, daemon),
    };
    if !matches!(peer.downloads.join(), Ok(Ok(()))) {
        fail("download source failed", run, daemon);
    }
    uploads
}

fn check_session(run: &GuestRun, daemon: &Daemon, upload: &[u8], down: &[u8], up_len: usize) {
    if let Err(e) = run.expect_success() {
        fail(&format!("guest failed: {e}"), Some(run), daemon);
    }
    let up_sha = sha256_hex(upload).unwrap_or_else(|e| panic!("{e}"));
    if upload.len() != up_len || run.value("up-sha256") != Some(up_sha.as_str()) {
        fail(
            &format!(
                "upload mismatch: host got {} bytes sha256 {up_sha}, guest sent {up_len} bytes sha256 {:?}",
                upload.len(),
                run.value("up-sha256")
            ),
            Some(run),
            daemon,
        );
    }
    let down_sha = sha256_hex(down).unwrap_or_else(|e| panic!("{e}"));
    let down_len = down.len().to_string();
    if run.value("down-sha256") != Some(down_sha.as_str())
        || run.value("down-len") != Some(down_len.as_str())
    {
        fail(
            &format!(
                "download mismatch: host sent {down_len} bytes sha256 {down_sha}, guest got {:?} bytes sha256 {:?}",
                run.value("down-len"),
                run.value("down-sha256")
            ),
            Some(run),
            daemon,
        );
    }
}

/// What every test starts from: the guest assets, a scratch directory, a private network
/// namespace, and `rqemu-net` in it with `opts`.
struct Setup {
    assets: GuestAssets,
    dir: tempfile::TempDir,
    // Bound before the daemon, so dropped after it: the namespace outlives the daemon in it.
    ns: NetNs,
    daemon: Daemon,
}

fn setup(opts: &NetDaemonOptions) -> Setup {
    let assets = GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::create()
        .unwrap_or_else(|e| panic!("creating a network namespace (needs root): {e}"));
    let daemon = spawn_daemon(&ns, dir.path(), &dir.path().join("net.sock"), opts)
        .unwrap_or_else(|e| panic!("{e}"));
    Setup {
        assets,
        dir,
        ns,
        daemon,
    }
}

fn transfer(case: Case) {
    let Setup {
        assets,
        dir,
        ns,
        daemon,
    } = setup(&NetDaemonOptions {
        queues: case.queues,
        inherit_tap: case.inherit_tap,
        ..NetDaemonOptions::default()
    });
    let up_mib = 8;
    let down = pattern(8 * MIB, 0x5eed_0001 + u64::from(case.queues));
    let peer = HostPeer::start(&ns, 1, down.clone(), TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let run = match vm(&assets, dir.path(), &daemon, &case, up_mib).run() {
        Ok(r) => r,
        Err(e) => fail(&format!("QEMU: {e}"), None, &daemon),
    };
    let uploads = join_peer(peer, Some(&run), &daemon);
    check_session(
        &run,
        &daemon,
        uploads.first().map(Vec::as_slice).unwrap_or_default(),
        &down,
        up_mib as usize * MIB,
    );

    eprintln!(
        "net e2e: queues {} cpus {} offloads {}: boot + ping + {up_mib} MiB each way in {:?}",
        case.queues, case.cpus, case.offloads, run.elapsed
    );
    if case.queues > 1 && case.cpus > 1 {
        let queues = run.value("queues").unwrap_or_default();
        if !(queues.contains("rx-1") && queues.contains("tx-1")) {
            fail(
                &format!("guest has queues {queues:?}, want two pairs"),
                Some(&run),
                &daemon,
            );
        }
    }
    let log = daemon.log();
    let status = daemon
        .terminate(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        status.success(),
        "rqemu-net exited with {status} after SIGTERM; log:\n{log}"
    );
    let log_after = std::fs::read_to_string(dir.path().join("rqemu-net.log")).unwrap_or(log);
    let stats =
        logged_stats(&log_after).unwrap_or_else(|| panic!("no stats in the log:\n{log_after}"));
    assert_eq!(
        stats.tx_dropped, 0,
        "the Linux driver sent invalid frames?\n{log_after}"
    );
    assert!(stats.tx_frames > 0 && stats.rx_frames > 0, "{stats:?}");
    let avg_tx = stats.tx_bytes / stats.tx_frames;
    let avg_rx = stats.rx_bytes / stats.rx_frames;
    if case.queues > 1 && case.cpus > 1 {
        // The transfers ran on CPU 1, so (XPS, tap flow steering) on queue pair 1.
        match logged_pair(&log_after, 1) {
            Some((rx, tx)) if rx > 0 && tx > 0 => {}
            other => panic!("queue pair 1 carried no traffic ({other:?}):\n{log_after}"),
        }
    } else if case.queues > 1 {
        // One vCPU: the driver enables one pair only; the daemon must steer the tap's
        // traffic away from the unused pair (detached tap queue), or the transfer stalls.
        assert_eq!(logged_pair(&log_after, 1), Some((0, 0)), "{log_after}");
    }
    if case.offloads {
        assert!(
            log_after.contains("mrg_rxbuf=true, tap offloads 0x17"),
            "offloads were not negotiated/applied:\n{log_after}"
        );
        // Segmentation offload in both directions: GSO frames (larger than the MTU, split by
        // the tap or the guest) crossed. (Not the average frame size: the pure ACKs of the
        // other direction's transfer weigh on it as much as the guest's TSO sizing, which
        // depends on its pacing rate, i.e. on timing.)
        assert!(stats.tx_gso_frames > 0, "no TSO from the guest: {stats:?}");
        assert!(stats.rx_gso_frames > 0, "no TSO to the guest: {stats:?}");
    } else {
        assert!(
            log_after.contains("mrg_rxbuf=false, tap offloads 0x0"),
            "offloads were not turned off:\n{log_after}"
        );
        assert!(
            avg_tx <= MAX_PLAIN_FRAME && avg_rx <= MAX_PLAIN_FRAME,
            "{stats:?}"
        );
        assert_eq!(
            (stats.tx_gso_frames, stats.rx_gso_frames),
            (0, 0),
            "{stats:?}"
        );
    }
    drop(ns);
}

#[test]
fn net_tcp_both_ways_with_offloads() {
    transfer(Case {
        queues: 1,
        cpus: 1,
        offloads: true,
        inherit_tap: false,
    });
}

#[test]
fn net_tcp_both_ways_without_offloads() {
    transfer(Case {
        queues: 1,
        cpus: 1,
        offloads: false,
        inherit_tap: false,
    });
}

/// Two queue pairs offered, one vCPU: the Linux driver uses a single pair.
#[test]
fn net_two_queue_pairs_offered_one_used() {
    transfer(Case {
        queues: 2,
        cpus: 1,
        offloads: true,
        inherit_tap: false,
    });
}

/// Two queue pairs on a multi-queue tap opened by the "privileged parent" (the test) and
/// handed over with `--tap-fd a,b`.
#[test]
fn net_tcp_both_ways_two_queue_pairs_inherited_tap() {
    transfer(Case {
        queues: 2,
        cpus: 2,
        offloads: true,
        inherit_tap: true,
    });
}

#[test]
fn net_tcp_both_ways_two_queue_pairs() {
    transfer(Case {
        queues: 2,
        cpus: 2,
        offloads: true,
        inherit_tap: false,
    });
}

/// Two guests in sequence against the same daemon (guest reboot / VMM restart).
#[test]
fn net_survives_frontend_reconnect() {
    let Setup {
        assets,
        dir,
        ns,
        mut daemon,
    } = setup(&NetDaemonOptions::default());
    let down = pattern(2 * MIB, 0xabcd);
    let peer = HostPeer::start(&ns, 2, down.clone(), TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let case = Case {
        queues: 1,
        cpus: 1,
        offloads: true,
        inherit_tap: false,
    };
    let mut runs = Vec::new();
    for phase in 0..2 {
        let run = match vm(&assets, dir.path(), &daemon, &case, 2).run() {
            Ok(r) => r,
            Err(e) => fail(&format!("QEMU (guest {phase}): {e}"), None, &daemon),
        };
        if let Err(e) = run.expect_success() {
            fail(&format!("guest {phase} failed: {e}"), Some(&run), &daemon);
        }
        if !daemon.is_running() {
            fail(
                &format!("rqemu-net exited after guest {phase}"),
                Some(&run),
                &daemon,
            );
        }
        runs.push(run);
    }
    let uploads = join_peer(peer, runs.last(), &daemon);
    assert_eq!(uploads.len(), 2);
    for (run, up) in runs.iter().zip(&uploads) {
        check_session(run, &daemon, up, &down, 2 * MIB);
    }
    let status = daemon
        .terminate(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        status.success(),
        "rqemu-net exited with {status} after SIGTERM"
    );
    drop(ns);
}

/// The first frontend dies abruptly (QEMU killed while the guest pings), the second guest
/// must get a working link from the same daemon.
#[test]
fn net_survives_frontend_killed_mid_traffic() {
    let Setup {
        assets,
        dir,
        ns,
        mut daemon,
    } = setup(&NetDaemonOptions::default());
    let device = VhostUserDevice::Net {
        socket: daemon.socket().to_path_buf(),
        queues: 1,
        mac: Some(NetDaemonOptions::default().mac),
    };
    let flood = format!(
        "ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 && ping -c 2 -W 10 {HOST_IP} \
         && (ping -i 0.05 {HOST_IP} > /dev/null &) && echo RQEMU-VAL flooding=1; sleep 100000"
    );
    // The harness kills QEMU (SIGKILL) when the time limit is reached.
    let killed = QemuVm::new(&assets, dir.path())
        .timeout(Duration::from_secs(90))
        .device(device.clone())
        .script(&flood)
        .run();
    match killed {
        Err(QemuError::Timeout { console, .. }) if console.contains("RQEMU-VAL flooding=1") => {}
        Err(e) => fail(&format!("first guest: {e}"), None, &daemon),
        Ok(run) => fail("first guest was not killed", Some(&run), &daemon),
    }
    if !daemon.is_running() {
        fail(
            "rqemu-net exited after its frontend was killed",
            None,
            &daemon,
        );
    }
    let down = pattern(MIB, 0x77);
    let peer = HostPeer::start(&ns, 1, down.clone(), TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let run = match QemuVm::new(&assets, dir.path())
        .timeout(TIMEOUT)
        .device(device)
        .script(&guest_script(1, None))
        .run()
    {
        Ok(r) => r,
        Err(e) => fail(&format!("second guest: {e}"), None, &daemon),
    };
    let uploads = join_peer(peer, Some(&run), &daemon);
    check_session(
        &run,
        &daemon,
        uploads.first().map(Vec::as_slice).unwrap_or_default(),
        &down,
        MIB,
    );
    let status = daemon
        .terminate(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        status.success(),
        "rqemu-net exited with {status} after SIGTERM"
    );
    drop(ns);
}
