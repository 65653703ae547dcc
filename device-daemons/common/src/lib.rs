//! Plumbing shared by every rqemu device daemon (`rqemu-blk`, `rqemu-net`, `rqemu-fs`, ...):
//!
//! * [`listen`]: the listening socket, bound to a path or inherited (`--fd N`, systemd socket
//!   activation), validated before use;
//! * [`signals`]: SIGTERM/SIGINT/SIGHUP handled on a dedicated thread so the daemon can
//!   quiesce its device and flush before exiting;
//! * [`logging`]: `tracing` to stderr, filtered by `RQEMU_LOG` (or `RUST_LOG`);
//! * [`vhost`]: the one-frontend-at-a-time vhost-user accept loop and the queue drain loop;
//! * [`queue_backend`]: the `VhostUserBackend` of queue-per-thread devices (blk, fs);
//! * [`emulated`]: start-up of the forwarding-protocol daemons (seqpacket listener, exit on
//!   signal, `--base` ports).

pub mod emulated;
pub mod listen;
pub mod logging;
pub mod queue_backend;
pub mod signals;
pub mod vhost;
