//! A driver-side split virtqueue (virtio 1.x, 2.7) living in [`DriverMemory`].

use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::{DriverMemory, MemoryError};

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Errors of the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Not enough free descriptors.
    #[error("queue full ({needed} descriptors needed, {free} free)")]
    Full {
        /// Descriptors needed.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// Bad queue size.
    #[error("queue size {0} is not a power of two in 1..=32768")]
    Size(u16),
    /// The device returned an id we did not give it.
    #[error("device returned unknown descriptor id {0}")]
    BadUsedId(u32),
    /// Memory error.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Eventfd error.
    #[error("eventfd: {0}")]
    Event(std::io::Error),
}

/// One buffer of a chain: guest address, length, device-writable.
pub type Chain<'a> = &'a [(u64, u32, bool)];

/// A split virtqueue, driver side.
#[derive(Debug)]
pub struct SplitQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    free: Vec<u16>,
    chain_len: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
    event_idx: bool,
}

impl SplitQueue {
    /// Allocates the rings in `mem`.
    pub fn new(mem: &mut DriverMemory, size: u16, event_idx: bool) -> Result<Self, QueueError> {
        if !size.is_power_of_two() || size > 32768 {
            return Err(QueueError::Size(size));
        }
        let n = usize::from(size);
        let desc = mem.alloc(16 * n, 16)?;
        let avail = mem.alloc(6 + 2 * n, 2)?;
        let used = mem.alloc(6 + 8 * n, 4)?;
        let ev = || EventFd::new(EFD_NONBLOCK).map_err(QueueError::Event);
        Ok(SplitQueue {
            size,
            desc,
            avail,
            used,
            kick: ev()?,
            call: ev()?,
            free: (0..size).rev().collect(),
            chain_len: vec![0; n],
            avail_idx: 0,
            last_used: 0,
            event_idx,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }
    /// Descriptor table address.
    pub fn desc_addr(&self) -> u64 {
        self.desc
    }
    /// Available ring address.
    pub fn avail_addr(&self) -> u64 {
        self.avail
    }
    /// Used ring address.
    pub fn used_addr(&self) -> u64 {
        self.used
    }
    /// Kick eventfd (driver → device).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }
    /// Call eventfd (device → driver).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }
    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }
    /// Requests posted and not yet returned.
    pub fn in_flight(&self) -> usize {
        usize::from(self.size) - self.free.len()
    }

    /// Writes a chain and publishes it on the available ring (no kick). Returns its head.
    pub fn add(&mut self, mem: &DriverMemory, chain: Chain<'_>) -> Result<u16, QueueError> {
        if chain.is_empty() || chain.len() > self.free.len() {
            return Err(QueueError::Full {
                needed: chain.len(),
                free: self.free.len(),
            });
        }
        let ids: Vec<u16> = (0..chain.len()).filter_map(|_| self.free.pop()).collect();
        let m = mem.mem();
        for (i, &(addr, len, write)) in chain.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            let next = ids.get(i + 1).copied();
            if next.is_some() {
                flags |= VRING_DESC_F_NEXT;
            }
            let base = GuestAddress(self.desc + 16 * u64::from(ids[i]));
            m.write_obj(addr.to_le(), base).map_err(MemoryError::from)?;
            m.write_obj(len.to_le(), GuestAddress(base.0 + 8))
                .map_err(MemoryError::from)?;
            m.write_obj(flags.to_le(), GuestAddress(base.0 + 12))
                .map_err(MemoryError::from)?;
            m.write_obj(next.unwrap_or(0).to_le(), GuestAddress(base.0 + 14))
                .map_err(MemoryError::from)?;
        }
        let head = ids[0];
        self.chain_len[usize::from(head)] = chain.len() as u16;
        let slot = u64::from(self.avail_idx % self.size);
        m.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .map_err(MemoryError::from)?;
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .map_err(MemoryError::from)?;
        fence(Ordering::SeqCst);
        Ok(head)
    }

    /// Notifies the device.
    pub fn kick(&self) -> Result<(), QueueError> {
        self.kick.write(1).map_err(QueueError::Event)
    }

    /// Takes one completion from the used ring: (head, used length).
    pub fn pop_used(&mut self, mem: &DriverMemory) -> Result<Option<(u16, u32)>, QueueError> {
        let m = mem.mem();
        fence(Ordering::SeqCst);
        let used_idx: u16 = m
            .read_obj(GuestAddress(self.used + 2))
            .map_err(MemoryError::from)?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        fence(Ordering::SeqCst);
        let slot = u64::from(self.last_used % self.size);
        let elem = GuestAddress(self.used + 4 + 8 * slot);
        let id: u32 = m.read_obj(elem).map_err(MemoryError::from)?;
        let len: u32 = m
            .read_obj(GuestAddress(elem.0 + 4))
            .map_err(MemoryError::from)?;
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| h < self.size)
            .ok_or(QueueError::BadUsedId(id))?;
        let n = self.chain_len[usize::from(head)];
        if n == 0 {
            return Err(QueueError::BadUsedId(id));
        }
        self.chain_len[usize::from(head)] = 0;
        // Walk the chain we wrote to give its descriptors back.
        let mut idx = head;
        for i in 0..n {
            self.free.push(idx);
            if i + 1 < n {
                let next: u16 = m
                    .read_obj(GuestAddress(self.desc + 16 * u64::from(idx) + 14))
                    .map_err(MemoryError::from)?;
                idx = next;
            }
        }
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            // used_event: interrupt us as soon as the next one completes.
            let used_event = GuestAddress(self.avail + 4 + 2 * u64::from(self.size));
            m.write_obj(self.last_used.to_le(), used_event)
                .map_err(MemoryError::from)?;
        }
        Ok(Some((head, len)))
    }

    /// Waits up to `timeout` for the device's call eventfd. Returns false on timeout.
    pub fn wait_call(&self, timeout: Duration) -> Result<bool, QueueError> {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.call),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            return Err(QueueError::Event(std::io::Error::last_os_error()));
        }
        if r == 0 {
            return Ok(false);
        }
        let _ = self.call.read();
        Ok(true)
    }
}
