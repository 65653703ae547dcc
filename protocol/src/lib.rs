//! The rqemu device protocol. This crate owns both ends of every message, so the VMM and the
//! device daemons can never disagree on a layout.
//!
//! * [`identity`]: how `rqemu-vmm --device-socket PATH` (no explicit type) learns what an rqemu
//!   vhost-user daemon is, inside the vhost-user protocol itself, so that third-party
//!   vhost-user daemons (qemu-storage-daemon, virtiofsd) keep working with an explicit type.
//!
//! The MMIO/PIO forwarding protocol for emulated devices (handshake over `SOCK_SEQPACKET`,
//! control messages, shared-memory rings) is specified in `protocol/README.md` as it lands.

pub mod identity;
