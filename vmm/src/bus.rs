//! A range-map bus for port I/O and MMIO: `BTreeMap<base, (len, device)>`, looked up with
//! one `range(..=addr).next_back()` per access (no allocation on the access path).
//!
//! Devices implement the small [`BusDevice`] trait; the same bus serves KVM exits and the
//! future TCG CPU. Writes can also be bound to an eventfd ("ioevent") for accelerators that
//! cannot do it in the kernel: see [`Bus::add_ioevent`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use vmm_sys_util::eventfd::EventFd;

/// A device on a bus. `offset` is relative to the base of the range it was inserted at.
pub trait BusDevice: Send {
    /// Handles a read of `data.len()` bytes; fill `data` (it is pre-filled with zeros).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from bus configuration.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps an existing one.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// Zero-length or wrapping range.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// Shared handle to a bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Entry {
    len: u64,
    device: SharedDevice,
}

struct IoEvent {
    addr: u64,
    datamatch: Option<u64>,
    fd: EventFd,
}

/// A bus of address ranges.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, Entry>>,
    ioevents: RwLock<Vec<IoEvent>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.devices.read().map(|d| d.len()).unwrap_or(0);
        f.debug_struct("Bus").field("devices", &n).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `device` at `[base, base + len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        if let Some((b, e)) = map.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        map.insert(base, Entry { len, device });
        Ok(())
    }

    /// The occupied ranges `(base, len)`, in address order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(&b, e)| (b, e.len)).collect()
    }

    /// Removes the device inserted at exactly `base`; returns it.
    pub fn remove(&self, base: u64) -> Option<SharedDevice> {
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&base).map(|e| e.device)
    }

    /// Finds the device covering `[addr, addr + size)`: `(device, offset)`.
    fn lookup(&self, addr: u64, size: usize) -> Option<(SharedDevice, u64)> {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (base, entry) = map.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        if end <= entry.len {
            Some((entry.device.clone(), offset))
        } else {
            None
        }
    }

    /// Dispatches a read; returns false (and fills `data` with ones) if nothing is mapped.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr, data.len()) {
            Some((dev, offset)) => {
                data.fill(0);
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false if nothing (device or ioevent) took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        if self.signal_ioevent(addr, data) {
            return true;
        }
        match self.lookup(addr, data.len()) {
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }

    /// Binds writes to `addr` (optionally only of value `datamatch`) to `fd`: the bus signals
    /// the eventfd instead of calling the device. This is what KVM's ioeventfd does in the
    /// kernel; accelerators without it (TCG) rely on this.
    pub fn add_ioevent(&self, addr: u64, datamatch: Option<u64>, fd: EventFd) {
        let mut v = self.ioevents.write().unwrap_or_else(|e| e.into_inner());
        v.push(IoEvent {
            addr,
            datamatch,
            fd,
        });
    }

    /// Removes the ioevent binding(s) for `addr`/`datamatch`.
    pub fn remove_ioevent(&self, addr: u64, datamatch: Option<u64>) {
        let mut v = self.ioevents.write().unwrap_or_else(|e| e.into_inner());
        v.retain(|e| !(e.addr == addr && e.datamatch == datamatch));
    }

    fn signal_ioevent(&self, addr: u64, data: &[u8]) -> bool {
        let v = self.ioevents.read().unwrap_or_else(|e| e.into_inner());
        if v.is_empty() {
            return false;
        }
        let mut value = [0u8; 8];
        let n = data.len().min(8);
        value[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(value);
        let mut hit = false;
        for e in v.iter() {
            if e.addr == addr && e.datamatch.is_none_or(|m| m == value) {
                // A full eventfd counter only means a kick is already pending.
                let _ = e.fd.write(1);
                hit = true;
            }
        }
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
        tag: u8,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.tag.wrapping_add(offset as u8).wrapping_add(i as u8);
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder {
            tag: 0x10,
            ..Default::default()
        }));
        let b = Arc::new(Mutex::new(Recorder {
            tag: 0x80,
            ..Default::default()
        }));
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        bus.insert(b.clone(), 0x110, 0x10).unwrap();
        let mut d = [0u8; 2];
        assert!(bus.read(0x105, &mut d));
        assert_eq!(d, [0x15, 0x16]);
        assert!(bus.read(0x110, &mut d));
        assert_eq!(d, [0x80, 0x81]);
        assert!(bus.write(0x11f, &[7]));
        assert_eq!(b.lock().unwrap().last_write, Some((0xf, vec![7])));
        assert!(a.lock().unwrap().last_write.is_none());
    }

    #[test]
    fn unmapped_and_straddling_accesses_miss() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 0x10)
            .unwrap();
        let mut d = [0u8; 4];
        assert!(!bus.read(0xff, &mut d));
        assert_eq!(d, [0xff; 4]);
        assert!(!bus.read(0x10e, &mut d), "straddles the end");
        assert!(!bus.write(0x110, &[1]));
        assert!(!bus.read(u64::MAX, &mut d));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let bus = Bus::new();
        let dev = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert!(bus.insert(dev(), 0x10f, 1).is_err());
        assert!(bus.insert(dev(), 0xf0, 0x11).is_err());
        assert!(bus.insert(dev(), 0x0, 0x1000).is_err());
        assert!(bus.insert(dev(), 0x200, 0).is_err());
        assert!(bus.insert(dev(), u64::MAX, 2).is_err());
        bus.insert(dev(), 0xf0, 0x10).unwrap();
        bus.insert(dev(), 0x110, 0x10).unwrap();
        assert!(bus.remove(0x100).is_some());
        bus.insert(dev(), 0x100, 0x10).unwrap();
    }

    #[test]
    fn ioevent_signals_instead_of_device() {
        let bus = Bus::new();
        let rec = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(rec.clone(), 0x1000, 0x100).unwrap();
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        bus.add_ioevent(0x1050, Some(3), fd.try_clone().unwrap());
        assert!(bus.write(0x1050, &3u32.to_le_bytes()));
        assert_eq!(fd.read().unwrap(), 1);
        assert!(rec.lock().unwrap().last_write.is_none());
        // Other values reach the device.
        assert!(bus.write(0x1050, &2u32.to_le_bytes()));
        assert!(rec.lock().unwrap().last_write.is_some());
        assert!(fd.read().is_err(), "no second signal");
        bus.remove_ioevent(0x1050, Some(3));
        rec.lock().unwrap().last_write = None;
        assert!(bus.write(0x1050, &3u32.to_le_bytes()));
        assert!(rec.lock().unwrap().last_write.is_some());
    }
}
