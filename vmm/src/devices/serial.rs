//! COM1: the 16550 UART of `rqemu-emulated-backend` (the one `rqemu-serial` serves) on the PIO
//! bus. Its interrupt is an eventfd, bound by the accelerator to GSI 4 (KVM: irqfd; TCG: a
//! poller raising the GSI). Output goes to stdout, a file or nowhere; with stdio, a thread
//! feeds stdin into the receive FIFO.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rqemu_emulated_backend::uart16550::{IrqLine, Uart16550};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::exit::ExitRequester;

/// Where the guest's serial output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's stdout (and stdin as input).
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    None,
}

/// Errors from setting up the serial port.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Opening the output file failed.
    #[error("opening serial output {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Creating the interrupt eventfd failed.
    #[error("creating the serial interrupt eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// The interrupt line of the UART: signals an eventfd.
#[derive(Debug)]
pub struct EventFdLine(EventFd);

impl IrqLine for EventFdLine {
    fn raise(&self) {
        // Fails only if the counter would overflow: the line is raised already.
        let _ = self.0.write(1);
    }
}

/// The COM1 device (insert at 0x3f8, length 8).
#[derive(Debug)]
pub struct SerialDevice {
    uart: Uart16550<EventFdLine, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// Creates the UART; returns it with a clone of its interrupt eventfd (to bind to GSI 4).
    pub fn new(output: &SerialOutput) -> Result<(Self, EventFd), SerialError> {
        let out: Box<dyn Write + Send> = match output {
            SerialOutput::Stdio => Box::new(io::stdout()),
            SerialOutput::File(path) => Box::new(
                File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| SerialError::Open {
                        path: path.clone(),
                        source,
                    })?,
            ),
            SerialOutput::None => Box::new(io::sink()),
        };
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let irq = evt.try_clone().map_err(SerialError::EventFd)?;
        // The UART flushes its output after every byte.
        let uart = Uart16550::new(EventFdLine(evt), out);
        Ok((SerialDevice { uart }, irq))
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.input(bytes)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.uart.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Output errors (closed stdout) must not stop the guest.
        let _ = self.uart.write(offset, data);
    }
}

/// Spawns the thread that copies stdin into the UART until `exit` says stop.
/// It polls with a timeout so it can be joined.
pub fn spawn_stdin_reader(
    serial: Arc<Mutex<SerialDevice>>,
    exit: ExitRequester,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("serial-stdin".into())
        .spawn(move || {
            crate::sandbox::confine_current(crate::sandbox::VmmThread::StdinReader);
            let stdin = io::stdin();
            let fd = stdin.as_raw_fd();
            let mut buf = [0u8; 64];
            let (mut head, mut tail) = (0usize, 0usize);
            while !exit.should_stop() {
                if head < tail {
                    let n = serial
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue_input(&buf[head..tail]);
                    head += n;
                    if head < tail {
                        // FIFO full: let the guest drain it.
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    continue;
                }
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: `pfd` is a valid pollfd array of length 1 for the call's duration.
                let r = unsafe { libc::poll(&mut pfd, 1, 100) };
                if r <= 0 {
                    continue;
                }
                match stdin.lock().read(&mut buf) {
                    Ok(0) | Err(_) => break, // EOF: no more input
                    Ok(n) => (head, tail) = (0, n),
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_goes_to_file_and_thr_empty_interrupt_fires() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        let (mut dev, irq) = SerialDevice::new(&SerialOutput::File(path.clone())).unwrap();
        dev.write(1, &[0x02]); // IER: THR empty interrupt
        dev.write(0, b"h");
        dev.write(0, b"i");
        assert_eq!(std::fs::read(&path).unwrap(), b"hi");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn input_is_readable_from_rbr() {
        let (mut dev, _irq) = SerialDevice::new(&SerialOutput::None).unwrap();
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        let mut lsr = [0];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'a');
        dev.read(0x100, &mut b);
    }
}
