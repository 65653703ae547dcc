//! Transport-free virtio-fs server logic for `rqemu-fs`.
//!
//! * [`config`]: mount tag, queue count, cache mode and the virtio-fs configuration space
//!   (`tag[36]`, `num_request_queues`; `notify_buf_size` is not offered);
//! * [`server`]: FUSE requests read from and answered into virtio descriptor chains by
//!   [`fuse-backend-rs`](https://docs.rs/fuse-backend-rs/0.14) (`api::server::Server` over
//!   `passthrough::PassthroughFs`, virtiofs `transport::{Reader, Writer}`), the same rust-vmm
//!   line as the rest of the workspace (vm-memory 0.17.1, virtio-queue 0.17);
//! * [`confine`]: the shared directory becomes the daemon's `/`.
//!
//! # Confinement design
//!
//! The passthrough resolves everything fd-relative, one component at a time, with
//! `O_PATH | O_NOFOLLOW`; symlinks are resolved by the *guest* kernel against the guest's own
//! root, and `LOOKUP ".."` on the root is mapped to the root. That is not enough on its own:
//!
//! * **rename race**: once the guest holds a directory inode, moving that directory out of
//!   the shared tree (host side) makes `LOOKUP(dir, "..")` land outside, and from there every
//!   host file is reachable (demonstrated by the `unconfined_rename_race_escapes` test);
//! * some operations use path names resolved in the daemon's own view of the filesystem
//!   (the passthrough's xattr code uses `/proc/self/fd/N`; [`confined_fs`] replaces it).
//!
//! So `rqemu-fs` takes the host filesystem away instead of filtering requests (the
//! `virtiofsd` sandbox design):
//!
//! 1. [`server::FsServer::new`] opens `/proc/self/fd` (kept as an fd: the passthrough re-opens
//!    `O_PATH` inodes through it) and `/proc/self/mountinfo`;
//! 2. [`confine::enter`]: new mount namespace, all mounts private, `DIR` bind-mounted onto
//!    itself (recursively read-only with `--readonly`, so the kernel answers writes with
//!    `EROFS`),
//!    `pivot_root` into it and the old root detached.
//!
//! Afterwards `/` is the shared directory in the daemon: `..` at the root stays at the root,
//! absolute and `../..` symlinks can only name things inside, `/proc` is absent (no
//! `/proc/self/fd/N` or `/proc/<pid>/root` tricks), and a directory moved out from under the
//! guest is disconnected from the bind mount — `..` from it fails (`ENOENT`) instead of
//! escaping. A hard link the *host* made to an outside inode exposes that one inode only.
//! Needs root (CAP_SYS_ADMIN); the daemon refuses to start otherwise.
//!
//! # FUSE coverage
//!
//! Dispatched by fuse-backend-rs 0.14's server and implemented by its passthrough: INIT,
//! DESTROY, LOOKUP, FORGET, BATCH_FORGET, GETATTR, SETATTR, READLINK, SYMLINK, MKNOD, MKDIR,
//! UNLINK, RMDIR, RENAME, RENAME2 (`RENAME_NOREPLACE`/`EXCHANGE`/`WHITEOUT`), LINK, OPEN,
//! CREATE, READ, WRITE, FLUSH, FSYNC, RELEASE, STATFS, OPENDIR, READDIR, READDIRPLUS,
//! FSYNCDIR, RELEASEDIR, ACCESS, FALLOCATE, LSEEK, INTERRUPT (ignored), and
//! SETXATTR/GETXATTR/LISTXATTR/REMOVEXATTR with `--xattr` (served by [`confined_fs`], because
//! the passthrough's own xattr code needs `/proc`, absent inside the confinement). Answered `ENOSYS`: GETLK,
//! SETLK, SETLKW (the passthrough has no lock support, so POSIX and flock locks stay local to
//! the guest kernel: correct within one guest, not shared with the host), COPY_FILE_RANGE (not
//! dispatched by the server; the guest kernel falls back to read + write), IOCTL, BMAP, POLL,
//! SETUPMAPPING/REMOVEMAPPING (DAX window not offered), SYNCFS, TMPFILE, STATX.

pub mod config;
pub mod confine;
pub mod confined_fs;
pub mod server;

#[cfg(test)]
mod tests_chain;

pub use config::{CacheMode, ConfigError, FsParams, Tag, CONFIG_SPACE_LEN, TAG_LEN};
pub use confine::ConfineError;
pub use server::{FsServer, ServerError};
