//! A [`VirtioDevice`] backed by a vhost-user daemon (vhost crate 0.15 `Frontend`).
//!
//! Connection: feature and protocol-feature negotiation (MQ, CONFIG, REPLY_ACK), queue count,
//! config space via GET_CONFIG/SET_CONFIG. Activation: SET_FEATURES, SET_MEM_TABLE (every RAM
//! region's memfd + offset), then per queue VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE. Reset:
//! GET_VRING_BASE (stops each ring) and disable. The socket has a read timeout so that a
//! daemon that stops answering yields an error instead of hanging the VMM.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemory as _};
use vmm_sys_util::eventfd::EventFd;

use rqemu_protocol::identity;

use super::{device_id, QueueConfig, VirtioDevice, VirtioError};
use crate::memory::GuestMemory;

/// How long to keep retrying to connect to a daemon's socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Reply timeout for every vhost-user request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Queue size offered to the guest.
const QUEUE_SIZE: u16 = 256;

/// The device types rqemu can front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhostUserKind {
    /// virtio-blk.
    Blk,
    /// virtio-net.
    Net,
    /// virtio-fs.
    Fs,
}

impl VhostUserKind {
    fn device_id(self) -> u32 {
        match self {
            VhostUserKind::Blk => device_id::BLOCK,
            VhostUserKind::Net => device_id::NET,
            VhostUserKind::Fs => device_id::FS,
        }
    }

    /// Size of the device config space.
    fn config_size(self) -> u32 {
        match self {
            VhostUserKind::Blk => 60,
            VhostUserKind::Net => 12,
            VhostUserKind::Fs => 40,
        }
    }

    /// Queues used when the backend does not support MQ.
    fn default_queues(self) -> usize {
        match self {
            VhostUserKind::Blk => 1,
            VhostUserKind::Net => 2,
            VhostUserKind::Fs => 2,
        }
    }
}

/// A vhost-user backed virtio device.
pub struct VhostUserDevice {
    kind: VhostUserKind,
    path: PathBuf,
    frontend: Frontend,
    mem: GuestMemory,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    queue_sizes: Vec<u16>,
    config: Vec<u8>,
    active_queues: Vec<usize>,
    watch: Option<UnixStream>,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("kind", &self.kind)
            .field("path", &self.path)
            .field("queues", &self.queue_sizes.len())
            .finish_non_exhaustive()
    }
}

fn connect_stream(path: &Path) -> Result<UnixStream, std::io::Error> {
    connect_retrying(|| UnixStream::connect(path))
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

impl VhostUserDevice {
    fn err(&self, op: &'static str, e: impl std::fmt::Display) -> VirtioError {
        VirtioError::Backend {
            path: self.path.display().to_string(),
            op,
            msg: e.to_string(),
        }
    }

    /// Connects to the daemon at `path` and negotiates what can be negotiated before the
    /// guest driver runs. `mem` is the guest RAM later sent with SET_MEM_TABLE.
    pub fn connect(
        kind: VhostUserKind,
        path: &Path,
        mem: GuestMemory,
    ) -> Result<Self, VirtioError> {
        Self::open(Some(kind), path, mem)
    }

    /// Like [`VhostUserDevice::connect`]; with `kind` `None` the device type is discovered
    /// from the daemon's rqemu identity block (`rqemu_protocol::identity`). A daemon that has
    /// none (a third-party vhost-user daemon) gives an error asking for an explicit type.
    pub fn open(
        kind: Option<VhostUserKind>,
        path: &Path,
        mem: GuestMemory,
    ) -> Result<Self, VirtioError> {
        let bad = |op, e: &dyn std::fmt::Display| VirtioError::Backend {
            path: path.display().to_string(),
            op,
            msg: e.to_string(),
        };
        let stream = connect_stream(path).map_err(|e| bad("connect", &e))?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|e| bad("set socket timeout", &e))?;
        let watch = stream
            .try_clone()
            .map_err(|e| bad("cloning the socket", &e))?;
        let frontend = Frontend::from_stream(stream, 64);
        let mut dev = VhostUserDevice {
            kind: kind.unwrap_or(VhostUserKind::Blk),
            path: path.to_path_buf(),
            frontend,
            mem,
            backend_features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            queue_sizes: Vec::new(),
            config: Vec::new(),
            active_queues: Vec::new(),
            watch: Some(watch),
        };
        dev.frontend
            .set_owner()
            .map_err(|e| dev.err("SET_OWNER", e))?;
        dev.backend_features = dev
            .frontend
            .get_features()
            .map_err(|e| dev.err("GET_FEATURES", e))?;
        let has_protocol =
            dev.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if has_protocol {
            let offered = dev
                .frontend
                .get_protocol_features()
                .map_err(|e| dev.err("GET_PROTOCOL_FEATURES", e))?;
            let wanted = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK;
            dev.protocol = offered & wanted;
            dev.frontend
                .set_protocol_features(dev.protocol)
                .map_err(|e| dev.err("SET_PROTOCOL_FEATURES", e))?;
        }
        dev.kind = match kind {
            Some(k) => k,
            None => dev.discover_kind()?,
        };
        let kind = dev.kind;
        let mut queues = kind.default_queues();
        if has_protocol {
            if dev.protocol.contains(VhostUserProtocolFeatures::MQ) {
                let n = dev
                    .frontend
                    .get_queue_num()
                    .map_err(|e| dev.err("GET_QUEUE_NUM", e))?;
                queues = usize::try_from(n).unwrap_or(1).clamp(1, 64);
            }
            if dev.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
                let size = kind.config_size();
                let buf = vec![0u8; size as usize];
                let (_, payload) = dev
                    .frontend
                    .get_config(0, size, VhostUserConfigFlags::WRITABLE, &buf)
                    .map_err(|e| dev.err("GET_CONFIG", e))?;
                dev.config = payload.to_vec();
            }
        }
        dev.queue_sizes = vec![QUEUE_SIZE; queues];
        Ok(dev)
    }

    /// Reads the rqemu identity block through GET_CONFIG and maps it to a device kind.
    fn discover_kind(&mut self) -> Result<VhostUserKind, VirtioError> {
        let path = self.path.display().to_string();
        let undiscoverable = |why: String| VirtioError::Backend {
            path: path.clone(),
            op: "device type discovery",
            msg: format!(
                "{why}; this is not an rqemu daemon (or too old): give the type explicitly \
                 (blk:PATH, net:PATH or fs:PATH)"
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

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A clone of the daemon connection, to watch for the daemon hanging up (only poll it
    /// for `POLLRDHUP`; never read from it). Returns `None` after the first call.
    pub fn take_watch_stream(&mut self) -> Option<UnixStream> {
        self.watch.take()
    }

    fn set_mem_table(&mut self) -> Result<(), VirtioError> {
        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("describing guest memory", e))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(|e| self.err("SET_MEM_TABLE", e))
    }

    fn host_addr(&self, gpa: u64, len: usize) -> Result<u64, VirtioError> {
        let slice = self
            .mem
            .get_slice(GuestAddress(gpa), len.max(1))
            .map_err(|e| self.err("translating a ring address", e))?;
        Ok(slice.ptr_guard().as_ptr() as u64)
    }

    fn setup_queue(
        &mut self,
        i: usize,
        q: &QueueConfig,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), VirtioError> {
        let n = usize::from(q.size);
        let cfg = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: self.host_addr(q.desc, 16 * n)?,
            used_ring_addr: self.host_addr(q.used, 6 + 8 * n)?,
            avail_ring_addr: self.host_addr(q.avail, 6 + 2 * n)?,
            log_addr: None,
        };
        let f = &mut self.frontend;
        let p = self.path.display().to_string();
        let e = |op: &'static str| {
            let p = p.clone();
            move |err: vhost::Error| VirtioError::Backend {
                path: p,
                op,
                msg: err.to_string(),
            }
        };
        f.set_vring_num(i, q.size).map_err(e("SET_VRING_NUM"))?;
        f.set_vring_addr(i, &cfg).map_err(e("SET_VRING_ADDR"))?;
        f.set_vring_base(i, 0).map_err(e("SET_VRING_BASE"))?;
        f.set_vring_call(i, call).map_err(e("SET_VRING_CALL"))?;
        f.set_vring_kick(i, kick).map_err(e("SET_VRING_KICK"))?;
        if self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            f.set_vring_enable(i, true).map_err(e("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.device_id()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.backend_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, b) in data.iter_mut().enumerate() {
            *b = start
                .checked_add(i)
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(off) = u32::try_from(offset) else {
            return;
        };
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return;
        }
        if let Err(e) = self
            .frontend
            .set_config(off, VhostUserConfigFlags::WRITABLE, data)
        {
            tracing::warn!(path = %self.path.display(), "SET_CONFIG failed: {e}");
            return;
        }
        let start = off as usize;
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = self.config.get_mut(start + i) {
                *c = *b;
            }
        }
    }

    fn activate(
        &mut self,
        features: u64,
        queues: &[(usize, QueueConfig, &EventFd, &EventFd)],
    ) -> Result<(), VirtioError> {
        let mut f = features;
        if self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            f |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(f)
            .map_err(|e| self.err("SET_FEATURES", e))?;
        self.set_mem_table()?;
        self.active_queues.clear();
        for (i, q, kick, call) in queues {
            self.setup_queue(*i, q, kick, call)?;
            self.active_queues.push(*i);
        }
        // A request with a reply as a barrier: backends handle messages in order, so once it
        // is answered every ring is enabled. Without it, a guest kick racing SET_VRING_ENABLE
        // is dropped by backends that discard kicks on disabled rings (vhost-user-backend).
        self.frontend
            .get_features()
            .map_err(|e| self.err("GET_FEATURES (barrier)", e))?;
        Ok(())
    }

    fn reset(&mut self) {
        let has_protocol =
            self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        for i in std::mem::take(&mut self.active_queues) {
            if has_protocol {
                let _ = self.frontend.set_vring_enable(i, false);
            }
            if let Err(e) = self.frontend.get_vring_base(i) {
                tracing::warn!(path = %self.path.display(), queue = i, "stopping ring: {e}");
            }
        }
    }
}
