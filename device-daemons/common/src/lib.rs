//! Plumbing shared by every rqemu device daemon (`rqemu-blk`, `rqemu-net`, `rqemu-fs`, ...):
//!
//! * [`startup`]: the one start-up of every daemon (`--socket`/`--fd` options, logging, signal
//!   mask and thread, listening socket, the error-exit style);
//! * [`activation`]: the listening socket passed by systemd socket activation (`LISTEN_FDS`);
//! * [`notify`]: `sd_notify` messages to the service manager (`READY=1`, `STATUS=`,
//!   `STOPPING=1`, `WATCHDOG=1`);
//! * [`confine`]: entering the sandbox once start-up is over ([`startup::Daemon::confine`]);
//! * [`listen`]: the listening socket, bound to a path or inherited (`--fd N`, systemd socket
//!   activation), validated before use — one routine for stream and seqpacket sockets;
//! * [`signals`]: SIGTERM/SIGINT handled on a dedicated thread so the daemon can quiesce its
//!   device and flush before exiting (SIGHUP is taken there too, and ignored);
//! * [`logging`]: `tracing` to stderr, filtered by `RQEMU_LOG` (or `RUST_LOG`), as text
//!   (journal-aware) or JSON lines (`--log-format json`);
//! * [`vhost`]: the one-frontend-at-a-time vhost-user accept loop and the queue drain loop;
//! * [`queue_backend`]: the `VhostUserBackend` of queue-per-thread devices (blk, fs, net) and
//!   what their workers share (`QueueError`, `MemGuard`);
//! * [`relay`]: an opt-in vhost-user message relay that holds back a frontend's early
//!   `SET_VRING_ENABLE` (QEMU's virtio-net) and tracks ring enables;
//! * [`emulated`]: what the forwarding-protocol daemons share (`--base` ports).

pub mod activation;
pub mod confine;
pub mod emulated;
pub mod inflight;
pub mod listen;
mod log_json;
pub mod logging;
pub mod notify;
pub mod queue_backend;
pub mod relay;
pub mod signals;
pub mod startup;
pub mod vhost;
