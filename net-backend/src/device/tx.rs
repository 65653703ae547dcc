//! TX: guest → tap. Each chain is one packet (vnet header + frame) in device-readable
//! descriptors. The 12 header bytes are copied out and validated with the frame length; the
//! frame goes to the tap with `writev` straight from guest memory (a chain fragmented into
//! more than [`MAX_IOV`] pieces is copied through a bounce buffer instead). Invalid packets
//! are dropped and counted; the chain is always returned with length 0.

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::{packet_buffer, DeviceError, NetDevice};
use crate::header::{validate_tx_header, FrameError, TxLimits, MAX_PACKET, VNET_HDR_LEN};
use crate::tap::Tap;

/// Most pieces (header + guest memory fragments) written with one `writev`.
pub const MAX_IOV: usize = 64;

/// Per-TX-queue scratch space: chain segments and the bounce buffer of the fallback path.
#[derive(Debug)]
pub struct TxScratch {
    buf: Vec<u8>,
    segs: Vec<(u64, u32)>,
}

impl Default for TxScratch {
    fn default() -> Self {
        TxScratch {
            buf: packet_buffer(),
            segs: Vec::with_capacity(MAX_IOV),
        }
    }
}

/// Why a chain was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChainError {
    /// A device-writable descriptor in a TX chain.
    #[error("device-writable descriptor in a TX chain")]
    WrongDirection,
    /// A descriptor outside guest memory.
    #[error("descriptor outside guest memory")]
    BadAddress,
    /// More bytes than any valid packet.
    #[error("chain longer than {MAX_PACKET} bytes")]
    TooLong,
}

/// Records the readable segments of `chain`; returns the total length.
fn segments<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    segs: &mut Vec<(u64, u32)>,
) -> Result<usize, ChainError> {
    segs.clear();
    let mut len = 0usize;
    for d in chain {
        if d.is_write_only() {
            return Err(ChainError::WrongDirection);
        }
        len = len
            .checked_add(d.len() as usize)
            .filter(|&l| l <= MAX_PACKET)
            .ok_or(ChainError::TooLong)?;
        if d.len() > 0 {
            segs.push((d.addr().0, d.len()));
        }
    }
    Ok(len)
}

/// Copies bytes `[skip, skip + out.len())` of the segmented stream into `out`.
fn copy_out<M: GuestMemory>(
    mem: &M,
    segs: &[(u64, u32)],
    mut skip: usize,
    out: &mut [u8],
) -> Result<(), ChainError> {
    let mut done = 0usize;
    for &(addr, len) in segs {
        if done == out.len() {
            break;
        }
        let len = len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(out.len() - done);
        let dst = out.get_mut(done..done + n).ok_or(ChainError::TooLong)?;
        let at = GuestAddress(addr)
            .checked_add(skip as u64)
            .ok_or(ChainError::BadAddress)?;
        mem.read_slice(dst, at)
            .map_err(|_| ChainError::BadAddress)?;
        done += n;
        skip = 0;
    }
    Ok(())
}

/// Fills `iov` with the guest memory of the stream past the header; `None` when it needs
/// more than `iov.len()` pieces.
fn frame_iov<M: GuestMemory>(
    mem: &M,
    segs: &[(u64, u32)],
    iov: &mut [libc::iovec],
) -> Result<Option<usize>, ChainError> {
    let mut n = 0usize;
    let mut skip = VNET_HDR_LEN;
    for &(addr, len) in segs {
        let len = len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let start = GuestAddress(addr)
            .checked_add(skip as u64)
            .ok_or(ChainError::BadAddress)?;
        let count = len - skip;
        skip = 0;
        for slice in mem.get_slices(start, count) {
            let slice = slice.map_err(|_| ChainError::BadAddress)?;
            let Some(v) = iov.get_mut(n) else {
                return Ok(None);
            };
            // Without the `xen` feature the guard holds no mapping: the pointer stays valid
            // as long as `mem` is borrowed.
            v.iov_base = slice.ptr_guard().as_ptr() as *mut libc::c_void;
            v.iov_len = slice.len();
            n += 1;
        }
    }
    Ok(Some(n))
}

impl NetDevice {
    /// Transmits every available packet of a TX queue. Returns the number of chains used
    /// (when non-zero, the caller signals the guest if the queue needs a notification).
    pub fn process_tx<M: GuestMemory>(
        &self,
        q: &mut Queue,
        mem: &M,
        tap: &dyn Tap,
        scratch: &mut TxScratch,
    ) -> Result<usize, DeviceError> {
        let limits = self.negotiated().tx_limits(self.params.mtu);
        let event_idx = q.event_idx_enabled();
        let mut used = 0usize;
        // Two passes in a row that pop nothing while re-enabling notifications says the driver
        // made more available: the avail index promises chains the ring cannot give (a broken
        // or hostile driver); stop rather than spin. One such pass is a buffer that raced the
        // re-check, taken by the next pass.
        let mut fruitless = 0;
        loop {
            if event_idx {
                q.disable_notification(mem)?;
            }
            let mut popped = false;
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                popped = true;
                let head = chain.head_index();
                if let Err(e) = self.transmit(mem, chain, &limits, tap, scratch) {
                    tracing::debug!("tx: dropping chain {head}: {e}");
                    self.stats.bad_chain();
                    self.stats.tx_dropped();
                }
                q.add_used(mem, head, 0)?;
                used += 1;
            }
            if !event_idx || !q.enable_notification(mem)? {
                break;
            }
            fruitless = if popped { 0 } else { fruitless + 1 };
            if fruitless >= 2 {
                tracing::debug!("tx: the avail index promises chains the ring does not give");
                break;
            }
        }
        Ok(used)
    }

    fn transmit<M: GuestMemory>(
        &self,
        mem: &M,
        chain: DescriptorChain<&M>,
        limits: &TxLimits,
        tap: &dyn Tap,
        scratch: &mut TxScratch,
    ) -> Result<(), ChainError> {
        let total = segments(chain, &mut scratch.segs)?;
        let mut hdr_bytes = [0u8; VNET_HDR_LEN];
        if total >= VNET_HDR_LEN {
            copy_out(mem, &scratch.segs, 0, &mut hdr_bytes)?;
        }
        let frame_len = total.saturating_sub(VNET_HDR_LEN);
        let checked = if total < VNET_HDR_LEN {
            Err(FrameError::TruncatedHeader(total))
        } else {
            validate_tx_header(&hdr_bytes, frame_len, limits)
        };
        let hdr = match checked {
            Ok(h) => h,
            Err(e) => {
                // A well-formed chain carrying a bad packet.
                tracing::debug!("tx: dropping packet: {e}");
                self.stats.tx_dropped();
                return Ok(());
            }
        };
        let hdr_bytes = hdr.to_bytes();
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut iov = [empty; MAX_IOV];
        iov[0] = libc::iovec {
            iov_base: hdr_bytes.as_ptr() as *mut libc::c_void,
            iov_len: VNET_HDR_LEN,
        };
        let result = match frame_iov(mem, &scratch.segs, &mut iov[1..])? {
            // SAFETY: iov[0] points at `hdr_bytes` (alive here); the others at guest memory
            // mapped for as long as `mem` is borrowed; the kernel only reads them.
            Some(n) => unsafe { tap.write_iov(&iov[..=n]) },
            None => {
                // Too fragmented for one writev: copy through the bounce buffer.
                let frame = scratch
                    .buf
                    .get_mut(VNET_HDR_LEN..total)
                    .ok_or(ChainError::TooLong)?;
                copy_out(mem, &scratch.segs, VNET_HDR_LEN, frame)?;
                let packet = scratch.buf.get_mut(..total).ok_or(ChainError::TooLong)?;
                packet
                    .get_mut(..VNET_HDR_LEN)
                    .ok_or(ChainError::TooLong)?
                    .copy_from_slice(&hdr_bytes);
                tap.write_packet(packet)
            }
        };
        match result {
            Ok(_) => self.stats.tx_frame(frame_len, hdr.gso_type != 0),
            Err(e) => {
                tracing::debug!("tx: tap write failed: {e}");
                self.stats.tx_error();
            }
        }
        Ok(())
    }
}
