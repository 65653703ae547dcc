//! The rqemu device protocol. This crate owns both ends of every message, so the VMM and the
//! device daemons can never disagree on a layout.
//!
//! * [`identity`]: how `rqemu-vmm --device-socket PATH` (no explicit type) learns what an rqemu
//!   vhost-user daemon is, inside the vhost-user protocol itself, so that third-party
//!   vhost-user daemons (qemu-storage-daemon, virtiofsd) keep working with an explicit type.
//! * The MMIO/PIO forwarding protocol for emulated (non-virtio) devices, specified in
//!   `protocol/README.md`: [`handshake`] (fixed-layout `HELLO`/`GRANT`/`REFUSE` over
//!   `SOCK_SEQPACKET`), [`messages`] (socket access fallback and postcard control messages),
//!   [`ring`] (per-vCPU shared-memory rings), [`client`] (the VMM end, [`ForwardedDevice`]) and
//!   [`server`] (the daemon end, [`EmulatedDevice`] + [`serve`]). [`sys`] wraps the Linux
//!   primitives (seqpacket sockets with `SCM_RIGHTS`, eventfds, sealed memfds).
//! * [`listen`]: the one listening routine of every daemon, stream or seqpacket (stale sockets
//!   replaced, live ones and non-sockets refused, inherited fds checked).
//!
//! A daemon and the VMM tell the two protocols apart by the socket type: vhost-user daemons
//! listen on `SOCK_STREAM`, forwarding daemons on `SOCK_SEQPACKET` (a `connect` with the wrong
//! type fails with `EPROTOTYPE`), see [`probe_socket_kind`].

pub mod client;
pub mod handshake;
pub mod identity;
pub mod listen;
pub mod messages;
pub mod ring;
pub mod server;
pub mod sys;

pub use client::{
    AccessError, Claims, ClientError, ConnectError, ForwardedDevice, GrantPolicy, GrantedIrq,
    Handle,
};
pub use handshake::{DeviceClass, IrqRequest, Space, Trigger, Window};
pub use server::{serve, serve_connection, DeviceInfo, EmulatedDevice, Interrupts, ServeError};

/// What listens on a device socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// A `SOCK_SEQPACKET` listener: an rqemu forwarding daemon (this protocol).
    Forwarding,
    /// A `SOCK_STREAM` listener: a vhost-user daemon (identify it with [`identity`]).
    VhostUser,
}

/// Tells which protocol the daemon at `path` speaks, by trying a seqpacket connection (which
/// the forwarding daemon then sees as a connection that closes before the handshake).
pub fn probe_socket_kind(path: &std::path::Path) -> std::io::Result<SocketKind> {
    match sys::SeqSocket::connect(path) {
        Ok(_) => Ok(SocketKind::Forwarding),
        Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => Ok(SocketKind::VhostUser),
        Err(e) => Err(e),
    }
}
