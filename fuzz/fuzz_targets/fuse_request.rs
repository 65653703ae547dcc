//! Fuzzes the virtiofs request path (FUSE decoding + passthrough) with guest-controlled bytes:
//! each input is one FUSE request in a readable descriptor, with a writable reply buffer. The
//! server shares a private temporary directory (it really creates what the requests ask for).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rqemu_fs_backend::{FsParams, FsServer};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const REQ: u64 = 0x4000;
const RESP: u64 = 0x2_0000;

struct Rig {
    _dir: tempfile::TempDir,
    srv: FsServer,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let srv = FsServer::new(&FsParams::default(), dir.path()).expect("server");
        srv.import().expect("import");
        Rig { _dir: dir, srv }
    })
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() || data.len() > 0x1_0000 {
        return;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap();
    let _ = mem.write_slice(data, GuestAddress(REQ));
    let q = MockSplitQueue::new(&mem, 16);
    let descs = [
        RawDescriptor::from(Descriptor::new(REQ, data.len() as u32, 0, 0)),
        RawDescriptor::from(Descriptor::new(RESP, 0x1_0000, 2, 0)),
    ];
    let Ok(chain) = q.build_desc_chain(&descs) else { return };
    let _ = rig().srv.process_chain(&mem, chain);
});
