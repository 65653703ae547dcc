//! The virtqueue side: guest TX chains into [`Muxer::from_guest`], [`Muxer::next_rx`]
//! packets into guest RX chains. Chains are walked descriptor by descriptor through
//! `vm-memory`'s checked accesses: a descriptor outside guest memory fails the chain, never the
//! daemon.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::muxer::{Muxer, MAX_BACKLOG};
use crate::packet::{HDR_LEN, MAX_PAYLOAD};

/// Errors of the queues (the used ring outside guest memory and the like).
#[derive(Debug, thiserror::Error)]
pub enum QueueIoError {
    /// Queue bookkeeping failed.
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
}

/// The readable bytes of a TX chain, at most a header and a full payload; `None` if a
/// descriptor lies outside guest memory.
fn gather<M: GuestMemory>(chain: DescriptorChain<&M>, mem: &M) -> Option<Vec<u8>> {
    let limit = HDR_LEN + MAX_PAYLOAD;
    let mut out = Vec::new();
    for d in chain {
        if d.is_write_only() {
            continue;
        }
        let take = (d.len() as usize).min(limit - out.len());
        let at = out.len();
        out.resize(at + take, 0);
        mem.read_slice(&mut out[at..], d.addr()).ok()?;
        if out.len() == limit {
            break;
        }
    }
    Some(out)
}

/// Processes the guest's TX chains (until the control backlog for the guest is full); returns
/// how many were used.
pub fn process_tx<M: GuestMemory>(
    mux: &mut Muxer,
    queue: &mut Queue,
    mem: &M,
) -> Result<usize, QueueIoError> {
    let mut used = 0;
    while mux.backlog() < MAX_BACKLOG {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        match gather(chain, mem) {
            Some(bytes) => mux.from_guest(&bytes),
            None => tracing::debug!("TX chain {head} outside guest memory"),
        }
        queue.add_used(mem, head, 0)?;
        used += 1;
    }
    Ok(used)
}

/// The writable descriptors of an RX chain, `None` if the chain is malformed.
fn writable<M: GuestMemory>(chain: DescriptorChain<&M>) -> Vec<(GuestAddress, usize)> {
    chain
        .filter(|d| d.is_write_only())
        .map(|d| (d.addr(), d.len() as usize))
        .collect()
}

/// Writes `parts` into the descriptors; `false` if one lies outside guest memory.
fn scatter<M: GuestMemory>(mem: &M, descs: &[(GuestAddress, usize)], parts: &[&[u8]]) -> bool {
    let mut descs = descs.iter().copied();
    let mut cur: Option<(GuestAddress, usize)> = None;
    for part in parts {
        let mut part: &[u8] = part;
        while !part.is_empty() {
            let (addr, room) = match cur.take().or_else(|| descs.next()) {
                Some(d) => d,
                None => return false,
            };
            let n = room.min(part.len());
            if mem.write_slice(&part[..n], addr).is_err() {
                return false;
            }
            part = &part[n..];
            if n < room {
                match addr.checked_add(n as u64) {
                    Some(next) => cur = Some((next, room - n)),
                    None => return false,
                }
            }
        }
    }
    true
}

/// Fills the guest's RX chains with what the muxer has; returns how many were used.
pub fn process_rx<M: GuestMemory>(
    mux: &mut Muxer,
    queue: &mut Queue,
    mem: &M,
) -> Result<usize, QueueIoError> {
    let mut used = 0;
    while mux.has_rx() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let descs = writable(chain);
        let room: usize = descs.iter().map(|d| d.1).fold(0, usize::saturating_add);
        if room < HDR_LEN {
            tracing::debug!("RX chain {head} has {room} bytes, less than a header");
            queue.add_used(mem, head, 0)?;
            used += 1;
            continue;
        }
        let Some((hdr, data)) = mux.next_rx(room - HDR_LEN) else {
            // Nothing after all (a socket had no bytes): the chain stays for later.
            queue.go_to_previous_position();
            break;
        };
        let len = if scatter(mem, &descs, &[&hdr.encode(), &data]) {
            (HDR_LEN + data.len()) as u32
        } else {
            tracing::debug!("RX chain {head} outside guest memory: packet lost");
            0
        };
        queue.add_used(mem, head, len)?;
        used += 1;
    }
    Ok(used)
}
