//! Mock-queue tests of TX, RX and the control queue, with a datagram socketpair as the tap.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;

use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::tx::MAX_IOV;
use super::*;
use crate::header::{VnetHdr, VNET_HDR_LEN};

const MEM_SIZE: usize = 0x40_0000;
const BUF: u64 = 0x10_0000;

/// The device end of a datagram socketpair; the test holds the "host" end.
struct FakeTap {
    sock: UnixDatagram,
    offload: Mutex<Option<u32>>,
}

impl Tap for FakeTap {
    fn read_packet(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }
    fn write_packet(&self, buf: &[u8]) -> io::Result<usize> {
        self.sock.send(buf)
    }
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        *self.offload.lock().unwrap() = Some(flags);
        Ok(())
    }
    fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    dev: NetDevice,
    tap: FakeTap,
    host: UnixDatagram,
}

fn rig(features: u64) -> Rig {
    rig_with(features, &[(GuestAddress(0), MEM_SIZE)])
}

fn rig_with(features: u64, ranges: &[(GuestAddress, usize)]) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(ranges).unwrap();
    let dev = NetDevice::new(NetParams {
        queue_pairs: 2,
        ..NetParams::default()
    })
    .unwrap();
    dev.set_features(features);
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    Rig {
        mem,
        dev,
        tap: FakeTap {
            sock: a,
            offload: Mutex::new(None),
        },
        host: b,
    }
}

fn all_features() -> u64 {
    NetParams::default().features()
}

fn without(bit: u32) -> u64 {
    all_features() & !(1u64 << bit)
}

fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
    let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// Links `descs` into one chain starting at table index `first`.
fn chain(first: u16, descs: &[RawDescriptor]) -> Vec<RawDescriptor> {
    let last = descs.len() - 1;
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let d = SplitDescriptor::from(*d);
            let (flags, next) = if i == last {
                (d.flags() & !(VRING_DESC_F_NEXT as u16), 0)
            } else {
                (d.flags() | VRING_DESC_F_NEXT as u16, first + i as u16 + 1)
            };
            RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, next))
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

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

fn tx_packet(hdr: VnetHdr, frame_len: usize) -> Vec<u8> {
    let mut p = hdr.to_bytes().to_vec();
    p.extend(frame(frame_len, 5));
    p
}

impl Rig {
    /// Puts `packet` in guest memory at BUF and submits it as a TX chain split after `split`.
    fn tx(&self, packet: &[u8], split: usize) -> (usize, Vec<(u32, u32)>) {
        self.mem.write_slice(packet, GuestAddress(BUF)).unwrap();
        let mq = MockSplitQueue::new(&self.mem, 16);
        let a = split.min(packet.len());
        let b = packet.len() - a;
        let mut d = vec![desc(BUF, a as u32, false)];
        if b > 0 {
            d.push(desc(BUF + a as u64, b as u32, false));
        }
        mq.add_desc_chains(&chain(0, &d), 0).unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        let r = self
            .dev
            .process_tx(&mut q, &self.mem, &self.tap, &mut TxScratch::default())
            .unwrap();
        (r, used(&mq))
    }

    fn host_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70000];
        match self.host.recv(&mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn tx_packet_reaches_the_tap_with_a_clean_header() {
    let r = rig(all_features());
    let mut hdr = VnetHdr {
        flags: 1,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 9,
        ..Default::default()
    };
    let p = tx_packet(hdr, 200);
    // Split inside the header: the chain is gathered, not taken descriptor by descriptor.
    let (n, used) = r.tx(&p, 5);
    assert_eq!(n, 1);
    assert_eq!(used, vec![(0, 0)]);
    let got = r.host_recv().expect("packet on the tap");
    hdr.num_buffers = 0;
    assert_eq!(&got[..VNET_HDR_LEN], &hdr.to_bytes());
    assert_eq!(&got[VNET_HDR_LEN..], &p[VNET_HDR_LEN..]);
    let s = r.dev.stats().snapshot();
    assert_eq!((s.tx_frames, s.tx_bytes, s.tx_dropped), (1, 200, 0));
}

#[test]
fn tx_truncated_header_is_dropped_and_counted() {
    let r = rig(all_features());
    let (n, used) = r.tx(&[0u8; 7], 7);
    assert_eq!(n, 1);
    assert_eq!(used, vec![(0, 0)]);
    assert!(r.host_recv().is_none());
    assert_eq!(r.dev.stats().snapshot().tx_dropped, 1);
}

#[test]
fn tx_oversize_frame_is_dropped() {
    let r = rig(all_features());
    r.tx(&tx_packet(VnetHdr::default(), 1600), 12);
    assert!(r.host_recv().is_none());
    // A GSO frame of the same size with TSO negotiated passes.
    let gso = VnetHdr {
        flags: 1,
        gso_type: 1,
        gso_size: 1448,
        hdr_len: 54,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    r.tx(&tx_packet(gso, 1600), 12);
    assert!(r.host_recv().is_some());
    let st = r.dev.stats().snapshot();
    assert_eq!(
        (st.tx_frames, st.tx_gso_frames),
        (1, 1),
        "counted as a GSO frame"
    );
    // Not with TSO off.
    let r = rig(without(VIRTIO_NET_F_HOST_TSO4));
    r.tx(&tx_packet(gso, 1600), 12);
    assert!(r.host_recv().is_none());
    assert_eq!(r.dev.stats().snapshot().tx_dropped, 1);
}

#[test]
fn tx_wrong_direction_and_bad_addresses_are_dropped() {
    let r = rig(all_features());
    let mq = MockSplitQueue::new(&r.mem, 16);
    let p = tx_packet(VnetHdr::default(), 100);
    r.mem.write_slice(&p, GuestAddress(BUF)).unwrap();
    let mut d = chain(0, &[desc(BUF, 12, false), desc(BUF + 12, 100, true)]);
    d.extend(chain(
        2,
        &[desc(BUF, 12, false), desc(MEM_SIZE as u64 - 10, 100, false)],
    ));
    d.extend(chain(4, &[desc(BUF, 112, false)]));
    mq.add_desc_chains(&d, 0).unwrap();
    let mut q: Queue = mq.create_queue().unwrap();
    r.dev
        .process_tx(&mut q, &r.mem, &r.tap, &mut TxScratch::default())
        .unwrap();
    assert_eq!(used(&mq), vec![(0, 0), (2, 0), (4, 0)]);
    assert_eq!(
        r.host_recv().map(|p| p.len()),
        Some(112),
        "only the valid chain is sent"
    );
    assert!(r.host_recv().is_none());
    let s = r.dev.stats().snapshot();
    assert_eq!((s.tx_frames, s.tx_dropped, s.bad_chains), (1, 2, 2));
}

#[test]
fn tx_fragmented_chain_falls_back_to_the_bounce_buffer() {
    let r = rig(all_features());
    let p = tx_packet(VnetHdr::default(), 8 * 70);
    r.mem.write_slice(&p, GuestAddress(BUF)).unwrap();
    // Header, then 70 eight-byte pieces: more than one writev takes.
    let mut d = vec![desc(BUF, 12, false)];
    d.extend((0..70).map(|i| desc(BUF + 12 + i * 8, 8, false)));
    assert!(d.len() > MAX_IOV);
    let mq = MockSplitQueue::new(&r.mem, 128);
    mq.add_desc_chains(&chain(0, &d), 0).unwrap();
    let mut q: Queue = mq.create_queue().unwrap();
    r.dev
        .process_tx(&mut q, &r.mem, &r.tap, &mut TxScratch::default())
        .unwrap();
    assert_eq!(r.host_recv().as_deref(), Some(&p[..]));
    assert_eq!(r.dev.stats().snapshot().tx_frames, 1);
}

#[test]
fn tx_descriptor_spanning_two_memory_regions() {
    const HALF: usize = MEM_SIZE / 2;
    let r = rig_with(
        all_features(),
        &[(GuestAddress(0), HALF), (GuestAddress(HALF as u64), HALF)],
    );
    let p = tx_packet(VnetHdr::default(), 1000);
    let at = HALF as u64 - 300;
    r.mem.write_slice(&p, GuestAddress(at)).unwrap();
    let mq = MockSplitQueue::new(&r.mem, 16);
    mq.add_desc_chains(&[desc(at, p.len() as u32, false)], 0)
        .unwrap();
    let mut q: Queue = mq.create_queue().unwrap();
    r.dev
        .process_tx(&mut q, &r.mem, &r.tap, &mut TxScratch::default())
        .unwrap();
    assert_eq!(r.host_recv().as_deref(), Some(&p[..]));
}

fn rx_packet(len: usize) -> Vec<u8> {
    let mut p = VnetHdr {
        flags: 2,
        ..Default::default()
    }
    .to_bytes()
    .to_vec();
    p.extend(frame(len, 11));
    p
}

#[test]
fn rx_merges_a_packet_across_buffers() {
    let r = rig(all_features());
    let mq = MockSplitQueue::new(&r.mem, 16);
    let bufs: Vec<RawDescriptor> = (0..4).map(|i| desc(BUF + i * 0x1000, 1000, true)).collect();
    mq.add_desc_chains(&bufs, 0).unwrap();
    let mut q: Queue = mq.create_queue().unwrap();
    let p = rx_packet(2500 - VNET_HDR_LEN);
    r.host.send(&p).unwrap();
    let mut st = RxState::default();
    let out = r.dev.process_rx(&mut q, &r.mem, &r.tap, &mut st).unwrap();
    assert_eq!(
        out,
        RxOutcome {
            used: true,
            stalled: false,
            frames: 1
        }
    );
    assert_eq!(used(&mq), vec![(0, 1000), (1, 1000), (2, 500)]);
    let mut got = vec![0u8; 2500];
    for (i, chunk) in got.chunks_mut(1000).enumerate() {
        r.mem
            .read_slice(chunk, GuestAddress(BUF + i as u64 * 0x1000))
            .unwrap();
    }
    let hdr = VnetHdr::from_bytes(got[..12].try_into().unwrap());
    assert_eq!(hdr.num_buffers, 3);
    assert_eq!(hdr.flags, 2);
    assert_eq!(&got[12..], &p[12..]);
    let stats = r.dev.stats().snapshot();
    assert_eq!((stats.rx_frames, stats.rx_gso_frames), (1, 0));

    // A GSO frame from the tap (receive offload) is counted as such.
    mq.add_desc_chains(&bufs, 3).unwrap();
    let mut g = VnetHdr {
        flags: 1,
        gso_type: 1,
        gso_size: 1448,
        hdr_len: 54,
        ..Default::default()
    }
    .to_bytes()
    .to_vec();
    g.extend(frame(2000, 7));
    r.host.send(&g).unwrap();
    let out = r.dev.process_rx(&mut q, &r.mem, &r.tap, &mut st).unwrap();
    assert_eq!(out.frames, 1);
    let stats = r.dev.stats().snapshot();
    assert_eq!((stats.rx_frames, stats.rx_gso_frames), (2, 1));
}

#[test]
fn rx_waits_for_buffers_and_resumes() {
    let r = rig(all_features());
    let mq = MockSplitQueue::new(&r.mem, 16);
    mq.add_desc_chains(&[desc(BUF, 1000, true)], 0).unwrap();
    let mut q: Queue = mq.create_queue().unwrap();
    let p = rx_packet(1800);
    r.host.send(&p).unwrap();
    let mut st = RxState::default();
    let out = r.dev.process_rx(&mut q, &r.mem, &r.tap, &mut st).unwrap();
    assert_eq!(
        out,
        RxOutcome {
            used: false,
            stalled: true,
            frames: 0
        }
    );
    assert!(st.has_pending());
    assert!(used(&mq).is_empty(), "the partial chain must be put back");
    // The guest adds a buffer and kicks.
    mq.add_desc_chains(&[desc(BUF + 0x1000, 1000, true)], 1)
        .unwrap();
    let out = r.dev.process_rx(&mut q, &r.mem, &r.tap, &mut st).unwrap();
    assert_eq!(
        out,
        RxOutcome {
            used: true,
            stalled: false,
            frames: 1
        }
    );
    assert_eq!(used(&mq), vec![(0, 1000), (1, 812)]);
    assert!(!st.has_pending());
}

#[test]
fn rx_without_mrg_uses_one_chain_and_drops_what_does_not_fit() {
    let r = rig(without(VIRTIO_NET_F_MRG_RXBUF));
    let mq = MockSplitQueue::new(&r.mem, 16);
    // Chain 0: two descriptors, 1600 bytes; chain 2: a 100-byte buffer.
    let mut d = chain(0, &[desc(BUF, 12, true), desc(BUF + 12, 1588, true)]);
    d.extend(chain(2, &[desc(BUF + 0x1000, 100, true)]));
    mq.add_desc_chains(&d, 0).unwrap();
    let mut q: Queue = mq.create_queue().unwrap();
    let mut st = RxState::default();
    r.host.send(&rx_packet(1000)).unwrap();
    r.host.send(&rx_packet(1000)).unwrap();
    let out = r.dev.process_rx(&mut q, &r.mem, &r.tap, &mut st).unwrap();
    assert!(out.used);
    assert_eq!(used(&mq), vec![(0, 1012)]);
    let mut h = [0u8; 12];
    r.mem.read_slice(&mut h, GuestAddress(BUF)).unwrap();
    assert_eq!(VnetHdr::from_bytes(&h).num_buffers, 1);
    let s = r.dev.stats().snapshot();
    assert_eq!((s.rx_frames, s.rx_dropped), (1, 1));
}

#[test]
fn rx_skips_readable_chains() {
    let r = rig(all_features());
    let mq = MockSplitQueue::new(&r.mem, 16);
    mq.add_desc_chains(&[desc(BUF, 1000, false), desc(BUF + 0x1000, 2000, true)], 0)
        .unwrap();
    let mut q: Queue = mq.create_queue().unwrap();
    r.host.send(&rx_packet(500)).unwrap();
    let mut st = RxState::default();
    r.dev.process_rx(&mut q, &r.mem, &r.tap, &mut st).unwrap();
    assert_eq!(used(&mq), vec![(0, 0), (1, 512)]);
    assert_eq!(r.dev.stats().snapshot().bad_chains, 1);
}

fn ctrl(r: &Rig, cmd: &[u8], with_ack: bool) -> (Vec<(u32, u32)>, u8) {
    let mq = MockSplitQueue::new(&r.mem, 16);
    r.mem.write_slice(cmd, GuestAddress(BUF)).unwrap();
    r.mem.write_obj(0xeeu8, GuestAddress(BUF + 0x1000)).unwrap();
    let mut d = vec![desc(BUF, 2, false)];
    if cmd.len() > 2 {
        d.push(desc(BUF + 2, cmd.len() as u32 - 2, false));
    }
    if with_ack {
        d.push(desc(BUF + 0x1000, 1, true));
    }
    mq.add_desc_chains(&chain(0, &d), 0).unwrap();
    let mut q: Queue = mq.create_queue().unwrap();
    assert!(r.dev.process_ctrl(&mut q, &r.mem).unwrap());
    (
        used(&mq),
        r.mem.read_obj::<u8>(GuestAddress(BUF + 0x1000)).unwrap(),
    )
}

#[test]
fn ctrl_mq_pairs_set() {
    let r = rig(all_features());
    let ok = VIRTIO_NET_OK as u8;
    let err = VIRTIO_NET_ERR as u8;
    let mq = VIRTIO_NET_CTRL_MQ as u8;
    assert_eq!(ctrl(&r, &[mq, 0, 2, 0], true), (vec![(0, 1)], ok));
    assert_eq!(r.dev.active_pairs(), 2);
    // More pairs than the device has, zero pairs, a short payload: ERR, nothing changes.
    assert_eq!(ctrl(&r, &[mq, 0, 3, 0], true).1, err);
    assert_eq!(ctrl(&r, &[mq, 0, 0, 0], true).1, err);
    assert_eq!(ctrl(&r, &[mq, 0, 1], true).1, err);
    assert_eq!(r.dev.active_pairs(), 2);
    // Without MQ negotiated the command is refused.
    let r = rig(without(VIRTIO_NET_F_MQ));
    assert_eq!(ctrl(&r, &[mq, 0, 1, 0], true).1, err);
}

#[test]
fn ctrl_other_commands() {
    let r = rig(all_features());
    let ok = VIRTIO_NET_OK as u8;
    let err = VIRTIO_NET_ERR as u8;
    assert_eq!(ctrl(&r, &[VIRTIO_NET_CTRL_RX as u8, 0, 1], true).1, ok);
    assert_eq!(ctrl(&r, &[VIRTIO_NET_CTRL_ANNOUNCE as u8, 0], true).1, ok);
    assert_eq!(
        ctrl(&r, &[VIRTIO_NET_CTRL_MAC as u8, 1, 2, 0, 0, 0, 0, 1], true).1,
        ok
    );
    assert_eq!(ctrl(&r, &[VIRTIO_NET_CTRL_MAC as u8, 1, 2], true).1, err);
    assert_eq!(ctrl(&r, &[99, 0, 1], true).1, err);
    // No ack descriptor: returned unwritten and counted.
    assert_eq!(
        ctrl(&r, &[VIRTIO_NET_CTRL_ANNOUNCE as u8, 0], false),
        (vec![(0, 0)], 0xee)
    );
    assert_eq!(r.dev.stats().snapshot().bad_chains, 1);
}

#[test]
fn offloads_reach_the_tap() {
    let r = rig(without(VIRTIO_NET_F_GUEST_TSO6));
    r.dev.apply_offloads(&r.tap).unwrap();
    let f = r.tap.offload.lock().unwrap().unwrap();
    assert_eq!(
        f,
        crate::tap::TUN_F_CSUM | crate::tap::TUN_F_TSO4 | crate::tap::TUN_F_UFO
    );
}
