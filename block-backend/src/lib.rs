//! Transport-free block device logic for rqemu.
//!
//! * [`image`]: disk image formats (raw, qcow2) behind the [`image::DiskImage`] trait.
//! * [`virtio`]: the virtio-blk request engine: it parses descriptor chains taken from a
//!   virtqueue, validates them against guest memory and executes them on a `DiskImage`.
//!
//! Nothing here knows about vhost-user or sockets: the `rqemu-blk` daemon adapts this crate to
//! a transport, and `rqemu-bench` or unit tests drive it directly with mock queues.

pub mod image;
pub mod virtio;
