//! Fuzzes what a forwarding daemon parses from the VMM (`rqemu-protocol`, daemon end): framed
//! socket messages (register accesses, postcard control messages), the handshake answer
//! (GRANT or REFUSE), and the request slots of a per-vCPU ring in shared memory, which the VMM
//! writes.
//!
//! Input: a selector byte (0 socket frame, 1 handshake answer, 2 ring), then the bytes. For
//! the ring: the VMM's `head` (8 bytes, little-endian), then the slot area (ring offset 256).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rqemu_protocol::handshake::Answer;
use rqemu_protocol::messages::{self, Access, Control, FRAME_HDR, TAG_ACCESS, TAG_CONTROL};
use rqemu_protocol::ring::{RingView, RING_BYTES, SLOTS};
use rqemu_protocol::sys::SharedMem;

/// Offset of the first slot in a ring (see `protocol/src/ring.rs`).
const SLOT_BASE: usize = 256;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => frame(rest),
        1 => {
            if let Ok(Answer::Grant(g)) = Answer::decode(rest) {
                for w in &g.windows {
                    assert!(w.is_valid(), "a decoded grant holds an invalid window {w:?}");
                }
            }
        }
        _ => ring(rest),
    }
});

fn frame(b: &[u8]) {
    let Ok((tag, p)) = messages::unframe(b) else {
        return;
    };
    match tag {
        TAG_ACCESS => {
            if let Ok(a) = Access::decode(p) {
                let e = a.encode();
                assert_eq!(Access::decode(&e[FRAME_HDR..]).ok(), Some(a));
            }
        }
        TAG_CONTROL => {
            if let Ok(c) = messages::decode_postcard::<Control>(p) {
                let _ = c.fd_count();
            }
        }
        _ => {}
    }
}

fn ring(b: &[u8]) {
    thread_local! {
        static MEM: SharedMem = SharedMem::create("fuzz-ring", RING_BYTES).expect("memfd");
    }
    MEM.with(|m| {
        let (head, slots) = b.split_at(b.len().min(8));
        let slots = &slots[..slots.len().min(RING_BYTES - SLOT_BASE)];
        // SAFETY: the mapping is RING_BYTES long and owned by this thread's SharedMem; the
        // copies stay inside it (8 bytes at 0, at most RING_BYTES - SLOT_BASE at SLOT_BASE).
        unsafe {
            std::ptr::write_bytes(m.ptr(), 0, RING_BYTES);
            std::ptr::copy_nonoverlapping(head.as_ptr(), m.ptr(), head.len());
            std::ptr::copy_nonoverlapping(slots.as_ptr(), m.ptr().add(SLOT_BASE), slots.len());
        }
        let view = RingView::new(m, 0).expect("one ring fits");
        let head = view.head();
        // The daemon serves requests up to the VMM's (untrusted) head, one ring's worth.
        for k in 0..SLOTS {
            let n = head.wrapping_sub(k);
            if let Some(a) = view.take(n) {
                assert_eq!(a.seq, n);
                assert!(messages::valid_len(a.len.into()));
                let _ = view.complete(n, messages::STATUS_OK, a.data);
            }
        }
    });
}
