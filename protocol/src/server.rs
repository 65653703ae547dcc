//! The daemon end: [`EmulatedDevice`] is what a device implements, [`serve`] runs the protocol
//! for it (handshake, control messages, socket accesses, one worker thread per vCPU ring) and
//! [`Interrupts`] raises and lowers its lines through the eventfds the VMM granted.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::handshake::{
    Answer, DeviceClass, HandshakeError, Hello, IrqRequest, Space, Trigger, Window, FEATURE_RING,
};
use crate::messages::{
    self, Access, AccessReply, Control, ControlReply, MessageError, OP_READ, STATUS_BAD_REQUEST,
    STATUS_OK, TAG_ACCESS, TAG_CONTROL, TAG_CONTROL_REPLY,
};
use crate::ring::{RingView, RING_BYTES, SLOTS};
use crate::sys::{poll_in, EventFd, SeqListener, SeqSocket, SharedMem, MAX_MSG};

/// Most rings (vCPUs) a daemon serves.
pub const MAX_VCPUS: u16 = 64;
/// How long a ring worker spins on an empty ring before sleeping on its doorbell.
pub const DEVICE_SPIN: Duration = Duration::from_micros(50);
/// How long the daemon waits for the VMM's answer to its `HELLO`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the daemon end.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Socket or system error.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// Bad handshake message.
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// Bad post-handshake message.
    #[error("message: {0}")]
    Message(#[from] MessageError),
    /// The VMM refused the device.
    #[error("the VMM refused the device: {0}")]
    Refused(String),
    /// The grant does not answer the claims.
    #[error("the VMM's grant does not match the claimed windows/lines/features")]
    BadGrant,
    /// The VMM closed the connection.
    #[error("the VMM disconnected")]
    Disconnected,
}

/// A device served by [`serve`]. Offsets are relative to the claimed window `window`.
pub trait EmulatedDevice: Send {
    /// A register read of `data.len()` (1, 2, 4 or 8) bytes; `data` arrives filled with 0xff.
    fn read(&mut self, space: Space, window: usize, offset: u64, data: &mut [u8]);
    /// A register write.
    fn write(&mut self, space: Space, window: usize, offset: u64, data: &[u8]);
    /// Machine reset.
    fn reset(&mut self) {}
    /// Device state for a snapshot (`None`: not supported).
    fn snapshot(&self) -> Option<Vec<u8>> {
        None
    }
    /// Restores a snapshot.
    fn restore(&mut self, _state: &[u8]) -> Result<(), String> {
        Err("snapshot/restore not supported by this device".into())
    }
}

/// What a daemon announces in its `HELLO`.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// Device class.
    pub class: DeviceClass,
    /// Daemon name.
    pub name: String,
    /// Claimed windows (window index = position).
    pub windows: Vec<Window>,
    /// Interrupt lines (line index = position).
    pub irqs: Vec<IrqRequest>,
    /// Features (`FEATURE_*`).
    pub features: u64,
}

#[derive(Debug, Default)]
struct Line {
    level: bool,
    asserted: bool,
    trigger: Option<EventFd>,
    resample: Option<EventFd>,
}

/// The device's interrupt lines. Cheap to clone; usable before a VMM is connected (a level
/// line raised meanwhile is signalled as soon as its eventfd arrives; edges are dropped).
#[derive(Debug, Clone, Default)]
pub struct Interrupts {
    lines: Arc<Mutex<Vec<Line>>>,
}

impl Interrupts {
    /// `n` lines, unconnected.
    pub fn new(n: usize) -> Self {
        let lines = (0..n).map(|_| Line::default()).collect();
        Interrupts {
            lines: Arc::new(Mutex::new(lines)),
        }
    }

    /// Lines shaped like a device's requests (level lines latch before a VMM connects).
    pub fn for_requests(reqs: &[IrqRequest]) -> Self {
        let lines = reqs
            .iter()
            .map(|r| Line {
                level: r.trigger == Trigger::Level,
                ..Line::default()
            })
            .collect();
        Interrupts {
            lines: Arc::new(Mutex::new(lines)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Line>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises `line`: an edge is one eventfd write; a level stays asserted until [`lower`].
    ///
    /// [`lower`]: Interrupts::lower
    pub fn raise(&self, line: usize) {
        let mut l = self.lock();
        let Some(l) = l.get_mut(line) else { return };
        l.asserted = l.level;
        if let Some(t) = &l.trigger {
            if let Err(e) = t.signal() {
                tracing::warn!("irq line {line}: {e}");
            }
        }
    }

    /// Lowers a level line (no-op for edges).
    pub fn lower(&self, line: usize) {
        if let Some(l) = self.lock().get_mut(line) {
            l.asserted = false;
        }
    }

    /// Whether `line` has an eventfd from a VMM.
    pub fn is_connected(&self, line: usize) -> bool {
        self.lock().get(line).is_some_and(|l| l.trigger.is_some())
    }

    fn install(&self, line: usize, level: bool, trigger: EventFd, resample: Option<EventFd>) {
        let mut lines = self.lock();
        if let Some(l) = lines.get_mut(line) {
            l.level = level;
            if l.asserted {
                let _ = trigger.signal();
            }
            l.trigger = Some(trigger);
            l.resample = resample;
        }
    }

    fn clear(&self) {
        for l in self.lock().iter_mut() {
            l.trigger = None;
            l.resample = None;
        }
    }

    /// Handles resample (EOI) events: re-signals level lines still asserted.
    fn resample_pending(&self) {
        for l in self.lock().iter_mut() {
            if let (Some(r), Some(t)) = (&l.resample, &l.trigger) {
                if r.drain() > 0 && l.asserted {
                    let _ = t.signal();
                }
            }
        }
    }

    fn resample_fds(&self) -> Vec<OwnedFd> {
        self.lock()
            .iter()
            .filter_map(|l| l.resample.as_ref()?.as_fd().try_clone_to_owned().ok())
            .collect()
    }
}

fn lock<D>(d: &Mutex<D>) -> MutexGuard<'_, D> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// Performs one access against the device; `(status, data)`.
fn dispatch<D: EmulatedDevice>(dev: &Mutex<D>, windows: &[Window], a: &Access) -> (u8, u64) {
    let len = usize::from(a.len);
    let hit = windows
        .iter()
        .enumerate()
        .find_map(|(i, w)| Some((i, w.offset_of(a.space, a.addr, len as u64)?)));
    let Some((win, off)) = hit else {
        return (STATUS_BAD_REQUEST, u64::MAX);
    };
    let mut buf = [0xffu8; 8];
    if a.op == OP_READ {
        lock(dev).read(a.space, win, off, &mut buf[..len]);
        (STATUS_OK, u64::from_le_bytes(buf))
    } else {
        buf = a.data.to_le_bytes();
        lock(dev).write(a.space, win, off, &buf[..len]);
        (STATUS_OK, 0)
    }
}

struct Workers {
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    threads: Vec<JoinHandle<()>>,
    _mem: Option<Arc<SharedMem>>,
}

impl Workers {
    fn new() -> io::Result<Self> {
        Ok(Workers {
            stop: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(EventFd::new()?),
            threads: Vec::new(),
            _mem: None,
        })
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.signal();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One step of a bounded spin: a CPU pause at first, then yielding, so a spinning thread does
/// not starve its peer when both share a core (few cores, or an oversubscribed host).
pub(crate) fn spin_pause(i: u32) {
    if i < 128 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// One ring's serving thread state.
struct RingWorker<D> {
    idx: usize,
    view: RingView,
    to_dev: EventFd,
    to_vmm: EventFd,
    dev: Arc<Mutex<D>>,
    windows: Vec<Window>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
}

fn ring_worker<D: EmulatedDevice>(w: RingWorker<D>) {
    let RingWorker {
        idx,
        view,
        to_dev,
        to_vmm,
        dev,
        windows,
        stop,
        wake,
    } = w;
    let mut tail = 0u64;
    // Performs request `tail + 1`; false when the ring is corrupt.
    let step = |tail: &mut u64, head: u64| -> bool {
        if head.wrapping_sub(*tail) > SLOTS {
            tracing::error!(
                "ring {idx}: VMM head {head} is inconsistent with tail {tail}; ring stopped"
            );
            return false;
        }
        let n = *tail + 1;
        let (status, data) = match view.take(n) {
            Some(a) => dispatch(&dev, &windows, &a),
            None => (STATUS_BAD_REQUEST, u64::MAX),
        };
        if view.complete(n, status, data) {
            let _ = to_vmm.signal();
        }
        *tail = n;
        true
    };
    loop {
        if stop.load(Ordering::SeqCst) {
            // The VMM is gone: perform what it published before leaving (posted writes).
            let head = view.head();
            while tail != head && step(&mut tail, head) {}
            return;
        }
        let mut head = view.head();
        if head == tail {
            let start = Instant::now();
            let mut i = 0u32;
            while head == tail && !stop.load(Ordering::Relaxed) {
                spin_pause(i);
                head = view.head();
                i = i.wrapping_add(1);
                if i % 64 == 0 && start.elapsed() > DEVICE_SPIN {
                    break;
                }
            }
            if head == tail {
                view.set_device_sleeping(true);
                if view.head() == tail && !stop.load(Ordering::SeqCst) {
                    let mut rev = [0i16; 2];
                    if let Err(e) = poll_in(&[to_dev.as_fd(), wake.as_fd()], None, &mut rev) {
                        tracing::error!("ring {idx}: poll: {e}");
                        return;
                    }
                }
                view.set_device_sleeping(false);
                to_dev.drain();
                continue;
            }
        }
        if !step(&mut tail, head) {
            return;
        }
    }
}

fn reply(sock: &SeqSocket, r: &ControlReply, buf: &mut [u8]) -> Result<(), ServeError> {
    let n = messages::encode_postcard(TAG_CONTROL_REPLY, r, buf)?;
    sock.send(&buf[..n], &[])?;
    Ok(())
}

struct Conn<'a, D> {
    sock: &'a SeqSocket,
    info: &'a DeviceInfo,
    dev: &'a Arc<Mutex<D>>,
    irqs: &'a Interrupts,
    windows: Vec<Window>,
    workers: Workers,
    resampler: Option<JoinHandle<()>>,
    /// Mapped guest memory regions (kept for devices that DMA; none does yet).
    memory: Vec<(messages::MemRegion, OwnedFd)>,
}

impl<D: EmulatedDevice + 'static> Conn<'_, D> {
    fn control(&mut self, c: Control, fds: Vec<OwnedFd>) -> Result<ControlReply, String> {
        if fds.len() != c.fd_count() {
            return Err(format!(
                "{} fds attached, {} expected",
                fds.len(),
                c.fd_count()
            ));
        }
        match c {
            Control::SetRings { vcpus } => self.set_rings(vcpus, fds),
            Control::SetIrqFds { lines } => {
                let mut fds = fds.into_iter();
                let mut seen = vec![false; self.info.irqs.len()];
                for l in &lines {
                    let idx = usize::from(l.line);
                    let want = self.info.irqs.get(idx).ok_or("no such interrupt line")?;
                    if want.trigger != l.trigger || std::mem::replace(&mut seen[idx], true) {
                        return Err(format!("line {idx}: wrong trigger or given twice"));
                    }
                }
                for l in lines {
                    let ev = |f: Option<OwnedFd>| -> Result<EventFd, String> {
                        EventFd::from_owned(f.ok_or("missing fd")?).map_err(|e| e.to_string())
                    };
                    let t = ev(fds.next())?;
                    let r = match l.trigger {
                        Trigger::Level => Some(ev(fds.next())?),
                        Trigger::Edge => None,
                    };
                    self.irqs
                        .install(l.line.into(), l.trigger == Trigger::Level, t, r);
                }
                self.start_resampler();
                Ok(ControlReply::Ok)
            }
            Control::SetMemTable { regions } => {
                self.memory = regions.into_iter().zip(fds).collect();
                Ok(ControlReply::Ok)
            }
            Control::Reset => {
                lock(self.dev).reset();
                Ok(ControlReply::Ok)
            }
            Control::Shutdown => Ok(ControlReply::Ok),
            Control::Snapshot => lock(self.dev)
                .snapshot()
                .map(ControlReply::State)
                .ok_or_else(|| "snapshot not supported".to_string()),
            Control::Restore { state } => lock(self.dev).restore(&state).map(|_| ControlReply::Ok),
        }
    }

    fn set_rings(&mut self, vcpus: u16, fds: Vec<OwnedFd>) -> Result<ControlReply, String> {
        if self.info.features & FEATURE_RING == 0 {
            return Err("rings not offered".into());
        }
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(format!("{vcpus} rings (1..={MAX_VCPUS})"));
        }
        if !self.workers.threads.is_empty() {
            return Err("rings already installed".into());
        }
        let mut fds = fds.into_iter();
        let memfd = fds.next().ok_or("missing memfd")?;
        let mem = SharedMem::from_fd(memfd, usize::from(vcpus) * RING_BYTES)
            .map_err(|e| e.to_string())?;
        let mem = Arc::new(mem);
        let mut bells = Vec::new();
        for _ in 0..vcpus {
            let a =
                EventFd::from_owned(fds.next().ok_or("missing fd")?).map_err(|e| e.to_string())?;
            let b =
                EventFd::from_owned(fds.next().ok_or("missing fd")?).map_err(|e| e.to_string())?;
            bells.push((a, b));
        }
        for (i, (to_dev, to_vmm)) in bells.into_iter().enumerate() {
            let view = RingView::new(&mem, i).ok_or("ring outside mapping")?;
            let (dev, windows) = (self.dev.clone(), self.windows.clone());
            let (stop, wake) = (self.workers.stop.clone(), self.workers.wake.clone());
            let t = std::thread::Builder::new()
                .name(format!("ring{i}"))
                .spawn(move || {
                    ring_worker(RingWorker {
                        idx: i,
                        view,
                        to_dev,
                        to_vmm,
                        dev,
                        windows,
                        stop,
                        wake,
                    })
                })
                .map_err(|e| e.to_string())?;
            self.workers.threads.push(t);
        }
        self.workers._mem = Some(mem);
        Ok(ControlReply::Ok)
    }

    fn start_resampler(&mut self) {
        let fds = self.irqs.resample_fds();
        if fds.is_empty() || self.resampler.is_some() {
            return;
        }
        let (irqs, stop, wake) = (
            self.irqs.clone(),
            self.workers.stop.clone(),
            self.workers.wake.clone(),
        );
        self.resampler = std::thread::Builder::new()
            .name("resample".into())
            .spawn(move || {
                let mut all: Vec<_> = fds.iter().take(15).map(|f| f.as_fd()).collect();
                all.push(wake.as_fd());
                let mut rev = [0i16; 16];
                while !stop.load(Ordering::Relaxed) {
                    if poll_in(&all, None, &mut rev).is_err() {
                        break;
                    }
                    irqs.resample_pending();
                }
            })
            .ok();
    }

    fn run(&mut self) -> Result<(), ServeError> {
        let mut buf = vec![0u8; MAX_MSG];
        let mut out = vec![0u8; MAX_MSG];
        loop {
            let mut fds = Vec::new();
            let n = match self.sock.recv(&mut buf, &mut fds, None) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let (tag, payload) = messages::unframe(&buf[..n])?;
            match tag {
                TAG_ACCESS => {
                    if !fds.is_empty() {
                        return Err(MessageError::Fds {
                            got: fds.len(),
                            want: 0,
                        }
                        .into());
                    }
                    let a = Access::decode(payload)?;
                    let (status, data) = if a.op == messages::OP_POSTED_WRITE {
                        (STATUS_BAD_REQUEST, u64::MAX)
                    } else {
                        dispatch(self.dev, &self.windows, &a)
                    };
                    self.sock.send(
                        &AccessReply {
                            seq: a.seq,
                            status,
                            data,
                        }
                        .encode(),
                        &[],
                    )?;
                }
                TAG_CONTROL => {
                    let c: Control = messages::decode_postcard(payload)?;
                    let shutdown = c == Control::Shutdown;
                    let r = self.control(c, fds).unwrap_or_else(ControlReply::Error);
                    if let ControlReply::Error(e) = &r {
                        tracing::warn!("control message failed: {e}");
                    }
                    reply(self.sock, &r, &mut out)?;
                    if shutdown {
                        return Ok(());
                    }
                }
                t => return Err(MessageError::Tag(t).into()),
            }
        }
    }
}

/// Serves one VMM connection until it closes or sends `Shutdown`.
pub fn serve_connection<D: EmulatedDevice + 'static>(
    sock: SeqSocket,
    info: &DeviceInfo,
    dev: &Arc<Mutex<D>>,
    irqs: &Interrupts,
) -> Result<(), ServeError> {
    let hello = Hello {
        class: info.class,
        name: info.name.clone(),
        features: info.features,
        windows: info.windows.clone(),
        irqs: info.irqs.clone(),
    };
    sock.send(&hello.encode()?, &[])?;
    let mut buf = [0u8; 512];
    let mut fds = Vec::new();
    let n = match sock.recv(&mut buf, &mut fds, Some(HANDSHAKE_TIMEOUT)) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ServeError::Disconnected),
        r => r?,
    };
    if !fds.is_empty() {
        return Err(MessageError::Fds {
            got: fds.len(),
            want: 0,
        }
        .into());
    }
    let grant = match Answer::decode(&buf[..n])? {
        Answer::Refuse(why) => return Err(ServeError::Refused(why)),
        Answer::Grant(g) => g,
    };
    if !grant.matches(&hello) {
        return Err(ServeError::BadGrant);
    }
    tracing::info!("VMM granted {:?}, GSIs {:?}", grant.windows, grant.gsis);
    let mut conn = Conn {
        sock: &sock,
        info,
        dev,
        irqs,
        windows: grant.windows,
        workers: Workers::new()?,
        resampler: None,
        memory: Vec::new(),
    };
    let r = conn.run();
    conn.workers.stop();
    if let Some(t) = conn.resampler.take() {
        let _ = t.join();
    }
    irqs.clear();
    tracing::debug!(
        "connection closed ({} memory regions were mapped)",
        conn.memory.len()
    );
    r
}

/// Serves VMM connections one after the other, forever (a VMM restart reattaches). Returns
/// only if accepting fails.
pub fn serve<D: EmulatedDevice + 'static>(
    listener: &SeqListener,
    info: &DeviceInfo,
    dev: Arc<Mutex<D>>,
    irqs: &Interrupts,
) -> io::Result<()> {
    loop {
        let sock = listener.accept()?;
        if !crate::listen::peer_allowed(std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(
            &sock,
        ))) {
            continue;
        }
        match serve_connection(sock, info, &dev, irqs) {
            Ok(()) => tracing::info!("VMM disconnected; waiting for the next one"),
            Err(ServeError::Disconnected) => tracing::debug!("probe connection closed"),
            Err(e) => tracing::warn!("connection ended: {e}"),
        }
    }
}
