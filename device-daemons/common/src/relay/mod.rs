//! A vhost-user message relay between the frontend and the `vhost` crate's request handler,
//! fixing one ordering incompatibility on the way.
//!
//! QEMU's virtio-net attaches its queue pairs at device reset by sending
//! `VHOST_USER_SET_VRING_ENABLE` as soon as the backend *offers*
//! `VHOST_USER_F_PROTOCOL_FEATURES` — before any `SET_FEATURES` — and does not send it again
//! when it starts the device. `vhost` 0.15 refuses that message until the feature is *acked*
//! and drops the connection. The relay therefore holds such early messages back (answering
//! them if the frontend asked for a reply), replays the last state of each ring right after
//! the `SET_FEATURES` that acks the feature, and forwards everything else verbatim, file
//! descriptors included.
//!
//! A device opts in with `QueueDevice::relay_vring_enable` (`rqemu-net` does);
//! [`serve_forever`](crate::vhost::serve_forever) then accepts the frontend itself and hands
//! the `vhost` crate the inner end of the relay ([`start`]). The relay also records each ring's
//! enable state ([`RingEnable`]), which `vhost-user-backend` 0.21 does not tell the backend.
//!
//! A device that tracks requests in flight (`QueueDevice::inflight_tracking`: `rqemu-blk`)
//! goes through the relay too: it answers GET_INFLIGHT_FD and SET_INFLIGHT_FD itself (the
//! handler of `vhost-user-backend` 0.21 answers "not supported") over the connection's
//! [`Inflight`](crate::inflight::Inflight) and never forwards them.

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::inflight::{Inflight, Region};

mod wire;

use wire::{new_msg, read_msg, send_with_fds, word, Msg, HDR_LEN};

const REQ_GET_FEATURES: u32 = 1;
const REQ_SET_FEATURES: u32 = 2;
const REQ_RESET_OWNER: u32 = 4;
const REQ_SET_VRING_KICK: u32 = 12;
const REQ_SET_VRING_ENABLE: u32 = 18;
const REQ_RESET_DEVICE: u32 = 34;
const REQ_GET_INFLIGHT_FD: u32 = 31;
const REQ_SET_INFLIGHT_FD: u32 = 32;
/// Bytes of `VhostUserInflight` (mmap_size, mmap_offset: u64; num_queues, queue_size: u16;
/// padded to 8).
const INFLIGHT_LEN: usize = 24;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Socket I/O failed.
    #[error("relay I/O: {0}")]
    Io(#[from] io::Error),
    /// A message larger than any vhost-user message.
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    /// The private socket between the relay and the `vhost` handler could not be made.
    #[error("relay socket ({0})")]
    Socket(&'static str, #[source] io::Error),
}

/// The enable state of each vring (bit i: ring i) as the frontend last set it. The relay
/// sees every `SET_VRING_ENABLE`; `vhost-user-backend` 0.21 does not tell the backend.
#[derive(Debug, Default)]
pub struct RingEnable(AtomicU64);

impl RingEnable {
    /// Whether ring `index` is enabled.
    pub fn is_enabled(&self, index: usize) -> bool {
        index < 64 && self.0.load(Ordering::Acquire) & (1u64 << index) != 0
    }

    fn set(&self, index: u32, on: bool) {
        if index < 64 {
            let bit = 1u64 << index;
            if on {
                self.0.fetch_or(bit, Ordering::AcqRel);
            } else {
                self.0.fetch_and(!bit, Ordering::AcqRel);
            }
        }
    }

    /// Sets every ring's state.
    pub fn set_all(&self, on: bool) {
        self.0
            .store(if on { u64::MAX } else { 0 }, Ordering::Release);
    }
}

/// One message: header, payload and attached fds.
/// The kick eventfd of each ring as the frontend last gave it (`SET_VRING_KICK`), kept so the
/// relay can kick a ring itself once it is both enabled and kickable: a frontend that
/// reconnects does not kick (QEMU's vhost-user-blk does not), and the requests a dead daemon
/// left in flight (resubmitted from the inflight region) or that the guest queued meanwhile
/// would wait for a guest notification that never comes. A spurious kick finds an empty ring.
///
/// The kick must reach the ring's worker only once the `vhost` handler has applied the
/// message that enabled the ring: `vhost-user-backend` consumes a kick that finds its ring
/// disabled and drops it. The handler runs on its own thread, behind the relay's socket, so
/// the relay follows that message with a barrier of its own, a GET_FEATURES (answered in any
/// state, changes nothing), and kicks when the handler answers it ([`Pending`]): the handler
/// takes messages in order, so by then the ring is enabled.
#[derive(Default)]
struct Kicks(Vec<Option<OwnedFd>>);

impl Kicks {
    fn record(&mut self, index: u32, fd: Option<OwnedFd>) {
        let i = index as usize;
        if i < 64 {
            if self.0.len() <= i {
                self.0.resize_with(i + 1, || None);
            }
            self.0[i] = fd;
        }
    }

    fn kick(&self, index: u32) {
        if let Some(Some(fd)) = self.0.get(index as usize) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live local buffer to an fd this relay owns.
            let r = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
            if r != 8 {
                tracing::debug!(
                    "relay: kicking ring {index}: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Kicks waiting for the handler to answer the relay's barriers, in the order sent (see
/// [`Kicks`]), and the kick fds, shared by the two relay threads.
#[derive(Default)]
struct Pending {
    kicks: Kicks,
    /// One entry per barrier sent and not yet answered: the ring to kick then.
    barriers: VecDeque<u32>,
}

type SharedKicks = Arc<Mutex<Pending>>;

fn lock(p: &SharedKicks) -> std::sync::MutexGuard<'_, Pending> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends the handler a barrier after which ring `index` is kicked ([`Kicks`]).
fn kick_after_barrier(back: &UnixStream, pending: &SharedKicks, index: u32) -> io::Result<()> {
    lock(pending).barriers.push_back(index);
    let mut m = [0u8; HDR_LEN];
    m[..4].copy_from_slice(&REQ_GET_FEATURES.to_le_bytes());
    m[4..8].copy_from_slice(&FLAG_VERSION.to_le_bytes());
    send_with_fds(back, &m, &[])
}

/// Whether `msg` (from the handler) answers one of the relay's barriers: then the ring it
/// stood for is kicked and the reply is not forwarded. A frontend waits for its own
/// GET_FEATURES reply before sending more, so the oldest GET_FEATURES reply outstanding while
/// a barrier is pending is the barrier's.
fn barrier_answered(msg: &Msg, pending: &SharedKicks) -> bool {
    if msg.request() != REQ_GET_FEATURES || msg.flags() & FLAG_REPLY == 0 {
        return false;
    }
    let mut p = lock(pending);
    match p.barriers.pop_front() {
        Some(index) => {
            p.kicks.kick(index);
            true
        }
        None => false,
    }
}

/// Frontend → backend, swallowing early `SET_VRING_ENABLE`s.
fn forward_requests(
    front: &UnixStream,
    back: &UnixStream,
    front_tx: &Mutex<()>,
    rings: &RingEnable,
    inflight: Option<&Inflight>,
    pending: &SharedKicks,
) -> Result<(), RelayError> {
    let mut msg = new_msg();
    let mut features_acked = false;
    // Held-back enable states: (ring index, state), last one per ring.
    let mut deferred: Vec<(u32, u32)> = Vec::new();
    while read_msg(front, &mut msg)?.is_some() {
        tracing::trace!(
            "relay: request {} flags {:#x}, {} payload bytes, {} fds",
            msg.request(),
            msg.flags(),
            msg.len - HDR_LEN,
            msg.fds.len()
        );
        match msg.request() {
            REQ_SET_FEATURES => {
                let mut v = [0u8; 8];
                if let Some(p) = msg.payload().get(..8) {
                    v.copy_from_slice(p);
                }
                features_acked = u64::from_le_bytes(v) & F_PROTOCOL_FEATURES != 0;
                if !features_acked {
                    // Without PROTOCOL_FEATURES every ring is enabled from now on.
                    rings.set_all(true);
                }
                send_with_fds(back, msg.bytes(), &msg.fds)?;
                if features_acked {
                    for (index, state) in deferred.drain(..) {
                        rings.set(index, state != 0);
                        let mut m = [0u8; HDR_LEN + 8];
                        m[..4].copy_from_slice(&REQ_SET_VRING_ENABLE.to_le_bytes());
                        m[4..8].copy_from_slice(&FLAG_VERSION.to_le_bytes());
                        m[8..12].copy_from_slice(&8u32.to_le_bytes());
                        m[12..16].copy_from_slice(&index.to_le_bytes());
                        m[16..20].copy_from_slice(&state.to_le_bytes());
                        send_with_fds(back, &m, &[])?;
                        if state != 0 {
                            kick_after_barrier(back, pending, index)?;
                        }
                    }
                }
                continue;
            }
            REQ_RESET_OWNER | REQ_RESET_DEVICE => {
                features_acked = false;
                rings.set_all(false);
                lock(pending).kicks.clear();
            }
            REQ_SET_VRING_ENABLE if !features_acked => {
                let (index, state) = (word(msg.payload(), 0), word(msg.payload(), 4));
                tracing::debug!(
                    "relay: SET_VRING_ENABLE({index}, {state}) before SET_FEATURES: held back"
                );
                if let Some(d) = deferred.iter_mut().find(|(i, _)| *i == index) {
                    d.1 = state;
                } else if deferred.len() < 256 {
                    deferred.push((index, state));
                }
                if msg.flags() & FLAG_NEED_REPLY != 0 {
                    let mut reply = [0u8; HDR_LEN + 8];
                    reply[..4].copy_from_slice(&REQ_SET_VRING_ENABLE.to_le_bytes());
                    reply[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
                    reply[8..12].copy_from_slice(&8u32.to_le_bytes());
                    let _g = front_tx.lock().unwrap_or_else(|e| e.into_inner());
                    send_with_fds(front, &reply, &[])?;
                }
                continue;
            }
            REQ_SET_VRING_ENABLE => {
                let (index, on) = (word(msg.payload(), 0), word(msg.payload(), 4) != 0);
                rings.set(index, on);
                send_with_fds(back, msg.bytes(), &msg.fds)?;
                if on {
                    kick_after_barrier(back, pending, index)?;
                }
                continue;
            }
            REQ_SET_VRING_KICK => {
                // u64 payload: ring index in bits 0-7, bit 8 "no fd" (polling).
                let index = word(msg.payload(), 0) & 0xFF;
                send_with_fds(back, msg.bytes(), &msg.fds)?;
                lock(pending).kicks.record(index, msg.fds.pop());
                if rings.is_enabled(index as usize) {
                    kick_after_barrier(back, pending, index)?;
                }
                continue;
            }
            REQ_GET_INFLIGHT_FD | REQ_SET_INFLIGHT_FD if inflight.is_some() => {
                let reply = answer_inflight(&mut msg, inflight);
                if let Some((bytes, fd)) = reply {
                    let _g = front_tx.lock().unwrap_or_else(|e| e.into_inner());
                    send_with_fds(front, &bytes, fd.as_slice())?;
                }
                continue;
            }
            _ => {}
        }
        send_with_fds(back, msg.bytes(), &msg.fds)?;
    }
    Ok(())
}

/// Answers GET_INFLIGHT_FD (a fresh region, its memfd attached) or SET_INFLIGHT_FD (maps the
/// region the frontend kept; a reply only if asked for): the reply bytes and fds to send.
/// A failure is logged and answered with an empty region (GET) or a non-zero status (SET).
fn answer_inflight(msg: &mut Msg, inflight: Option<&Inflight>) -> Option<(Vec<u8>, Vec<OwnedFd>)> {
    let inflight = inflight?;
    let p = msg.payload();
    let u64_at = |at| u64::from(word(p, at)) | (u64::from(word(p, at + 4)) << 32);
    let (size, offset) = (u64_at(0), u64_at(8));
    let half = word(p, 16);
    let (queues, queue_size) = ((half & 0xffff) as u16, (half >> 16) as u16);
    let request = msg.request();
    let mut reply = Vec::with_capacity(HDR_LEN + INFLIGHT_LEN);
    reply.extend(request.to_le_bytes());
    reply.extend((FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    if request == REQ_GET_INFLIGHT_FD {
        let region = Region::create(queues, queue_size);
        let mut body = [0u8; INFLIGHT_LEN];
        let mut fds = Vec::new();
        match region {
            Ok(r) => {
                body[..8].copy_from_slice(&(r.len() as u64).to_le_bytes());
                body[16..18].copy_from_slice(&queues.to_le_bytes());
                body[18..20].copy_from_slice(&queue_size.to_le_bytes());
                match r.fd().try_clone() {
                    Ok(fd) => fds.push(fd),
                    Err(e) => tracing::warn!("GET_INFLIGHT_FD: {e}"),
                }
                tracing::info!(
                    "inflight region: {} bytes for {queues} queue(s) of {queue_size}",
                    r.len()
                );
                inflight.set(Some(r));
            }
            Err(e) => tracing::warn!("GET_INFLIGHT_FD: {e}"),
        }
        reply.extend((INFLIGHT_LEN as u32).to_le_bytes());
        reply.extend(body);
        return Some((reply, fds));
    }
    let status: u64 = match msg.fds.pop() {
        Some(fd) => match Region::map(fd, size, offset, queues, queue_size) {
            Ok(r) => {
                tracing::info!(
                    "inflight region handed over: {size} bytes for {queues} queue(s) of \
                     {queue_size}; requests in flight are resubmitted"
                );
                inflight.set(Some(r));
                0
            }
            Err(e) => {
                tracing::warn!("SET_INFLIGHT_FD: {e}");
                1
            }
        },
        None => {
            tracing::warn!("SET_INFLIGHT_FD without a file descriptor");
            1
        }
    };
    if msg.flags() & FLAG_NEED_REPLY == 0 {
        return None;
    }
    reply.extend(8u32.to_le_bytes());
    reply.extend(status.to_le_bytes());
    Some((reply, Vec::new()))
}

/// Backend → frontend, verbatim, except the answers to the relay's own barriers.
fn forward_replies(
    back: &UnixStream,
    front: &UnixStream,
    front_tx: &Mutex<()>,
    pending: &SharedKicks,
) -> Result<(), RelayError> {
    let mut msg = new_msg();
    while read_msg(back, &mut msg)?.is_some() {
        if barrier_answered(&msg, pending) {
            continue;
        }
        let _g = front_tx.lock().unwrap_or_else(|e| e.into_inner());
        send_with_fds(front, msg.bytes(), &msg.fds)?;
    }
    Ok(())
}

/// Starts relaying `front` (a frontend's connection): returns the listening socket the `vhost`
/// crate's handler accepts the relay's inner end from (one connection pending), and the two
/// relay threads (they end when either side closes).
pub fn start(
    front: UnixStream,
    rings: Arc<RingEnable>,
    inflight: Option<Arc<Inflight>>,
) -> Result<(UnixListener, [JoinHandle<()>; 2]), RelayError> {
    let (inner, back) = relay_socket()?;
    let threads = spawn(front, back, rings, inflight)?;
    Ok((inner, threads))
}

/// A listening socket with one pending connection, for the relay to reach the vhost crate's
/// handler (which only accepts from a `Listener`), made without any path (the daemon is
/// confined: no filesystem, issue #12): an AF_UNIX socket autobound to an abstract address (`bind`
/// of the family alone), connected to at once, then shut down for reading so that no other connection can
/// be made. Between `listen` and our `connect` a local process of the same network namespace
/// (none in `--sandbox namespace`, which has its own) could connect first: [`only_ours`] tells,
/// after the handler accepted, whether it took ours.
fn relay_socket() -> Result<(UnixListener, UnixStream), RelayError> {
    let sock = |what| RelayError::Socket(what, io::Error::last_os_error());
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sock("socket"));
    }
    // SAFETY: a fresh fd owned by nobody else.
    let listener = unsafe { OwnedFd::from_raw_fd(fd) };
    // Binding an address of the family alone autobinds to a fresh abstract address.
    let family = libc::AF_UNIX as libc::sa_family_t;
    let family_len = std::mem::size_of::<libc::sa_family_t>() as libc::socklen_t;
    // SAFETY: `family` is a valid (minimal) sockaddr of `family_len` bytes.
    let r = unsafe {
        libc::bind(
            listener.as_raw_fd(),
            std::ptr::addr_of!(family).cast(),
            family_len,
        )
    };
    if r != 0 {
        return Err(sock("bind"));
    }
    // SAFETY: listen on our bound socket.
    if unsafe { libc::listen(listener.as_raw_fd(), 1) } != 0 {
        return Err(sock("listen"));
    }
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr`/`len` describe a valid sockaddr_un buffer.
    let r = unsafe {
        libc::getsockname(
            listener.as_raw_fd(),
            std::ptr::addr_of_mut!(addr).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(sock("getsockname"));
    }
    // SAFETY: as for the listener.
    let cfd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if cfd < 0 {
        return Err(sock("socket"));
    }
    // SAFETY: a fresh fd owned by nobody else.
    let client = unsafe { OwnedFd::from_raw_fd(cfd) };
    // SAFETY: `addr`/`len` are the listener's own address as getsockname returned it.
    let r = unsafe { libc::connect(client.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) };
    if r != 0 {
        return Err(sock("connect"));
    }
    // No connection after ours: a shut-down listener refuses connects (ECONNREFUSED) but
    // still hands out the pending one.
    // SAFETY: shutdown on an fd we own.
    if unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RD) } != 0 {
        return Err(sock("shutdown"));
    }
    Ok((UnixListener::from(listener), UnixStream::from(client)))
}

/// After the handler accepted from `listener` (a duplicate of the relay's): whether nothing is
/// left pending, i.e. the connection it took was the relay's (the only one, see
/// [`relay_socket`]). Anything left is accepted and closed.
pub fn only_ours(listener: &UnixListener) -> Result<bool, RelayError> {
    listener
        .set_nonblocking(true)
        .map_err(|e| RelayError::Socket("fcntl", e))?;
    match listener.accept() {
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(e) => Err(RelayError::Socket("accept", e)),
    }
}

/// Relays between `front` (the frontend's connection) and `back` (connected to the vhost
/// request handler) until either side closes; then shuts both down. With `inflight`, the
/// relay answers GET/SET_INFLIGHT_FD itself (the `vhost` handler does not implement them).
pub fn spawn(
    front: UnixStream,
    back: UnixStream,
    rings: Arc<RingEnable>,
    inflight: Option<Arc<Inflight>>,
) -> io::Result<[JoinHandle<()>; 2]> {
    let front = Arc::new(front);
    let back = Arc::new(back);
    let lock = Arc::new(Mutex::new(()));
    let pending = SharedKicks::default();
    let close = |a: &UnixStream, b: &UnixStream| {
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    };
    let (f, b, l, p) = (front.clone(), back.clone(), lock.clone(), pending.clone());
    let requests = std::thread::Builder::new()
        .name("relay-req".into())
        .spawn(move || {
            crate::confine::confine_thread_once(crate::confine::ThreadKind::Helper);
            if let Err(e) = forward_requests(&f, &b, &l, &rings, inflight.as_deref(), &p) {
                tracing::debug!("relay (requests): {e}");
            }
            close(&f, &b);
        })?;
    let replies = std::thread::Builder::new()
        .name("relay-rep".into())
        .spawn(move || {
            crate::confine::confine_thread_once(crate::confine::ThreadKind::Helper);
            if let Err(e) = forward_replies(&back, &front, &lock, &pending) {
                tracing::debug!("relay (replies): {e}");
            }
            close(&front, &back);
        })?;
    Ok([requests, replies])
}

#[cfg(test)]
mod tests {
    use super::wire::MAX_FDS;
    use super::*;
    use std::io::{IoSlice, Read, Write};
    use std::os::fd::RawFd;

    fn msg(req: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(req.to_le_bytes());
        m.extend((flags | FLAG_VERSION).to_le_bytes());
        m.extend((payload.len() as u32).to_le_bytes());
        m.extend(payload);
        m
    }

    #[test]
    fn early_vring_enable_is_held_back_and_fds_pass() {
        let (mut qemu, front) = UnixStream::pair().unwrap();
        let (back, mut backend) = UnixStream::pair().unwrap();
        let rings = Arc::new(RingEnable::default());
        let threads = spawn(front, back, rings.clone(), None).unwrap();
        // Early enables of ring 0 (off, then on with a reply requested): answered by the
        // relay, not forwarded yet.
        qemu.write_all(&msg(REQ_SET_VRING_ENABLE, 0, &[0u8; 8]))
            .unwrap();
        let on = [0, 0, 0, 0, 1, 0, 0, 0];
        qemu.write_all(&msg(REQ_SET_VRING_ENABLE, FLAG_NEED_REPLY, &on))
            .unwrap();
        let mut reply = [0u8; 20];
        qemu.read_exact(&mut reply).unwrap();
        assert_eq!(word(&reply, 0), REQ_SET_VRING_ENABLE);
        assert_eq!(word(&reply, 4), FLAG_VERSION | FLAG_REPLY);
        // SET_FEATURES with PROTOCOL_FEATURES, then an enable: both forwarded, with an fd.
        let feat = msg(REQ_SET_FEATURES, 0, &F_PROTOCOL_FEATURES.to_le_bytes());
        let file = std::fs::File::open("/dev/null").unwrap();
        send_with_fds(&qemu, &feat, &[OwnedFd::from(file)]).unwrap();
        let enable = msg(REQ_SET_VRING_ENABLE, 0, &[3, 0, 0, 0, 1, 0, 0, 0]);
        qemu.write_all(&enable).unwrap();
        let mut got = new_msg();
        read_msg(&backend, &mut got).unwrap().unwrap();
        assert_eq!(got.buf[..got.len], feat[..]);
        assert_eq!(got.fds.len(), 1);
        // The held-back state (ring 0 enabled) is replayed right after SET_FEATURES.
        read_msg(&backend, &mut got).unwrap().unwrap();
        assert_eq!(
            got.buf[..got.len],
            msg(REQ_SET_VRING_ENABLE, 0, &[0, 0, 0, 0, 1, 0, 0, 0])[..]
        );
        // Each enable is followed by the relay's barrier (a GET_FEATURES of its own).
        let barrier = msg(REQ_GET_FEATURES, 0, &[]);
        read_msg(&backend, &mut got).unwrap().unwrap();
        assert_eq!(got.buf[..got.len], barrier[..]);
        read_msg(&backend, &mut got).unwrap().unwrap();
        assert_eq!(got.buf[..got.len], enable[..]);
        read_msg(&backend, &mut got).unwrap().unwrap();
        assert_eq!(got.buf[..got.len], barrier[..]);
        // The backend's view: ring 0 (replayed) and ring 3 enabled, nothing else.
        assert!(rings.is_enabled(0) && rings.is_enabled(3));
        assert!(!rings.is_enabled(1) && !rings.is_enabled(64));
        // The barriers' answers stay in the relay; the next reply flows back.
        let features = msg(REQ_GET_FEATURES, FLAG_REPLY, &7u64.to_le_bytes());
        backend.write_all(&features).unwrap();
        backend.write_all(&features).unwrap();
        let rep = msg(15, FLAG_REPLY, &7u64.to_le_bytes());
        backend.write_all(&rep).unwrap();
        let mut back_rep = vec![0u8; rep.len()];
        qemu.read_exact(&mut back_rep).unwrap();
        assert_eq!(back_rep, rep);
        // Closing the frontend closes the backend side.
        drop(qemu);
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        for t in threads {
            t.join().unwrap();
        }
    }

    fn eventfd_count(fd: &OwnedFd) -> u64 {
        let mut v = [0u8; 8];
        // SAFETY: reads 8 bytes into a live local buffer from a non-blocking eventfd we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
        if n == 8 {
            u64::from_ne_bytes(v)
        } else {
            0
        }
    }

    #[test]
    fn a_ring_is_kicked_only_once_the_handler_answered_the_barrier() {
        let (mut qemu, front) = UnixStream::pair().unwrap();
        let (back, mut backend) = UnixStream::pair().unwrap();
        let rings = Arc::new(RingEnable::default());
        let threads = spawn(front, back, rings.clone(), None).unwrap();
        // SAFETY: plain eventfd creation; the fd is owned below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh fd owned by nobody else.
        let kick = unsafe { OwnedFd::from_raw_fd(raw) };
        let feat = msg(REQ_SET_FEATURES, 0, &F_PROTOCOL_FEATURES.to_le_bytes());
        qemu.write_all(&feat).unwrap();
        let set_kick = msg(REQ_SET_VRING_KICK, 0, &2u64.to_le_bytes());
        send_with_fds(&qemu, &set_kick, &[kick.try_clone().unwrap()]).unwrap();
        qemu.write_all(&msg(REQ_SET_VRING_ENABLE, 0, &[2, 0, 0, 0, 1, 0, 0, 0]))
            .unwrap();
        let mut got = new_msg();
        for want in [REQ_SET_FEATURES, REQ_SET_VRING_KICK, REQ_SET_VRING_ENABLE] {
            read_msg(&backend, &mut got).unwrap().unwrap();
            assert_eq!(got.request(), want);
        }
        read_msg(&backend, &mut got).unwrap().unwrap();
        assert_eq!(got.request(), REQ_GET_FEATURES, "the barrier");
        // Until the handler answers, the ring is not kicked.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            eventfd_count(&kick),
            0,
            "kicked before the handler was done"
        );
        backend
            .write_all(&msg(REQ_GET_FEATURES, FLAG_REPLY, &7u64.to_le_bytes()))
            .unwrap();
        // A reply of another request after it: forwarded, and by then the kick is done.
        let rep = msg(15, FLAG_REPLY, &3u64.to_le_bytes());
        backend.write_all(&rep).unwrap();
        let mut back_rep = vec![0u8; rep.len()];
        qemu.read_exact(&mut back_rep).unwrap();
        assert_eq!(back_rep, rep, "the barrier's answer reached the frontend");
        assert_eq!(eventfd_count(&kick), 1);
        drop(qemu);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn inflight_requests_are_answered_by_the_relay() {
        let (mut qemu, front) = UnixStream::pair().unwrap();
        let (back, mut backend) = UnixStream::pair().unwrap();
        let inflight = Arc::new(Inflight::default());
        let threads = spawn(front, back, Arc::default(), Some(inflight.clone())).unwrap();
        // GET_INFLIGHT_FD for 2 queues of 16: a fresh region and its memfd.
        let mut ask = [0u8; INFLIGHT_LEN];
        ask[16..18].copy_from_slice(&2u16.to_le_bytes());
        ask[18..20].copy_from_slice(&16u16.to_le_bytes());
        qemu.write_all(&msg(REQ_GET_INFLIGHT_FD, 0, &ask)).unwrap();
        let mut got = new_msg();
        read_msg(&qemu, &mut got).unwrap().unwrap();
        assert_eq!(got.request(), REQ_GET_INFLIGHT_FD);
        assert_eq!(got.flags(), FLAG_VERSION | FLAG_REPLY);
        let size = u64::from(word(got.payload(), 0));
        assert_eq!(size as usize, 2 * crate::inflight::queue_bytes(16));
        assert_eq!(got.payload()[16..20], ask[16..20]);
        let fd = got.fds.pop().expect("the memfd");
        assert_eq!(inflight.get().unwrap().shape(), (2, 16));
        // SET_INFLIGHT_FD with that fd, a reply asked for: mapped, status 0.
        let mut set = ask;
        set[..8].copy_from_slice(&size.to_le_bytes());
        send_with_fds(
            &qemu,
            &msg(REQ_SET_INFLIGHT_FD, FLAG_NEED_REPLY, &set),
            &[fd],
        )
        .unwrap();
        read_msg(&qemu, &mut got).unwrap().unwrap();
        assert_eq!(got.request(), REQ_SET_INFLIGHT_FD);
        assert_eq!(got.payload(), &0u64.to_le_bytes());
        // Without an fd: status non-zero.
        qemu.write_all(&msg(REQ_SET_INFLIGHT_FD, FLAG_NEED_REPLY, &set))
            .unwrap();
        read_msg(&qemu, &mut got).unwrap().unwrap();
        assert_eq!(got.payload(), &1u64.to_le_bytes());
        // Neither reached the vhost handler.
        drop(qemu);
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn ring_states_follow_features_and_resets() {
        let (mut qemu, front) = UnixStream::pair().unwrap();
        let (back, backend) = UnixStream::pair().unwrap();
        let rings = Arc::new(RingEnable::default());
        let threads = spawn(front, back, rings.clone(), None).unwrap();
        let mut got = new_msg();
        // No PROTOCOL_FEATURES: every ring is enabled by SET_FEATURES.
        qemu.write_all(&msg(REQ_SET_FEATURES, 0, &0u64.to_le_bytes()))
            .unwrap();
        read_msg(&backend, &mut got).unwrap().unwrap();
        assert!(rings.is_enabled(0) && rings.is_enabled(5));
        qemu.write_all(&msg(REQ_RESET_OWNER, 0, &[])).unwrap();
        read_msg(&backend, &mut got).unwrap().unwrap();
        assert!(!rings.is_enabled(0) && !rings.is_enabled(5));
        drop(qemu);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn start_hands_the_handler_a_pending_connection() {
        let (mut qemu, front) = UnixStream::pair().unwrap();
        let (inner, threads) = start(front, Arc::default(), None).unwrap();
        let (mut handler, _) = inner.accept().unwrap();
        let req = msg(REQ_SET_FEATURES, 0, &0u64.to_le_bytes());
        qemu.write_all(&req).unwrap();
        let mut got = vec![0u8; req.len()];
        handler.read_exact(&mut got).unwrap();
        assert_eq!(got, req);
        drop(qemu);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn the_relay_socket_takes_no_second_connection_and_tells_whose_was_taken() {
        let (inner, back) = relay_socket().unwrap();
        let addr = inner.local_addr().unwrap();
        assert!(addr.as_pathname().is_none(), "no path: {addr:?}");
        // A stranger connecting now is refused (the listener is shut down for reading).
        // SAFETY: a fresh AF_UNIX socket, closed below.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        // SAFETY: sockaddr_un is plain data; getsockname fills it.
        let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: valid buffer and length.
        let r = unsafe {
            libc::getsockname(
                inner.as_raw_fd(),
                std::ptr::addr_of_mut!(sa).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0);
        // SAFETY: the address getsockname returned.
        let r = unsafe { libc::connect(fd, std::ptr::addr_of!(sa).cast(), len) };
        let e = io::Error::last_os_error();
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
        assert_eq!(r, -1, "a second connection was accepted");
        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{e}");
        // The one pending connection is the relay's own.
        let check = inner.try_clone().unwrap();
        let (mut handler, _) = inner.accept().unwrap();
        assert!(only_ours(&check).unwrap());
        (&back).write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        handler.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
    }

    #[test]
    fn a_message_with_too_many_fds_ends_the_relay() {
        let (qemu, front) = UnixStream::pair().unwrap();
        let (back, mut backend) = UnixStream::pair().unwrap();
        let threads = spawn(front, back, Arc::default(), None).unwrap();
        // More fds than any vhost-user message carries: the control data is truncated.
        let fds: Vec<OwnedFd> = (0..MAX_FDS * 3)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
            .collect();
        let data = msg(REQ_SET_FEATURES, 0, &0u64.to_le_bytes());
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let payload = std::mem::size_of_val(raw.as_slice());
        // SAFETY: CMSG_SPACE/CMSG_LEN are constant computations.
        let (space, clen) = unsafe {
            (
                libc::CMSG_SPACE(payload as u32) as usize,
                libc::CMSG_LEN(payload as u32),
            )
        };
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        let iov = [IoSlice::new(&data)];
        // SAFETY: msghdr is plain data.
        let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
        m.msg_iov = iov.as_ptr() as *mut libc::iovec;
        m.msg_iovlen = 1;
        m.msg_control = cbuf.as_mut_ptr().cast();
        m.msg_controllen = space as _;
        // SAFETY: the control buffer holds one cmsghdr with `payload` bytes of fds.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&m);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = clen as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast(), raw.len());
        }
        // SAFETY: `m` points at live buffers.
        let n = unsafe { libc::sendmsg(qemu.as_raw_fd(), &m, 0) };
        assert_eq!(n, data.len() as isize, "{}", io::Error::last_os_error());
        let mut got = Vec::new();
        backend.read_to_end(&mut got).unwrap();
        assert!(got.is_empty(), "a truncated message was relayed");
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn oversized_messages_end_the_relay() {
        let (mut qemu, front) = UnixStream::pair().unwrap();
        let (back, mut backend) = UnixStream::pair().unwrap();
        let threads = spawn(front, back, Arc::default(), None).unwrap();
        let mut m = msg(5, 0, &[]);
        m[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        qemu.write_all(&m).unwrap();
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        for t in threads {
            t.join().unwrap();
        }
    }
}
