//! virtio-mmio version 2 transport (virtio 1.x spec, section 4.2.2).

use vmm_sys_util::eventfd::EventFd;

use super::empty::{VIRTIO_MMIO_MAGIC, VIRTIO_VENDOR_ID};
use super::{QueueConfig, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// Register offsets.
pub mod reg {
    /// "virt".
    pub const MAGIC: u64 = 0x000;
    /// Transport version (2).
    pub const VERSION: u64 = 0x004;
    /// Device ID.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor ID.
    pub const VENDOR_ID: u64 = 0x00c;
    /// Device features (32-bit word selected by `DEVICE_FEATURES_SEL`).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Device features word selector.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Driver features (word selected by `DRIVER_FEATURES_SEL`).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Driver features word selector.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Queue selector.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Maximum size of the selected queue.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Selected queue ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notifier (value = queue index).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Interrupt status.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Interrupt acknowledge.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Driver (avail) ring address, low.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// Driver (avail) ring address, high.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Device (used) ring address, low.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// Device (used) ring address, high.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Shared memory region selector.
    pub const SHM_SEL: u64 = 0x0ac;
    /// Length of the selected shared memory region, low 32 bits.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Length of the selected shared memory region, high 32 bits.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Base of the selected shared memory region, low 32 bits.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// Base of the selected shared memory region, high 32 bits.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// Config generation counter.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of device config space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    /// Guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// Guest has a driver.
    pub const DRIVER: u32 = 2;
    /// Driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

const INT_VRING: u32 = 1;

#[derive(Debug, Default, Clone, Copy)]
struct Queue {
    max: u16,
    cfg: QueueConfig,
    ready: bool,
}

/// The transport, inserted on the MMIO bus at a virtio-mmio window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    config_generation: u32,
    live: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

fn set_low(v: &mut u64, lo: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(lo);
}

fn set_high(v: &mut u64, hi: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(hi) << 32);
}

impl MmioTransport {
    /// Wraps `device`; creates one kick and one call eventfd per queue.
    pub fn new(device: Box<dyn VirtioDevice>) -> Result<Self, VirtioError> {
        let queues: Vec<Queue> = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue {
                max,
                ..Default::default()
            })
            .collect();
        let mk = || EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventFd);
        let kicks = queues.iter().map(|_| mk()).collect::<Result<Vec<_>, _>>()?;
        let calls = queues.iter().map(|_| mk()).collect::<Result<Vec<_>, _>>()?;
        let mut device = device;
        device.set_notifiers(&kicks, &calls)?;
        Ok(MmioTransport {
            device,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            kicks,
            calls,
            config_generation: 0,
            live: false,
        })
    }

    /// Kick eventfd of each queue (bind to an ioevent at `base + QUEUE_NOTIFY`, datamatch =
    /// queue index).
    pub fn kick_fds(&self) -> &[EventFd] {
        &self.kicks
    }

    /// Call eventfd of each queue (bind to an irqfd on the window's GSI).
    pub fn call_fds(&self) -> &[EventFd] {
        &self.calls
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => VIRTIO_MMIO_MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VIRTIO_VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let f = self.device.device_features() | VIRTIO_F_VERSION_1;
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.queue().map_or(0, |q| u32::from(q.max)),
            reg::QUEUE_READY => self.queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => u32::from(self.live) * INT_VRING,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            // No shared memory regions (no DAX window): the spec's "no such region" is a
            // length and base of all ones. Zero would announce an empty region at address 0,
            // which virtiofs then fails to reserve.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let configurable = self.status & status::DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features, v),
                    1 => set_high(&mut self.driver_features, v),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM if configurable => {
                if let Some(q) = self.queue() {
                    // Sizes must be powers of two not above the maximum (split rings).
                    if v != 0 && v <= u32::from(q.max) && v.is_power_of_two() {
                        q.cfg.size = v as u16;
                    }
                }
            }
            reg::QUEUE_READY if configurable => {
                if let Some(q) = self.queue() {
                    q.ready = v == 1 && q.cfg.size != 0;
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
                if configurable =>
            {
                if let Some(q) = self.queue() {
                    let high = offset & 4 != 0;
                    let field = match offset & !4 {
                        reg::QUEUE_DESC_LOW => &mut q.cfg.desc,
                        reg::QUEUE_DRIVER_LOW => &mut q.cfg.avail,
                        _ => &mut q.cfg.used,
                    };
                    if high {
                        set_high(field, v)
                    } else {
                        set_low(field, v)
                    }
                }
            }
            reg::QUEUE_NOTIFY => {
                // Reached only when no ioevent took the write (no KVM ioeventfd, no bus hook).
                if let Some(k) = self.kicks.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            reg::INTERRUPT_ACK => {}
            reg::STATUS => self.write_status(v),
            _ => {}
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let new_bits = v & !self.status;
        let mut v = v;
        if new_bits & status::FEATURES_OK != 0 {
            let offered = self.device.device_features() | VIRTIO_F_VERSION_1;
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                v &= !status::FEATURES_OK;
            }
        }
        if new_bits & status::DRIVER_OK != 0 && !self.live {
            match self.activate() {
                Ok(()) => self.live = true,
                Err(e) => {
                    tracing::error!("virtio device activation failed: {e}");
                    v |= status::DEVICE_NEEDS_RESET;
                }
            }
        }
        self.status = v;
    }

    fn activate(&mut self) -> Result<(), VirtioError> {
        if self.status & status::FEATURES_OK == 0 {
            return Err(VirtioError::Config("DRIVER_OK without FEATURES_OK".into()));
        }
        let ready: Vec<(usize, QueueConfig, &EventFd, &EventFd)> = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready)
            .map(|(i, q)| (i, q.cfg, &self.kicks[i], &self.calls[i]))
            .collect();
        if ready.is_empty() {
            return Err(VirtioError::Config("no queue is ready".into()));
        }
        self.device.activate(self.driver_features, &ready)
    }

    fn reset(&mut self) {
        if self.live || self.status != 0 {
            self.device.reset();
        }
        self.live = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            let max = q.max;
            *q = Queue {
                max,
                ..Default::default()
            };
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            return; // registers are 32-bit only; other accesses read as zero
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset % 4 == 0 {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests;
