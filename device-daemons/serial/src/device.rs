//! The 16550 UART (vm-superio) as an [`EmulatedDevice`], and its console back ends.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rqemu_protocol::handshake::{FEATURE_POSTED, FEATURE_RING, FEATURE_SNAPSHOT, WINDOW_POSTED};
use rqemu_protocol::{
    DeviceClass, DeviceInfo, EmulatedDevice, Interrupts, IrqRequest, Space, Trigger, Window,
};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger as SerialTrigger};

/// Errors setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Unknown `--console` value.
    #[error("--console must be stdio, file:PATH or socket:PATH, not {0:?}")]
    Syntax(String),
    /// Opening the file or socket failed.
    #[error("console {0}: {1}")]
    Open(PathBuf, #[source] io::Error),
}

/// Where the UART's output goes and its input comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleSpec {
    /// The daemon's stdin/stdout.
    Stdio,
    /// Output appended to a file (no input).
    File(PathBuf),
    /// A UNIX stream socket a user attaches to (`socat - UNIX-CONNECT:PATH`); one client at a
    /// time, output while nobody is attached is dropped.
    Socket(PathBuf),
}

impl std::str::FromStr for ConsoleSpec {
    type Err = ConsoleError;
    fn from_str(s: &str) -> Result<Self, ConsoleError> {
        if s == "stdio" {
            Ok(ConsoleSpec::Stdio)
        } else if let Some(p) = s.strip_prefix("file:") {
            Ok(ConsoleSpec::File(p.into()))
        } else if let Some(p) = s.strip_prefix("socket:") {
            Ok(ConsoleSpec::Socket(p.into()))
        } else {
            Err(ConsoleError::Syntax(s.into()))
        }
    }
}

/// The console output side.
pub enum ConsoleOut {
    /// stdout, flushed per write.
    Stdout,
    /// A file.
    File(File),
    /// The attached socket client, if any.
    Socket(Arc<Mutex<Option<UnixStream>>>),
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ConsoleOut::Stdout => {
                let mut o = io::stdout().lock();
                o.write_all(buf)?;
                o.flush()?;
                Ok(buf.len())
            }
            ConsoleOut::File(f) => f.write(buf),
            ConsoleOut::Socket(c) => {
                let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(s) = c.as_mut() {
                    if s.write_all(buf).is_err() {
                        *c = None; // the user detached
                    }
                }
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// vm-superio's receive FIFO size.
const RX_FIFO: usize = 64;

/// Raises the UART's interrupt line (edge) through the protocol.
pub struct Irq(pub Interrupts);

impl SerialTrigger for Irq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.raise(0);
        Ok(())
    }
}

/// The UART.
pub struct SerialDevice {
    uart: Serial<Irq, NoEvents, ConsoleOut>,
}

impl SerialDevice {
    /// A UART writing to `out` and interrupting through line 0 of `irqs`.
    pub fn new(irqs: Interrupts, out: ConsoleOut) -> Self {
        SerialDevice {
            uart: Serial::new(Irq(irqs), out),
        }
    }

    /// Feeds console input; returns how many bytes the receive FIFO took.
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl EmulatedDevice for SerialDevice {
    fn read(&mut self, _space: Space, _window: usize, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, _space: Space, _window: usize, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, v) {
                tracing::warn!("uart write: {e}");
            }
        }
    }

    fn reset(&mut self) {
        let irqs = self.uart.interrupt_evt().0.clone();
        let out = std::mem::replace(self.uart.writer_mut(), ConsoleOut::Stdout);
        self.uart = Serial::new(Irq(irqs), out);
    }

    /// The registers (9 bytes, vm-superio's `SerialState` order) then the receive FIFO.
    fn snapshot(&self) -> Option<Vec<u8>> {
        let s = self.uart.state();
        let mut v = vec![
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ];
        v.extend_from_slice(&s.in_buffer);
        Some(v)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        let (regs, fifo) = state
            .split_first_chunk::<9>()
            .ok_or_else(|| format!("serial state is {} bytes, at least 9 expected", state.len()))?;
        let s = SerialState {
            baud_divisor_low: regs[0],
            baud_divisor_high: regs[1],
            interrupt_enable: regs[2],
            interrupt_identification: regs[3],
            line_control: regs[4],
            line_status: regs[5],
            modem_control: regs[6],
            modem_status: regs[7],
            scratch: regs[8],
            in_buffer: fifo.to_vec(),
        };
        if s.in_buffer.len() > RX_FIFO {
            return Err(format!(
                "serial state has {} FIFO bytes (max {RX_FIFO})",
                s.in_buffer.len()
            ));
        }
        let irqs = self.uart.interrupt_evt().0.clone();
        let out = std::mem::replace(self.uart.writer_mut(), ConsoleOut::Stdout);
        // The only other failure is the trigger's, and raising a line cannot fail.
        self.uart = match Serial::from_state(&s, Irq(irqs), NoEvents, out) {
            Ok(u) => u,
            Err(e) => return Err(format!("serial state rejected: {e:?}")),
        };
        Ok(())
    }
}

/// What `rqemu-serial` claims: 8 ports at `base`, one edge line preferring `gsi`.
pub fn device_info(base: u16, gsi: u32) -> DeviceInfo {
    DeviceInfo {
        class: DeviceClass::Serial,
        name: "rqemu-serial".into(),
        // Register writes return nothing to the vCPU: they may be posted (order is kept).
        windows: vec![Window {
            space: Space::Pio,
            base: base.into(),
            size: 8,
            flags: WINDOW_POSTED,
        }],
        irqs: vec![IrqRequest {
            trigger: Trigger::Edge,
            gsi_hint: Some(gsi),
        }],
        features: FEATURE_RING | FEATURE_POSTED | FEATURE_SNAPSHOT,
    }
}

fn pump(dev: &Mutex<SerialDevice>, mut src: impl Read) {
    let mut buf = [0u8; 64];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let took = dev.lock().unwrap_or_else(|e| e.into_inner()).input(rest);
            rest = &rest[took..];
            if took == 0 {
                // FIFO full: the guest is not reading; wait for it.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// An opened console: output, the socket console's listener, its attached client.
pub type Console = (
    ConsoleOut,
    Option<UnixListener>,
    Arc<Mutex<Option<UnixStream>>>,
);

/// Opens the console output; for inputs call [`spawn_input`] once the device exists.
pub fn open_console(spec: &ConsoleSpec) -> Result<Console, ConsoleError> {
    let client = Arc::new(Mutex::new(None));
    Ok(match spec {
        ConsoleSpec::Stdio => (ConsoleOut::Stdout, None, client),
        ConsoleSpec::File(p) => {
            let f = File::options()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| ConsoleError::Open(p.clone(), e))?;
            (ConsoleOut::File(f), None, client)
        }
        ConsoleSpec::Socket(p) => {
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p).map_err(|e| ConsoleError::Open(p.clone(), e))?;
            (ConsoleOut::Socket(client.clone()), Some(l), client)
        }
    })
}

/// Starts the console input thread(s).
pub fn spawn_input(
    spec: &ConsoleSpec,
    dev: Arc<Mutex<SerialDevice>>,
    listener: Option<UnixListener>,
    client: Arc<Mutex<Option<UnixStream>>>,
) -> io::Result<()> {
    match (spec, listener) {
        (ConsoleSpec::Stdio, _) => {
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || pump(&dev, io::stdin()))?;
        }
        (ConsoleSpec::Socket(_), Some(l)) => {
            std::thread::Builder::new()
                .name("console".into())
                .spawn(move || {
                    for s in l.incoming().flatten() {
                        let Ok(reader) = s.try_clone() else { continue };
                        *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
                        tracing::info!("console attached");
                        pump(&dev, reader);
                        tracing::info!("console detached");
                    }
                })?;
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_specs_parse() {
        assert_eq!("stdio".parse::<ConsoleSpec>().unwrap(), ConsoleSpec::Stdio);
        assert_eq!(
            "file:/x".parse::<ConsoleSpec>().unwrap(),
            ConsoleSpec::File("/x".into())
        );
        assert_eq!(
            "socket:/s".parse::<ConsoleSpec>().unwrap(),
            ConsoleSpec::Socket("/s".into())
        );
        assert!("tcp:1".parse::<ConsoleSpec>().is_err());
    }

    #[test]
    fn snapshot_restores_registers_and_fifo_into_a_fresh_uart() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out");
        let (out, _, _) = open_console(&ConsoleSpec::File(p.clone())).unwrap();
        let mut a = SerialDevice::new(Interrupts::new(1), out);
        a.write(Space::Pio, 0, 3, &[0x03]); // LCR: 8N1
        a.write(Space::Pio, 0, 7, &[0x5a]); // scratch
        a.write(Space::Pio, 0, 1, &[0x01]); // IER: RX data
        assert_eq!(a.input(b"xy"), 2);
        let state = a.snapshot().unwrap();

        let (out, _, _) = open_console(&ConsoleSpec::File(p.clone())).unwrap();
        let mut b = SerialDevice::new(Interrupts::new(1), out);
        let reg = |d: &mut SerialDevice, off| {
            let mut v = [0u8];
            d.read(Space::Pio, 0, off, &mut v);
            v[0]
        };
        assert_eq!(reg(&mut b, 7), 0, "a fresh UART");
        b.restore(&state).unwrap();
        assert_eq!(reg(&mut b, 3), 0x03);
        assert_eq!(reg(&mut b, 7), 0x5a);
        assert_eq!(reg(&mut b, 1), 0x01);
        assert_eq!(reg(&mut b, 0), b'x', "the receive FIFO came along");
        assert_eq!(reg(&mut b, 0), b'y');
        // The console is still the same one.
        b.write(Space::Pio, 0, 0, b"!");
        assert_eq!(std::fs::read(&p).unwrap(), b"!");

        assert!(b.restore(&state[..5]).is_err(), "short state");
        let mut huge = state[..9].to_vec();
        huge.extend(std::iter::repeat_n(0u8, 65));
        assert!(b.restore(&huge).is_err(), "FIFO larger than the UART's");
        assert_eq!(reg(&mut b, 7), 0x5a, "a refused state changes nothing");
    }

    #[test]
    fn uart_registers_and_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out");
        let (out, _, _) = open_console(&ConsoleSpec::File(p.clone())).unwrap();
        let mut d = SerialDevice::new(Interrupts::new(1), out);
        for &b in b"hi" {
            d.write(Space::Pio, 0, 0, &[b]);
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"hi");
        let mut lsr = [0u8];
        d.read(Space::Pio, 0, 5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "THR empty, transmitter empty");
        assert_eq!(d.input(b"ok"), 2);
        d.read(Space::Pio, 0, 5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut c = [0u8];
        d.read(Space::Pio, 0, 0, &mut c);
        assert_eq!(c[0], b'o');
        // Offsets beyond a byte are ignored, not truncated onto a register.
        d.write(Space::Pio, 0, 0x100, b"X");
        d.reset();
        d.read(Space::Pio, 0, 5, &mut lsr);
        assert_eq!(lsr[0] & 1, 0, "reset empties the FIFO");
        assert_eq!(std::fs::read(&p).unwrap(), b"hi");
    }
}
