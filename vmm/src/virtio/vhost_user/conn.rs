//! One connection to a vhost-user daemon (vhost crate 0.15 `Frontend`): the handshake
//! (SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES), queue count and config space, starting
//! the rings (SET_FEATURES, SET_MEM_TABLE, per queue VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE) and
//! stopping them (disable, GET_VRING_BASE). The socket has a read timeout so that a daemon that
//! stops answering yields an error instead of hanging the caller (the vhost-user control
//! thread; never a vCPU).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemory as _};
use vmm_sys_util::eventfd::EventFd;

use rqemu_protocol::identity;

use super::{VhostUserKind, QUEUE_SIZE};
use crate::memory::GuestMemory;
use crate::virtio::{QueueConfig, VirtioError};

/// How long to keep retrying to connect to a daemon's socket at start-up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Reply timeout for every vhost-user request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The protocol features rqemu-vmm uses when the daemon offers them.
pub(super) const WANTED_PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD);

/// The inflight region a daemon allocated (GET_INFLIGHT_FD), kept by the VMM for the device's
/// lifetime and handed to every daemon that takes over (SET_INFLIGHT_FD).
pub(super) struct InflightFd {
    /// As the daemon described it.
    pub desc: VhostUserInflight,
    /// The memfd.
    pub file: std::fs::File,
}

impl std::fmt::Debug for InflightFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InflightFd({:?})", InflightDesc(&self.desc))
    }
}

impl std::fmt::Debug for InflightDesc<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.0;
        let (size, queues, qs) = (d.mmap_size, d.num_queues, d.queue_size);
        write!(f, "{size} bytes, {queues} queue(s) of {qs}")
    }
}

/// Display helper for a [`VhostUserInflight`].
pub(super) struct InflightDesc<'a>(pub &'a VhostUserInflight);

/// What happens to the inflight region when the rings start.
#[derive(Debug)]
pub(super) enum InflightStep<'a> {
    /// A fresh activation: GET_INFLIGHT_FD for `queues` queues (a new, empty region).
    Fresh(usize),
    /// A daemon taking over: SET_INFLIGHT_FD with the region the previous one wrote.
    Handover(&'a InflightFd),
}

/// Runs `connect` until it succeeds, fails with something other than "no socket yet" /
/// "refused" (a daemon still starting), or [`CONNECT_TIMEOUT`] has passed.
pub(crate) fn connect_retrying<T>(
    mut connect: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let start = Instant::now();
    loop {
        match connect() {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) && start.elapsed() < CONNECT_TIMEOUT =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// A ring to start: its index, layout and the index the daemon resumes at.
#[derive(Debug, Clone, Copy)]
pub(super) struct RingStart {
    /// Queue index.
    pub index: usize,
    /// Guest-programmed layout.
    pub cfg: QueueConfig,
    /// SET_VRING_BASE value (the next avail index the daemon reads).
    pub base: u16,
}

/// A handshaken connection.
pub(super) struct Conn {
    path: PathBuf,
    frontend: Frontend,
    /// A clone of the socket, only polled for a hang-up.
    watch: UnixStream,
    /// GET_FEATURES (with `VHOST_USER_F_PROTOCOL_FEATURES`).
    features: u64,
    /// Negotiated protocol features.
    protocol: VhostUserProtocolFeatures,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("path", &self.path)
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

fn backend_err(path: &Path, op: &'static str, e: impl std::fmt::Display) -> VirtioError {
    VirtioError::Backend {
        path: path.display().to_string(),
        op,
        msg: e.to_string(),
    }
}

impl Conn {
    /// Connects to `path` (retrying for a few seconds while the daemon starts when `retry`)
    /// and handshakes, acking the offered protocol features among `wanted`.
    pub(super) fn connect(
        path: &Path,
        wanted: VhostUserProtocolFeatures,
        retry: bool,
    ) -> Result<Self, VirtioError> {
        let bad = |op, e: &dyn std::fmt::Display| backend_err(path, op, e);
        let stream = if retry {
            connect_retrying(|| UnixStream::connect(path))
        } else {
            UnixStream::connect(path)
        }
        .map_err(|e| bad("connect", &e))?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|e| bad("set socket timeout", &e))?;
        let watch = stream
            .try_clone()
            .map_err(|e| bad("cloning the socket", &e))?;
        let mut c = Conn {
            path: path.to_path_buf(),
            frontend: Frontend::from_stream(stream, 64),
            watch,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
        };
        c.frontend.set_owner().map_err(|e| c.err("SET_OWNER", e))?;
        c.features = c
            .frontend
            .get_features()
            .map_err(|e| c.err("GET_FEATURES", e))?;
        if c.has_protocol() {
            let offered = c
                .frontend
                .get_protocol_features()
                .map_err(|e| c.err("GET_PROTOCOL_FEATURES", e))?;
            c.protocol = offered & wanted;
            c.frontend
                .set_protocol_features(c.protocol)
                .map_err(|e| c.err("SET_PROTOCOL_FEATURES", e))?;
        }
        Ok(c)
    }

    pub(super) fn err(&self, op: &'static str, e: impl std::fmt::Display) -> VirtioError {
        backend_err(&self.path, op, e)
    }

    /// The socket path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the daemon offers `VHOST_USER_F_PROTOCOL_FEATURES`.
    pub(super) fn has_protocol(&self) -> bool {
        self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// The virtio features the daemon offers (without the vhost-user protocol bit).
    pub(super) fn virtio_features(&self) -> u64 {
        self.features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// The negotiated protocol features.
    pub(super) fn protocol(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// The number of queues the daemon serves (`default` without MQ).
    pub(super) fn queue_num(&mut self, default: usize) -> Result<usize, VirtioError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::MQ) {
            return Ok(default);
        }
        let n = self
            .frontend
            .get_queue_num()
            .map_err(|e| self.err("GET_QUEUE_NUM", e))?;
        Ok(usize::try_from(n).unwrap_or(1).clamp(1, 64))
    }

    /// The first `size` bytes of the config space (empty without the CONFIG feature).
    pub(super) fn config(&mut self, size: u32) -> Result<Vec<u8>, VirtioError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(Vec::new());
        }
        let buf = vec![0u8; size as usize];
        let (_, payload) = self
            .frontend
            .get_config(0, size, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(|e| self.err("GET_CONFIG", e))?;
        Ok(payload)
    }

    /// SET_CONFIG (nothing without the CONFIG feature).
    pub(super) fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), VirtioError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(());
        }
        self.frontend
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .map_err(|e| self.err("SET_CONFIG", e))
    }

    /// Reads the rqemu identity block through GET_CONFIG and maps it to a device kind.
    pub(super) fn discover_kind(&mut self) -> Result<VhostUserKind, VirtioError> {
        let path = self.path.display().to_string();
        let undiscoverable = |why: String| VirtioError::Backend {
            path: path.clone(),
            op: "device type discovery",
            msg: format!(
                "{why}; this is not an rqemu daemon (or too old): give the type explicitly \
                 (blk:PATH, net:PATH, fs:PATH or vsock:PATH)"
            ),
        };
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(undiscoverable(
                "the daemon does not offer the CONFIG protocol feature".into(),
            ));
        }
        let buf = vec![0u8; identity::IDENTITY_LEN as usize];
        let payload = self
            .frontend
            .get_config(
                identity::IDENTITY_OFFSET,
                identity::IDENTITY_LEN,
                VhostUserConfigFlags::WRITABLE,
                &buf,
            )
            .map_err(|e| undiscoverable(format!("no identity block ({e})")))?
            .1;
        let id = identity::Identity::decode(&payload).map_err(|e| undiscoverable(e.to_string()))?;
        let kind = match id.kind {
            identity::DeviceKind::Blk => VhostUserKind::Blk,
            identity::DeviceKind::Net => VhostUserKind::Net,
            identity::DeviceKind::Fs => VhostUserKind::Fs,
            identity::DeviceKind::Vsock => VhostUserKind::Vsock,
            identity::DeviceKind::Other(n) => {
                return Err(VirtioError::Backend {
                    path,
                    op: "device type discovery",
                    msg: format!(
                        "{} serves virtio device type {n}, which rqemu-vmm does not support",
                        id.name
                    ),
                })
            }
        };
        tracing::info!(path = %self.path.display(), daemon = %id.name, "discovered a {kind:?} device");
        Ok(kind)
    }

    /// Whether the daemon hung up (a poll of the socket, not blocking).
    pub(super) fn hung_up(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.watch.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        r > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Starts the device: SET_FEATURES (`features` acked by the driver), SET_MEM_TABLE, then
    /// every ring of `rings` with its kick and call eventfd, and a request with a reply as a
    /// barrier (once it is answered every ring is enabled).
    pub(super) fn start(
        &mut self,
        mem: &GuestMemory,
        features: u64,
        rings: &[RingStart],
        kicks: &[EventFd],
        calls: &[EventFd],
        inflight: InflightStep<'_>,
    ) -> Result<Option<InflightFd>, VirtioError> {
        let mut f = features;
        if self.has_protocol() {
            f |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(f)
            .map_err(|e| self.err("SET_FEATURES", e))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("describing guest memory", e))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(|e| self.err("SET_MEM_TABLE", e))?;
        let mut fresh = None;
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            match inflight {
                InflightStep::Fresh(queues) => {
                    let ask = VhostUserInflight {
                        num_queues: u16::try_from(queues).unwrap_or(u16::MAX),
                        queue_size: QUEUE_SIZE,
                        ..VhostUserInflight::default()
                    };
                    let (desc, file) = self
                        .frontend
                        .get_inflight_fd(&ask)
                        .map_err(|e| self.err("GET_INFLIGHT_FD", e))?;
                    tracing::debug!(path = %self.path.display(), "inflight region: {:?}", InflightDesc(&desc));
                    fresh = Some(InflightFd { desc, file });
                }
                InflightStep::Handover(r) => {
                    self.frontend
                        .set_inflight_fd(&r.desc, r.file.as_raw_fd())
                        .map_err(|e| self.err("SET_INFLIGHT_FD", e))?;
                }
            }
        }
        for r in rings {
            let (Some(kick), Some(call)) = (kicks.get(r.index), calls.get(r.index)) else {
                return Err(VirtioError::Config(format!(
                    "queue {} has no notifiers",
                    r.index
                )));
            };
            self.setup_ring(mem, r, kick, call)?;
        }
        // Backends handle messages in order: once this is answered every ring is enabled.
        // Without it, a guest kick racing SET_VRING_ENABLE is dropped by backends that
        // discard kicks on disabled rings (vhost-user-backend); the caller kicks once after.
        self.frontend
            .get_features()
            .map_err(|e| self.err("GET_FEATURES (barrier)", e))?;
        Ok(fresh)
    }

    fn setup_ring(
        &mut self,
        mem: &GuestMemory,
        r: &RingStart,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), VirtioError> {
        let q = &r.cfg;
        let n = usize::from(q.size);
        let cfg = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: host_addr(mem, q.desc, 16 * n).map_err(|e| self.err("ring", e))?,
            used_ring_addr: host_addr(mem, q.used, 6 + 8 * n).map_err(|e| self.err("ring", e))?,
            avail_ring_addr: host_addr(mem, q.avail, 6 + 2 * n).map_err(|e| self.err("ring", e))?,
            log_addr: None,
        };
        let i = r.index;
        let f = &mut self.frontend;
        let p = &self.path;
        f.set_vring_num(i, q.size)
            .map_err(|e| backend_err(p, "SET_VRING_NUM", e))?;
        f.set_vring_addr(i, &cfg)
            .map_err(|e| backend_err(p, "SET_VRING_ADDR", e))?;
        f.set_vring_base(i, r.base)
            .map_err(|e| backend_err(p, "SET_VRING_BASE", e))?;
        f.set_vring_call(i, call)
            .map_err(|e| backend_err(p, "SET_VRING_CALL", e))?;
        f.set_vring_kick(i, kick)
            .map_err(|e| backend_err(p, "SET_VRING_KICK", e))?;
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            f.set_vring_enable(i, true)
                .map_err(|e| backend_err(p, "SET_VRING_ENABLE", e))?;
        }
        Ok(())
    }

    /// Stops `rings` (disable, GET_VRING_BASE); failures are logged.
    pub(super) fn stop(&mut self, rings: impl IntoIterator<Item = usize>) {
        let has_protocol = self.has_protocol();
        for i in rings {
            if has_protocol {
                let _ = self.frontend.set_vring_enable(i, false);
            }
            if let Err(e) = self.frontend.get_vring_base(i) {
                tracing::warn!(path = %self.path.display(), queue = i, "stopping ring: {e}");
            }
        }
    }
}

/// The host address of `len` bytes of guest memory at `gpa` (all in one region).
pub(super) fn host_addr(mem: &GuestMemory, gpa: u64, len: usize) -> Result<u64, String> {
    let slice = mem
        .get_slice(GuestAddress(gpa), len.max(1))
        .map_err(|e| format!("translating ring address {gpa:#x}+{len:#x}: {e}"))?;
    Ok(slice.ptr_guard().as_ptr() as u64)
}
