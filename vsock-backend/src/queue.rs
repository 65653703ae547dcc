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

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::host::port_path;
    use crate::packet::{Header, Op, HOST_CID, TYPE_STREAM};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const BUF: u64 = 0x10_0000;

    /// Descriptors `(addr, len, writable)` linked into one chain from table index 0.
    fn chain(descs: &[(u64, u32, bool)]) -> Vec<RawDescriptor> {
        let last = descs.len() - 1;
        descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { F_WRITE } else { 0 };
                if i != last {
                    flags |= F_NEXT;
                }
                let next = if i == last { 0 } else { i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect()
    }

    fn used(mq: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let n = mq.used().idx().load();
        (0..n)
            .map(|i| {
                let e = mq.used().ring().ref_at(usize::from(i)).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    struct Rig {
        _dir: tempfile::TempDir,
        _port: UnixListener,
        mem: GuestMemoryMmap,
        mux: Muxer,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let port = UnixListener::bind(port_path(&path, 80)).unwrap();
        let l = UnixListener::bind(&path).unwrap();
        let mux = Muxer::new(3, path, l, Box::new(|_| true)).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        Rig {
            _dir: dir,
            _port: port,
            mem,
            mux,
        }
    }

    fn request() -> Vec<u8> {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 4000,
            dst_port: 80,
            type_: TYPE_STREAM,
            op: Op::Request as u16,
            buf_alloc: 4096,
            ..Header::default()
        }
        .encode()
        .to_vec()
    }

    #[test]
    fn a_split_tx_header_and_a_split_rx_buffer() {
        let mut r = rig();
        r.mem.write_slice(&request(), GuestAddress(BUF)).unwrap();
        let mq = MockSplitQueue::new(&r.mem, 16);
        mq.add_desc_chains(&chain(&[(BUF, 7, false), (BUF + 7, 37, false)]), 0)
            .unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        assert_eq!(process_tx(&mut r.mux, &mut q, &r.mem).unwrap(), 1);
        assert_eq!(used(&mq), vec![(0, 0)]);
        assert_eq!(r.mux.connections(), 1);

        // RESPONSE into a buffer split in 10 + 100 bytes.
        let mq = MockSplitQueue::new(&r.mem, 16);
        mq.add_desc_chains(&chain(&[(BUF, 10, true), (BUF + 0x1000, 100, true)]), 0)
            .unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        assert_eq!(process_rx(&mut r.mux, &mut q, &r.mem).unwrap(), 1);
        assert_eq!(used(&mq), vec![(0, HDR_LEN as u32)]);
        let mut hdr = [0u8; HDR_LEN];
        r.mem.read_slice(&mut hdr[..10], GuestAddress(BUF)).unwrap();
        r.mem
            .read_slice(&mut hdr[10..], GuestAddress(BUF + 0x1000))
            .unwrap();
        let h = Header::parse(&hdr).unwrap();
        assert_eq!(
            (h.op(), h.src_port, h.dst_port),
            (Some(Op::Response), 80, 4000)
        );
    }

    #[test]
    fn chains_outside_memory_or_too_small_harm_nothing() {
        let mut r = rig();
        // A TX descriptor beyond guest memory: used, dropped.
        let mq = MockSplitQueue::new(&r.mem, 16);
        mq.add_desc_chains(&chain(&[(0x30_0000, 44, false)]), 0)
            .unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        assert_eq!(process_tx(&mut r.mux, &mut q, &r.mem).unwrap(), 1);
        assert_eq!(r.mux.connections(), 0);
        assert!(!r.mux.has_rx());

        // Nothing to send: the RX chain stays available.
        let mq = MockSplitQueue::new(&r.mem, 16);
        mq.add_desc_chains(&chain(&[(BUF, 100, true)]), 0).unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        assert_eq!(process_rx(&mut r.mux, &mut q, &r.mem).unwrap(), 0);
        assert!(used(&mq).is_empty());

        // Something to send, but the RX chain is too small for a header, then outside memory.
        r.mem.write_slice(&request(), GuestAddress(BUF)).unwrap();
        let mq = MockSplitQueue::new(&r.mem, 16);
        mq.add_desc_chains(&chain(&[(BUF, 44, false)]), 0).unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        process_tx(&mut r.mux, &mut q, &r.mem).unwrap();
        assert!(r.mux.has_rx());
        let mq = MockSplitQueue::new(&r.mem, 16);
        mq.add_desc_chains(&chain(&[(BUF, 20, true)]), 0).unwrap();
        mq.add_desc_chains(&chain(&[(0x1f_fff0, 100, true)]), 1)
            .unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        assert_eq!(process_rx(&mut r.mux, &mut q, &r.mem).unwrap(), 2);
        assert_eq!(used(&mq), vec![(0, 0), (1, 0)]);
    }
}
