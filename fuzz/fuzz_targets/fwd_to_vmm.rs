//! Fuzzes what the VMM parses from a forwarding daemon (`rqemu-protocol`, VMM end): the
//! daemon's `HELLO` and the VMM's grant decision on it, framed socket replies (access replies,
//! postcard control replies), and the responses a daemon writes into a ring slot.
//!
//! Input: a selector byte (0 HELLO, 1 socket frame, 2 ring), then the bytes. For the ring: the
//! sequence number the VMM waits for (8 bytes, little-endian), then the ring from offset 0.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rqemu_protocol::handshake::{Answer, Hello};
use rqemu_protocol::messages::{
    self, AccessReply, ControlReply, TAG_ACCESS_REPLY, TAG_CONTROL_REPLY,
};
use rqemu_protocol::ring::{Poll, RingView, RING_BYTES};
use rqemu_protocol::sys::SharedMem;
use rqemu_protocol::GrantPolicy;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => hello(rest),
        1 => frame(rest),
        _ => ring(rest),
    }
});

fn hello(b: &[u8]) {
    let Ok(hello) = Hello::decode(b) else {
        return;
    };
    // A decoded HELLO encodes again to the same message.
    let again = hello.encode().expect("a decoded HELLO encodes");
    assert_eq!(Hello::decode(&again).ok().as_ref(), Some(&hello));
    // What the VMM grants fits what was claimed, and travels intact.
    let policy = GrantPolicy::isa_default(2);
    if let Ok(grant) = policy.decide(&hello) {
        assert!(grant.matches(&hello), "{grant:?} does not match {hello:?}");
        let wire = grant.encode().expect("a decided grant encodes");
        assert_eq!(Answer::decode(&wire).ok(), Some(Answer::Grant(grant)));
    }
}

fn frame(b: &[u8]) {
    let Ok((tag, p)) = messages::unframe(b) else {
        return;
    };
    match tag {
        TAG_ACCESS_REPLY => {
            let _ = AccessReply::decode(p);
        }
        TAG_CONTROL_REPLY => {
            let _ = messages::decode_postcard::<ControlReply>(p);
        }
        _ => {}
    }
}

fn ring(b: &[u8]) {
    thread_local! {
        static MEM: SharedMem = SharedMem::create("fuzz-ring", RING_BYTES).expect("memfd");
    }
    if b.len() < 8 {
        return;
    }
    let (seq, body) = b.split_at(8);
    let seq = u64::from_le_bytes(seq.try_into().expect("8 bytes"));
    MEM.with(|m| {
        let body = &body[..body.len().min(RING_BYTES)];
        // SAFETY: the mapping is RING_BYTES long and owned by this thread's SharedMem; the
        // copy stays inside it.
        unsafe {
            std::ptr::write_bytes(m.ptr(), 0, RING_BYTES);
            std::ptr::copy_nonoverlapping(body.as_ptr(), m.ptr(), body.len());
        }
        let view = RingView::new(m, 0).expect("one ring fits");
        let _ = view.tail();
        match view.poll(seq) {
            Poll::Pending | Poll::Done(..) => {}
            Poll::Mismatch(got) => assert_ne!(got, seq),
        }
    });
}
