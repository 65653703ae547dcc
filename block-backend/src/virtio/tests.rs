//! Mock-queue tests of the request engine: real descriptor chains in a mock guest memory.

use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::*;
use crate::image::mem::MemImage;

const MEM_SIZE: usize = 0x40_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const SIZE: usize = 1 << 20;

struct Rig {
    mem: GuestMemoryMmap,
    image: Arc<MemImage>,
    dev: BlockDevice,
    scratch: Scratch,
}

fn rig(params: BlkParams) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let image = Arc::new(MemImage::new(SIZE, false));
    let dev = BlockDevice::new(image.clone(), params).unwrap();
    Rig {
        mem,
        image,
        dev,
        scratch: Scratch::default(),
    }
}

fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
    let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

impl Rig {
    fn run(&mut self, descs: &[RawDescriptor]) -> Completion {
        self.mem.write_slice(&[0xee], GuestAddress(STATUS)).unwrap();
        let q = MockSplitQueue::new(&self.mem, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        self.dev.process_chain(&self.mem, chain, &mut self.scratch)
    }

    fn request(&mut self, kind: u32, sector: u64, data: &[RawDescriptor]) -> Completion {
        self.mem
            .write_slice(&header(kind, sector), GuestAddress(HDR))
            .unwrap();
        let mut d = vec![desc(HDR, 16, false)];
        d.extend_from_slice(data);
        d.push(desc(STATUS, 1, true));
        self.run(&d)
    }

    fn status_byte(&self) -> u8 {
        let mut b = [0u8];
        self.mem.read_slice(&mut b, GuestAddress(STATUS)).unwrap();
        b[0]
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn write_then_read_round_trip() {
    let mut r = rig(BlkParams::default());
    let data = pattern(8192, 7);
    r.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let c = r.request(
        VIRTIO_BLK_T_OUT,
        3,
        &[desc(DATA, 4096, false), desc(DATA + 4096, 4096, false)],
    );
    assert_eq!(
        c,
        Completion {
            used_len: 1,
            status: Some(Status::Ok)
        }
    );
    assert_eq!(r.status_byte(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(&r.image.snapshot()[3 * 512..3 * 512 + 8192], &data[..]);

    r.mem
        .write_slice(&vec![0u8; 8192], GuestAddress(DATA))
        .unwrap();
    let c = r.request(
        VIRTIO_BLK_T_IN,
        3,
        &[desc(DATA, 512, true), desc(DATA + 512, 7680, true)],
    );
    assert_eq!(
        c,
        Completion {
            used_len: 8193,
            status: Some(Status::Ok)
        }
    );
    let mut back = vec![0u8; 8192];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, data);
}

#[test]
fn large_read_is_chunked() {
    let mut r = rig(BlkParams::default());
    let data = pattern(CHUNK * 2 + 512, 3);
    r.image.write_at(&data, 0).unwrap();
    let c = r.request(VIRTIO_BLK_T_IN, 0, &[desc(DATA, data.len() as u32, true)]);
    assert_eq!(c.status, Some(Status::Ok));
    let mut back = vec![0u8; data.len()];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, data);
}

#[test]
fn header_and_status_in_one_buffer_each_side() {
    // Header and data in one readable descriptor (any layout is legal).
    let mut r = rig(BlkParams::default());
    let mut buf = header(VIRTIO_BLK_T_OUT, 1).to_vec();
    buf.extend_from_slice(&pattern(512, 9));
    r.mem.write_slice(&buf, GuestAddress(HDR)).unwrap();
    let c = r.run(&[desc(HDR, buf.len() as u32, false), desc(STATUS, 1, true)]);
    assert_eq!(c.status, Some(Status::Ok));
    assert_eq!(&r.image.snapshot()[512..1024], &pattern(512, 9)[..]);
}

#[test]
fn out_of_range_and_unaligned_requests_fail() {
    let mut r = rig(BlkParams::default());
    let last = (SIZE / 512) as u64;
    let c = r.request(VIRTIO_BLK_T_IN, last, &[desc(DATA, 512, true)]);
    assert_eq!(c.status, Some(Status::IoErr));
    let c = r.request(VIRTIO_BLK_T_IN, last - 1, &[desc(DATA, 1024, true)]);
    assert_eq!(c.status, Some(Status::IoErr));
    let c = r.request(VIRTIO_BLK_T_OUT, u64::MAX, &[desc(DATA, 512, false)]);
    assert_eq!(c.status, Some(Status::IoErr));
    let c = r.request(VIRTIO_BLK_T_OUT, 0, &[desc(DATA, 100, false)]);
    assert_eq!(c.status, Some(Status::IoErr));
    let c = r.request(VIRTIO_BLK_T_IN, last - 1, &[desc(DATA, 512, true)]);
    assert_eq!(c.status, Some(Status::Ok));
}

#[test]
fn malformed_chains_never_panic() {
    let mut r = rig(BlkParams::default());
    // No status byte at all: nothing written, used length 0.
    r.mem
        .write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
        .unwrap();
    let c = r.run(&[desc(HDR, 16, false)]);
    assert_eq!(
        c,
        Completion {
            used_len: 0,
            status: None
        }
    );
    // Short header.
    let c = r.run(&[desc(HDR, 8, false), desc(STATUS, 1, true)]);
    assert_eq!(c.status, Some(Status::IoErr));
    // Data descriptor outside guest memory.
    let c = r.request(
        VIRTIO_BLK_T_OUT,
        0,
        &[desc(MEM_SIZE as u64 - 256, 512, false)],
    );
    assert_eq!(c.status, Some(Status::IoErr));
    // Writable descriptor outside guest memory: the status cannot be written safely.
    let c = r.request(VIRTIO_BLK_T_IN, 0, &[desc(u64::MAX - 100, 512, true)]);
    assert_eq!(c.status, None);
    // Wrong direction: IN with a read-only data buffer -> only the status is writable.
    let c = r.request(VIRTIO_BLK_T_IN, 0, &[desc(DATA, 512, false)]);
    assert_eq!(
        c,
        Completion {
            used_len: 1,
            status: Some(Status::Ok)
        }
    );
    // Wrong direction: OUT whose data is device-writable: no data -> zero-length write.
    let c = r.request(VIRTIO_BLK_T_OUT, 0, &[desc(DATA, 512, true)]);
    assert_eq!(c.status, Some(Status::Ok));
    assert_eq!(c.used_len, 1);
    assert!(r.image.snapshot().iter().all(|&b| b == 0));
    // Unknown request type.
    let c = r.request(0x1234, 0, &[]);
    assert_eq!(c.status, Some(Status::Unsupp));
}

#[test]
fn get_id_returns_the_serial() {
    let mut r = rig(BlkParams {
        serial: b"disk-42".to_vec(),
        ..Default::default()
    });
    let c = r.request(VIRTIO_BLK_T_GET_ID, 0, &[desc(DATA, 20, true)]);
    assert_eq!(
        c,
        Completion {
            used_len: 21,
            status: Some(Status::Ok)
        }
    );
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..7], b"disk-42");
    assert_eq!(&id[7..], &[0; 13]);
}

#[test]
fn serial_longer_than_20_bytes_is_refused() {
    let image = Arc::new(MemImage::new(4096, false));
    let p = BlkParams {
        serial: vec![b'x'; 21],
        ..Default::default()
    };
    assert!(matches!(
        BlockDevice::new(image, p),
        Err(DeviceError::SerialTooLong(_))
    ));
}

fn segment(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = sector.to_le_bytes().to_vec();
    s.extend_from_slice(&sectors.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

#[test]
fn discard_and_write_zeroes() {
    let mut r = rig(BlkParams::default());
    r.image.write_at(&vec![0xaa; SIZE], 0).unwrap();
    let mut segs = segment(0, 2, 0);
    segs.extend(segment(10, 1, 0));
    r.mem.write_slice(&segs, GuestAddress(DATA)).unwrap();
    let c = r.request(VIRTIO_BLK_T_DISCARD, 0, &[desc(DATA, 32, false)]);
    assert_eq!(c.status, Some(Status::Ok));
    let snap = r.image.snapshot();
    assert!(snap[..1024].iter().all(|&b| b == 0));
    assert!(snap[1024..5120].iter().all(|&b| b == 0xaa));
    assert!(snap[5120..5632].iter().all(|&b| b == 0));

    r.mem
        .write_slice(&segment(20, 4, 1), GuestAddress(DATA))
        .unwrap();
    let c = r.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[desc(DATA, 16, false)]);
    assert_eq!(c.status, Some(Status::Ok));
    assert!(r.image.snapshot()[20 * 512..24 * 512]
        .iter()
        .all(|&b| b == 0));

    // Discard with the unmap flag, unknown flags: UNSUPP. Bad length / range: IOERR.
    r.mem
        .write_slice(&segment(0, 1, 1), GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        r.request(VIRTIO_BLK_T_DISCARD, 0, &[desc(DATA, 16, false)])
            .status,
        Some(Status::Unsupp)
    );
    r.mem
        .write_slice(&segment(0, 1, 4), GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        r.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[desc(DATA, 16, false)])
            .status,
        Some(Status::Unsupp)
    );
    assert_eq!(
        r.request(VIRTIO_BLK_T_DISCARD, 0, &[desc(DATA, 15, false)])
            .status,
        Some(Status::IoErr)
    );
    r.mem
        .write_slice(&segment((SIZE / 512) as u64, 1, 0), GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        r.request(VIRTIO_BLK_T_DISCARD, 0, &[desc(DATA, 16, false)])
            .status,
        Some(Status::IoErr)
    );
    // A bad segment after a good one: nothing is done.
    r.image.write_at(&[0x55; 512], 0).unwrap();
    let mut segs = segment(0, 1, 0);
    segs.extend(segment(u64::MAX / 2, 1, 0));
    r.mem.write_slice(&segs, GuestAddress(DATA)).unwrap();
    assert_eq!(
        r.request(VIRTIO_BLK_T_DISCARD, 0, &[desc(DATA, 32, false)])
            .status,
        Some(Status::IoErr)
    );
    assert!(r.image.snapshot()[..512].iter().all(|&b| b == 0x55));
    // Too many segments.
    let many: Vec<u8> = (0..33).flat_map(|i| segment(i, 1, 0)).collect();
    r.mem.write_slice(&many, GuestAddress(DATA)).unwrap();
    let c = r.request(
        VIRTIO_BLK_T_DISCARD,
        0,
        &[desc(DATA, many.len() as u32, false)],
    );
    assert_eq!(c.status, Some(Status::IoErr));
}

#[test]
fn read_only_refuses_writes() {
    let mut r = rig(BlkParams {
        read_only: true,
        ..Default::default()
    });
    r.mem.write_slice(&[1u8; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        r.request(VIRTIO_BLK_T_OUT, 0, &[desc(DATA, 512, false)])
            .status,
        Some(Status::IoErr)
    );
    r.mem
        .write_slice(&segment(0, 1, 0), GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        r.request(VIRTIO_BLK_T_DISCARD, 0, &[desc(DATA, 16, false)])
            .status,
        Some(Status::Unsupp)
    );
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 0, &[desc(DATA, 512, true)])
            .status,
        Some(Status::Ok)
    );
    assert!(r.image.snapshot().iter().all(|&b| b == 0));
    assert_ne!(r.dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn flush_succeeds() {
    let mut r = rig(BlkParams::default());
    assert_eq!(
        r.request(VIRTIO_BLK_T_FLUSH, 0, &[]).status,
        Some(Status::Ok)
    );
}

#[test]
fn random_chains_never_panic() {
    // A seeded fuzz loop over arbitrary descriptor layouts and headers.
    let mut r = rig(BlkParams::default());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..2000 {
        let n = (next() % 5 + 1) as usize;
        let descs: Vec<RawDescriptor> = (0..n)
            .map(|_| {
                let addr = match next() % 4 {
                    0 => next(),
                    _ => next() % MEM_SIZE as u64,
                };
                desc(addr, (next() % 70_000) as u32, next() % 2 == 0)
            })
            .collect();
        let mut h = header((next() % 16) as u32, next() % 4096);
        h[4] = next() as u8;
        r.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        let c = r.run(&descs);
        assert!(
            c.used_len as u64
                <= descs
                    .iter()
                    .map(|d| u64::from(SplitDescriptor::from(*d).len()))
                    .sum::<u64>()
        );
    }
}

#[test]
fn status_goes_to_the_last_non_empty_writable_byte() {
    let mut r = rig(BlkParams::default());
    r.mem
        .write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
        .unwrap();
    // Data, then an empty writable descriptor, then the status byte.
    let c = r.run(&[
        desc(HDR, 16, false),
        desc(DATA, 512, true),
        desc(DATA + 4096, 0, true),
        desc(STATUS, 1, true),
    ]);
    assert_eq!(
        c,
        Completion {
            used_len: 513,
            status: Some(Status::Ok)
        }
    );
    assert_eq!(r.status_byte(), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn raw_image_reads_and_writes_guest_memory_directly() {
    use crate::image::{raw::RawImage, DiskImage};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.raw");
    let content = pattern(1 << 20, 5);
    std::fs::write(&path, &content).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let image: Arc<dyn DiskImage> = Arc::new(RawImage::new(file, false).unwrap());
    let dev = BlockDevice::new(image, BlkParams::default()).unwrap();
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut scratch = Scratch::default();
    let q = MockSplitQueue::new(&mem, 16);
    // A read scattered over three buffers, one of them unaligned.
    mem.write_slice(&header(VIRTIO_BLK_T_IN, 2), GuestAddress(HDR))
        .unwrap();
    let chain = q
        .build_desc_chain(&[
            desc(HDR, 16, false),
            desc(DATA + 1, 1000, true),
            desc(DATA + 8192, 24, true),
            desc(DATA + 16384, 512, true),
            desc(STATUS, 1, true),
        ])
        .unwrap();
    let c = dev.process_chain(&mem, chain, &mut scratch);
    assert_eq!(
        c,
        Completion {
            used_len: 1537,
            status: Some(Status::Ok)
        }
    );
    let mut got = vec![0u8; 1536];
    mem.read_slice(&mut got[..1000], GuestAddress(DATA + 1))
        .unwrap();
    mem.read_slice(&mut got[1000..1024], GuestAddress(DATA + 8192))
        .unwrap();
    mem.read_slice(&mut got[1024..], GuestAddress(DATA + 16384))
        .unwrap();
    assert_eq!(got, content[1024..2560]);
    // A gathered write, then the file holds it.
    mem.write_slice(&pattern(1024, 77), GuestAddress(DATA + 3))
        .unwrap();
    mem.write_slice(&header(VIRTIO_BLK_T_OUT, 100), GuestAddress(HDR))
        .unwrap();
    let chain = q
        .build_desc_chain(&[
            desc(HDR, 16, false),
            desc(DATA + 3, 100, false),
            desc(DATA + 103, 924, false),
            desc(STATUS, 1, true),
        ])
        .unwrap();
    assert_eq!(
        dev.process_chain(&mem, chain, &mut scratch).status,
        Some(Status::Ok)
    );
    assert_eq!(
        std::fs::read(&path).unwrap()[51200..52224],
        pattern(1024, 77)[..]
    );
}

/// `prepare_chain` hands aligned reads and writes on a passthrough image to the caller as
/// iovecs on guest memory (and everything else, or anything misaligned, back as `Sync`);
/// `RawIo::complete` writes the status and zero-fills a short read.
#[test]
fn passthrough_requests_become_raw_io() {
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(SIZE as u64).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.path())
        .unwrap();
    let img = crate::image::raw::RawImage::new(file, false)
        .unwrap()
        .with_direct(Some(512));
    let dev = BlockDevice::new(Arc::new(img), BlkParams::default()).unwrap();
    let prepare = |kind: u32, sector: u64, data: RawDescriptor| {
        mem.write_slice(&header(kind, sector), GuestAddress(HDR))
            .unwrap();
        let q = MockSplitQueue::new(&mem, 16);
        let chain = q
            .build_desc_chain(&[desc(HDR, 16, false), data, desc(STATUS, 1, true)])
            .unwrap();
        match dev.prepare_chain(&mem, chain, true) {
            Prepared::Io(io) => Some(io),
            _ => None,
        }
    };
    let io = prepare(VIRTIO_BLK_T_IN, 8, desc(DATA, 4096, true)).expect("aligned read");
    assert_eq!(
        (io.write, io.offset, io.len, io.iov.len()),
        (false, 4096, 4096, 1)
    );
    let host = mem
        .get_slice(GuestAddress(DATA), 1)
        .unwrap()
        .ptr_guard()
        .as_ptr();
    assert_eq!(io.iov[0].iov_base as usize, host as usize);
    mem.write_slice(&[0xab; 4096], GuestAddress(DATA)).unwrap();
    // SAFETY: `mem` is still mapped.
    let used = unsafe { io.complete(1024) }; // short read: the rest reads as zeroes
    assert_eq!(used, 4097);
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back[..1024].iter().all(|&b| b == 0xab) && back[1024..].iter().all(|&b| b == 0));
    let mut st = [0xee];
    mem.read_slice(&mut st, GuestAddress(STATUS)).unwrap();
    assert_eq!(st[0], VIRTIO_BLK_S_OK as u8);

    let io = prepare(VIRTIO_BLK_T_OUT, 16, desc(DATA, 512, false)).expect("aligned write");
    assert!(io.write && io.offset == 8192);
    // SAFETY: as above.
    assert_eq!(unsafe { io.complete(100) }, 1, "a short write fails");
    mem.read_slice(&mut st, GuestAddress(STATUS)).unwrap();
    assert_eq!(st[0], VIRTIO_BLK_S_IOERR as u8);

    // Misaligned memory under O_DIRECT, out of range, and flushes run synchronously.
    assert!(prepare(VIRTIO_BLK_T_IN, 0, desc(DATA + 8, 512, true)).is_none());
    assert!(prepare(VIRTIO_BLK_T_IN, (SIZE / 512) as u64, desc(DATA, 512, true)).is_none());
    assert!(prepare(VIRTIO_BLK_T_FLUSH, 0, desc(DATA, 512, true)).is_none());
}
