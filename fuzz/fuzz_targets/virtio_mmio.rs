//! Fuzzes the VMM's virtio-mmio register file (`rqemu_vmm::virtio::mmio::MmioTransport`) with
//! guest register reads and writes against a stand-in device that checks what the transport
//! hands it (a queue is activated only with a valid size, features only as offered).
//!
//! Input: 8-byte accesses: `kind` (bit 0: write), offset (u16 LE, within the 0x200-byte
//! window), size selector (1, 2, 4, 8 bytes), value (u32 LE; 8-byte writes repeat it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rqemu_vmm::bus::BusDevice;
use rqemu_vmm::virtio::mmio::{reg, MmioTransport};
use rqemu_vmm::virtio::{QueueConfig, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};
use vmm_sys_util::eventfd::EventFd;

const MAX_SIZES: [u16; 2] = [256, 64];
const FEATURES: u64 = (1 << 28) | (1 << 29) | (1 << 9);

/// A device with two queues and a 16-byte config space.
struct Dummy {
    config: [u8; 16],
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &MAX_SIZES
    }
    fn device_features(&self) -> u64 {
        FEATURES
    }
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(src) = start
            .checked_add(data.len())
            .and_then(|end| self.config.get(start..end))
        {
            data.copy_from_slice(src);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(dst) = start
            .checked_add(data.len())
            .and_then(|end| self.config.get_mut(start..end))
        {
            dst.copy_from_slice(data);
        }
    }
    fn activate(
        &mut self,
        features: u64,
        queues: &[(usize, QueueConfig, &EventFd, &EventFd)],
    ) -> Result<(), VirtioError> {
        assert_eq!(
            features & !(FEATURES | VIRTIO_F_VERSION_1),
            0,
            "features not offered: {features:#x}"
        );
        assert!(features & VIRTIO_F_VERSION_1 != 0);
        assert!(!queues.is_empty());
        for (i, q, _, _) in queues {
            let max = MAX_SIZES.get(*i).copied().expect("a queue the device has");
            assert!(
                q.size != 0 && q.size <= max && q.size.is_power_of_two(),
                "queue {i} activated with size {}",
                q.size
            );
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.config = [0; 16];
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut t) = MmioTransport::new(Box::new(Dummy { config: [0; 16] })) else {
        return;
    };
    for op in data.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) % 0x200);
        let len = [1usize, 2, 4, 8][usize::from(op[3] & 3)];
        let v = [op[4], op[5], op[6], op[7]];
        let mut buf = [v[0], v[1], v[2], v[3], v[0], v[1], v[2], v[3]];
        if op[0] & 1 == 1 {
            t.write(offset, &buf[..len]);
        } else {
            t.read(offset, &mut buf[..len]);
        }
        let mut magic = [0u8; 4];
        t.read(reg::MAGIC, &mut magic);
        assert_eq!(&magic, b"virt");
    }
});
