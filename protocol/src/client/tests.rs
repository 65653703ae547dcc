//! Both ends in one process: the real server against the client, and hand-written hostile
//! daemons against the client.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::handshake::{Answer, IrqRequest, FEATURE_POSTED, WINDOW_POSTED};
use crate::messages::{Access, AccessReply, IrqLine, STATUS_OK, TAG_CONTROL_REPLY};
use crate::ring::RING_BYTES;
use crate::server::{serve_connection, DeviceInfo, EmulatedDevice, Interrupts, ServeError};
use crate::sys::MAX_MSG;

/// 8 byte registers at PIO 0x500 (register 7: writing raises line 0), 16 bytes of MMIO at
/// 0xd000_0000 (posted window).
#[derive(Debug)]
struct Regs {
    pio: [u8; 8],
    mmio: [u8; 16],
    irqs: Interrupts,
    resets: u32,
}

impl EmulatedDevice for Regs {
    fn read(&mut self, space: Space, _w: usize, off: u64, data: &mut [u8]) {
        let src: &[u8] = match space {
            Space::Pio => &self.pio,
            Space::Mmio => &self.mmio,
        };
        for (i, d) in data.iter_mut().enumerate() {
            *d = src.get(off as usize + i).copied().unwrap_or(0xff);
        }
    }
    fn write(&mut self, space: Space, _w: usize, off: u64, data: &[u8]) {
        if space == Space::Pio && off == 7 {
            match data.first() {
                Some(1) => self.irqs.raise(0),
                Some(2) => self.irqs.raise(1),
                Some(3) => self.irqs.lower(1),
                _ => {}
            }
        }
        let dst: &mut [u8] = match space {
            Space::Pio => &mut self.pio,
            Space::Mmio => &mut self.mmio,
        };
        for (i, d) in data.iter().enumerate() {
            if let Some(x) = dst.get_mut(off as usize + i) {
                *x = *d;
            }
        }
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.pio = [0; 8];
    }
    fn snapshot(&self) -> Option<Vec<u8>> {
        Some(self.pio.to_vec())
    }
}

fn info() -> DeviceInfo {
    DeviceInfo {
        class: DeviceClass::Other(99),
        name: "regs".into(),
        windows: vec![
            Window {
                space: Space::Pio,
                base: 0x500,
                size: 8,
                flags: 0,
            },
            Window {
                space: Space::Mmio,
                base: 0xd000_0000,
                size: 16,
                flags: WINDOW_POSTED,
            },
        ],
        irqs: vec![
            IrqRequest {
                trigger: Trigger::Edge,
                gsi_hint: Some(5),
            },
            IrqRequest {
                trigger: Trigger::Level,
                gsi_hint: None,
            },
        ],
        features: FEATURE_RING | FEATURE_POSTED,
    }
}

fn policy() -> GrantPolicy {
    let mut p = GrantPolicy::isa_default(2);
    p.timeout = Duration::from_millis(300);
    p
}

type Served = (
    Claims,
    Handle,
    Arc<Mutex<Regs>>,
    thread::JoinHandle<Result<(), ServeError>>,
);

fn start(info: DeviceInfo, policy: &GrantPolicy) -> Result<Served, ClientError> {
    let (a, b) = SeqSocket::pair().unwrap();
    let irqs = Interrupts::new(info.irqs.len());
    let dev = Arc::new(Mutex::new(Regs {
        pio: [0; 8],
        mmio: [0; 16],
        irqs: irqs.clone(),
        resets: 0,
    }));
    let d2 = dev.clone();
    let t = thread::spawn(move || serve_connection(b, &info, &d2, &irqs));
    match ForwardedDevice::attach(a, policy) {
        Ok((c, h)) => Ok((c, h, dev, t)),
        Err(e) => {
            let _ = t.join();
            Err(e)
        }
    }
}

#[test]
fn handshake_grants_windows_and_lines() {
    let (claims, h, _dev, t) = start(info(), &policy()).unwrap();
    assert_eq!(claims.name, "regs");
    assert_eq!(claims.class, DeviceClass::Other(99));
    assert_eq!(claims.windows, info().windows);
    assert_eq!(claims.irqs.len(), 2);
    assert_eq!(claims.irqs[0].gsi, 5);
    assert_eq!(claims.irqs[1].gsi, 3, "first free GSI");
    assert!(claims.irqs[1].resample.is_some());
    assert_eq!(h.rings(), 2);
    h.shutdown().unwrap();
    t.join().unwrap().unwrap();
}

#[test]
fn reads_and_writes_over_ring_and_socket() {
    let (_c, h, dev, t) = start(info(), &policy()).unwrap();
    h.write(0, Space::Pio, 0x500, &[0x11, 0x22]).unwrap();
    h.write(1, Space::Pio, 0x502, &[0x33, 0x44, 0x55, 0x66])
        .unwrap();
    let mut b = [0u8; 8];
    h.read(1, Space::Pio, 0x500, &mut b).unwrap();
    assert_eq!(b, [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0, 0]);
    // Many round trips wrap the 64-slot ring several times.
    for i in 0..300u32 {
        let v = (i as u8).wrapping_mul(7);
        h.write(0, Space::Pio, 0x506, &[v]).unwrap();
        let mut r = [0u8; 1];
        h.read(0, Space::Pio, 0x506, &mut r).unwrap();
        assert_eq!(r[0], v);
    }
    // Socket fallback, and a vCPU without a ring falls back to the socket too.
    h.write_socket(Space::Pio, 0x501, &[0x99]).unwrap();
    let mut r = [0u8; 2];
    h.read_socket(Space::Pio, 0x500, &mut r).unwrap();
    assert_eq!(r, [0x11, 0x99]);
    let mut r = [0u8; 4];
    h.read(7, Space::Pio, 0x500, &mut r).unwrap();
    assert_eq!(r, [0x11, 0x99, 0x33, 0x44]);
    // Outside the windows / bad sizes never reach the daemon.
    let mut r = [0u8; 2];
    assert_eq!(
        h.read(0, Space::Pio, 0x507, &mut r),
        Err(AccessError::NotClaimed {
            space: Space::Pio,
            addr: 0x507
        })
    );
    assert_eq!(r, [0xff, 0xff]);
    let mut r = [0u8; 3];
    assert_eq!(
        h.read(0, Space::Pio, 0x500, &mut r),
        Err(AccessError::BadSize(3))
    );
    assert_eq!(
        h.write(0, Space::Mmio, 0x500, &[1]),
        Err(AccessError::NotClaimed {
            space: Space::Mmio,
            addr: 0x500
        })
    );
    // Control messages.
    h.reset().unwrap();
    assert_eq!(dev.lock().unwrap().resets, 1);
    assert_eq!(h.snapshot().unwrap(), vec![0; 8]);
    assert!(matches!(h.restore(&[1]), Err(ClientError::Daemon(_))));
    let mem = SharedMem::create("guest", 4096).unwrap();
    let region = MemRegion {
        gpa: 0,
        size: 4096,
        offset: 0,
    };
    h.set_mem_table(&[region], &[mem.as_fd()]).unwrap();
    assert!(
        matches!(h.set_mem_table(&[region], &[]), Err(ClientError::Daemon(w)) if w.contains("fds"))
    );
    drop(h);
    t.join().unwrap().unwrap();
}

#[test]
fn posted_writes_are_ordered_before_later_reads() {
    let (_c, h, dev, t) = start(info(), &policy()).unwrap();
    // 200 posted writes (more than the ring holds: the client waits for room).
    for i in 0..200u64 {
        h.write(0, Space::Mmio, 0xd000_0000 + (i % 16), &[i as u8])
            .unwrap();
    }
    let mut b = [0u8; 8];
    h.read(0, Space::Mmio, 0xd000_0008, &mut b).unwrap();
    // Last writer of offset o (0..16) among i in 0..200 with i % 16 == o is the largest such i.
    let last = |o: u64| (0..200u64).filter(|i| i % 16 == o).max().unwrap() as u8;
    let expect: Vec<u8> = (8..16).map(last).collect();
    assert_eq!(b.to_vec(), expect);
    assert_eq!(dev.lock().unwrap().mmio[15], last(15));
    drop(h);
    t.join().unwrap().unwrap();
}

#[test]
fn interrupts_fire_through_eventfds() {
    let (claims, h, _dev, t) = start(info(), &policy()).unwrap();
    let long = Some(Duration::from_secs(5));
    h.write(0, Space::Pio, 0x507, &[1]).unwrap();
    assert!(claims.irqs[0].event.wait(long).unwrap(), "edge line fired");
    // Level: fires, and fires again on resample while still asserted.
    h.write(0, Space::Pio, 0x507, &[2]).unwrap();
    assert!(claims.irqs[1].event.wait(long).unwrap(), "level line fired");
    let resample = claims.irqs[1].resample.as_ref().unwrap();
    resample.signal().unwrap();
    assert!(
        claims.irqs[1].event.wait(long).unwrap(),
        "re-raised after EOI while asserted"
    );
    h.write(0, Space::Pio, 0x507, &[3]).unwrap(); // lower
    resample.signal().unwrap();
    // Prove the resample was processed (a later edge arrives) and that it did not re-raise.
    h.write(0, Space::Pio, 0x507, &[1]).unwrap();
    assert!(claims.irqs[0].event.wait(long).unwrap());
    h.write(0, Space::Pio, 0x500, &[0]).unwrap();
    assert_eq!(
        claims.irqs[1].event.drain(),
        0,
        "lowered line not re-raised"
    );
    drop(h);
    t.join().unwrap().unwrap();
}

#[test]
fn policy_refusals_reach_the_daemon() {
    let check = |p: GrantPolicy, info: DeviceInfo, needle: &str| {
        let err = start(info, &p).unwrap_err();
        match err {
            ClientError::Refused(why) => assert!(why.contains(needle), "{why}"),
            e => panic!("unexpected {e}"),
        }
    };
    let mut p = policy();
    p.pio = vec![(0x600, 0x700)];
    check(p, info(), "outside the allowed space");
    let mut p = policy();
    p.taken = vec![Window {
        space: Space::Mmio,
        base: 0xd000_000f,
        size: 1,
        flags: 0,
    }];
    check(p, info(), "overlaps");
    let mut p = policy();
    p.free_gsis = vec![3, 4];
    check(p, info(), "GSI 5 is not available");
    let mut p = policy();
    p.free_gsis = vec![5];
    check(p, info(), "no free GSI");
    // The daemon side sees the refusal with its reason.
    let (a, b) = SeqSocket::pair().unwrap();
    let mut p = policy();
    p.mmio.clear();
    let d = Arc::new(Mutex::new(Regs {
        pio: [0; 8],
        mmio: [0; 16],
        irqs: Interrupts::new(2),
        resets: 0,
    }));
    let t = thread::spawn(move || serve_connection(b, &info(), &d, &Interrupts::new(2)));
    assert!(ForwardedDevice::attach(a, &p).is_err());
    assert!(matches!(t.join().unwrap(), Err(ServeError::Refused(w)) if w.contains("window 1")));
}

#[test]
fn rings_are_optional() {
    let mut i = info();
    i.features = 0;
    let (c, h, _d, t) = start(i, &policy()).unwrap();
    assert_eq!(c.features, 0);
    assert_eq!(h.rings(), 0);
    h.write(0, Space::Mmio, 0xd000_0001, &[5]).unwrap(); // not posted: feature not negotiated
    let mut b = [0u8; 1];
    h.read(0, Space::Mmio, 0xd000_0001, &mut b).unwrap();
    assert_eq!(b, [5]);
    drop(h);
    t.join().unwrap().unwrap();
}

// ---------- hostile daemons ----------

fn hello_bytes() -> Vec<u8> {
    let i = info();
    Hello {
        class: i.class,
        name: i.name,
        features: i.features,
        windows: i.windows,
        irqs: i.irqs,
    }
    .encode()
    .unwrap()
    .to_vec()
}

/// Runs the client against `daemon` (given the daemon end of the socket).
fn against<T: Send + 'static>(
    daemon: impl FnOnce(SeqSocket) -> T + Send + 'static,
) -> (Result<(Claims, Handle), ClientError>, thread::JoinHandle<T>) {
    let (a, b) = SeqSocket::pair().unwrap();
    let t = thread::spawn(move || daemon(b));
    (ForwardedDevice::attach(a, &policy()), t)
}

fn recv_answer(s: &SeqSocket) -> Answer {
    let mut buf = [0u8; 512];
    let n = s
        .recv(&mut buf, &mut Vec::new(), Some(Duration::from_secs(5)))
        .unwrap();
    Answer::decode(&buf[..n]).unwrap()
}

#[test]
fn malformed_hellos_are_refused() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![1, 2, 3], "bytes"),
        (hello_bytes()[..200].to_vec(), "bytes"),
        (
            {
                let mut b = hello_bytes();
                b[10] = 42;
                b
            },
            "type 42",
        ),
        (
            {
                let mut b = hello_bytes();
                b[8] = 2;
                b
            },
            "version 2",
        ),
        (
            {
                let mut b = hello_bytes();
                b.copy_within(64..88, 88);
                b[88] = 0;
                b[18] = 2;
                b
            },
            "overlap",
        ),
        (
            {
                let mut b = hello_bytes();
                b[18] = 200;
                b
            },
            "count",
        ),
    ];
    for (bytes, needle) in cases {
        let (r, t) = against(move |s| {
            s.send(&bytes, &[]).unwrap();
            recv_answer(&s)
        });
        let e = r.unwrap_err();
        assert!(matches!(e, ClientError::Handshake(_)), "{e}");
        match t.join().unwrap() {
            Answer::Refuse(why) => assert!(why.contains(needle), "{why} / {needle}"),
            a => panic!("{a:?}"),
        }
    }
}

#[test]
fn fd_floods_are_refused_and_closed() {
    // Within the receive limit: refused because a HELLO carries no fds.
    let (r, t) = against(|s| {
        let evs: Vec<_> = (0..10).map(|_| EventFd::new().unwrap()).collect();
        let fds: Vec<_> = evs.iter().map(|e| e.as_fd()).collect();
        s.send(&hello_bytes(), &fds).unwrap();
        recv_answer(&s)
    });
    assert!(
        matches!(r, Err(ClientError::Refused(ref w)) if w.contains("10 unexpected fds")),
        "{r:?}"
    );
    assert!(matches!(t.join().unwrap(), Answer::Refuse(_)));
    // Beyond it: the message is dropped as a flood.
    let (r, t) = against(|s| {
        let evs: Vec<_> = (0..200).map(|_| EventFd::new().unwrap()).collect();
        let fds: Vec<_> = evs.iter().map(|e| e.as_fd()).collect();
        s.send(&hello_bytes(), &fds).unwrap();
        recv_answer(&s)
    });
    assert!(
        matches!(r, Err(ClientError::Io(ref e)) if e.to_string().contains("fd flood")),
        "{r:?}"
    );
    assert!(matches!(t.join().unwrap(), Answer::Refuse(w) if w.contains("fd flood")));
}

/// A daemon that handshakes correctly, answers the set-up control messages and returns the
/// ring memory and the socket.
fn fake_setup(s: SeqSocket) -> (SeqSocket, SharedMem) {
    s.send(&hello_bytes(), &[]).unwrap();
    assert!(matches!(recv_answer(&s), Answer::Grant(_)));
    let mut buf = vec![0u8; MAX_MSG];
    loop {
        let mut fds: Vec<OwnedFd> = Vec::new();
        let n = s
            .recv(&mut buf, &mut fds, Some(Duration::from_secs(5)))
            .unwrap();
        let (_, p) = messages::unframe(&buf[..n]).unwrap();
        let c: Control = messages::decode_postcard(p).unwrap();
        let mut out = [0u8; 64];
        let k = messages::encode_postcard(TAG_CONTROL_REPLY, &ControlReply::Ok, &mut out).unwrap();
        s.send(&out[..k], &[]).unwrap();
        if let Control::SetRings { vcpus } = c {
            let mem = SharedMem::from_fd(fds.remove(0), usize::from(vcpus) * RING_BYTES).unwrap();
            return (s, mem);
        }
    }
}

#[test]
fn silent_daemon_times_out_then_death_is_detected() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (r, t) = against(move |s| {
        let (s, mem) = fake_setup(s);
        let _ = rx.recv(); // never answers until told to die
        drop((s, mem));
    });
    let (_c, h) = r.unwrap();
    let mut b = [0u8; 4];
    let start = Instant::now();
    assert_eq!(
        h.read(0, Space::Pio, 0x500, &mut b),
        Err(AccessError::Timeout)
    );
    assert_eq!(b, [0xff; 4]);
    assert_eq!(
        h.read_socket(Space::Pio, 0x500, &mut b),
        Err(AccessError::Timeout)
    );
    assert_eq!(b, [0xff; 4]);
    assert!(start.elapsed() < Duration::from_secs(30), "bounded wait");
    assert!(h.is_alive());
    tx.send(()).unwrap();
    t.join().unwrap();
    assert_eq!(
        h.read(1, Space::Pio, 0x500, &mut b),
        Err(AccessError::Disconnected)
    );
    assert_eq!(b, [0xff; 4]);
    assert!(!h.is_alive());
    assert_eq!(
        h.write(0, Space::Pio, 0x500, &[1]),
        Err(AccessError::Disconnected)
    );
    assert!(matches!(h.reset(), Err(ClientError::Disconnected)));
}

#[test]
fn dead_daemon_is_detected_on_the_socket_path() {
    let (r, t) = against(|s| drop(fake_setup(s)));
    let (_c, h) = r.unwrap();
    t.join().unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        h.read_socket(Space::Pio, 0x500, &mut b),
        Err(AccessError::Disconnected)
    );
    assert!(!h.is_alive());
}

#[test]
fn forged_ring_sequence_and_tail_are_caught() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (r, t) = against(move |s| {
        let (s, mem) = fake_setup(s);
        let v = RingView::new(&mem, 0).unwrap();
        // Request 1: answer with a sequence number never issued.
        while v.head() < 1 {
            std::hint::spin_loop();
        }
        v.forge_resp_seq(1, 77);
        // Request 2: move the tail far beyond the head.
        while v.head() < 2 {
            std::hint::spin_loop();
        }
        v.complete(1000, STATUS_OK, 0);
        let _ = rx.recv();
        drop(s);
    });
    let (_c, h) = r.unwrap();
    let mut b = [0u8; 2];
    assert_eq!(
        h.read(0, Space::Pio, 0x500, &mut b),
        Err(AccessError::SequenceMismatch {
            expected: 1,
            got: 77
        })
    );
    assert_eq!(b, [0xff; 2]);
    assert_eq!(
        h.read(0, Space::Pio, 0x500, &mut b),
        Err(AccessError::Timeout)
    );
    assert_eq!(
        h.read(0, Space::Pio, 0x500, &mut b),
        Err(AccessError::Protocol("ring tail beyond head"))
    );
    tx.send(()).unwrap();
    t.join().unwrap();
}

#[test]
fn forged_socket_replies_are_caught() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (r, t) = against(move |s| {
        let (s, _mem) = fake_setup(s);
        let mut buf = [0u8; 64];
        let mut fds = Vec::new();
        for k in 0..4 {
            let n = s.recv(&mut buf, &mut fds, None).unwrap();
            let (_, p) = messages::unframe(&buf[..n]).unwrap();
            let a = Access::decode(p).unwrap();
            match k {
                0 => s
                    .send(
                        &AccessReply {
                            seq: a.seq + 3,
                            status: 0,
                            data: 1,
                        }
                        .encode(),
                        &[],
                    )
                    .unwrap(),
                1 => {
                    // A stale reply first, then the right one.
                    s.send(
                        &AccessReply {
                            seq: a.seq - 1,
                            status: 0,
                            data: 9,
                        }
                        .encode(),
                        &[],
                    )
                    .unwrap();
                    s.send(
                        &AccessReply {
                            seq: a.seq,
                            status: 0,
                            data: 0x1234,
                        }
                        .encode(),
                        &[],
                    )
                    .unwrap();
                }
                2 => s.send(&[0u8; 5], &[]).unwrap(),
                _ => s
                    .send(
                        &AccessReply {
                            seq: a.seq,
                            status: 1,
                            data: 0,
                        }
                        .encode(),
                        &[],
                    )
                    .unwrap(),
            }
        }
        let _ = rx.recv();
    });
    let (_c, h) = r.unwrap();
    let mut b = [0u8; 2];
    assert_eq!(
        h.read_socket(Space::Pio, 0x500, &mut b),
        Err(AccessError::SequenceMismatch {
            expected: 1,
            got: 4
        })
    );
    h.read_socket(Space::Pio, 0x500, &mut b).unwrap();
    assert_eq!(b, [0x34, 0x12]);
    assert_eq!(
        h.read_socket(Space::Pio, 0x500, &mut b),
        Err(AccessError::Protocol("bad frame"))
    );
    assert_eq!(
        h.read_socket(Space::Pio, 0x500, &mut b),
        Err(AccessError::Rejected(1))
    );
    assert_eq!(b, [0xff; 2]);
    tx.send(()).unwrap();
    t.join().unwrap();
}

// ---------- hostile VMM against the real server ----------

fn raw_vmm() -> (SeqSocket, thread::JoinHandle<Result<(), ServeError>>) {
    let (a, b) = SeqSocket::pair().unwrap();
    let t = thread::spawn(move || {
        let irqs = Interrupts::new(2);
        let d = Arc::new(Mutex::new(Regs {
            pio: [0; 8],
            mmio: [0; 16],
            irqs: irqs.clone(),
            resets: 0,
        }));
        serve_connection(b, &info(), &d, &irqs)
    });
    let mut buf = [0u8; 512];
    let n = a
        .recv(&mut buf, &mut Vec::new(), Some(Duration::from_secs(5)))
        .unwrap();
    let hello = Hello::decode(&buf[..n]).unwrap();
    let mut g = policy().decide(&hello).unwrap();
    g.features = 0;
    g.vcpus = 0;
    a.send(&g.encode().unwrap(), &[]).unwrap();
    (a, t)
}

fn control_reply(s: &SeqSocket) -> ControlReply {
    let mut buf = [0u8; 512];
    let n = s
        .recv(&mut buf, &mut Vec::new(), Some(Duration::from_secs(5)))
        .unwrap();
    let (tag, p) = messages::unframe(&buf[..n]).unwrap();
    assert_eq!(tag, TAG_CONTROL_REPLY);
    messages::decode_postcard(p).unwrap()
}

#[test]
fn server_rejects_hostile_vmm_messages() {
    let (a, t) = raw_vmm();
    let mut buf = [0u8; 256];
    // Control with the wrong number of fds.
    let n = messages::encode_postcard(TAG_CONTROL, &Control::Reset, &mut buf).unwrap();
    let e = EventFd::new().unwrap();
    a.send(&buf[..n], &[e.as_fd()]).unwrap();
    assert!(matches!(control_reply(&a), ControlReply::Error(w) if w.contains("fds")));
    // Rings when none were offered in this grant are still validated: a bogus memfd.
    let n =
        messages::encode_postcard(TAG_CONTROL, &Control::SetRings { vcpus: 1 }, &mut buf).unwrap();
    let (e1, e2) = (EventFd::new().unwrap(), EventFd::new().unwrap());
    a.send(&buf[..n], &[e.as_fd(), e1.as_fd(), e2.as_fd()])
        .unwrap();
    assert!(matches!(control_reply(&a), ControlReply::Error(_)));
    // Interrupt line that does not exist.
    let c = Control::SetIrqFds {
        lines: vec![IrqLine {
            line: 9,
            gsi: 1,
            trigger: Trigger::Edge,
        }],
    };
    let n = messages::encode_postcard(TAG_CONTROL, &c, &mut buf).unwrap();
    a.send(&buf[..n], &[e.as_fd()]).unwrap();
    assert!(matches!(control_reply(&a), ControlReply::Error(_)));
    // Access outside the windows: answered with an error status.
    let acc = Access {
        seq: 1,
        op: crate::messages::OP_READ,
        space: Space::Pio,
        len: 4,
        addr: 0x506,
        data: 0,
    };
    a.send(&acc.encode(), &[]).unwrap();
    let n = a
        .recv(&mut buf, &mut Vec::new(), Some(Duration::from_secs(5)))
        .unwrap();
    let r = AccessReply::decode(&buf[8..n]).unwrap();
    assert_eq!(
        (r.seq, r.status, r.data),
        (1, crate::messages::STATUS_BAD_REQUEST, u64::MAX)
    );
    // Unknown tag: the daemon drops the connection.
    a.send(&[0x77, 0, 0, 0, 0, 0, 0, 0], &[]).unwrap();
    assert!(matches!(t.join().unwrap(), Err(ServeError::Message(_))));
}

#[test]
fn server_drops_bad_frames() {
    let (a, t) = raw_vmm();
    a.send(&[1, 2, 3], &[]).unwrap();
    assert!(matches!(t.join().unwrap(), Err(ServeError::Message(_))));
    let (a, t) = raw_vmm();
    let mut b = Access {
        seq: 1,
        op: 1,
        space: Space::Pio,
        len: 1,
        addr: 0x500,
        data: 0,
    }
    .encode();
    b[8 + 10] = 5; // bad length
    a.send(&b, &[]).unwrap();
    assert!(matches!(t.join().unwrap(), Err(ServeError::Message(_))));
}

#[test]
fn stale_reply_flood_cannot_hold_the_vmm() {
    let (r, t) = against(move |s| {
        let (s, _mem) = fake_setup(s);
        let mut buf = [0u8; 64];
        let _ = s.recv(&mut buf, &mut Vec::new(), None);
        // Answer with stale sequence numbers, forever (until the VMM goes away).
        let stale = AccessReply {
            seq: 0,
            status: 0,
            data: 0,
        }
        .encode();
        while s.send(&stale, &[]).is_ok() {}
    });
    let (_c, h) = r.unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        h.read_socket(Space::Pio, 0x500, &mut b),
        Err(AccessError::Timeout)
    );
    assert_eq!(b, [0xff]);
    assert!(matches!(h.reset(), Err(ClientError::Timeout)));
    drop(h);
    t.join().unwrap();
}

#[test]
fn level_lines_latch_until_a_vmm_connects() {
    let mut i = info();
    i.irqs.truncate(2);
    let irqs = Interrupts::for_requests(&i.irqs);
    irqs.raise(1); // level, no VMM yet
    irqs.raise(0); // edge, dropped
    assert!(!irqs.is_connected(1));
    let (a, b) = SeqSocket::pair().unwrap();
    let dev = Arc::new(Mutex::new(Regs {
        pio: [0; 8],
        mmio: [0; 16],
        irqs: irqs.clone(),
        resets: 0,
    }));
    let i2 = irqs.clone();
    let t = thread::spawn(move || serve_connection(b, &i, &dev, &i2));
    let (claims, h) = ForwardedDevice::attach(a, &policy()).unwrap();
    assert!(
        claims.irqs[1]
            .event
            .wait(Some(Duration::from_secs(5)))
            .unwrap(),
        "latched level line signalled"
    );
    assert_eq!(
        claims.irqs[0].event.drain(),
        0,
        "edge raised while unconnected is dropped"
    );
    assert!(irqs.is_connected(1));
    h.shutdown().unwrap();
    t.join().unwrap().unwrap();
    assert!(!irqs.is_connected(1), "fds dropped with the connection");
}

#[test]
fn a_policy_without_level_lines_refuses_a_device_that_needs_one() {
    let mut p = policy();
    p.allow_level = false;
    match start(info(), &p) {
        Err(ClientError::Refused(why)) => assert!(why.contains("level"), "{why}"),
        r => panic!("expected a refusal, got {:?}", r.map(|s| s.0)),
    }
}

#[test]
fn check_alive_sees_a_hang_up_without_an_access() {
    let (a, b) = SeqSocket::pair().unwrap();
    let daemon_end: OwnedFd = b.as_fd().try_clone_to_owned().unwrap();
    let info = info();
    let irqs = Interrupts::new(info.irqs.len());
    let dev = Arc::new(Mutex::new(Regs {
        pio: [0; 8],
        mmio: [0; 16],
        irqs: irqs.clone(),
        resets: 0,
    }));
    let t = thread::spawn(move || serve_connection(b, &info, &dev, &irqs));
    let (_c, h) = ForwardedDevice::attach(a, &policy()).unwrap();
    assert!(h.check_alive());
    assert!(h.check_alive(), "checking does not consume anything");
    // The daemon's end of the connection goes away, as in a crash; no access is made.
    // SAFETY: shutdown(2) on a dup of the daemon's socket, which we own.
    unsafe { libc::shutdown(daemon_end.as_raw_fd(), libc::SHUT_RDWR) };
    let _ = t.join();
    assert!(!h.check_alive());
    assert!(!h.is_alive(), "marked dead for every later access");
    let mut r = [0u8; 1];
    assert_eq!(
        h.read(0, Space::Pio, 0x500, &mut r),
        Err(AccessError::Disconnected)
    );
    assert_eq!(r, [0xff]);
}
