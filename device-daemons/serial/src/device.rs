//! `rqemu-serial`'s device: the 16550 UART of `rqemu-emulated-backend` as an
//! [`EmulatedDevice`], interrupting through line 0 of the protocol.

use rqemu_emulated_backend::uart16550::{IrqLine, Uart16550, REGISTERS};
use rqemu_protocol::handshake::{FEATURE_POSTED, FEATURE_RING, FEATURE_SNAPSHOT, WINDOW_POSTED};
use rqemu_protocol::{
    DeviceClass, DeviceInfo, EmulatedDevice, Interrupts, IrqRequest, Space, Trigger, Window,
};

use crate::console::{ConsoleInput, ConsoleOut};

/// Raises the UART's interrupt line (edge) through the protocol.
#[derive(Debug)]
pub struct Irq(pub Interrupts);

impl IrqLine for Irq {
    fn raise(&self) {
        self.0.raise(0);
    }
}

/// The UART served over the forwarding protocol (one window: its 8 registers).
#[derive(Debug)]
pub struct SerialDevice(Uart16550<Irq, ConsoleOut>);

impl SerialDevice {
    /// A UART writing to `out` and interrupting through line 0 of `irqs`.
    pub fn new(irqs: Interrupts, out: ConsoleOut) -> Self {
        SerialDevice(Uart16550::new(Irq(irqs), out))
    }
}

impl ConsoleInput for SerialDevice {
    /// Feeds console input; returns how many bytes the receive FIFO took.
    fn input(&mut self, bytes: &[u8]) -> usize {
        self.0.input(bytes)
    }
}

impl EmulatedDevice for SerialDevice {
    fn read(&mut self, _space: Space, _window: usize, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn write(&mut self, _space: Space, _window: usize, offset: u64, data: &[u8]) {
        if let Err(e) = self.0.write(offset, data) {
            tracing::warn!("uart write: {e}");
        }
    }

    fn reset(&mut self) {
        self.0.reset();
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        Some(self.0.snapshot())
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        self.0.restore(state).map_err(|e| e.to_string())
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
            size: REGISTERS,
            flags: WINDOW_POSTED,
        }],
        irqs: vec![IrqRequest {
            trigger: Trigger::Edge,
            gsi_hint: Some(gsi),
        }],
        features: FEATURE_RING | FEATURE_POSTED | FEATURE_SNAPSHOT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::{open_console, ConsoleSpec};

    fn reg(d: &mut SerialDevice, off: u64) -> u8 {
        let mut v = [0u8];
        d.read(Space::Pio, 0, off, &mut v);
        v[0]
    }

    #[test]
    fn registers_snapshot_and_reset_through_the_protocol_trait() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out");
        let (out, _, _) = open_console(&ConsoleSpec::File(p.clone())).unwrap();
        let mut a = SerialDevice::new(Interrupts::new(1), out);
        for &b in b"hi" {
            a.write(Space::Pio, 0, 0, &[b]);
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"hi");
        a.write(Space::Pio, 0, 7, &[0x5a]); // scratch
        assert_eq!(a.input(b"xy"), 2);
        let state = EmulatedDevice::snapshot(&a).unwrap();

        let (out, _, _) = open_console(&ConsoleSpec::File(p.clone())).unwrap();
        let mut b = SerialDevice::new(Interrupts::new(1), out);
        b.restore(&state).unwrap();
        assert_eq!(reg(&mut b, 7), 0x5a);
        assert_eq!(reg(&mut b, 0), b'x', "the receive FIFO came along");
        let e = b.restore(&state[..5]).unwrap_err();
        assert!(e.contains("at least 9"), "{e}");

        b.reset();
        assert_eq!(reg(&mut b, 5) & 1, 0, "reset empties the FIFO");
        b.write(Space::Pio, 0, 0, b"!");
        assert_eq!(
            std::fs::read(&p).unwrap(),
            b"hi!",
            "same console after a reset"
        );
    }

    #[test]
    fn claims_eight_posted_ports_one_edge_line_and_snapshots() {
        let i = device_info(0x2f8, 3);
        assert_eq!(i.windows.len(), 1);
        assert_eq!((i.windows[0].base, i.windows[0].size), (0x2f8, 8));
        assert_eq!(i.irqs.len(), 1);
        assert_eq!(i.irqs[0].gsi_hint, Some(3));
        assert_eq!(i.irqs[0].trigger, Trigger::Edge);
        assert_ne!(i.features & FEATURE_SNAPSHOT, 0);
    }
}
