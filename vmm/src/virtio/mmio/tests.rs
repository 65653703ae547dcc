use std::sync::{Arc, Mutex};

use super::*;

#[derive(Default)]
struct Log {
    activated: Option<(u64, Vec<(usize, QueueConfig)>)>,
    resets: u32,
    config: [u8; 8],
}

struct FakeDevice(Arc<Mutex<Log>>);

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 128]
    }
    fn device_features(&self) -> u64 {
        (1 << 1) | (1 << 6)
    }
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let log = self.0.lock().unwrap();
        for (i, b) in data.iter_mut().enumerate() {
            *b = log.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut log = self.0.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = log.config.get_mut(offset as usize + i) {
                *c = *b;
            }
        }
    }
    fn activate(
        &mut self,
        features: u64,
        queues: &[(usize, QueueConfig, &EventFd, &EventFd)],
    ) -> Result<(), VirtioError> {
        self.0.lock().unwrap().activated =
            Some((features, queues.iter().map(|q| (q.0, q.1)).collect()));
        Ok(())
    }
    fn reset(&mut self) {
        self.0.lock().unwrap().resets += 1;
    }
}

fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn transport() -> (MmioTransport, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    (
        MmioTransport::new(Box::new(FakeDevice(log.clone()))).unwrap(),
        log,
    )
}

#[test]
fn identification_and_features() {
    let (mut t, _) = transport();
    assert_eq!(r(&mut t, reg::MAGIC), VIRTIO_MMIO_MAGIC);
    assert_eq!(r(&mut t, reg::VERSION), 2);
    assert_eq!(r(&mut t, reg::DEVICE_ID), 2);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), (1 << 1) | (1 << 6));
    w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 offered");
    w(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 128);
    w(&mut t, reg::QUEUE_SEL, 7);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
    let mut odd = [0u8; 2];
    t.read(reg::MAGIC, &mut odd);
    assert_eq!(odd, [0, 0], "16-bit register reads are not supported");
}

fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(t, reg::DRIVER_FEATURES_SEL, 0);
    w(t, reg::DRIVER_FEATURES, features as u32);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    w(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    r(t, reg::STATUS)
}

#[test]
fn features_ok_requires_version_1_and_a_subset() {
    let (mut t, _) = transport();
    assert_eq!(negotiate(&mut t, 1 << 1) & status::FEATURES_OK, 0);
    w(&mut t, reg::STATUS, 0);
    assert_eq!(
        negotiate(&mut t, VIRTIO_F_VERSION_1 | (1 << 9)) & status::FEATURES_OK,
        0
    );
    w(&mut t, reg::STATUS, 0);
    assert_ne!(
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 2) & status::FEATURES_OK,
        0
    );
}

#[test]
fn queue_setup_activation_and_reset() {
    let (mut t, log) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1 | 2);
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_NUM, 300); // too big: ignored
    w(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0, "no size yet");
    w(&mut t, reg::QUEUE_NUM, 64);
    w(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
    w(&mut t, reg::QUEUE_DESC_HIGH, 0x1);
    w(&mut t, reg::QUEUE_DRIVER_LOW, 0x2000);
    w(&mut t, reg::QUEUE_DEVICE_LOW, 0x3000);
    w(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    w(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    let (features, queues) = log.lock().unwrap().activated.clone().unwrap();
    assert_eq!(features, VIRTIO_F_VERSION_1 | 2);
    assert_eq!(
        queues,
        vec![(
            0,
            QueueConfig {
                size: 64,
                desc: 0x1_0000_1000,
                avail: 0x2000,
                used: 0x3000
            }
        )]
    );
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
    // Queue registers are frozen while live.
    w(&mut t, reg::QUEUE_NUM, 32);
    // Notify without an ioevent reaches the kick eventfd.
    w(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(t.kick_fds()[0].read().unwrap(), 1);
    w(&mut t, reg::STATUS, 0);
    assert_eq!(log.lock().unwrap().resets, 1);
    assert_eq!(r(&mut t, reg::STATUS), 0);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
}

#[test]
fn driver_ok_without_ready_queue_needs_reset() {
    let (mut t, log) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    w(&mut t, reg::STATUS, 0xf);
    assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert!(log.lock().unwrap().activated.is_none());
}

#[test]
fn config_space_passthrough_bumps_generation() {
    let (mut t, _) = transport();
    let g = r(&mut t, reg::CONFIG_GENERATION);
    t.write(reg::CONFIG + 2, &[0xaa, 0xbb]);
    let mut b = [0u8; 4];
    t.read(reg::CONFIG, &mut b);
    assert_eq!(b, [0, 0, 0xaa, 0xbb]);
    assert_ne!(r(&mut t, reg::CONFIG_GENERATION), g);
}

#[test]
fn no_shared_memory_regions_are_announced() {
    let (mut t, _) = transport();
    w(&mut t, reg::SHM_SEL, 0);
    for off in [
        reg::SHM_LEN_LOW,
        reg::SHM_LEN_HIGH,
        reg::SHM_BASE_LOW,
        reg::SHM_BASE_HIGH,
    ] {
        assert_eq!(r(&mut t, off), u32::MAX, "register {off:#x}");
    }
}
