use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use super::*;
use crate::conn::{BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
use crate::host::port_path;

const CID: u64 = 3;

struct Rig {
    dir: tempfile::TempDir,
    mux: Muxer,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let l = UnixListener::bind(&path).unwrap();
    let mux = Muxer::new(CID, path, l, Box::new(|_| true)).unwrap();
    Rig { dir, mux }
}

impl Rig {
    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("v.sock")
    }
    fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(port_path(&self.path(), port)).unwrap()
    }
    /// Every packet the muxer has for the guest now (after draining host events).
    fn drain(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.mux.host_events().unwrap();
        let mut out = Vec::new();
        while self.mux.has_rx() {
            match self.mux.next_rx(MAX_PAYLOAD) {
                Some(p) => out.push(p),
                None => break,
            }
        }
        out
    }
}

fn pkt(op: Op, src_port: u32, dst_port: u32, payload: &[u8]) -> Vec<u8> {
    pkt_credit(op, src_port, dst_port, payload, 1 << 20, 0)
}

fn pkt_credit(
    op: Op,
    src_port: u32,
    dst_port: u32,
    payload: &[u8],
    buf_alloc: u32,
    fwd_cnt: u32,
) -> Vec<u8> {
    let h = Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: payload.len() as u32,
        type_: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(payload);
    v
}

fn ops(pkts: &[(Header, Vec<u8>)]) -> Vec<Option<Op>> {
    pkts.iter().map(|(h, _)| h.op()).collect()
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

#[test]
fn guest_connects_to_a_host_port_and_data_flows_both_ways() {
    let mut r = rig();
    // Nobody listens on port 80 yet: refused with RST from (2, 80) to the guest port.
    r.mux.from_guest(&pkt(Op::Request, 40000, 80, &[]));
    let p = r.drain();
    assert_eq!(ops(&p), vec![Some(Op::Rst)]);
    assert_eq!((p[0].0.src_port, p[0].0.dst_port), (80, 40000));
    assert_eq!((p[0].0.src_cid, p[0].0.dst_cid), (HOST_CID, CID));

    let l = r.listen(80);
    r.mux.from_guest(&pkt(Op::Request, 40000, 80, &[]));
    let p = r.drain();
    assert_eq!(ops(&p), vec![Some(Op::Response)]);
    assert_eq!(p[0].0.buf_alloc, BUF_ALLOC);
    let (mut host, _) = l.accept().unwrap();

    r.mux.from_guest(&pkt(Op::Rw, 40000, 80, b"ping"));
    let mut got = [0u8; 4];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");

    host.write_all(b"pong!").unwrap();
    let p = r.drain();
    assert_eq!(ops(&p), vec![Some(Op::Rw)]);
    assert_eq!(p[0].1, b"pong!");
    assert_eq!(p[0].0.fwd_cnt, 4, "the guest learns what was forwarded");

    // The host shuts its write side: SHUTDOWN(SEND) only (it still reads).
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let p = r.drain();
    assert_eq!(ops(&p), vec![Some(Op::Shutdown)]);
    assert_eq!(p[0].0.flags, SHUTDOWN_SEND);
    r.mux.from_guest(&pkt(Op::Rw, 40000, 80, b"more"));
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"more");

    // The guest closes: RST, the host sees EOF, the connection is gone.
    let mut close = pkt(Op::Shutdown, 40000, 80, &[]);
    close[32..36].copy_from_slice(&(SHUTDOWN_RCV | SHUTDOWN_SEND).to_le_bytes());
    r.mux.from_guest(&close);
    assert_eq!(ops(&r.drain()), vec![Some(Op::Rst)]);
    assert_eq!(r.mux.connections(), 0);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(r.mux.stats().connections, 1);
}

#[test]
fn host_connects_with_connect_line_and_gets_ok_with_its_port() {
    let mut r = rig();
    let mut host = UnixStream::connect(r.path()).unwrap();
    host.write_all(b"CONNECT 5000\nearly").unwrap();
    let p = r.drain();
    assert_eq!(ops(&p), vec![Some(Op::Request)]);
    let (hdr, _) = p[0];
    assert_eq!(hdr.dst_port, 5000);
    assert!(hdr.src_port >= FIRST_LOCAL_PORT);
    // The guest accepts.
    r.mux
        .from_guest(&pkt(Op::Response, 5000, hdr.src_port, &[]));
    assert_eq!(read_line(&mut host), format!("OK {}", hdr.src_port));
    // What followed the line goes first, then the socket's bytes.
    let p = r.drain();
    assert_eq!(ops(&p), vec![Some(Op::Rw)]);
    assert_eq!(p[0].1, b"early");
    host.write_all(b"late").unwrap();
    let p = r.drain();
    assert_eq!(p[0].1, b"late");
    // The host closes outright: SHUTDOWN with both flags.
    drop(host);
    let p = r.drain();
    assert_eq!(ops(&p), vec![Some(Op::Shutdown)]);
    assert_eq!(p[0].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    // The guest answers RST: gone.
    r.mux.from_guest(&pkt(Op::Rst, 5000, hdr.src_port, &[]));
    assert_eq!(r.mux.connections(), 0);
}

#[test]
fn host_connection_refused_by_the_guest_is_closed() {
    let mut r = rig();
    let mut host = UnixStream::connect(r.path()).unwrap();
    host.write_all(b"CONNECT 7\n").unwrap();
    let p = r.drain();
    r.mux.from_guest(&pkt(Op::Rst, 7, p[0].0.src_port, &[]));
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "closed without OK");
    // A bad line is closed too, and nothing reaches the guest.
    let mut bad = UnixStream::connect(r.path()).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    assert!(r.drain().is_empty());
    bad.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn host_connections_the_guest_leaves_unanswered_expire() {
    let mut r = rig();
    let mut host = UnixStream::connect(r.path()).unwrap();
    host.write_all(b"CONNECT 7\n").unwrap();
    let p = r.drain();
    assert_eq!(ops(&p), vec![Some(Op::Request)]);
    r.mux.expire_connecting();
    assert_eq!(r.mux.connections(), 1, "within the timeout");
    r.mux.set_connect_timeout(std::time::Duration::ZERO);
    r.mux.expire_connecting();
    assert_eq!(r.mux.connections(), 0);
    let p = r.drain();
    assert_eq!(ops(&p), vec![Some(Op::Rst)]);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "closed without OK");
    // The guest's late RESPONSE is for nothing: RST.
    r.mux
        .from_guest(&pkt(Op::Response, 7, p[0].0.src_port, &[]));
    assert_eq!(ops(&r.drain()), vec![Some(Op::Rst)]);
}

#[test]
fn host_data_respects_the_guest_credit() {
    let mut r = rig();
    let l = r.listen(9);
    r.mux
        .from_guest(&pkt_credit(Op::Request, 1000, 9, &[], 10, 0));
    assert_eq!(ops(&r.drain()), vec![Some(Op::Response)]);
    let (mut host, _) = l.accept().unwrap();
    host.write_all(&[1u8; 100]).unwrap();
    // 10 bytes of credit: 10 bytes, then one CREDIT_REQUEST, then silence.
    let p = r.drain();
    assert_eq!(ops(&p), vec![Some(Op::Rw), Some(Op::CreditRequest)]);
    assert_eq!(p[0].1.len(), 10);
    assert!(r.drain().is_empty());
    // The guest consumed 10 bytes.
    r.mux
        .from_guest(&pkt_credit(Op::CreditUpdate, 1000, 9, &[], 10, 10));
    // Then out of credit again: one request, answered without credit (its reader is
    // stalled): not asked again (no ping-pong), the guest speaks up when its reader goes on.
    let p = r.drain();
    assert_eq!(ops(&p), vec![Some(Op::Rw), Some(Op::CreditRequest)]);
    assert_eq!(p[0].1.len(), 10);
    r.mux
        .from_guest(&pkt_credit(Op::CreditUpdate, 1000, 9, &[], 10, 10));
    assert!(r.drain().is_empty());
    // A guest claiming more than it got gets no credit out of it.
    r.mux
        .from_guest(&pkt_credit(Op::CreditUpdate, 1000, 9, &[], 10, 1000));
    assert!(r.drain().is_empty());
    // RX buffers smaller than the credit: the packet fits the buffer.
    r.mux
        .from_guest(&pkt_credit(Op::CreditUpdate, 1000, 9, &[], 100, 20));
    r.mux.host_events().unwrap();
    let (h, d) = r.mux.next_rx(7).unwrap();
    assert_eq!((h.op(), d.len()), (Some(Op::Rw), 7));
}

#[test]
fn forwarded_guest_data_earns_credit_updates() {
    let mut r = rig();
    let l = r.listen(9);
    r.mux.from_guest(&pkt(Op::Request, 1000, 9, &[]));
    r.drain();
    let (mut host, _) = l.accept().unwrap();
    let chunk = vec![5u8; 32 * 1024];
    let n = CREDIT_UPDATE_THRESHOLD as usize / chunk.len();
    let reader = std::thread::spawn(move || {
        let mut all = vec![0u8; n * 32 * 1024];
        host.read_exact(&mut all).map(|_| (all, host))
    });
    for _ in 0..n {
        r.mux.from_guest(&pkt(Op::Rw, 1000, 9, &chunk));
    }
    // Whatever the host has not read yet is written out as it reads.
    while r.mux.conns.values().any(|c| !c.to_host.is_empty()) {
        r.mux.host_events().unwrap();
        std::thread::yield_now();
    }
    let (all, _host) = reader.join().unwrap().unwrap();
    assert!(all.iter().all(|&b| b == 5));
    let p = r.drain();
    assert_eq!(ops(&p), vec![Some(Op::CreditUpdate)]);
    assert_eq!(p[0].0.fwd_cnt, CREDIT_UPDATE_THRESHOLD);
    // A credit request is answered too.
    r.mux.from_guest(&pkt(Op::CreditRequest, 1000, 9, &[]));
    assert_eq!(ops(&r.drain()), vec![Some(Op::CreditUpdate)]);
}

#[test]
fn invalid_guest_packets_are_dropped_or_reset() {
    let mut r = rig();
    // Too short, or from another CID: dropped silently.
    r.mux.from_guest(&[0u8; 10]);
    let mut other = pkt(Op::Request, 1, 2, &[]);
    other[0..8].copy_from_slice(&9u64.to_le_bytes());
    r.mux.from_guest(&other);
    assert!(r.drain().is_empty());
    // Data for no connection, a payload on a REQUEST, a length beyond the chain: RST.
    r.mux.from_guest(&pkt(Op::Rw, 1, 2, b"x"));
    let mut req = pkt(Op::Request, 1, 2, b"x");
    req[24..28].copy_from_slice(&1u32.to_le_bytes());
    r.mux.from_guest(&req);
    let mut long = pkt(Op::Rw, 1, 2, b"x");
    long[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    r.mux.from_guest(&long);
    assert_eq!(ops(&r.drain()), vec![Some(Op::Rst); 3]);
    // An RST is never answered.
    r.mux.from_guest(&pkt(Op::Rst, 1, 2, &[]));
    assert!(r.drain().is_empty());
    assert_eq!(r.mux.stats().bad_packets, 4);
}

#[test]
fn a_guest_overrunning_its_credit_is_reset() {
    let mut r = rig();
    let l = r.listen(9);
    r.mux.from_guest(&pkt(Op::Request, 1000, 9, &[]));
    r.drain();
    let (_host, _) = l.accept().unwrap(); // never reads
    let chunk = vec![0u8; MAX_PAYLOAD];
    for _ in 0..(BUF_ALLOC as usize / MAX_PAYLOAD + 8) {
        r.mux.from_guest(&pkt(Op::Rw, 1000, 9, &chunk));
    }
    let p = r.drain();
    assert_eq!(p.last().map(|(h, _)| h.op()), Some(Some(Op::Rst)));
    assert_eq!(r.mux.connections(), 0);
}

#[test]
fn reset_forgets_every_connection() {
    let mut r = rig();
    let l = r.listen(9);
    r.mux.from_guest(&pkt(Op::Request, 1000, 9, &[]));
    r.mux.from_guest(&pkt(Op::Request, 1001, 9, &[]));
    assert_eq!(r.mux.connections(), 2);
    r.mux.reset();
    assert_eq!(r.mux.connections(), 0);
    assert!(!r.mux.has_rx());
    let (mut a, _) = l.accept().unwrap();
    let mut rest = Vec::new();
    a.read_to_end(&mut rest).unwrap();
    assert!(Path::new(&r.path()).exists());
}
