//! Fuzzes the virtio-blk request engine with guest-controlled descriptor chains and memory:
//! the input is split into descriptors (addr, len, flags) and guest memory contents.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use rqemu_block_backend::image::mem::MemImage;
use rqemu_block_backend::virtio::{BlkParams, BlockDevice, Scratch};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x10_0000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = usize::from(data[0] % 6) + 1;
    let (descs_raw, rest) = data[1..].split_at((n * 13).min(data.len() - 1));
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    // Guest memory contents: the rest of the input, repeated at 0x1000.
    if !rest.is_empty() {
        let _ = mem.write_slice(&rest[..rest.len().min(MEM - 0x1000)], GuestAddress(0x1000));
    }
    let descs: Vec<RawDescriptor> = descs_raw
        .chunks_exact(13)
        .map(|c| {
            let addr = u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                | (u64::from(c[12] & 0x80) << 25);
            let len = u32::from_le_bytes([c[4], c[5], c[6], c[7]]) % 0x2_0000;
            let flags = u16::from(c[8] & 0x2); // WRITE or not; NEXT is set by the mock
            RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
        })
        .collect();
    if descs.is_empty() {
        return;
    }
    let image = Arc::new(MemImage::new(64 * 1024, false));
    let dev = BlockDevice::new(image, BlkParams::default()).unwrap();
    let q = MockSplitQueue::new(&mem, 16);
    let Ok(chain) = q.build_desc_chain(&descs) else {
        return;
    };
    let mut scratch = Scratch::default();
    let _ = dev.process_chain(&mem, chain, &mut scratch);
});
