//! Attaching the devices of a machine: the device sockets of the command line (vhost-user
//! daemons on virtio-mmio windows, forwarding daemons on the windows they are granted), and
//! the in-VMM defaults (COM1, CMOS RTC) for what no daemon took.

use std::sync::{Arc, Mutex};

use rqemu_protocol::handshake::FEATURE_RING;
use rqemu_protocol::Space;
use vmm_sys_util::eventfd::EventFd;

use super::control::DeviceEntry;
use super::counted::{AccessCounts, Counted, Shared};
use super::{DeviceSocketConfig, VmConfig, VmError};
use crate::accel::{Accelerator, IoEventAddress, IoEventBinding};
use crate::acpi::VirtioWindow;
use crate::bus::Bus;
use crate::devices::rtc::Rtc;
use crate::devices::serial::{SerialDevice, SerialOutput};
use crate::forwarded::{self, Link, Probed};
use crate::layout::{RTC_PORT, SERIAL_GSI, SERIAL_PORT};
use crate::memory::GuestRam;
use crate::virtio::empty::EmptyVirtioMmio;
use crate::virtio::mmio::{reg, MmioTransport};
use crate::virtio::vhost_user::{Control, VhostUserDevice};
use crate::virtio::VirtioDevice;

/// The in-VMM COM1 and its interrupt eventfd.
pub(super) type InVmmSerial = (Arc<Mutex<SerialDevice>>, EventFd);

/// What [`attach_devices`] set up.
pub(super) struct Attached {
    /// The control sides of the vhost-user devices (run on their threads by `Vm::run`).
    pub(super) controls: Vec<Control>,
    /// Every device, for the management API.
    pub(super) devices: Vec<DeviceEntry>,
    /// Forwarded devices.
    pub(super) links: Vec<Arc<Link>>,
    /// The in-VMM COM1, unless a daemon serves it.
    pub(super) serial: Option<InVmmSerial>,
}

/// Connects every device socket (probing the untyped ones), fills the unused virtio-mmio
/// windows with empty devices, and adds the in-VMM COM1 and RTC unless a forwarding daemon
/// was granted their ports.
pub(super) fn attach_devices(
    accel: &dyn Accelerator,
    ram: &GuestRam,
    pio: &Bus,
    mmio: &Bus,
    windows: &[VirtioWindow],
    cfg: &VmConfig,
) -> Result<Attached, VmError> {
    let serial = &cfg.serial;
    let mut vhost = Vec::new();
    let mut fwd = Vec::new();
    for d in &cfg.devices {
        check_socket_path(&d.socket)?;
        if d.kind.is_some() {
            vhost.push(d);
            continue;
        }
        match forwarded::probe(&d.socket)? {
            Probed::VhostUser => vhost.push(d),
            Probed::Forwarding(sock) => fwd.push((sock, &d.socket)),
        }
    }
    if vhost.len() > windows.len() {
        return Err(VmError::TooManyDevices(vhost.len()));
    }
    let mut controls = Vec::new();
    let mut devices = Vec::new();
    for (i, w) in windows.iter().enumerate() {
        match vhost.get(i) {
            Some(d) => {
                let counts = Arc::new(AccessCounts::default());
                let (virtio_id, control) = attach_vhost_user(accel, ram, mmio, d, w, &counts)?;
                devices.push(DeviceEntry::VhostUser {
                    virtio_id,
                    socket: d.socket.clone(),
                    status: control.status(),
                    counts,
                });
                controls.push(control);
            }
            None => mmio.insert(Arc::new(Mutex::new(EmptyVirtioMmio)), w.base, w.size)?,
        }
    }

    let mut links: Vec<Arc<Link>> = Vec::new();
    for (sock, path) in fwd {
        let used: Vec<u32> = links.iter().flat_map(|l| l.gsis().to_vec()).collect();
        let mut policy = forwarded::machine_policy(pio, mmio, cfg.vcpus, &used);
        if !cfg.forward_rings {
            policy.features &= !FEATURE_RING;
        }
        let link = forwarded::attach(accel, pio, mmio, sock, path, &policy)?;
        devices.push(DeviceEntry::Forwarded(link.clone(), path.clone()));
        links.push(link);
    }

    let serial = match forwarded::claimed(&links, Space::Pio, u64::from(SERIAL_PORT), 8) {
        Some(l) => {
            if *serial != SerialOutput::Stdio {
                tracing::warn!(
                    "COM1 is served by device daemon {}: --serial is ignored",
                    l.name()
                );
            }
            None
        }
        None => {
            if let Some(l) = links.iter().find(|l| l.gsis().contains(&SERIAL_GSI)) {
                return Err(VmError::GsiTaken(SERIAL_GSI, l.name().to_string()));
            }
            let counts = Arc::new(AccessCounts::default());
            devices.push(DeviceEntry::InVmm("serial", counts.clone()));
            let (dev, irq) = SerialDevice::new(serial)?;
            let dev = Arc::new(Mutex::new(dev));
            accel.register_irqfd(&irq, SERIAL_GSI)?;
            let counted = Counted::new(Shared(dev.clone()), counts);
            pio.insert(Arc::new(Mutex::new(counted)), u64::from(SERIAL_PORT), 8)?;
            Some((dev, irq))
        }
    };
    if forwarded::claimed(&links, Space::Pio, u64::from(RTC_PORT), 2).is_none() {
        let counts = Arc::new(AccessCounts::default());
        devices.push(DeviceEntry::InVmm("rtc", counts.clone()));
        let counted = Counted::new(Rtc::new(), counts);
        pio.insert(Arc::new(Mutex::new(counted)), u64::from(RTC_PORT), 2)?;
    }
    Ok(Attached {
        controls,
        devices,
        links,
        serial,
    })
}

/// Connects a vhost-user daemon and maps its transport at window `w`: QueueNotify → the
/// queue's kick eventfd (ioeventfd or bus ioevent), call eventfds → irqfd on the window's GSI.
/// Returns the virtio device ID and the device's control side.
pub(super) fn attach_vhost_user(
    accel: &dyn Accelerator,
    ram: &GuestRam,
    mmio: &Bus,
    d: &DeviceSocketConfig,
    w: &VirtioWindow,
    counts: &Arc<AccessCounts>,
) -> Result<(u32, Control), VmError> {
    let mut dev = VhostUserDevice::open(d.kind, &d.socket, ram.memory().clone())?;
    let control = dev.take_control().ok_or_else(|| {
        VmError::Virtio(crate::virtio::VirtioError::Config(
            "vhost-user control taken twice".into(),
        ))
    })?;
    let virtio_id = dev.device_type();
    let transport = MmioTransport::new(Box::new(dev))?;
    let notify = w.base + reg::QUEUE_NOTIFY;
    for (q, kick) in transport.kick_fds().iter().enumerate() {
        let q = q as u32;
        let binding = accel.register_ioevent(kick, IoEventAddress::Mmio(notify), Some(q))?;
        if binding == IoEventBinding::ViaBus {
            let fd = kick
                .try_clone()
                .map_err(|e| VmError::Os("cloning a kick eventfd", e))?;
            mmio.add_ioevent(notify, Some(u64::from(q)), fd);
        }
    }
    for call in transport.call_fds() {
        accel.register_irqfd(call, w.gsi)?;
    }
    let counted = Counted::new(transport, counts.clone());
    mmio.insert(Arc::new(Mutex::new(counted)), w.base, w.size)?;
    Ok((virtio_id, control))
}

/// A path that exists must be a socket (connecting to a regular file only says "connection
/// refused"); a missing one is left to the connect error.
fn check_socket_path(path: &std::path::Path) -> Result<(), VmError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let t = meta.file_type();
    let kind = if t.is_socket() {
        return Ok(());
    } else if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else {
        "device or other special file"
    };
    Err(VmError::NotASocket(path.to_path_buf(), kind))
}
