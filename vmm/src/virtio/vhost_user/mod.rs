//! A [`VirtioDevice`] backed by a vhost-user daemon.
//!
//! [`VhostUserDevice::open`] connects (on the main thread, before the guest runs) and
//! negotiates what can be negotiated before the driver runs: features, protocol features
//! (MQ, CONFIG, REPLY_ACK), queue count, config space ([`conn`]). From then on the device is
//! split in two:
//! * the [`VhostUserDevice`] in the virtio-mmio transport, called in a vCPU's MMIO exit:
//!   answers from what it cached and *posts* activation, reset and config writes;
//! * its [`Control`] (taken with [`VhostUserDevice::take_control`], run with
//!   [`Control::spawn`]): the only sender of vhost-user messages, which also reconnects a
//!   daemon that died ([`control`] documents the state machine).
//!
//! So a vCPU never waits for a daemon: a dead or slow one delays the device, not the guest.

mod conn;
mod control;
mod features;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};

use vmm_sys_util::eventfd::EventFd;

use super::{device_id, QueueConfig, VirtioDevice, VirtioError};
use crate::memory::GuestMemory;
use conn::{host_addr, Conn, WANTED_PROTOCOL};
use control::{Activation, Command};

pub(crate) use conn::connect_retrying;
pub use control::{Control, ControlStatus};

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
    /// virtio-vsock: the daemon holds every connection; the VMM only relays its config
    /// space (`guest_cid`).
    Vsock,
}

impl VhostUserKind {
    fn device_id(self) -> u32 {
        match self {
            VhostUserKind::Blk => device_id::BLOCK,
            VhostUserKind::Net => device_id::NET,
            VhostUserKind::Fs => device_id::FS,
            VhostUserKind::Vsock => device_id::VSOCK,
        }
    }

    /// Size of the device config space.
    fn config_size(self) -> u32 {
        match self {
            VhostUserKind::Blk => 60,
            VhostUserKind::Net => 12,
            VhostUserKind::Fs => 40,
            // `le64 guest_cid`.
            VhostUserKind::Vsock => 8,
        }
    }

    /// Queues used when the backend does not support MQ.
    fn default_queues(self) -> usize {
        match self {
            VhostUserKind::Blk => 1,
            VhostUserKind::Net => 2,
            VhostUserKind::Fs => 2,
            // rx, tx, event.
            VhostUserKind::Vsock => 3,
        }
    }
}

/// A vhost-user backed virtio device (the vCPU side).
pub struct VhostUserDevice {
    kind: VhostUserKind,
    path: PathBuf,
    mem: GuestMemory,
    features: u64,
    queue_sizes: Vec<u16>,
    config: Vec<u8>,
    tx: Sender<Command>,
    control: Option<Control>,
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

impl VhostUserDevice {
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
        let mut conn = Conn::connect(path, WANTED_PROTOCOL, true)?;
        let kind = match kind {
            Some(k) => k,
            None => conn.discover_kind()?,
        };
        let queues = conn.queue_num(kind.default_queues())?;
        let config = conn.config(kind.config_size())?;
        let features = conn.virtio_features();
        let (tx, rx) = mpsc::channel();
        let control = Control::new(kind, mem.clone(), conn, queues, rx);
        Ok(VhostUserDevice {
            kind,
            path: path.to_path_buf(),
            mem,
            features,
            queue_sizes: vec![QUEUE_SIZE; queues],
            config,
            tx,
            control: Some(control),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The control side, to run on its thread ([`Control::spawn`]) once the process is
    /// confined; until it runs, the device's requests wait in its queue. `None` after the
    /// first call.
    pub fn take_control(&mut self) -> Option<Control> {
        self.control.take()
    }

    fn post(&self, cmd: Command) {
        // Fails only once the control thread ended (the VM is stopping).
        let _ = self.tx.send(cmd);
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
        self.features
    }

    fn set_notifiers(&mut self, kicks: &[EventFd], calls: &[EventFd]) -> Result<(), VirtioError> {
        let dup = |fds: &[EventFd]| {
            fds.iter()
                .map(|e| e.try_clone().map_err(VirtioError::EventFd))
                .collect::<Result<Vec<_>, _>>()
        };
        self.post(Command::Notifiers(dup(kicks)?, dup(calls)?));
        Ok(())
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
        if self.config.is_empty() {
            return; // no CONFIG protocol feature
        }
        let start = off as usize;
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = start.checked_add(i).and_then(|o| self.config.get_mut(o)) {
                *c = *b;
            }
        }
        self.post(Command::WriteConfig(off, data.to_vec()));
    }

    fn activate(
        &mut self,
        features: u64,
        queues: &[(usize, QueueConfig, &EventFd, &EventFd)],
    ) -> Result<(), VirtioError> {
        // Checked here so that a bad ring fails the activation the guest sees.
        for (i, q, _, _) in queues {
            let n = usize::from(q.size);
            for (addr, len) in [(q.desc, 16 * n), (q.avail, 6 + 2 * n), (q.used, 6 + 8 * n)] {
                host_addr(&self.mem, addr, len)
                    .map_err(|e| VirtioError::Config(format!("queue {i}: {e}")))?;
            }
        }
        self.post(Command::Activate(Activation {
            features,
            queues: queues.iter().map(|(i, q, _, _)| (*i, *q)).collect(),
        }));
        Ok(())
    }

    fn reset(&mut self) {
        self.post(Command::Reset);
    }
}
