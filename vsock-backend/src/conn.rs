//! One connection: its state, the credit both sides have (virtio spec 5.10.6.3: a sender may
//! only have `buf_alloc` bytes in flight that the receiver has not forwarded yet), and the
//! bytes waiting for the host socket. Pure bookkeeping over a host stream; the
//! [`Muxer`](crate::Muxer) drives it.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Receive buffer announced to the guest per connection (bytes the daemon holds for a host
/// socket that does not read).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// A credit update is sent once the guest's view of our forward counter lags by this much.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// Errors of the bookkeeping.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The guest sent more than the credit it was given.
    #[error("guest overran its credit: {pending} bytes pending + {len} > {BUF_ALLOC}")]
    CreditOverrun {
        /// Bytes buffered.
        pending: usize,
        /// Bytes received.
        len: usize,
    },
    /// The host socket failed.
    #[error("host socket: {0}")]
    Host(#[from] io::Error),
}

/// The credit counters of one connection (all wrapping `u32`, as on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Credit {
    /// The guest's receive buffer.
    pub peer_buf_alloc: u32,
    /// What the guest says it has consumed.
    pub peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    pub tx_cnt: u32,
    /// Payload bytes received from the guest.
    pub rx_cnt: u32,
    /// Of those, forwarded to the host socket.
    pub fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard of.
    pub last_fwd_cnt_sent: u32,
}

impl Credit {
    /// Records the guest's buffer and forward counter (from any packet it sends).
    pub fn update_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Bytes the guest can take now. A guest claiming to have consumed more than it was sent
    /// (or shrinking its buffer) gets nothing rather than a wrapped-around credit.
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// `n` payload bytes went to the guest.
    pub fn sent(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// `n` payload bytes came from the guest.
    pub fn received(&mut self, n: u32) {
        self.rx_cnt = self.rx_cnt.wrapping_add(n);
    }

    /// `n` bytes went to the host socket.
    pub fn forwarded(&mut self, n: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
    }

    /// Whether the guest should hear of the forward counter now.
    pub fn needs_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// The `(buf_alloc, fwd_cnt)` of an outgoing packet; the guest now knows `fwd_cnt`.
    pub fn stamp(&mut self) -> (u32, u32) {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        (BUF_ALLOC, self.fwd_cnt)
    }
}

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
    /// RST sent to the guest; the rest of the guest's data is written to the host, then the
    /// connection is dropped.
    Closing,
}

/// One connection between a guest port and a host UNIX socket.
#[derive(Debug)]
pub struct Conn {
    /// The host end (non-blocking).
    pub stream: UnixStream,
    /// Where it is.
    pub state: State,
    /// Credit counters.
    pub credit: Credit,
    /// Guest bytes the host socket has not taken yet (at most [`BUF_ALLOC`]).
    pub to_host: VecDeque<u8>,
    /// Host bytes to send before reading the socket again (what followed `CONNECT <port>\n`).
    pub to_guest: Vec<u8>,
    /// The host socket may have bytes (edge seen, no `EAGAIN` since).
    pub readable: bool,
    /// The host socket is hung up in both directions.
    pub hup: bool,
    /// Shutdown flags the guest sent.
    pub peer_shutdown: u32,
    /// Shutdown flags sent to the guest.
    pub local_shutdown: u32,
    /// A CREDIT_REQUEST was sent and no credit arrived since.
    pub credit_requested: bool,
    /// A CREDIT_UPDATE is queued.
    pub update_queued: bool,
    /// When the connection was made (host-initiated ones expire unanswered).
    pub created: Instant,
}

impl Conn {
    /// A connection over `stream`.
    pub fn new(stream: UnixStream, state: State) -> Self {
        Conn {
            stream,
            state,
            credit: Credit::default(),
            to_host: VecDeque::new(),
            to_guest: Vec::new(),
            readable: false,
            hup: false,
            peer_shutdown: 0,
            local_shutdown: 0,
            credit_requested: false,
            update_queued: false,
            created: Instant::now(),
        }
    }

    /// Takes `data` from the guest for the host socket: written now as far as the socket
    /// takes it, the rest kept. Returns the bytes forwarded now.
    pub fn from_guest(&mut self, data: &[u8]) -> Result<usize, ConnError> {
        let pending = self.to_host.len();
        if pending + data.len() > BUF_ALLOC as usize {
            return Err(ConnError::CreditOverrun {
                pending,
                len: data.len(),
            });
        }
        self.credit.received(data.len() as u32);
        let mut written = 0;
        if pending == 0 {
            written = write_some(&mut self.stream, data)?;
        }
        self.to_host.extend(&data[written..]);
        self.credit.forwarded(written as u32);
        Ok(written)
    }

    /// Writes what is pending to the host socket; returns the bytes forwarded.
    pub fn flush_host(&mut self) -> Result<usize, ConnError> {
        let mut total = 0;
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            let n = write_some(&mut self.stream, a)?;
            if n == 0 {
                break;
            }
            self.to_host.drain(..n);
            total += n;
        }
        self.credit.forwarded(total as u32);
        Ok(total)
    }
}

/// Writes as much of `data` as the non-blocking socket takes now.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match stream.write(&data[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn peer_credit_never_wraps() {
        let mut c = Credit::default();
        c.update_peer(1000, 0);
        assert_eq!(c.peer_free(), 1000);
        c.sent(600);
        assert_eq!(c.peer_free(), 400);
        c.update_peer(1000, 500);
        assert_eq!(c.peer_free(), 900);
        // A guest claiming to have consumed more than it got, or shrinking its buffer.
        c.update_peer(1000, 700);
        assert_eq!(c.peer_free(), 0);
        c.update_peer(50, 500);
        assert_eq!(c.peer_free(), 0);
        // Counters wrap as on the wire.
        let mut c = Credit {
            tx_cnt: u32::MAX - 9,
            peer_fwd_cnt: u32::MAX - 9,
            peer_buf_alloc: 100,
            ..Credit::default()
        };
        c.sent(20);
        assert_eq!(c.peer_free(), 80);
    }

    #[test]
    fn credit_updates_follow_the_forward_counter() {
        let mut c = Credit::default();
        c.forwarded(CREDIT_UPDATE_THRESHOLD - 1);
        assert!(!c.needs_update());
        c.forwarded(1);
        assert!(c.needs_update());
        assert_eq!(c.stamp(), (BUF_ALLOC, CREDIT_UPDATE_THRESHOLD));
        assert!(!c.needs_update());
    }

    #[test]
    fn guest_data_is_buffered_when_the_host_is_slow_and_bounded() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Conn::new(a, State::Established);
        let chunk = vec![7u8; 64 * 1024];
        let mut forwarded = 0;
        let mut sent = 0;
        // Fill the socket buffer, then the connection's own buffer up to the credit.
        loop {
            match c.from_guest(&chunk) {
                Ok(n) => {
                    forwarded += n;
                    sent += chunk.len();
                }
                Err(ConnError::CreditOverrun { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(c.to_host.len() > BUF_ALLOC as usize - chunk.len());
        assert_eq!(c.credit.rx_cnt as usize, sent);
        assert_eq!(c.credit.fwd_cnt as usize, forwarded);
        // The host reads everything: flushing forwards the rest, in order.
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            b.read_to_end(&mut all).map(|_| all)
        });
        while !c.to_host.is_empty() {
            c.flush_host().unwrap();
            std::thread::yield_now();
        }
        assert_eq!(c.credit.fwd_cnt as usize, sent);
        drop(c);
        let all = reader.join().unwrap().unwrap();
        assert_eq!(all.len(), sent);
        assert!(all.iter().all(|&x| x == 7));
    }
}
