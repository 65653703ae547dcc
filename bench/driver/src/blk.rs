//! virtio-blk requests over a [`Device`]: pre-allocated request slots
//! (header, data, status) so that any number of requests can be in flight.

use std::time::Duration;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

use crate::{Device, DriverError, DriverMemory, SplitQueue};

/// One pre-allocated request slot in driver memory.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    /// Header (16 bytes).
    pub header: u64,
    /// Data buffer.
    pub data: u64,
    /// Status byte.
    pub status: u64,
}

/// A set of request slots.
#[derive(Debug)]
pub struct Slots {
    slots: Vec<Slot>,
    max_data: usize,
}

impl Slots {
    /// Allocates `count` slots of `max_data` bytes of data each.
    pub fn new(dev: &mut Device, count: usize, max_data: usize) -> Result<Self, DriverError> {
        let mut slots = Vec::with_capacity(count);
        for _ in 0..count {
            slots.push(Slot {
                header: dev.mem.alloc(16, 16)?,
                data: dev.mem.alloc(max_data, 4096)?,
                status: dev.mem.alloc(1, 1)?,
            });
        }
        Ok(Slots { slots, max_data })
    }

    /// Slot `i`.
    pub fn get(&self, i: usize) -> Slot {
        self.slots[i % self.slots.len()]
    }

    /// Largest data length of a slot.
    pub fn max_data(&self) -> usize {
        self.max_data
    }
}

/// Writes a request header into `slot` and posts the chain on queue `q` (no kick). Data for
/// OUT requests must already be in `slot.data`. `data_len` 0 gives a header+status chain.
pub fn post(
    dev: &mut Device,
    q: usize,
    slot: Slot,
    kind: u32,
    sector: u64,
    data_len: u32,
) -> Result<u16, DriverError> {
    let Device { mem, queues, .. } = dev;
    post_on(mem, &mut queues[q], slot, kind, sector, data_len)
}

/// [`post`] on an explicit memory and queue, for drivers running queues on several threads.
pub fn post_on(
    mem: &DriverMemory,
    queue: &mut SplitQueue,
    slot: Slot,
    kind: u32,
    sector: u64,
    data_len: u32,
) -> Result<u16, DriverError> {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write(slot.header, &h)?;
    mem.write(slot.status, &[0xff])?;
    let device_writes_data = kind == VIRTIO_BLK_T_IN || kind == 8; // IN, GET_ID
    let mut chain = vec![(slot.header, 16, false)];
    if data_len > 0 {
        chain.push((slot.data, data_len, device_writes_data));
    }
    chain.push((slot.status, 1, true));
    Ok(queue.add(mem, &chain)?)
}

/// Reads the status byte of a completed slot.
pub fn status(dev: &Device, slot: Slot) -> Result<u8, DriverError> {
    status_in(&dev.mem, slot)
}

/// [`status`] on an explicit memory.
pub fn status_in(mem: &DriverMemory, slot: Slot) -> Result<u8, DriverError> {
    let mut s = [0u8];
    mem.read(slot.status, &mut s)?;
    Ok(s[0])
}

/// Runs one request synchronously on queue `q` with slot `slot`: for OUT, `data` is sent; for
/// IN (and GET_ID), `data` is filled. Returns the status byte and the used length.
pub fn request(
    dev: &mut Device,
    q: usize,
    slot: Slot,
    kind: u32,
    sector: u64,
    data: &mut [u8],
    timeout: Duration,
) -> Result<(u8, u32), DriverError> {
    if kind == VIRTIO_BLK_T_OUT || kind == 11 || kind == 13 {
        dev.mem.write(slot.data, data)?;
    }
    let head = post(dev, q, slot, kind, sector, data.len() as u32)?;
    dev.queues[q].kick()?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some((id, len)) = dev.queues[q].pop_used(&dev.mem)? {
            if id != head {
                return Err(crate::QueueError::BadUsedId(u32::from(id)).into());
            }
            if kind == VIRTIO_BLK_T_IN || kind == 8 {
                dev.mem.read(slot.data, data)?;
            }
            return Ok((status(dev, slot)?, len));
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(DriverError::Timeout(timeout));
        }
        dev.queues[q].wait_call(left.min(Duration::from_millis(100)))?;
    }
}
