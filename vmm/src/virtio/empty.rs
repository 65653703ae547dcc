//! An empty virtio-mmio window: magic "virt", version 2, DeviceID 0 ("no device"), like
//! QEMU's microvm transports without a backend. Linux's virtio-mmio driver skips such
//! windows quietly, so every window the DSDT declares is safe to probe.

use crate::bus::BusDevice;

/// "virt" in little endian.
pub const VIRTIO_MMIO_MAGIC: u32 = 0x7472_6976;
/// Vendor ID reported by rqemu transports ("RQMU").
pub const VIRTIO_VENDOR_ID: u32 = 0x554d_5152;

/// The empty transport.
#[derive(Debug, Default)]
pub struct EmptyVirtioMmio;

impl BusDevice for EmptyVirtioMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v: u32 = match offset {
            0x000 => VIRTIO_MMIO_MAGIC,
            0x004 => 2,
            0x008 => 0,
            0x00c => VIRTIO_VENDOR_ID,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}
