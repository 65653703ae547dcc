//! Fuzz entry point ([`fuzz_session`], for the `vsock_session` cargo-fuzz target): a guest
//! session against a real muxer whose host side is UNIX sockets in a private directory.
//!
//! The input is a list of commands, each a selector byte and its operands:
//!
//! | byte % 5 | operands | what |
//! |---|---|---|
//! | 0 | `u16` length L, L bytes | a guest TX packet (header + payload) |
//! | 1 | `u16` room | a packet for the guest, into an RX buffer of `room` bytes |
//! | 2 | — | host socket events |
//! | 3 | `u8` n | every host listener accepts, every host socket gets n bytes |
//! | 4 | `u8` port | a host connection, `CONNECT <port>\n` |
//!
//! Host listeners serve host ports 1 and 2 (`PATH_1`, `PATH_2`). Every packet for the guest is
//! checked: from the host CID to the guest's, a stream, a known operation, the payload within
//! the buffer and only on RW. Between inputs every connection is reset and the host sockets
//! are drained, so inputs do not leak into each other.

use std::cell::RefCell;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use crate::host::port_path;
use crate::muxer::Muxer;
use crate::packet::{Op, HDR_LEN, HOST_CID, MAX_PAYLOAD, TYPE_STREAM};

const GUEST_CID: u64 = 3;

struct Rig {
    dir: PathBuf,
    mux: Muxer,
    ports: Vec<UnixListener>,
    accepted: Vec<UnixStream>,
    clients: Vec<UnixStream>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rig() -> Rig {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("rqemu-vsock-fuzz-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fuzz rig directory");
    let path = dir.join("v.sock");
    let l = UnixListener::bind(&path).expect("fuzz rig listener");
    let ports = [1, 2]
        .iter()
        .map(|&p| {
            let l = UnixListener::bind(port_path(&path, p)).expect("fuzz rig port");
            l.set_nonblocking(true).expect("non-blocking");
            l
        })
        .collect();
    let mux = Muxer::new(GUEST_CID, path, l, Box::new(|_| true)).expect("fuzz rig muxer");
    Rig {
        dir,
        mux,
        ports,
        accepted: Vec::new(),
        clients: Vec::new(),
    }
}

thread_local! {
    static RIG: RefCell<Option<Rig>> = const { RefCell::new(None) };
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// Runs one fuzz input (see the module documentation). Panics when a packet for the guest
/// breaks an invariant, which is what a fuzzer looks for.
pub fn fuzz_session(data: &[u8]) {
    RIG.with(|r| {
        let mut r = r.borrow_mut();
        let rig = r.get_or_insert_with(rig);
        run(rig, data);
        // Forget everything for the next input.
        rig.mux.reset();
        let _ = rig.mux.host_events();
        rig.mux.reset();
        rig.accepted.clear();
        rig.clients.clear();
        for l in &rig.ports {
            while l.accept().is_ok() {}
        }
    });
}

fn run(rig: &mut Rig, data: &[u8]) {
    let mut input = Input(data);
    while let Some(sel) = input.u8() {
        match sel % 5 {
            0 => {
                let Some(len) = input.u16() else { return };
                let pkt = input.bytes(usize::from(len)).to_vec();
                rig.mux.from_guest(&pkt);
            }
            1 => {
                let Some(room) = input.u16() else { return };
                let room = usize::from(room);
                if room < HDR_LEN {
                    continue;
                }
                if let Some((h, d)) = rig.mux.next_rx(room - HDR_LEN) {
                    assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));
                    assert_eq!(h.type_, TYPE_STREAM);
                    assert_eq!(h.len as usize, d.len());
                    assert!(d.len() <= (room - HDR_LEN).min(MAX_PAYLOAD));
                    let op = h.op().expect("a known operation");
                    assert!(op == Op::Rw || d.is_empty(), "{op:?} with data");
                    assert!(op != Op::Rw || !d.is_empty(), "empty RW");
                }
            }
            2 => {
                rig.mux.host_events().expect("epoll");
            }
            3 => {
                let Some(n) = input.u8() else { return };
                for l in &rig.ports {
                    while let Ok((s, _)) = l.accept() {
                        let _ = s.set_nonblocking(true);
                        rig.accepted.push(s);
                    }
                }
                let chunk = vec![0x5a; usize::from(n)];
                for s in rig.accepted.iter_mut().chain(rig.clients.iter_mut()) {
                    let _ = s.write(&chunk);
                }
            }
            _ => {
                let Some(port) = input.u8() else { return };
                if rig.clients.len() >= 8 {
                    continue;
                }
                let path = rig.dir.join("v.sock");
                if let Ok(mut s) = UnixStream::connect(path) {
                    let _ = s.set_nonblocking(true);
                    let _ = s.write_all(format!("CONNECT {port}\n").as_bytes());
                    rig.clients.push(s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Header;

    fn guest(op: Op, src_port: u32, dst_port: u32, payload: &[u8]) -> Vec<u8> {
        let h = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: payload.len() as u32,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        };
        let mut v = h.encode().to_vec();
        v.extend_from_slice(payload);
        let mut cmd = vec![0];
        cmd.extend_from_slice(&(v.len() as u16).to_le_bytes());
        cmd.extend_from_slice(&v);
        cmd
    }

    /// A session exercising every command: the kind of input the seed corpus holds.
    pub(crate) fn seed_session() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(guest(Op::Request, 1000, 1, &[]));
        s.extend(guest(Op::Request, 1001, 7, &[]));
        s.extend([1, 0, 1, 1, 0, 1]);
        s.extend(guest(Op::Rw, 1000, 1, b"hello"));
        s.extend([3, 100, 2, 1, 0, 16, 1, 0, 16]);
        s.extend([4, 9, 2, 1, 0, 1]);
        s.extend(guest(Op::Response, 9, 1 << 30, &[]));
        s.extend(guest(Op::CreditRequest, 1000, 1, &[]));
        s.extend(guest(Op::Shutdown, 1000, 1, &[]));
        s.extend([2, 1, 0, 1, 1, 0, 1, 1, 0, 1]);
        s
    }

    #[test]
    fn the_committed_seed_corpus_runs_clean() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vsock_session");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            fuzz_session(&std::fs::read(e.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n >= 5, "{} holds {n} seeds", dir.display());
    }

    #[test]
    fn seeds_and_random_sessions_keep_the_invariants() {
        fuzz_session(&seed_session());
        fuzz_session(&[]);
        fuzz_session(&[0, 0xff, 0xff, 1, 2, 3]);
        // A seeded random walk over mutated seeds (xorshift): no panic, no invariant broken.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let seed = seed_session();
        for _ in 0..300 {
            let mut s = seed.clone();
            for _ in 0..8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize) % s.len();
                s[at] = (x >> 32) as u8;
            }
            fuzz_session(&s);
        }
    }
}
