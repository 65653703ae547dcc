//! A 16550A UART (8 registers; `vm-superio`'s register model), transport-free: the guest's
//! output goes to any [`Write`], the interrupt output to an [`IrqLine`], console input comes
//! in through [`Uart16550::input`]. The in-VMM COM1 puts it on the VMM's bus; `rqemu-serial`
//! serves it over the forwarding protocol.
//!
//! Interrupts follow a real UART's level signal as edges: (re-)enabling an interrupt whose
//! condition is pending raises the line at once (the transmitter is always empty, so enabling
//! THRE interrupts raises it; so does enabling RX interrupts with data in the FIFO), and so
//! does every transmitted byte while THRE interrupts are enabled.
//!
//! State ([`Uart16550::snapshot`]): the 9 registers in `vm-superio`'s `SerialState` order
//! (divisor low, divisor high, IER, IIR, LCR, LSR, MCR, MSR, scratch), then the receive FIFO.

use std::convert::Infallible;
use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// Size of the receive FIFO.
pub const RX_FIFO: usize = 64;
/// Number of registers (the window's size in port space).
pub const REGISTERS: u64 = 8;
/// Bytes of registers at the start of a state blob.
const STATE_REGS: usize = 9;

/// Errors of the UART.
#[derive(Debug, thiserror::Error)]
pub enum UartError {
    /// Writing the guest's output failed (the byte is lost; the UART goes on).
    #[error("writing the serial output: {0}")]
    Output(#[source] io::Error),
    /// A state blob shorter than the registers.
    #[error("serial state is {0} bytes, at least {STATE_REGS} expected")]
    StateTooShort(usize),
    /// A state blob whose FIFO is larger than the UART's.
    #[error("serial state has {0} FIFO bytes (max {RX_FIFO})")]
    FifoTooLarge(usize),
}

/// The UART's interrupt output (an edge-triggered line): how the host raises it is the
/// user's business (an irqfd eventfd in the VMM, a protocol line in `rqemu-serial`).
pub trait IrqLine {
    /// Signals one interrupt edge.
    fn raise(&self);
}

/// `vm-superio`'s trigger over an [`IrqLine`]; shared so a reset can rebuild the UART.
struct Line<I>(Arc<I>);

impl<I: IrqLine> Trigger for Line<I> {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.raise();
        Ok(())
    }
}

/// The output, movable out of a UART being rebuilt (`None` only during the rebuild).
struct Out<W>(Option<W>);

impl<W: Write> Write for Out<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            Some(w) => w.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.0 {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

/// A 16550A UART writing to `W` and interrupting through `I`.
pub struct Uart16550<I: IrqLine, W: Write> {
    uart: Serial<Line<I>, NoEvents, Out<W>>,
}

impl<I: IrqLine, W: Write> std::fmt::Debug for Uart16550<I, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uart16550")
            .field("fifo_room", &self.uart.fifo_capacity())
            .finish_non_exhaustive()
    }
}

impl<I: IrqLine, W: Write> Uart16550<I, W> {
    /// A UART in its power-on state.
    pub fn new(irq: I, out: W) -> Self {
        Uart16550 {
            uart: Serial::new(Line(Arc::new(irq)), Out(Some(out))),
        }
    }

    /// A register read at `offset` (0..8); `data` is 1 byte (more are left untouched).
    /// Offsets beyond a byte read nothing (they are not truncated onto a register).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    /// A register write at `offset` (0..8). Only an output failure is an error, and the
    /// register write has happened anyway.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), UartError> {
        let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return Ok(());
        };
        self.uart.write(off, v).map_err(|e| match e {
            vm_superio::serial::Error::IOError(e) => UartError::Output(e),
            vm_superio::serial::Error::Trigger(never) => match never {},
            // Register writes never report a full FIFO (loopback drops the byte instead).
            vm_superio::serial::Error::FullFifo => {
                UartError::Output(io::ErrorKind::WouldBlock.into())
            }
        })
    }

    /// Console input for the guest: returns how many bytes the receive FIFO took (0 when it
    /// is full, or in loopback mode).
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Free bytes in the receive FIFO.
    pub fn fifo_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Machine reset: power-on registers, empty FIFO; the output and line stay.
    pub fn reset(&mut self) {
        self.rebuild(&SerialState::default());
    }

    /// The state: see the module documentation.
    pub fn snapshot(&self) -> Vec<u8> {
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
        v
    }

    /// Loads a state from [`snapshot`](Uart16550::snapshot); a malformed one changes nothing.
    /// Interrupts pending and enabled in the state are raised again.
    pub fn restore(&mut self, state: &[u8]) -> Result<(), UartError> {
        let (regs, fifo) = state
            .split_first_chunk::<STATE_REGS>()
            .ok_or(UartError::StateTooShort(state.len()))?;
        if fifo.len() > RX_FIFO {
            return Err(UartError::FifoTooLarge(fifo.len()));
        }
        self.rebuild(&SerialState {
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
        });
        Ok(())
    }

    /// Replaces the UART by one in `state`, keeping its line and output. Callers check that
    /// `state`'s FIFO fits.
    fn rebuild(&mut self, state: &SerialState) {
        let line = Line(self.uart.interrupt_evt().0.clone());
        let out = Out(self.uart.writer_mut().0.take());
        self.uart = match Serial::from_state(state, line, NoEvents, out) {
            Ok(u) => u,
            // `from_state` fails only on a FIFO larger than the UART's (checked by the
            // callers) or a failing trigger (ours cannot fail). Were it to fail anyway, the
            // output went with it: a power-on UART writing nowhere, rather than a panic.
            Err(_) => Serial::new(Line(self.uart.interrupt_evt().0.clone()), Out(None)),
        };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;

    /// Counts interrupt edges.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl IrqLine for Arc<Count> {
        fn raise(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Output shared with the test.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (Uart16550<Arc<Count>, Sink>, Arc<Count>, Sink) {
        let (irq, out) = (Arc::new(Count::default()), Sink::default());
        (Uart16550::new(irq.clone(), out.clone()), irq, out)
    }

    fn reg<I: IrqLine, W: Write>(u: &mut Uart16550<I, W>, off: u64) -> u8 {
        let mut v = [0u8];
        u.read(off, &mut v);
        v[0]
    }

    fn edges(c: &Count) -> usize {
        c.0.load(Ordering::SeqCst)
    }

    #[test]
    fn output_and_status() {
        let (mut u, _, out) = uart();
        for &b in b"hi" {
            u.write(0, &[b]).unwrap();
        }
        assert_eq!(*out.0.lock().unwrap(), b"hi");
        assert_eq!(reg(&mut u, 5) & 0x60, 0x60, "THR empty, transmitter empty");
        // Offsets beyond a byte and empty accesses are ignored.
        u.write(0x100, b"X").unwrap();
        u.write(0, &[]).unwrap();
        let mut none = [];
        u.read(0, &mut none);
        assert_eq!(*out.0.lock().unwrap(), b"hi");
    }

    #[test]
    fn thr_empty_interrupt_on_enable_and_on_each_byte() {
        let (mut u, irq, _) = uart();
        u.write(0, b"a").unwrap();
        assert_eq!(edges(&irq), 0, "interrupts disabled");
        u.write(1, &[0x02]).unwrap(); // IER: THR empty
        assert_eq!(
            edges(&irq),
            1,
            "enabling THRE with an empty THR raises the line"
        );
        assert_eq!(reg(&mut u, 2) & 0x0f, 0x02, "IIR: THR empty");
        assert_eq!(reg(&mut u, 2) & 0x0f, 0x01, "reading IIR acknowledged it");
        u.write(0, b"b").unwrap();
        assert_eq!(edges(&irq), 2, "each transmitted byte raises it again");
    }

    #[test]
    fn input_fills_the_fifo_and_raises_rx_interrupts() {
        let (mut u, irq, _) = uart();
        u.write(1, &[0x01]).unwrap(); // IER: RX data
        assert_eq!(edges(&irq), 0);
        assert_eq!(u.input(b"ab"), 2);
        assert_eq!(edges(&irq), 1);
        assert_eq!(reg(&mut u, 5) & 1, 1, "data ready");
        assert_eq!(reg(&mut u, 0), b'a');
        assert_eq!(reg(&mut u, 0), b'b');
        assert_eq!(reg(&mut u, 5) & 1, 0, "FIFO drained");
        // More than fits: the FIFO takes what it can, then nothing.
        assert_eq!(u.input(&[b'x'; 100]), RX_FIFO);
        assert_eq!(u.fifo_room(), 0);
        assert_eq!(u.input(b"y"), 0);
        // Re-enabling RX interrupts with data pending raises the line again, even once the
        // guest acknowledged the interrupt (IIR read).
        assert_eq!(reg(&mut u, 2) & 0x0f, 0x04, "IIR: RX data");
        let before = edges(&irq);
        u.write(1, &[0x00]).unwrap();
        u.write(1, &[0x01]).unwrap();
        assert!(edges(&irq) > before);
    }

    #[test]
    fn output_errors_are_reported_and_the_uart_goes_on() {
        let mut u = Uart16550::new(Arc::new(Count::default()), Broken);
        assert!(matches!(u.write(0, b"x"), Err(UartError::Output(_))));
        u.write(7, &[0x33]).unwrap();
        assert_eq!(reg(&mut u, 7), 0x33);
    }

    #[test]
    fn snapshot_restores_registers_and_fifo_into_a_fresh_uart() {
        let (mut a, _, out) = uart();
        a.write(3, &[0x03]).unwrap(); // LCR: 8N1
        a.write(7, &[0x5a]).unwrap(); // scratch
        a.write(1, &[0x01]).unwrap(); // IER: RX data
        assert_eq!(a.input(b"xy"), 2);
        let state = a.snapshot();
        assert_eq!(state.len(), 9 + 2);

        let irq = Arc::new(Count::default());
        let mut b = Uart16550::new(irq.clone(), out.clone());
        assert_eq!(reg(&mut b, 7), 0, "a fresh UART");
        b.restore(&state).unwrap();
        assert_eq!(edges(&irq), 1, "the pending RX interrupt is raised again");
        assert_eq!(reg(&mut b, 3), 0x03);
        assert_eq!(reg(&mut b, 7), 0x5a);
        assert_eq!(reg(&mut b, 1), 0x01);
        assert_eq!(reg(&mut b, 0), b'x', "the receive FIFO came along");
        assert_eq!(reg(&mut b, 0), b'y');
        b.write(0, b"!").unwrap();
        assert_eq!(
            *out.0.lock().unwrap(),
            b"!",
            "the output is still the same one"
        );

        assert!(matches!(
            b.restore(&state[..5]),
            Err(UartError::StateTooShort(5))
        ));
        let mut huge = state[..9].to_vec();
        huge.extend(std::iter::repeat_n(0u8, RX_FIFO + 1));
        assert!(matches!(b.restore(&huge), Err(UartError::FifoTooLarge(65))));
        assert_eq!(reg(&mut b, 7), 0x5a, "a refused state changes nothing");
    }

    #[test]
    fn reset_empties_the_fifo_and_keeps_output_and_line() {
        let (mut u, irq, out) = uart();
        u.write(7, &[0x12]).unwrap();
        assert_eq!(u.input(b"ok"), 2);
        u.reset();
        assert_eq!(reg(&mut u, 5) & 1, 0, "reset empties the FIFO");
        assert_eq!(reg(&mut u, 7), 0, "and clears the registers");
        u.write(0, b"z").unwrap();
        assert_eq!(*out.0.lock().unwrap(), b"z");
        u.write(1, &[0x02]).unwrap();
        assert_eq!(edges(&irq), 1, "the line is still connected");
    }
}
