//! Forwarded register read round trip, without a guest: shared-memory ring, socket fallback,
//! and a plain in-process call for reference. Prints p50/p99; asserts nothing.
//!
//! `cargo run --release -p rqemu-protocol --example fwd_bench [iterations]`

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rqemu_protocol::handshake::{FEATURE_POSTED, FEATURE_RING};
use rqemu_protocol::sys::SeqSocket;
use rqemu_protocol::{
    serve_connection, DeviceClass, DeviceInfo, EmulatedDevice, ForwardedDevice, GrantPolicy,
    Interrupts, Space, Window,
};

struct Scratch([u8; 8]);

impl EmulatedDevice for Scratch {
    fn read(&mut self, _s: Space, _w: usize, off: u64, data: &mut [u8]) {
        let o = off as usize;
        data.copy_from_slice(&self.0[o..o + data.len()]);
    }
    fn write(&mut self, _s: Space, _w: usize, off: u64, data: &[u8]) {
        let o = off as usize;
        self.0[o..o + data.len()].copy_from_slice(data);
    }
}

fn report(name: &str, mut ns: Vec<u64>) {
    ns.sort_unstable();
    let p = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize];
    println!(
        "{name:<22} n={:<7} p50={:>7} ns  p99={:>7} ns  max={:>8} ns",
        ns.len(),
        p(0.5),
        p(0.99),
        ns[ns.len() - 1]
    );
}

fn measure(n: usize, mut f: impl FnMut()) -> Vec<u64> {
    for _ in 0..n / 10 {
        f(); // warm-up
    }
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_nanos() as u64
        })
        .collect()
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(50_000);
    let info = DeviceInfo {
        class: DeviceClass::Other(100),
        name: "bench".into(),
        windows: vec![Window {
            space: Space::Pio,
            base: 0x510,
            size: 8,
            flags: 0,
        }],
        irqs: vec![],
        features: FEATURE_RING | FEATURE_POSTED,
    };
    let (a, b) = SeqSocket::pair().expect("socketpair");
    let dev = Arc::new(Mutex::new(Scratch([0x5a; 8])));
    let d2 = dev.clone();
    let irqs = Interrupts::new(0);
    let t = std::thread::spawn(move || serve_connection(b, &info, &d2, &irqs));
    let mut policy = GrantPolicy::isa_default(1);
    policy.timeout = Duration::from_secs(5);
    let (_claims, h) = ForwardedDevice::attach(a, &policy).expect("handshake");

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{} CPUs, load average {} (spinning peers share cores under load)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut buf = [0u8; 1];
    report(
        "in-process call",
        measure(n, || {
            dev.lock().unwrap().read(Space::Pio, 0, 3, &mut buf);
            black_box(&buf);
        }),
    );
    report(
        "shared-memory ring",
        measure(n, || {
            h.read(0, Space::Pio, 0x513, &mut buf).expect("ring read");
            black_box(&buf);
        }),
    );
    report(
        "socket (seqpacket)",
        measure(n, || {
            h.read_socket(Space::Pio, 0x513, &mut buf)
                .expect("socket read");
            black_box(&buf);
        }),
    );
    h.shutdown().expect("shutdown");
    t.join().expect("server thread").expect("server");
}
