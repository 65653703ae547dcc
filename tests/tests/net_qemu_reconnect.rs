//! rqemu-net SIGKILLed under QEMU as the vhost-user frontend (`-chardev socket,reconnect-ms=`:
//! QEMU connects again to whatever listens on the path and sets the device up again) while a
//! Linux guest moves 4 MiB each way over TCP, on a tap the test holds and hands each daemon
//! (`--tap-fd`): the link survives, every byte is checked (SHA-256 on both ends).
//!
//! Needs root (network namespaces, taps), `scripts/install-deps.sh`,
//! `scripts/guest-assets.sh`, `cargo build --workspace --bins`.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use rqemu_e2e::net::{self, NetDaemonOptions};
use rqemu_e2e::net_kills::HeldTapTransfers;
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
    let mut t = HeldTapTransfers::start(dir.path(), TRANSFER, KILLS_PER_TRANSFER, 0x9e7);
    let vm = QemuVm::new(&assets, dir.path())
        .timeout(TIMEOUT)
        .reconnect_ms(200)
        .device(VhostUserDevice::Net {
            socket: t.sock.clone(),
            queues: 1,
            mac: Some(NetDaemonOptions::default().mac),
        })
        .script(&net::guest_script((TRANSFER >> 20) as u32, None));
    let start = Instant::now();
    let guest = std::thread::spawn(move || vm.run());
    let mut kills = 0;
    let mut logs = String::new();
    while kills < 2 * KILLS_PER_TRANSFER {
        match t.events.recv_timeout(Duration::from_millis(100)) {
            Ok(at) => {
                logs.push_str(&t.kill_and_restart());
                eprintln!("rqemu-net SIGKILLed and restarted: {at}");
                kills += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) if guest.is_finished() => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("host peer: {e}"),
        }
    }
    let run = guest.join().expect("QEMU thread");
    logs.push_str(&t.log());
    let run = run.unwrap_or_else(|e| panic!("guest: {e}\n--- rqemu-net logs ---\n{logs}"));
    let report = format!("{}\n--- rqemu-net logs ---\n{logs}", run.transcript());
    assert_eq!(
        kills,
        2 * KILLS_PER_TRANSFER,
        "the guest ended before every kill\n{report}"
    );
    run.expect_success()
        .unwrap_or_else(|e| panic!("{e}\n{report}"));
    t.check(&|k| run.value(k).map(str::to_string), &report);
    eprintln!(
        "QEMU: {} MiB up and down over TCP across {kills} rqemu-net SIGKILLs on a held tap, \
         every byte checked, {:.1} s",
        TRANSFER >> 20,
        start.elapsed().as_secs_f64()
    );
}
