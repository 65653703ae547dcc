//! Harness for rqemu end-to-end tests: guest assets, QEMU as the reference frontend, device
//! daemons under test, disk workloads with a host-side model.
//!
//! Preparation (see the repository README): `scripts/install-deps.sh`,
//! `scripts/guest-assets.sh`, `cargo build --workspace --bins`, then `cargo test -p rqemu-e2e`.
//! Missing assets, tools or binaries make the tests fail with a message saying what to run;
//! nothing is skipped.

pub mod blk;
pub mod cpio;
pub mod daemon;
pub mod disk;
pub mod fs;
pub mod net;
pub mod net_kills;
pub mod oci;
pub mod paths;
pub mod qemu;
pub mod qemu_img;
pub mod vmm;
pub mod vsock;

pub use daemon::Daemon;
pub use paths::{project_binary, GuestAssets};
pub use qemu::{GuestRun, QemuVm, VhostUserDevice};
pub use vmm::RqemuVm;
