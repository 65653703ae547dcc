//! The VMM end of forwarded devices against the real protocol server in this process:
//! probing, the machine policy, bus mapping, a daemon that dies and one that comes back.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rqemu_protocol::handshake::{FEATURE_RING, FEATURE_SNAPSHOT};
use rqemu_protocol::sys::SeqListener;
use rqemu_protocol::{
    serve_connection, DeviceInfo, EmulatedDevice, Interrupts, IrqRequest, ServeError, Trigger,
};

use super::*;
use crate::accel::tcg::TcgAccel;
use crate::exit::{ExitRequester, GuestExit};

/// Four byte registers at a PIO base, with snapshots.
struct Scratch([u8; 4]);

impl EmulatedDevice for Scratch {
    fn read(&mut self, _s: Space, _w: usize, off: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.0.get(off as usize + i).copied().unwrap_or(0xff);
        }
    }
    fn write(&mut self, _s: Space, _w: usize, off: u64, data: &[u8]) {
        for (i, d) in data.iter().enumerate() {
            if let Some(r) = self.0.get_mut(off as usize + i) {
                *r = *d;
            }
        }
    }
    fn snapshot(&self) -> Option<Vec<u8>> {
        Some(self.0.to_vec())
    }
    fn restore(&mut self, s: &[u8]) -> Result<(), String> {
        self.0 = s.try_into().map_err(|_| "bad state".to_string())?;
        Ok(())
    }
}

fn info(base: u64) -> DeviceInfo {
    DeviceInfo {
        class: DeviceClass::Other(0x99),
        name: "scratch".into(),
        windows: vec![Window {
            space: Space::Pio,
            base,
            size: 4,
            flags: 0,
        }],
        irqs: vec![IrqRequest {
            trigger: Trigger::Edge,
            gsi_hint: None,
        }],
        features: FEATURE_RING | FEATURE_SNAPSHOT,
    }
}

/// One incarnation of a daemon process: binds `path`, serves one VMM connection with a
/// power-on device claiming `base`, then is gone (listener closed). Sends the connection's
/// socket (cutting it is "the process dies") and how the connection ended.
fn daemon(path: &Path, base: u64) -> (mpsc::Receiver<OwnedFd>, mpsc::Receiver<Result<(), String>>) {
    let listener = SeqListener::bind(path).unwrap();
    let (socks, rx_socks) = mpsc::channel();
    let (ends, rx_ends) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok(sock) = listener.accept() else { return };
        socks
            .send(sock.as_fd().try_clone_to_owned().unwrap())
            .unwrap();
        let dev = Arc::new(Mutex::new(Scratch([0; 4])));
        let r = serve_connection(sock, &info(base), &dev, &Interrupts::new(1));
        drop(listener);
        let _ = ends.send(r.map_err(|e: ServeError| e.to_string()));
    });
    (rx_socks, rx_ends)
}

fn kill(sock: &OwnedFd) {
    // SAFETY: shutdown(2) on a socket fd we own; it only ends the connection.
    unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read4(bus: &Bus, addr: u64) -> [u8; 4] {
    let mut d = [0u8; 4];
    assert!(bus.read(addr, &mut d));
    d
}

struct Machine {
    accel: Arc<dyn Accelerator>,
    pio: Bus,
    mmio: Bus,
}

fn machine() -> Machine {
    let accel = TcgAccel::new().unwrap();
    accel.start_threads().unwrap();
    Machine {
        accel: Arc::new(accel),
        pio: Bus::new(),
        mmio: Bus::new(),
    }
}

fn connect(m: &Machine, path: &Path) -> Arc<Link> {
    let Probed::Forwarding(sock) = probe(path).unwrap() else {
        panic!("a seqpacket listener probed as vhost-user");
    };
    let policy = machine_policy(&m.pio, &m.mmio, 2, &[]);
    attach(&*m.accel, &m.pio, &m.mmio, sock, path, &policy).unwrap()
}

#[test]
fn probe_tells_the_protocols_apart_and_waits_for_a_late_socket() {
    let dir = tempfile::tempdir().unwrap();
    let stream = dir.path().join("vhost.sock");
    let _l = std::os::unix::net::UnixListener::bind(&stream).unwrap();
    assert!(matches!(probe(&stream).unwrap(), Probed::VhostUser));

    let late = dir.path().join("late.sock");
    let p = late.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        SeqListener::bind(&p).unwrap()
    });
    assert!(matches!(probe(&late).unwrap(), Probed::Forwarding(_)));
    drop(t.join().unwrap());

    let file = dir.path().join("regular");
    std::fs::write(&file, b"").unwrap();
    let e = probe(&file).unwrap_err().to_string();
    assert!(e.contains("regular"), "{e}");
}

#[test]
fn machine_policy_keeps_platform_ports_bus_devices_and_used_lines() {
    let m = machine();
    m.pio
        .insert(
            Arc::new(Mutex::new(crate::devices::i8042::I8042::new(
                ExitRequester::new(),
            ))),
            0x60,
            5,
        )
        .unwrap();
    let p = machine_policy(&m.pio, &m.mmio, 1, &[3, 5]);
    let hello = |base, trigger| rqemu_protocol::handshake::Hello {
        class: DeviceClass::Serial,
        name: "t".into(),
        features: 0,
        windows: vec![Window {
            space: Space::Pio,
            base,
            size: 8,
            flags: 0,
        }],
        irqs: vec![IrqRequest {
            trigger,
            gsi_hint: None,
        }],
    };
    let g = p.decide(&hello(0x3f8, Trigger::Edge)).unwrap();
    assert_eq!(
        g.gsis,
        vec![4],
        "3 and 5 are used, 4 is the first free line"
    );
    assert!(p.decide(&hello(0x40, Trigger::Edge)).is_err(), "the PIT");
    assert!(
        p.decide(&hello(0x5c, Trigger::Edge)).is_err(),
        "overlaps the i8042"
    );
    let e = p.decide(&hello(0x3f8, Trigger::Level)).unwrap_err();
    assert!(e.contains("level"), "{e}");
}

#[test]
fn accesses_reach_the_daemon_and_a_restarted_daemon_gets_the_saved_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scratch.sock");
    let (socks, ends) = daemon(&path, 0x510);
    let m = machine();
    let link = connect(&m, &path);
    assert_eq!(link.windows()[0].base, 0x510);
    assert_eq!(link.gsis(), &[3]);
    assert!(m.pio.write(0x510, &[1, 2, 3, 4]));
    assert_eq!(read4(&m.pio, 0x510), [1, 2, 3, 4]);

    let exit = ExitRequester::new();
    let sup = supervisor::spawn(m.accel.clone(), vec![link.clone()], exit.clone()).unwrap();
    wait_for("a saved state", || {
        link.saved.lock().unwrap().as_deref() == Some(&[1, 2, 3, 4][..])
    });

    // The daemon dies: the guest keeps running, the registers read as all ones.
    kill(&socks.recv().unwrap());
    let _ = ends.recv().unwrap(); // the first connection ended (how does not matter)
    wait_for("the hang-up", || !link.handle().is_alive());
    assert_eq!(read4(&m.pio, 0x510), [0xff; 4]);
    assert!(
        m.pio.write(0x510, &[9, 9, 9, 9]),
        "a write to a dead daemon is dropped"
    );

    // It comes back (power-on state) and is reattached with the saved state.
    let (socks, ends) = daemon(&path, 0x510);
    let _second = socks.recv().unwrap();
    wait_for("the reattach", || link.reattach_count() == 1);
    assert_eq!(read4(&m.pio, 0x510), [1, 2, 3, 4]);
    m.pio.write(0x512, &[7]);
    assert_eq!(read4(&m.pio, 0x510), [1, 2, 7, 4]);

    exit.request(GuestExit::Error("test over".into()));
    sup.join().unwrap();
    link.shutdown();
    assert_eq!(
        ends.recv().unwrap(),
        Ok(()),
        "a clean shutdown of the second connection"
    );
}

#[test]
fn a_different_device_cannot_take_a_dead_daemons_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scratch.sock");
    let (socks, ends) = daemon(&path, 0x510);
    let m = machine();
    let link = connect(&m, &path);
    let exit = ExitRequester::new();
    let sup = supervisor::spawn(m.accel.clone(), vec![link.clone()], exit.clone()).unwrap();
    kill(&socks.recv().unwrap());
    let _ = ends.recv().unwrap();
    let (socks, ends) = daemon(&path, 0x600);
    let _second = socks.recv().unwrap();
    let refused = ends.recv().unwrap().unwrap_err();
    assert!(refused.contains("refused"), "{refused}");
    assert_eq!(link.reattach_count(), 0);
    assert_eq!(read4(&m.pio, 0x510), [0xff; 4]);
    let mut d = [0u8; 4];
    assert!(
        !m.pio.read(0x600, &mut d),
        "nothing was mapped at the impostor's window"
    );
    exit.request(GuestExit::Error("test over".into()));
    sup.join().unwrap();
}
