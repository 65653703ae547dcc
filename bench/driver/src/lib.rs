//! A guest-less vhost-user frontend that is also the virtio driver.
//!
//! It plays both the VMM (vhost-user negotiation, memory table, vring set-up, kick and call
//! eventfds) and the guest driver (split virtqueues in a memfd "guest memory", descriptor
//! chains, used-ring polling). `rqemu-bench`, conformance checks and the daemons' in-process
//! tests drive any vhost-user backend with it — ours or a third party's.
//!
//! Device helpers: [`blk`] (virtio-blk requests) and [`fs`] (virtio-fs: the driver is the FUSE
//! client, with its own FUSE ABI definitions so that it shares no code with the servers it
//! tests).

pub mod blk;
pub mod fs;
mod memory;
mod queue;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

pub use memory::{DriverMemory, MemoryError};
pub use queue::{Chain, QueueError, SplitQueue};
pub use vhost::vhost_user::message::VhostUserProtocolFeatures as ProtocolFeatures;

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Connecting to the backend's socket failed.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A vhost-user request failed.
    #[error("vhost-user {op}: {source}")]
    VhostUser {
        /// The request.
        op: &'static str,
        /// The error.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks something required.
    #[error("backend does not offer {0}")]
    Missing(&'static str),
    /// Guest memory set-up failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Virtqueue error.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The backend has fewer queues than asked for.
    #[error("{wanted} queues asked, the backend has {offered} (GET_QUEUE_NUM)")]
    Queues {
        /// Queues asked for.
        wanted: u16,
        /// Queues the backend has.
        offered: u64,
    },
    /// Waiting for an interrupt timed out.
    #[error("no completion within {0:?}")]
    Timeout(Duration),
    /// An eventfd operation failed.
    #[error("eventfd: {0}")]
    Event(std::io::Error),
}

fn vu<T>(op: &'static str, r: vhost::Result<T>) -> Result<T, DriverError> {
    r.map_err(|source| DriverError::VhostUser { op, source })
}

/// Options of a connection.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// Size of the driver's guest memory (rings + data buffers).
    pub mem_size: usize,
    /// Number of queues to set up.
    pub num_queues: u16,
    /// Size of each queue (power of two).
    pub queue_size: u16,
    /// Device feature bits the driver is willing to accept (beyond VERSION_1, which is
    /// required, and EVENT_IDX, which is accepted when `event_idx`).
    pub accept_features: u64,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when offered.
    pub event_idx: bool,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            mem_size: 64 << 20,
            num_queues: 1,
            queue_size: 256,
            accept_features: u64::MAX,
            event_idx: false,
        }
    }
}

/// A connected, running device.
pub struct Device {
    frontend: Frontend,
    /// The guest memory shared with the backend.
    pub mem: DriverMemory,
    /// The queues, enabled and running.
    pub queues: Vec<SplitQueue>,
    /// Negotiated virtio features.
    pub features: u64,
    /// Negotiated vhost-user protocol features.
    pub protocol_features: VhostUserProtocolFeatures,
    /// Features the backend offered.
    pub offered_features: u64,
    /// Protocol features the backend offered.
    pub offered_protocol_features: VhostUserProtocolFeatures,
}

impl std::fmt::Debug for DriverMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverMemory")
            .field("size", &self.size())
            .finish()
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("features", &format_args!("{:#x}", self.features))
            .field("queues", &self.queues.len())
            .finish()
    }
}

impl Device {
    /// Connects to `path`, negotiates, shares memory and starts `opts.num_queues` queues.
    pub fn connect(path: &Path, opts: &DriverOptions) -> Result<Self, DriverError> {
        let sock = UnixStream::connect(path).map_err(|source| DriverError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let mut frontend = Frontend::from_stream(sock, u64::from(opts.num_queues));
        vu("SET_OWNER", frontend.set_owner())?;
        let offered = vu("GET_FEATURES", frontend.get_features())?;
        let proto_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(DriverError::Missing("VIRTIO_F_VERSION_1"));
        }
        if offered & proto_bit == 0 {
            return Err(DriverError::Missing("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        let mut accept = opts.accept_features | (1 << VIRTIO_F_VERSION_1) | proto_bit;
        if !opts.event_idx {
            accept &= !(1 << VIRTIO_RING_F_EVENT_IDX);
        }
        let features = offered & accept;
        vu("SET_FEATURES", frontend.set_features(features))?;
        let offered_proto = vu("GET_PROTOCOL_FEATURES", frontend.get_protocol_features())?;
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK;
        let protocol_features = offered_proto & wanted;
        vu(
            "SET_PROTOCOL_FEATURES",
            frontend.set_protocol_features(protocol_features),
        )?;
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request is acknowledged: errors surface where they happen.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if opts.num_queues > 1 {
            if !protocol_features.contains(VhostUserProtocolFeatures::MQ) {
                return Err(DriverError::Missing("VHOST_USER_PROTOCOL_F_MQ"));
            }
            let n = vu("GET_QUEUE_NUM", frontend.get_queue_num())?;
            if n < u64::from(opts.num_queues) {
                return Err(DriverError::Queues {
                    wanted: opts.num_queues,
                    offered: n,
                });
            }
        }

        let mut mem = DriverMemory::new(opts.mem_size)?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem.size() as u64,
            userspace_addr: mem.host_addr() as u64,
            mmap_offset: 0,
            mmap_handle: mem.fd(),
        };
        vu("SET_MEM_TABLE", frontend.set_mem_table(&[region]))?;

        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(usize::from(opts.num_queues));
        for i in 0..usize::from(opts.num_queues) {
            let q = SplitQueue::new(&mut mem, opts.queue_size, event_idx)?;
            vu("SET_VRING_NUM", frontend.set_vring_num(i, opts.queue_size))?;
            let cfg = VringConfigData {
                queue_max_size: opts.queue_size,
                queue_size: opts.queue_size,
                flags: 0,
                desc_table_addr: mem.host_addr() as u64 + q.desc_addr(),
                used_ring_addr: mem.host_addr() as u64 + q.used_addr(),
                avail_ring_addr: mem.host_addr() as u64 + q.avail_addr(),
                log_addr: None,
            };
            vu("SET_VRING_ADDR", frontend.set_vring_addr(i, &cfg))?;
            vu("SET_VRING_BASE", frontend.set_vring_base(i, 0))?;
            vu("SET_VRING_CALL", frontend.set_vring_call(i, q.call_fd()))?;
            vu("SET_VRING_KICK", frontend.set_vring_kick(i, q.kick_fd()))?;
            vu("SET_VRING_ENABLE", frontend.set_vring_enable(i, true))?;
            queues.push(q);
        }
        // A request with a reply, as a barrier: the backend handles messages in order, so once
        // this is answered every queue is enabled and a kick cannot be lost.
        vu("GET_FEATURES", frontend.get_features())?;
        Ok(Device {
            frontend,
            mem,
            queues,
            features,
            protocol_features,
            offered_features: offered,
            offered_protocol_features: offered_proto,
        })
    }

    /// Reads `len` bytes of the device configuration space at `offset`.
    pub fn config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, DriverError> {
        let buf = vec![0u8; len as usize];
        let (_, payload) = vu(
            "GET_CONFIG",
            self.frontend
                .get_config(offset, len, VhostUserConfigFlags::WRITABLE, &buf),
        )?;
        Ok(payload)
    }

    /// GET_QUEUE_NUM: the number of queues the backend supports (needs MQ).
    pub fn queue_num(&mut self) -> Result<u64, DriverError> {
        vu("GET_QUEUE_NUM", self.frontend.get_queue_num())
    }

    /// Stops queue `i` and returns the backend's view of the next available index.
    pub fn stop_queue(&mut self, i: usize) -> Result<u32, DriverError> {
        vu("SET_VRING_ENABLE", self.frontend.set_vring_enable(i, false))?;
        vu("GET_VRING_BASE", self.frontend.get_vring_base(i))
    }

    /// Starts queue `i` again after [`Device::stop_queue`] returned `base`, on the same rings
    /// (as a VMM does after a device reset): SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE.
    pub fn restart_queue(&mut self, i: usize, base: u16) -> Result<(), DriverError> {
        let host = self.mem.host_addr() as u64;
        let q = &self.queues[i];
        let size = q.size();
        let f = &mut self.frontend;
        vu("SET_VRING_NUM", f.set_vring_num(i, size))?;
        let cfg = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: host + q.desc_addr(),
            used_ring_addr: host + q.used_addr(),
            avail_ring_addr: host + q.avail_addr(),
            log_addr: None,
        };
        vu("SET_VRING_ADDR", f.set_vring_addr(i, &cfg))?;
        vu("SET_VRING_BASE", f.set_vring_base(i, base))?;
        vu("SET_VRING_CALL", f.set_vring_call(i, q.call_fd()))?;
        vu("SET_VRING_KICK", f.set_vring_kick(i, q.kick_fd()))?;
        vu("SET_VRING_ENABLE", f.set_vring_enable(i, true))?;
        vu("GET_FEATURES", f.get_features()).map(drop)
    }

    /// The underlying vhost-user frontend, for raw protocol checks.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }
}
