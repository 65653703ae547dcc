//! Emulated devices in other processes, over the rqemu forwarding protocol
//! (`rqemu-protocol`'s client end).
//!
//! * [`probe`] tells, for a `--device-socket PATH` without a type, whether a forwarding daemon
//!   (`SOCK_SEQPACKET`) or a vhost-user daemon (`SOCK_STREAM`) listens there; a forwarding
//!   daemon's probe connection is kept and becomes the device's connection.
//! * [`attach`] runs the handshake under the machine's [`GrantPolicy`], maps every granted
//!   window on the PIO/MMIO bus as a [`window::WindowDevice`] and registers the granted lines
//!   as irqfds.
//! * [`supervisor`] notices a daemon that died (accesses then read all ones and the guest keeps
//!   running), reattaches it when it is back on the same socket with the same claims, and
//!   restores the device state it last saved.

pub mod supervisor;
mod window;

use std::cell::Cell;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};

use rqemu_protocol::handshake::FEATURE_SNAPSHOT;
use rqemu_protocol::sys::SeqSocket;
use rqemu_protocol::{Claims, ClientError, DeviceClass, ForwardedDevice, GrantPolicy, Handle};
use rqemu_protocol::{Space, Window};
use vmm_sys_util::eventfd::EventFd;

use crate::accel::{AccelError, Accelerator};
use crate::bus::{Bus, BusError};
use crate::layout::PLATFORM_PIO;
use crate::virtio::vhost_user::connect_retrying;

pub use window::WindowDevice;

/// GSIs a forwarded device may be granted, in preference order: the ISA lines that no
/// platform device uses (0 timer, 1 keyboard, 2 cascade, 9 ACPI SCI, 12 mouse).
pub const FREE_ISA_GSIS: [u32; 11] = [3, 4, 5, 6, 7, 8, 10, 11, 13, 14, 15];

/// Errors attaching a forwarded device.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The socket could not be connected.
    #[error("device socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The handshake failed or the daemon was refused.
    #[error("device daemon at {path}: {source}")]
    Handshake {
        /// Socket path.
        path: String,
        /// The error.
        #[source]
        source: ClientError,
    },
    /// Mapping a granted window failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Registering an interrupt line failed.
    #[error(transparent)]
    Accel(#[from] AccelError),
}

thread_local! {
    static CURRENT_VCPU: Cell<usize> = const { Cell::new(0) };
}

/// Records that this thread runs vCPU `index`, so forwarded accesses use that vCPU's ring.
pub fn set_current_vcpu(index: usize) {
    CURRENT_VCPU.with(|c| c.set(index));
}

fn current_vcpu() -> usize {
    CURRENT_VCPU.with(Cell::get)
}

/// What listens on a device socket.
#[derive(Debug)]
pub enum Probed {
    /// A forwarding daemon; the connection made to find out, for the handshake.
    Forwarding(SeqSocket),
    /// A vhost-user daemon (connect it with the vhost-user frontend).
    VhostUser,
}

/// Tells which protocol the daemon at `path` speaks (retrying for a few seconds while the
/// socket does not exist yet or refuses connections, as a daemon starting up does).
pub fn probe(path: &Path) -> Result<Probed, ForwardError> {
    match connect_retrying(|| SeqSocket::connect(path)) {
        Ok(s) => Ok(Probed::Forwarding(s)),
        Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => Ok(Probed::VhostUser),
        Err(source) => Err(ForwardError::Connect {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// The policy for a device of this machine: any PIO port and the free part of the 32-bit
/// MMIO hole not used by the platform or a device already on the buses, the free ISA GSIs,
/// edge lines only (the accelerators' irqfds do not resample).
pub fn machine_policy(pio: &Bus, mmio: &Bus, vcpus: u32, used_gsis: &[u32]) -> GrantPolicy {
    let mut p = GrantPolicy::isa_default(u16::try_from(vcpus).unwrap_or(u16::MAX));
    let win = |space, (base, size)| Window {
        space,
        base,
        size,
        flags: 0,
    };
    p.taken = PLATFORM_PIO
        .iter()
        .copied()
        .chain(pio.ranges())
        .map(|r| win(Space::Pio, r))
        .chain(mmio.ranges().into_iter().map(|r| win(Space::Mmio, r)))
        .collect();
    p.free_gsis = FREE_ISA_GSIS
        .iter()
        .copied()
        .filter(|g| !used_gsis.contains(g))
        .collect();
    p.allow_level = false;
    p
}

/// A forwarded device: the current connection and what it must look like after a reattach.
pub struct Link {
    path: PathBuf,
    class: DeviceClass,
    name: String,
    windows: Vec<Window>,
    gsis: Vec<u32>,
    policy: GrantPolicy,
    handle: RwLock<Handle>,
    /// The irqfds registered for the current connection: (gsi, eventfd).
    irqfds: Mutex<Vec<(u32, EventFd)>>,
    /// The last device state saved from the daemon, restored into a restarted one.
    saved: Mutex<Option<Vec<u8>>>,
    snapshots: AtomicBool,
    reattached: AtomicU64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("windows", &self.windows)
            .field("gsis", &self.gsis)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Device class the daemon announced.
    pub fn class(&self) -> DeviceClass {
        self.class
    }

    /// Daemon name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Granted windows.
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// Granted GSIs.
    pub fn gsis(&self) -> &[u32] {
        &self.gsis
    }

    /// How many times the device was reattached after its daemon came back.
    pub fn reattach_count(&self) -> u64 {
        self.reattached.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The current connection.
    pub fn handle(&self) -> Handle {
        self.handle
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Tells the daemon this VMM is done (posted writes land first), so it serves the next.
    pub fn shutdown(&self) {
        let h = self.handle();
        if h.is_alive() {
            if let Err(e) = h.shutdown() {
                tracing::warn!("device daemon {}: shutdown: {e}", self.name);
            }
        }
    }
}

/// Registers the granted lines of `claims` as irqfds.
fn register_irqs(
    accel: &dyn Accelerator,
    claims: Claims,
) -> Result<Vec<(u32, EventFd)>, ForwardError> {
    let mut out = Vec::with_capacity(claims.irqs.len());
    for irq in claims.irqs {
        let owned: OwnedFd = irq.event.into();
        // SAFETY: `owned` is an eventfd we own (created by the protocol client); ownership moves
        // into the vmm-sys-util wrapper, which closes it.
        let fd = unsafe { EventFd::from_raw_fd(owned.into_raw_fd()) };
        if let Err(e) = accel.register_irqfd(&fd, irq.gsi) {
            unregister_irqs(accel, &out);
            return Err(e.into());
        }
        out.push((irq.gsi, fd));
    }
    Ok(out)
}

fn unregister_irqs(accel: &dyn Accelerator, irqfds: &[(u32, EventFd)]) {
    for (gsi, fd) in irqfds {
        if let Err(e) = accel.unregister_irqfd(fd, *gsi) {
            tracing::warn!("unregistering the irqfd of GSI {gsi}: {e}");
        }
    }
}

/// Runs the handshake on `sock` (from [`probe`]) under `policy`, maps the granted windows on
/// the buses and registers the granted lines.
pub fn attach(
    accel: &dyn Accelerator,
    pio: &Bus,
    mmio: &Bus,
    sock: SeqSocket,
    path: &Path,
    policy: &GrantPolicy,
) -> Result<Arc<Link>, ForwardError> {
    let (claims, handle) =
        ForwardedDevice::attach(sock, policy).map_err(|source| ForwardError::Handshake {
            path: path.display().to_string(),
            source,
        })?;
    let class = claims.class;
    let name = claims.name.clone();
    let windows = claims.windows.clone();
    let gsis: Vec<u32> = claims.irqs.iter().map(|i| i.gsi).collect();
    let snapshots = claims.features & FEATURE_SNAPSHOT != 0;
    let irqfds = register_irqs(accel, claims)?;
    let link = Arc::new(Link {
        path: path.to_path_buf(),
        class,
        name,
        windows,
        gsis,
        policy: policy.clone(),
        handle: RwLock::new(handle),
        irqfds: Mutex::new(irqfds),
        saved: Mutex::new(None),
        snapshots: AtomicBool::new(snapshots),
        reattached: AtomicU64::new(0),
    });
    let mut mapped: Vec<(Space, u64)> = Vec::new();
    for w in &link.windows {
        let bus = match w.space {
            Space::Pio => pio,
            Space::Mmio => mmio,
        };
        let dev = Arc::new(Mutex::new(WindowDevice::new(link.clone(), w.space, w.base)));
        if let Err(e) = bus.insert(dev, w.base, w.size) {
            for (space, base) in mapped {
                match space {
                    Space::Pio => pio.remove(base),
                    Space::Mmio => mmio.remove(base),
                };
            }
            unregister_irqs(
                accel,
                &link.irqfds.lock().unwrap_or_else(|e| e.into_inner()),
            );
            link.shutdown();
            return Err(e.into());
        }
        mapped.push((w.space, w.base));
    }
    tracing::info!(
        "device daemon {} ({:?}) at {}: windows {:?}, GSIs {:?}",
        link.name,
        link.class,
        path.display(),
        link.windows,
        link.gsis
    );
    Ok(link)
}

/// Whether `[base, base + len)` in `space` overlaps a window of one of `links`.
pub fn claimed(links: &[Arc<Link>], space: Space, base: u64, len: u64) -> Option<&Arc<Link>> {
    let probe = Window {
        space,
        base,
        size: len,
        flags: 0,
    };
    links
        .iter()
        .find(|l| l.windows.iter().any(|w| w.overlaps(&probe)))
}

#[cfg(test)]
mod tests;
