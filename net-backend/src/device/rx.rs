//! RX: tap → guest. A packet read from the tap (vnet header + frame) is written into one
//! device-writable chain, or with `MRG_RXBUF` into as many chains as needed, the count going
//! into the header's `num_buffers`. When the guest has too few buffers, the packet is kept,
//! the queue's notifications are re-enabled and the caller stops reading the tap until the
//! guest kicks the RX queue.

use std::io::ErrorKind;
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{packet_buffer, DeviceError, NetDevice};
use crate::header::{ETH_HLEN, VNET_HDR_LEN};
use crate::tap::Tap;

/// Per-RX-queue state: the packet waiting for guest buffers and reusable chain bookkeeping.
#[derive(Debug)]
pub struct RxState {
    buf: Vec<u8>,
    /// Length of the packet in `buf` waiting to be delivered (0: none).
    pending: usize,
    /// Writable segments (address, length) of the chains being filled.
    segs: Vec<(u64, u32)>,
    /// Chains being filled: head index and end of its segments in `segs`.
    heads: Vec<(u16, usize)>,
}

impl Default for RxState {
    fn default() -> Self {
        RxState {
            buf: packet_buffer(),
            pending: 0,
            segs: Vec::with_capacity(64),
            heads: Vec::with_capacity(64),
        }
    }
}

impl RxState {
    /// Whether a packet read from the tap is waiting for guest buffers.
    pub fn has_pending(&self) -> bool {
        self.pending != 0
    }

    /// Forgets the pending packet (new driver: nothing of the old session is delivered).
    pub fn clear(&mut self) {
        self.pending = 0;
    }
}

/// Result of one RX pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxOutcome {
    /// Buffers were used: notify the guest if the queue asks for it.
    pub used: bool,
    /// The guest ran out of buffers with a packet pending: wait for an RX kick.
    pub stalled: bool,
    /// Packets delivered.
    pub frames: usize,
}

enum Delivery {
    Done,
    Dropped,
    NoBuffers(Wrapping<u16>),
}

impl NetDevice {
    /// Moves packets from the tap to the guest until the tap is empty or the guest has no
    /// more buffers.
    pub fn process_rx<M: GuestMemory>(
        &self,
        q: &mut Queue,
        mem: &M,
        tap: &dyn Tap,
        st: &mut RxState,
    ) -> Result<RxOutcome, DeviceError> {
        let mrg = self.negotiated().mrg_rxbuf();
        let mut out = RxOutcome::default();
        loop {
            if st.pending == 0 {
                match tap.read_packet(&mut st.buf) {
                    Ok(n) if n < VNET_HDR_LEN + ETH_HLEN => {
                        tracing::debug!("rx: dropping {n}-byte packet from the tap");
                        self.stats.rx_dropped();
                        continue;
                    }
                    Ok(n) => st.pending = n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(DeviceError::TapRead(e)),
                }
            }
            match self.deliver(q, mem, st, mrg, &mut out)? {
                Delivery::Done => {
                    out.frames += 1;
                    st.pending = 0;
                }
                Delivery::Dropped => st.pending = 0,
                Delivery::NoBuffers(seen) => {
                    // Ask for a kick, then look again: buffers added before the kick was
                    // enabled would otherwise be missed.
                    q.enable_notification(mem)?;
                    if q.avail_idx(mem, Ordering::Acquire)? != seen {
                        continue;
                    }
                    out.stalled = true;
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Places the pending packet into guest buffers.
    fn deliver<M: GuestMemory>(
        &self,
        q: &mut Queue,
        mem: &M,
        st: &mut RxState,
        mrg: bool,
        out: &mut RxOutcome,
    ) -> Result<Delivery, DeviceError> {
        let need = st.pending;
        st.segs.clear();
        st.heads.clear();
        let mut cap = 0usize;
        // Once a bad chain was consumed, popped chains can no longer be put back.
        let mut can_rewind = true;
        while cap < need {
            let seen = q.avail_idx(mem, Ordering::Acquire)?;
            let whole_ring = st.heads.len() >= usize::from(q.size());
            let popped = if whole_ring {
                None
            } else {
                q.pop_descriptor_chain(mem)
            };
            let Some(chain) = popped else {
                if can_rewind && whole_ring {
                    // Even the whole ring cannot hold it: it never will.
                    for _ in 0..st.heads.len() {
                        q.go_to_previous_position();
                    }
                    self.stats.rx_dropped();
                    return Ok(Delivery::Dropped);
                }
                if can_rewind {
                    for _ in 0..st.heads.len() {
                        q.go_to_previous_position();
                    }
                    return Ok(Delivery::NoBuffers(seen));
                }
                // Return what was taken, empty, and drop the packet.
                for &(head, _) in &st.heads {
                    q.add_used(mem, head, 0)?;
                    out.used = true;
                }
                self.stats.rx_dropped();
                return Ok(Delivery::Dropped);
            };
            let head = chain.head_index();
            let start = st.segs.len();
            let mut chain_cap = 0usize;
            let mut bad = false;
            for d in chain {
                if !d.is_write_only() || !mem.check_range(d.addr(), d.len() as usize) {
                    bad = true;
                    break;
                }
                if d.len() > 0 {
                    st.segs.push((d.addr().0, d.len()));
                    chain_cap += d.len() as usize;
                }
            }
            if bad || chain_cap < VNET_HDR_LEN {
                tracing::debug!("rx: chain {head} is unusable (readable, outside memory or tiny)");
                st.segs.truncate(start);
                q.add_used(mem, head, 0)?;
                out.used = true;
                self.stats.bad_chain();
                can_rewind = false;
                continue;
            }
            if !mrg && chain_cap < need {
                // The guest's buffers cannot hold this packet: drop it, keep the buffer.
                tracing::debug!("rx: dropping {need}-byte packet, buffer has {chain_cap}");
                q.go_to_previous_position();
                self.stats.rx_dropped();
                return Ok(Delivery::Dropped);
            }
            st.heads.push((head, st.segs.len()));
            cap += chain_cap;
        }
        let count = if mrg { st.heads.len() as u16 } else { 1 };
        if let Some(nb) = st.buf.get_mut(10..12) {
            nb.copy_from_slice(&count.to_le_bytes());
        }
        let mut off = 0usize;
        let mut seg = 0usize;
        for &(head, seg_end) in &st.heads {
            let mut used = 0usize;
            while seg < seg_end {
                let (addr, len) = st.segs.get(seg).copied().unwrap_or_default();
                seg += 1;
                let n = (len as usize).min(need - off);
                let Some(src) = st.buf.get(off..off + n) else {
                    break;
                };
                if mem.write_slice(src, GuestAddress(addr)).is_err() {
                    self.stats.bad_chain();
                }
                off += n;
                used += n;
            }
            q.add_used(mem, head, used as u32)?;
        }
        out.used = true;
        // gso_type is byte 1 of the vnet header the tap wrote at the start of the buffer.
        let gso = st.buf.get(1).is_some_and(|&t| t != 0);
        self.stats.rx_frame(need - VNET_HDR_LEN, gso);
        Ok(Delivery::Done)
    }
}
