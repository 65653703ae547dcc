//! `rqemu-serial` in its own process, driven through the protocol client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rqemu_protocol::{AccessError, DeviceClass, ForwardedDevice, GrantPolicy, Space};

const THR: u64 = 0x3f8;
const IER: u64 = 0x3f9;
const IIR: u64 = 0x3fa;
const LSR: u64 = 0x3fd;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(sock: &Path, console: &str) -> Daemon {
    let child = Command::new(env!("CARGO_BIN_EXE_rqemu-serial"))
        .args(["--socket", sock.to_str().unwrap(), "--console", console])
        .spawn()
        .expect("spawning rqemu-serial");
    let d = Daemon(child);
    let end = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            Instant::now() < end,
            "rqemu-serial did not create {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    d
}

fn wait_for_file(p: &PathBuf, want: &[u8]) -> Vec<u8> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let got = std::fs::read(p).unwrap_or_default();
        if got.windows(want.len()).any(|w| w == want) || Instant::now() > end {
            return got;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn prints_reports_status_and_interrupts() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("serial.sock");
    let out = dir.path().join("console.txt");
    let _d = spawn(&sock, &format!("file:{}", out.display()));
    let (claims, h) = ForwardedDevice::connect(&sock, &GrantPolicy::isa_default(1)).unwrap();
    assert_eq!(claims.class, DeviceClass::Serial);
    assert_eq!(claims.windows.len(), 1);
    assert_eq!((claims.windows[0].base, claims.windows[0].size), (0x3f8, 8));
    assert_eq!(claims.irqs[0].gsi, 4);

    // THR → console file (ring path, then the socket path).
    for &b in b"hello " {
        h.write(0, Space::Pio, THR, &[b]).unwrap();
    }
    for &b in b"world\n" {
        h.write_socket(Space::Pio, THR, &[b]).unwrap();
    }
    assert_eq!(wait_for_file(&out, b"hello world\n"), b"hello world\n");

    // LSR: transmitter holding register and shift register empty.
    let mut lsr = [0u8];
    h.read(0, Space::Pio, LSR, &mut lsr).unwrap();
    assert_eq!(lsr[0] & 0x60, 0x60, "LSR {:#x}", lsr[0]);
    h.read_socket(Space::Pio, LSR, &mut lsr).unwrap();
    assert_eq!(lsr[0] & 0x60, 0x60);

    // THR-empty interrupt: enable it in IER, transmit, the line's eventfd fires.
    let irq = &claims.irqs[0].event;
    irq.drain();
    h.write(0, Space::Pio, IER, &[0x02]).unwrap();
    h.write(0, Space::Pio, THR, b"!").unwrap();
    assert!(
        irq.wait(Some(Duration::from_secs(10))).unwrap(),
        "THR empty interrupt"
    );
    let mut iir = [0u8];
    h.read(0, Space::Pio, IIR, &mut iir).unwrap();
    assert_eq!(
        iir[0] & 0x0f,
        0x02,
        "IIR reports THR empty, got {:#x}",
        iir[0]
    );
}

#[test]
fn survives_vmm_reconnects_and_reports_death() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("serial.sock");
    let out = dir.path().join("console.txt");
    let mut d = spawn(&sock, &format!("file:{}", out.display()));
    {
        let (_c, h) = ForwardedDevice::connect(&sock, &GrantPolicy::isa_default(2)).unwrap();
        h.write(1, Space::Pio, THR, b"a").unwrap();
        h.shutdown().unwrap();
    }
    {
        // A VMM that just disappears.
        let (_c, h) = ForwardedDevice::connect(&sock, &GrantPolicy::isa_default(1)).unwrap();
        h.write(0, Space::Pio, THR, b"b").unwrap();
    }
    let (_c, h) = ForwardedDevice::connect(&sock, &GrantPolicy::isa_default(1)).unwrap();
    h.write(0, Space::Pio, THR, b"c").unwrap();
    assert_eq!(wait_for_file(&out, b"abc"), b"abc");
    // Kill the daemon: accesses complete with all ones and an error, without hanging.
    d.0.kill().unwrap();
    d.0.wait().unwrap();
    let mut lsr = [0u8];
    assert_eq!(
        h.read(0, Space::Pio, LSR, &mut lsr),
        Err(AccessError::Disconnected)
    );
    assert_eq!(lsr, [0xff]);
    assert!(!h.is_alive());
}

#[test]
fn console_socket_carries_input_and_output() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("serial.sock");
    let con = dir.path().join("console.sock");
    let _d = spawn(&sock, &format!("socket:{}", con.display()));
    let (_c, h) = ForwardedDevice::connect(&sock, &GrantPolicy::isa_default(1)).unwrap();
    let mut user = std::os::unix::net::UnixStream::connect(&con).unwrap();
    user.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    user.write_all(b"k").unwrap();
    // The byte reaches the receive FIFO: LSR data-ready, then RBR returns it.
    let end = Instant::now() + Duration::from_secs(10);
    let mut lsr = [0u8];
    loop {
        h.read(0, Space::Pio, LSR, &mut lsr).unwrap();
        if lsr[0] & 1 == 1 || Instant::now() > end {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(lsr[0] & 1, 1, "input arrived");
    let mut c = [0u8];
    h.read(0, Space::Pio, THR, &mut c).unwrap();
    assert_eq!(c, *b"k");
    // Output reaches the attached user (once the client is registered, output is delivered).
    h.write(0, Space::Pio, THR, b"Z").unwrap();
    let mut got = [0u8];
    user.read_exact(&mut got).unwrap();
    assert_eq!(got, *b"Z");
}
