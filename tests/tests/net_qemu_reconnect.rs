//! rqemu-net SIGKILLed under QEMU as the vhost-user frontend (`-chardev socket,reconnect-ms=`:
//! QEMU connects again to whatever listens on the path and sets the device up again) while a
//! Linux guest moves 4 MiB each way over TCP, on a tap the test holds and hands each daemon
//! (`--tap-fd`): the link survives, every byte is checked (SHA-256 on both ends).
//!
//! Needs root (network namespaces, taps), `scripts/install-deps.sh`,
//! `scripts/guest-assets.sh`, `cargo build --workspace --bins`.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use rqemu_e2e::net::{self, NetDaemonOptions, NetNs, TAP};
use rqemu_e2e::net_kills::{serve, start_net};
use rqemu_e2e::qemu::{QemuVm, VhostUserDevice};
use rqemu_e2e::GuestAssets;

const TIMEOUT: Duration = Duration::from_secs(900);
/// Bytes per transfer direction.
const TRANSFER: usize = 4 << 20;
/// Kills per direction, evenly spread over the transfer.
const KILLS_PER_TRANSFER: usize = 2;

#[test]
fn qemu_tcp_transfers_survive_rqemu_net_sigkills_on_a_held_tap() {
    let assets = GuestAssets::locate().expect("guest assets (run scripts/guest-assets.sh)");
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::create().expect("network namespace");
    let sock = dir.path().join("net.sock");
    let taps = ns
        .spawn(|| net::open_tap(TAP, 1))
        .expect("entering the namespace")
        .join()
        .expect("tap thread")
        .expect("opening the tap");
    let mut daemon = start_net(&ns, dir.path(), &sock, Some(&taps));
    let down = net::pattern(TRANSFER, 0x9e7);
    let down_sha = net::sha256_hex(&down).unwrap();
    let (tx, events) = mpsc::channel();
    let peer = ns
        .spawn(move || serve(tx, down, TRANSFER, KILLS_PER_TRANSFER))
        .expect("host peer");
    assert_eq!(
        events.recv_timeout(Duration::from_secs(20)).ok().as_deref(),
        Some("listening")
    );
    let vm = QemuVm::new(&assets, dir.path())
        .timeout(TIMEOUT)
        .reconnect_ms(200)
        .device(VhostUserDevice::Net {
            socket: sock.clone(),
            queues: 1,
            mac: Some(NetDaemonOptions::default().mac),
        })
        .script(&net::guest_script((TRANSFER >> 20) as u32, None));
    let start = Instant::now();
    let guest = std::thread::spawn(move || vm.run());
    let mut kills = 0;
    let mut logs = String::new();
    while kills < 2 * KILLS_PER_TRANSFER {
        match events.recv_timeout(Duration::from_millis(100)) {
            Ok(at) => {
                logs.push_str(&daemon.log());
                daemon.kill().expect("killing rqemu-net");
                daemon = start_net(&ns, dir.path(), &sock, Some(&taps));
                eprintln!("rqemu-net SIGKILLed and restarted: {at}");
                kills += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) if guest.is_finished() => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("host peer: {e}"),
        }
    }
    let run = guest.join().expect("QEMU thread");
    logs.push_str(&daemon.log());
    let run = run.unwrap_or_else(|e| panic!("guest: {e}\n--- rqemu-net logs ---\n{logs}"));
    let report = || format!("{}\n--- rqemu-net logs ---\n{logs}", run.transcript());
    assert_eq!(
        kills,
        2 * KILLS_PER_TRANSFER,
        "the guest ended before every kill\n{}",
        report()
    );
    run.expect_success()
        .unwrap_or_else(|e| panic!("{e}\n{}", report()));
    drop(daemon);
    let up = peer.join().expect("peer thread").expect("host peer");
    assert_eq!(up.len(), TRANSFER, "{}", report());
    assert_eq!(
        run.value("up-sha256"),
        Some(net::sha256_hex(&up).unwrap().as_str()),
        "{}",
        report()
    );
    assert_eq!(
        run.value("down-sha256"),
        Some(down_sha.as_str()),
        "{}",
        report()
    );
    assert_eq!(
        run.value("down-len"),
        Some(TRANSFER.to_string().as_str()),
        "{}",
        report()
    );
    eprintln!(
        "QEMU: {} MiB up and down over TCP across {kills} rqemu-net SIGKILLs on a held tap, \
         every byte checked, {:.1} s",
        TRANSFER >> 20,
        start.elapsed().as_secs_f64()
    );
}
