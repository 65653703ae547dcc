//! Fuzzes the virtiofs request path (FUSE decoding + passthrough, and the requests rqemu serves
//! itself: SETLKW, COPY_FILE_RANGE) with guest-controlled bytes: each input is one FUSE request
//! in a readable descriptor, with a writable reply buffer. The server shares a private
//! temporary directory (it really creates what the requests ask for); at start-up the rig
//! mounts it (INIT), opens file `f` (inode 2, handle 1) read-write and the root directory
//! (handle 2), so inputs naming nodeid 2 / fh 1 reach the lock and copy code, and nodeid 1 /
//! fh 2 the directory reading code, with valid handles; xattrs are on.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rqemu_fs_backend::{FsParams, FsServer, UsedRing};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const REQ: u64 = 0x4000;
const RESP: u64 = 0x2_0000;

/// Deferred answers (a SETLKW that has to wait) go nowhere.
#[derive(Clone)]
struct NoRing;

impl UsedRing for NoRing {
    fn is_running(&self) -> bool {
        true
    }
    fn complete(&self, _head: u16, _len: u32) {}
}

struct Rig {
    _dir: tempfile::TempDir,
    srv: FsServer,
}

fn serve(srv: &FsServer, data: &[u8]) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap();
    let _ = mem.write_slice(data, GuestAddress(REQ));
    let q = MockSplitQueue::new(&mem, 16);
    let descs = [
        RawDescriptor::from(Descriptor::new(REQ, data.len() as u32, 0, 0)),
        RawDescriptor::from(Descriptor::new(RESP, 0x1_0000, 2, 0)),
    ];
    let Ok(chain) = q.build_desc_chain(&descs) else {
        return;
    };
    let _ = srv.process_chain(&mem, chain, &NoRing);
}

fn request(opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&(40 + body.len() as u32).to_le_bytes());
    m.extend_from_slice(&opcode.to_le_bytes());
    m.extend_from_slice(&1u64.to_le_bytes());
    m.extend_from_slice(&nodeid.to_le_bytes());
    m.extend_from_slice(&[0u8; 16]);
    m.extend_from_slice(body);
    m
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("f"), vec![7u8; 8192]).expect("file");
        // Names the seed requests remove (they are only there for the first one).
        std::fs::create_dir(dir.path().join("d")).expect("dir");
        std::fs::write(dir.path().join("node"), b"").expect("file");
        let params = FsParams {
            xattr: true,
            ..FsParams::default()
        };
        let srv = FsServer::new(&params, dir.path()).expect("server");
        srv.import().expect("import");
        let init: Vec<u8> = [7u32, 31, 0x2_0000, 0x402]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        serve(&srv, &request(26, 0, &init));
        serve(&srv, &request(1, 1, b"f\0"));
        serve(&srv, &request(14, 2, &[2, 0, 0, 0, 0, 0, 0, 0]));
        serve(&srv, &request(27, 1, &[0u8; 8]));
        Rig { _dir: dir, srv }
    })
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() || data.len() > 0x1_0000 {
        return;
    }
    serve(&rig().srv, data);
});
