//! Transport-free virtio-net device logic over a Linux tap.
//!
//! * [`header`]: the 12-byte virtio 1.x net header and the pure validation of guest packets
//!   (the TX fuzz entry point, [`header::validate_tx_packet`]);
//! * [`tap`]: the [`tap::Tap`] seam and the Linux tap ([`tap::TapQueue`], `IFF_VNET_HDR`,
//!   multi-queue, `TUNSETOFFLOAD`);
//! * [`config`]: parameters, offered features, configuration space, what negotiated features
//!   mean for offloads and validation;
//! * [`device`]: [`device::NetDevice`] — TX, RX (with `MRG_RXBUF`) and control queue
//!   processing on `virtio_queue::Queue`s;
//! * [`stats`]: the counters.

pub mod config;
pub mod device;
pub mod header;
pub mod stats;
pub mod tap;

pub use config::{Negotiated, NetParams};
pub use device::{DeviceError, NetDevice, RxOutcome, RxState, TxScratch};
pub use stats::{NetStats, StatsSnapshot};
pub use tap::{Tap, TapQueue};
