//! The connection table between the guest's packets and the host's UNIX sockets.
//!
//! Guest packets come in through [`Muxer::from_guest`]; packets for the guest go out through
//! [`Muxer::next_rx`] (control packets first, in order, then data of the connections whose
//! host socket has bytes and whose guest buffer has room, round-robin). Host sockets — the
//! listening `PATH` socket, `CONNECT` handshakes, connections — sit in one edge-triggered
//! epoll instance ([`Muxer::epoll_fd`], polled by the queue worker); [`Muxer::host_events`]
//! drains it. Nothing here blocks: every host socket is non-blocking.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use crate::conn::{Conn, State};
use crate::host::{self, Handshake};
use crate::packet::{
    Header, Op, PacketError, HDR_LEN, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND,
    TYPE_STREAM,
};

/// Most connections at once (a guest REQUEST beyond is reset).
pub const MAX_CONNS: usize = 1024;
/// Most host connections still in their `CONNECT` handshake.
pub const MAX_HANDSHAKES: usize = 64;
/// Control packets queued for the guest beyond which guest TX is not processed (the guest's
/// TX ring then fills: the guest is throttled instead of the daemon growing).
pub const MAX_BACKLOG: usize = 256;
/// How long the guest has to accept a host-initiated connection (`CONNECT <port>`): then the
/// host socket is closed and the guest gets RST, as when it refuses.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Period of the timer that expires unanswered host-initiated connections (armed once at
/// start-up: a confined daemon does not set timers).
const TICK: Duration = Duration::from_secs(1);
/// First port handed out to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Errors of the muxer.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// Creating or using the epoll instance failed.
    #[error("epoll: {0}")]
    Epoll(#[source] io::Error),
    /// Creating the connection timer failed.
    #[error("timerfd: {0}")]
    Timer(#[source] vmm_sys_util::errno::Error),
    /// The listening socket could not be made non-blocking.
    #[error("listening socket: {0}")]
    Listener(#[source] io::Error),
}

/// A connection's ports: (host side, guest side).
pub type Key = (u32, u32);

#[derive(Debug, Clone, Copy)]
enum Token {
    Listener,
    Timer,
    Handshake,
    Conn(Key),
}

/// A control packet waiting for the guest.
#[derive(Debug, Clone, Copy)]
struct Ctrl {
    key: Key,
    op: Op,
    flags: u32,
}

/// Counters, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MuxStats {
    /// Guest packets dropped as invalid.
    pub bad_packets: u64,
    /// Connections established (both directions).
    pub connections: u64,
    /// RSTs sent.
    pub resets: u64,
    /// Payload bytes guest → host.
    pub bytes_to_host: u64,
    /// Payload bytes host → guest.
    pub bytes_to_guest: u64,
}

/// Connections of one guest to the host's UNIX sockets.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    accept_filter: Box<dyn Fn(RawFd) -> bool + Send>,
    epoll: Epoll,
    timer: TimerFd,
    connect_timeout: Duration,
    conns: BTreeMap<Key, Conn>,
    handshakes: HashMap<RawFd, Handshake>,
    tokens: HashMap<RawFd, Token>,
    ctrl: VecDeque<Ctrl>,
    /// Round-robin position among the connections for data.
    cursor: Key,
    next_port: u32,
    stats: MuxStats,
}

impl std::fmt::Debug for Muxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Muxer")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.uds_path)
            .field("conns", &self.conns.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn interest() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

impl Muxer {
    /// A muxer for guest `guest_cid`, host sockets at `uds_path` (whose listening socket is
    /// `listener`); `accept_filter` decides whether an accepted host peer is served (e.g. its
    /// uid).
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
        accept_filter: Box<dyn Fn(RawFd) -> bool + Send>,
    ) -> Result<Self, MuxError> {
        listener.set_nonblocking(true).map_err(MuxError::Listener)?;
        let epoll = Epoll::new().map_err(MuxError::Epoll)?;
        let fd = listener.as_raw_fd();
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, fd as u64),
            )
            .map_err(MuxError::Epoll)?;
        let mut tokens = HashMap::new();
        tokens.insert(fd, Token::Listener);
        let mut timer = TimerFd::new().map_err(MuxError::Timer)?;
        timer.reset(TICK, Some(TICK)).map_err(MuxError::Timer)?;
        let tfd = timer.as_raw_fd();
        epoll
            .ctl(
                ControlOperation::Add,
                tfd,
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, tfd as u64),
            )
            .map_err(MuxError::Epoll)?;
        tokens.insert(tfd, Token::Timer);
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener,
            accept_filter,
            epoll,
            timer,
            connect_timeout: CONNECT_TIMEOUT,
            conns: BTreeMap::new(),
            handshakes: HashMap::new(),
            tokens,
            ctrl: VecDeque::new(),
            cursor: (0, 0),
            next_port: FIRST_LOCAL_PORT,
            stats: MuxStats::default(),
        })
    }

    /// The epoll fd to poll (readable when a host socket has news).
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Counters.
    pub fn stats(&self) -> MuxStats {
        self.stats
    }

    /// Live connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Control packets waiting for the guest.
    pub fn backlog(&self) -> usize {
        self.ctrl.len()
    }

    /// Forgets every connection (the frontend went away: the guest's driver is gone with it);
    /// host sockets are closed. Handshakes in progress stay (a new guest may accept them).
    pub fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        self.ctrl.clear();
    }

    fn queue(&mut self, key: Key, op: Op, flags: u32) {
        if op == Op::Rst {
            self.stats.resets += 1;
        }
        self.ctrl.push_back(Ctrl { key, op, flags });
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.stream.as_raw_fd());
            // Closing the fd takes it out of the epoll set.
        }
    }

    /// Resets `key`: RST to the guest, host socket closed.
    fn kill(&mut self, key: Key) {
        self.remove(key);
        self.queue(key, Op::Rst, 0);
    }

    fn register(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(interest(), fd as u64),
        )?;
        self.tokens.insert(fd, token);
        Ok(())
    }

    // ------------------------------------------------------------------ guest → host

    /// One packet the guest sent (header and payload as read from its TX chain). Invalid
    /// packets are dropped (and answered with RST when they name a connection); nothing the
    /// guest sends can make this fail.
    pub fn from_guest(&mut self, bytes: &[u8]) {
        let hdr = match Header::parse(bytes) {
            Ok(h) => h,
            Err(e) => return self.bad(None, e),
        };
        let payload = &bytes[HDR_LEN..];
        let op = match hdr.validate(self.guest_cid, payload.len()) {
            Ok(op) => op,
            Err(e) => return self.bad(Some(hdr), e),
        };
        let payload = &payload[..hdr.len as usize];
        let key = (hdr.dst_port, hdr.src_port);
        if !self.conns.contains_key(&key) {
            match op {
                Op::Request => self.guest_connect(key, &hdr),
                Op::Rst => {}
                _ => self.queue(key, Op::Rst, 0),
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt);
            // Asked again only once credit came back: a guest whose reader is stalled answers
            // a CREDIT_REQUEST with no credit, and asking again would ping-pong forever.
            if c.credit.peer_free() > 0 {
                c.credit_requested = false;
            }
        }
        match op {
            Op::Rst => self.remove(key),
            Op::Request => self.kill(key),
            Op::Response => self.response(key),
            Op::Rw => self.rw(key, payload),
            Op::CreditUpdate => {}
            Op::CreditRequest => self.credit_update(key),
            Op::Shutdown => self.shutdown(key, hdr.flags),
        }
    }

    fn bad(&mut self, hdr: Option<Header>, e: PacketError) {
        self.stats.bad_packets += 1;
        tracing::debug!("dropping a guest packet: {e}");
        // Answer with RST what names a connection of this guest, unless it is an RST itself.
        if let Some(h) = hdr {
            if h.src_cid == self.guest_cid && h.op != Op::Rst as u16 {
                let key = (h.dst_port, h.src_port);
                self.remove(key);
                self.queue(key, Op::Rst, 0);
            }
        }
    }

    fn guest_connect(&mut self, key: Key, hdr: &Header) {
        if self.conns.len() >= MAX_CONNS {
            tracing::warn!("refusing guest port {}: {MAX_CONNS} connections", key.1);
            return self.queue(key, Op::Rst, 0);
        }
        let stream = match host::connect_port(&self.uds_path, key.0) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(
                    "guest port {} → host port {}: {}: {e}",
                    key.1,
                    key.0,
                    host::port_path(&self.uds_path, key.0).display()
                );
                return self.queue(key, Op::Rst, 0);
            }
        };
        let mut c = Conn::new(stream, State::Established);
        c.credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt);
        let fd = c.stream.as_raw_fd();
        if let Err(e) = self.register(fd, Token::Conn(key)) {
            tracing::warn!("polling a host socket: {e}");
            return self.queue(key, Op::Rst, 0);
        }
        self.conns.insert(key, c);
        self.stats.connections += 1;
        tracing::debug!("guest port {} connected to host port {}", key.1, key.0);
        self.queue(key, Op::Response, 0);
    }

    fn response(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.state != State::Connecting {
            return self.kill(key);
        }
        let line = format!("OK {}\n", key.0);
        match std::io::Write::write(&mut c.stream, line.as_bytes()) {
            Ok(n) if n == line.len() => {
                c.state = State::Established;
                self.stats.connections += 1;
                tracing::debug!("host port {} connected to guest port {}", key.0, key.1);
            }
            // A fresh socket takes a dozen bytes; anything else is a host gone away.
            _ => self.kill(key),
        }
    }

    fn rw(&mut self, key: Key, payload: &[u8]) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.state != State::Established || c.peer_shutdown & SHUTDOWN_SEND != 0 {
            return self.kill(key);
        }
        match c.from_guest(payload) {
            Ok(_) => {
                self.stats.bytes_to_host += payload.len() as u64;
                self.after_forward(key);
            }
            Err(e) => {
                tracing::debug!("connection {key:?}: {e}");
                self.kill(key);
            }
        }
    }

    fn credit_update(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.update_queued {
                c.update_queued = true;
                self.queue(key, Op::CreditUpdate, 0);
            }
        }
    }

    fn shutdown(&mut self, key: Key, flags: u32) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        c.peer_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        if c.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            // The guest closed: acknowledge with RST; deliver what is still pending.
            c.state = State::Closing;
            self.queue(key, Op::Rst, 0);
        }
        self.after_forward(key);
    }

    /// After bytes went to the host: credit update if due; host write side shut once the
    /// guest will send nothing more; a closing connection dropped once flushed.
    fn after_forward(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let flushed = c.to_host.is_empty();
        if flushed && c.peer_shutdown & SHUTDOWN_SEND != 0 {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        if c.state == State::Closing {
            if flushed {
                self.remove(key);
            }
            return;
        }
        if c.credit.needs_update() && !c.update_queued {
            c.update_queued = true;
            self.queue(key, Op::CreditUpdate, 0);
        }
    }

    // ------------------------------------------------------------------ host events

    /// Drains the host sockets' events: accepts, handshakes, readiness of connections,
    /// pending guest bytes written out.
    pub fn host_events(&mut self) -> Result<(), MuxError> {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(MuxError::Epoll(e)),
            };
            for ev in &events[..n] {
                let fd = ev.data() as RawFd;
                match self.tokens.get(&fd).copied() {
                    Some(Token::Listener) => self.accept(),
                    Some(Token::Timer) => {
                        // Readable (the event says so): the read does not block.
                        let _ = self.timer.wait();
                        self.expire_connecting();
                    }
                    Some(Token::Handshake) => self.handshake(fd),
                    Some(Token::Conn(key)) => self.conn_event(key, ev.event_set()),
                    None => {}
                }
            }
            // Events handled may have made more (a socket accepted and registered with bytes
            // already there): until the set is quiet.
            if n == 0 {
                return Ok(());
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("accepting a host connection: {e}");
                    return;
                }
            };
            if !(self.accept_filter)(stream.as_raw_fd()) {
                tracing::debug!("host connection refused by the peer check");
                continue;
            }
            if self.handshakes.len() >= MAX_HANDSHAKES {
                tracing::warn!("dropping a host connection: {MAX_HANDSHAKES} handshakes pending");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!("host connection: {e}");
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = self.register(fd, Token::Handshake) {
                tracing::warn!("polling a host connection: {e}");
                continue;
            }
            self.handshakes.insert(fd, Handshake::new(stream));
            // Bytes already there were reported by the registration itself.
        }
    }

    fn handshake(&mut self, fd: RawFd) {
        let Some(h) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let (port, rest) = match h.advance() {
            Ok(None) => return,
            Ok(Some(done)) => done,
            Err(e) => {
                tracing::debug!("host connection: {e}");
                self.tokens.remove(&fd);
                self.handshakes.remove(&fd);
                return;
            }
        };
        let Some(h) = self.handshakes.remove(&fd) else {
            return;
        };
        if self.conns.len() >= MAX_CONNS {
            tracing::warn!("dropping a host connection to port {port}: {MAX_CONNS} connections");
            self.tokens.remove(&fd);
            return;
        }
        let key = (self.allocate_port(port), port);
        let mut c = Conn::new(h.stream, State::Connecting);
        c.to_guest = rest;
        // The socket may already hold more than the line: read it once established.
        c.readable = true;
        self.tokens.insert(fd, Token::Conn(key));
        self.conns.insert(key, c);
        self.queue(key, Op::Request, 0);
    }

    /// Sets how long the guest has to accept a host-initiated connection.
    pub fn set_connect_timeout(&mut self, timeout: Duration) {
        self.connect_timeout = timeout;
    }

    /// Resets the host-initiated connections the guest left unanswered for too long.
    pub fn expire_connecting(&mut self) {
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state == State::Connecting && c.created.elapsed() >= self.connect_timeout
            })
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            tracing::debug!(
                "guest port {} did not answer: closing host port {}",
                key.1,
                key.0
            );
            self.kill(key);
        }
    }

    fn allocate_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer)) {
                return p;
            }
        }
    }

    fn conn_event(&mut self, key: Key, ev: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if ev.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            c.readable = true;
        }
        if ev.contains(EventSet::HANG_UP) {
            c.hup = true;
        }
        if ev.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP)
            && !c.to_host.is_empty()
        {
            match c.flush_host() {
                Ok(_) => self.after_forward(key),
                Err(e) => {
                    tracing::debug!("connection {key:?}: {e}");
                    if c_closing(&self.conns, key) {
                        self.remove(key);
                    } else {
                        self.kill(key);
                    }
                }
            }
        }
    }

    // ------------------------------------------------------------------ host → guest

    fn sendable(c: &Conn) -> bool {
        c.state == State::Established
            && c.peer_shutdown & SHUTDOWN_RCV == 0
            && c.local_shutdown & SHUTDOWN_SEND == 0
            && (c.readable || !c.to_guest.is_empty())
            && (c.credit.peer_free() > 0 || !c.credit_requested)
    }

    /// Whether [`Muxer::next_rx`] may have a packet.
    pub fn has_rx(&self) -> bool {
        !self.ctrl.is_empty() || self.conns.values().any(Self::sendable)
    }

    fn header(&mut self, key: Key, op: Op, flags: u32, len: u32) -> Header {
        let (buf_alloc, fwd_cnt) = match self.conns.get_mut(&key) {
            Some(c) => c.credit.stamp(),
            None => (0, 0),
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// The next packet for the guest, with at most `max_payload` bytes of data (the room of
    /// the guest's RX buffer after the header); `None` when nothing is ready.
    pub fn next_rx(&mut self, max_payload: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(ctrl) = self.ctrl.pop_front() {
            if ctrl.op == Op::CreditUpdate {
                if let Some(c) = self.conns.get_mut(&ctrl.key) {
                    c.update_queued = false;
                }
            }
            return Some((self.header(ctrl.key, ctrl.op, ctrl.flags, 0), Vec::new()));
        }
        let max_payload = max_payload.min(MAX_PAYLOAD);
        let keys: Vec<Key> = self
            .conns
            .range((
                std::ops::Bound::Excluded(self.cursor),
                std::ops::Bound::Unbounded,
            ))
            .chain(self.conns.range(..=self.cursor))
            .filter(|(_, c)| Self::sendable(c))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if let Some(p) = self.data_from(key, max_payload) {
                self.cursor = key;
                return Some(p);
            }
        }
        None
    }

    /// A packet of connection `key`'s host data (or the SHUTDOWN/RST its socket's end or
    /// error calls for).
    fn data_from(&mut self, key: Key, max_payload: usize) -> Option<(Header, Vec<u8>)> {
        let c = self.conns.get_mut(&key)?;
        let free = c.credit.peer_free() as usize;
        if free == 0 {
            // Out of guest buffer: ask once for news of it.
            c.credit_requested = true;
            return Some((self.header(key, Op::CreditRequest, 0, 0), Vec::new()));
        }
        let room = free.min(max_payload);
        if room == 0 {
            return None;
        }
        let data = if !c.to_guest.is_empty() {
            let n = room.min(c.to_guest.len());
            c.to_guest.drain(..n).collect::<Vec<u8>>()
        } else {
            let mut buf = vec![0u8; room];
            match read_some(&mut c.stream, &mut buf) {
                Ok(Some(0)) => {
                    // The host shut its write side (or closed: then it reads no more either).
                    c.readable = false;
                    let flags = SHUTDOWN_SEND | if c.hup { SHUTDOWN_RCV } else { 0 };
                    c.local_shutdown |= flags;
                    return Some((self.header(key, Op::Shutdown, flags, 0), Vec::new()));
                }
                Ok(Some(n)) => {
                    buf.truncate(n);
                    buf
                }
                Ok(None) => {
                    c.readable = false;
                    return None;
                }
                Err(e) => {
                    tracing::debug!("connection {key:?}: host read: {e}");
                    self.remove(key);
                    self.stats.resets += 1;
                    return Some((self.header(key, Op::Rst, 0, 0), Vec::new()));
                }
            }
        };
        let len = data.len() as u32;
        c.credit.sent(len);
        self.stats.bytes_to_guest += u64::from(len);
        Some((self.header(key, Op::Rw, 0, len), data))
    }
}

fn c_closing(conns: &BTreeMap<Key, Conn>, key: Key) -> bool {
    conns.get(&key).is_some_and(|c| c.state == State::Closing)
}

/// One non-blocking read: `Ok(None)` when nothing is there.
fn read_some(stream: &mut impl Read, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match stream.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
