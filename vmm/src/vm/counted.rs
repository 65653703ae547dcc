//! Per-device access counters seen from the VMM's side (`vm.counters`): a bus device wrapper
//! that counts the guest's register reads and writes that reach it (KVM ioeventfd notifies
//! and irqfd interrupts bypass the bus and are not counted).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;

/// Counters of one device.
#[derive(Debug, Default)]
pub(super) struct AccessCounts {
    reads: AtomicU64,
    writes: AtomicU64,
}

impl AccessCounts {
    /// `(reads, writes)`.
    pub(super) fn get(&self) -> (u64, u64) {
        (
            self.reads.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
        )
    }
}

/// `inner`, counting every access.
pub(super) struct Counted<D> {
    inner: D,
    counts: Arc<AccessCounts>,
}

impl<D> Counted<D> {
    /// Wraps `inner`; the counts are shared with `counts`.
    pub(super) fn new(inner: D, counts: Arc<AccessCounts>) -> Self {
        Counted { inner, counts }
    }
}

impl<D: BusDevice> BusDevice for Counted<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.counts.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.counts.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.write(offset, data);
    }
}

/// A device also used outside the bus (the in-VMM COM1 and its stdin reader).
pub(super) struct Shared<D>(pub(super) Arc<Mutex<D>>);

impl<D: BusDevice> BusDevice for Shared<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn counts_reads_and_writes_and_passes_them_through() {
        let counts = Arc::new(AccessCounts::default());
        let inner = Arc::new(Mutex::new(Echo(1)));
        let mut dev = Counted::new(Shared(inner.clone()), counts.clone());
        let mut b = [0u8; 2];
        dev.read(0, &mut b);
        assert_eq!(b, [1, 1]);
        dev.write(0, &[7]);
        dev.read(0, &mut b);
        assert_eq!(b, [7, 7]);
        assert_eq!(inner.lock().unwrap().0, 7);
        assert_eq!(counts.get(), (2, 1));
    }
}
