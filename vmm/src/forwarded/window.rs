//! The bus device of one granted window: every access goes to the daemon through the link's
//! current connection, on the ring of the vCPU making it.

use std::sync::Arc;

use rqemu_protocol::Space;

use super::{current_vcpu, Link};
use crate::bus::BusDevice;

/// One window of a forwarded device on the PIO or MMIO bus.
#[derive(Debug)]
pub struct WindowDevice {
    link: Arc<Link>,
    space: Space,
    base: u64,
}

impl WindowDevice {
    /// The window at `base` in `space` of `link`.
    pub fn new(link: Arc<Link>, space: Space, base: u64) -> Self {
        WindowDevice { link, space, base }
    }
}

impl BusDevice for WindowDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let h = self.link.handle.read().unwrap_or_else(|e| e.into_inner());
        // Failures are logged by the handle and read as all ones.
        let _ = h.read(current_vcpu(), self.space, self.base + offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let h = self.link.handle.read().unwrap_or_else(|e| e.into_inner());
        // Failures are logged by the handle; the write is dropped.
        let _ = h.write(current_vcpu(), self.space, self.base + offset, data);
    }
}
