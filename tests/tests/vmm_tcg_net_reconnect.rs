//! rqemu-net SIGKILLed under a running Linux guest (`rqemu-vmm --accel tcg`) and started again
//! on the same socket path: the VMM reconnects each new daemon and the guest's link comes back.
//!
//! - The daemon's own tap (`--tap`): it goes with the daemon and the new daemon makes a new one,
//!   which the test gives the host address again; the guest forgets the old peer's MAC; its
//!   pings to the host peer succeed again after every restart.
//! - A tap the supervisor holds (`--tap-fd`, here the test; rqemu-run's monitor or systemd's fd
//!   store in a deployment): the link never goes away, and TCP transfers in both directions run
//!   across the kills; every byte is checked (SHA-256 on both ends).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rqemu_e2e::net::{self, NetNs, GUEST_IP, HOST_IP, TAP};
use rqemu_e2e::net_kills::{serve, start_net};
use rqemu_e2e::{GuestAssets, RqemuVm};

const TIMEOUT: Duration = Duration::from_secs(900);
/// Daemon restarts.
const KILLS: usize = 3;

fn read(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

/// rqemu-vmm (TCG) running `script` with the net device on `sock`, console and log in `dir`.
struct Guest {
    vmm: Child,
    console: PathBuf,
    log: PathBuf,
    start: Instant,
}

impl Guest {
    fn spawn(assets: &GuestAssets, dir: &Path, sock: &Path, script: &str) -> Self {
        let console = dir.join("console.log");
        let log = dir.join("vmm.log");
        let vmm = RqemuVm::new(assets)
            .device_socket(&format!("net:{}", sock.display()))
            .serial(&format!("file:{}", console.display()))
            .run_cmdline(script)
            .command()
            .unwrap_or_else(|e| panic!("{e}"))
            .stdin(Stdio::null())
            .env("RQEMU_LOG", "info")
            .stderr(std::fs::File::create(&log).expect("creating the VMM log"))
            .spawn()
            .expect("spawning rqemu-vmm");
        Guest {
            vmm,
            console,
            log,
            start: Instant::now(),
        }
    }

    fn report(&self) -> String {
        format!(
            "--- console ---\n{}\n--- rqemu-vmm ---\n{}",
            read(&self.console),
            read(&self.log)
        )
    }

    /// Panics when the VMM is gone or the time is up.
    fn check_running(&mut self, what: &str) {
        if let Some(st) = self.vmm.try_wait().unwrap() {
            panic!("rqemu-vmm exited ({st}) before {what}\n{}", self.report());
        }
        assert!(
            self.start.elapsed() < TIMEOUT,
            "no {what}\n{}",
            self.report()
        );
    }

    fn wait_console(&mut self, what: &str, cond: &dyn Fn(&str) -> bool) {
        while !cond(&read(&self.console)) {
            self.check_running(what);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the power-off; checks the exit and the reconnections; returns the console.
    fn finish(mut self, kills: usize) -> String {
        self.wait_console("the power-off", &|c| c.contains("RQEMU-EXIT="));
        let status = self.vmm.wait().unwrap();
        let report = self.report();
        assert!(read(&self.console).contains("RQEMU-EXIT=0"), "{report}");
        assert!(status.success(), "{status}\n{report}");
        assert_eq!(
            read(&self.log).matches("net.sock reconnected").count(),
            kills,
            "{report}"
        );
        read(&self.console)
    }
}

#[test]
fn tcg_linux_link_survives_rqemu_net_sigkills() {
    let assets = GuestAssets::locate().expect("guest assets (run scripts/guest-assets.sh)");
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::create().expect("network namespace");
    let sock = dir.path().join("net.sock");
    let mut daemon = start_net(&ns, dir.path(), &sock, None);
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
    let mut guest = Guest::spawn(&assets, dir.path(), &sock, &script);
    for k in 0..KILLS {
        guest.wait_console(&format!("NET-UP {k}"), &|c| {
            c.contains(&format!("NET-UP {k} "))
        });
        daemon.kill().expect("killing rqemu-net");
        daemon = start_net(&ns, dir.path(), &sock, None);
    }
    let start = guest.start;
    let text = guest.finish(KILLS);
    drop(daemon);
    assert!(text.contains("NET-END"), "{text}");
    for l in text.lines().filter(|l| l.contains("NET-UP")) {
        eprintln!("{}", l.trim());
    }
    eprintln!(
        "rqemu-vmm TCG: link back after each of {KILLS} rqemu-net SIGKILLs, power-off after {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

/// Bytes per transfer direction.
const TRANSFER: usize = 4 << 20;
/// Kills per direction, evenly spread over the transfer.
const KILLS_PER_TRANSFER: usize = 2;

fn val<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let tag = format!("RQEMU-VAL {key}=");
    text.lines()
        .find_map(|l| l.split(&tag).nth(1))
        .map(str::trim)
}

#[test]
fn tcg_tcp_transfers_survive_rqemu_net_sigkills_on_a_held_tap() {
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
    let down = net::pattern(TRANSFER, 0x5eed);
    let down_sha = net::sha256_hex(&down).unwrap();
    let (tx, events) = mpsc::channel();
    let peer = ns
        .spawn(move || serve(tx, down, TRANSFER, KILLS_PER_TRANSFER))
        .expect("host peer");
    assert_eq!(
        events.recv_timeout(Duration::from_secs(20)).ok().as_deref(),
        Some("listening")
    );
    let script = net::guest_script((TRANSFER >> 20) as u32, None);
    let mut guest = Guest::spawn(&assets, dir.path(), &sock, &script);
    let mut kills = 0;
    while kills < 2 * KILLS_PER_TRANSFER {
        match events.recv_timeout(Duration::from_millis(100)) {
            Ok(at) => {
                daemon.kill().expect("killing rqemu-net");
                daemon = start_net(&ns, dir.path(), &sock, Some(&taps));
                eprintln!("rqemu-net SIGKILLed and restarted: {at}");
                kills += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => guest.check_running("the transfers"),
            Err(e) => panic!("host peer: {e}\n{}", guest.report()),
        }
    }
    let start = guest.start;
    let text = guest.finish(kills);
    drop(daemon);
    let up = peer.join().expect("peer thread").expect("host peer");
    assert_eq!(up.len(), TRANSFER, "{text}");
    assert_eq!(
        val(&text, "up-sha256"),
        Some(net::sha256_hex(&up).unwrap().as_str()),
        "{text}"
    );
    assert_eq!(val(&text, "down-sha256"), Some(down_sha.as_str()), "{text}");
    assert_eq!(
        val(&text, "down-len"),
        Some(TRANSFER.to_string().as_str()),
        "{text}"
    );
    eprintln!(
        "rqemu-vmm TCG: {} MiB up and down over TCP across {kills} rqemu-net SIGKILLs on a held \
         tap, every byte checked, power-off after {:.1} s",
        TRANSFER >> 20,
        start.elapsed().as_secs_f64()
    );
}
