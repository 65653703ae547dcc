//! Transport-free virtio-fs server logic for `rqemu-fs`.
//!
//! * [`config`]: mount tag, queue count, cache mode and the virtio-fs configuration space
//!   (`tag[36]`, `num_request_queues`; `notify_buf_size` is not offered);
//! * [`server`]: FUSE requests read from and answered into virtio descriptor chains by
//!   [`fuse-backend-rs`](https://docs.rs/fuse-backend-rs/0.14) (`api::server::Server` over
//!   `passthrough::PassthroughFs`, virtiofs `transport::{Reader, Writer}`), the same rust-vmm
//!   line as the rest of the workspace (vm-memory 0.17.1, virtio-queue 0.17);
//! * [`confine`]: the shared directory path (the tests pivot one thread into it).
//! * [`state`], [`resume`], [`resume_fs`]: `--state-file`: the guest's node and handle ids kept
//!   in a shared file mapping, translated on every request, resumed by a restarted daemon;
//!   [`replay`]: the replies of non-idempotent requests kept there, given again (not
//!   re-executed) when a restarted daemon pops the same request.
//! * [`passthrough`]: the served `PassthroughFs` type and its configuration, below every
//!   module that works on it ([`inode_fd`], [`locks`], [`copy_range`], [`confined_fs`],
//!   [`server`]).
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
//! `virtiofsd` sandbox design; the daemon's `sandbox.rs` does it, with `rqemu-sandbox`):
//!
//! 1. new user (when unprivileged), mount, pid, net and ipc namespaces; the daemon forks and
//!    the child, PID 1 of the new pid namespace, mounts a **private procfs** on `/proc` (only
//!    itself in it; `subset=pid`, read-only);
//! 2. [`server::FsServer::new`] opens `/proc/self/fd` (kept as an fd: the passthrough re-opens
//!    `O_PATH` inodes through it) and `/proc/self/mountinfo` — on that private procfs;
//! 3. `DIR` bind-mounted onto itself (recursively read-only with `--readonly`, so the kernel
//!    answers writes with `EROFS`), `pivot_root` into it and the old root detached; then
//!    capabilities, no_new_privs, landlock and seccomp.
//!
//! Afterwards `/` is the shared directory in the daemon: `..` at the root stays at the root,
//! absolute and `../..` symlinks can only name things inside, `/proc` is absent, the kept
//! procfs fd shows no other process (`../../<pid>/root` reaches the share only), and a
//! directory moved out from under the guest is disconnected from the bind mount — `..` from it
//! fails (`ENOENT`) instead of escaping. A hard link the *host* made to an outside inode
//! exposes that one inode only. The crate's tests pivot one thread into the share with the same
//! `rqemu_sandbox::namespaces` steps to show the path confinement.
//!
//! # FUSE coverage
//!
//! Dispatched by fuse-backend-rs 0.14's server and implemented by its passthrough: INIT,
//! DESTROY, LOOKUP, FORGET, BATCH_FORGET, GETATTR, SETATTR, READLINK, SYMLINK, MKNOD, MKDIR,
//! UNLINK, RMDIR, RENAME, RENAME2 (`RENAME_NOREPLACE`/`EXCHANGE`/`WHITEOUT`), LINK, OPEN,
//! CREATE, READ, WRITE, FLUSH, FSYNC, RELEASE, STATFS, OPENDIR, READDIR, READDIRPLUS,
//! FSYNCDIR, RELEASEDIR, ACCESS, FALLOCATE, LSEEK, INTERRUPT (ignored; the Linux virtiofs
//! driver never sends it).
//!
//! Served by rqemu ([`confined_fs`], [`locks`], [`copy_range`]):
//!
//! * SETXATTR/GETXATTR/LISTXATTR/REMOVEXATTR with `--xattr` (the passthrough's own xattr code
//!   needs `/proc`, absent inside the confinement); buffers are clamped to `XATTR_SIZE_MAX` /
//!   `XATTR_LIST_MAX` whatever size the guest asks for, and by default ([`XattrPolicy`])
//!   the guest's `trusted.*`/`security.*`/`system.*` names are stored as `user.rqemu.*` on
//!   the host, never as privileged attributes of host files;
//! * GETLK, SETLK, SETLKW — POSIX record locks as open-file-description locks on a host fd
//!   per guest lock owner, and `flock` (`FUSE_LK_FLOCK`) with `flock(2)` on it; offered at
//!   INIT (`FUSE_POSIX_LOCKS | FUSE_FLOCK_LOCKS`), released on FLUSH / RELEASE, shared with
//!   host processes; a conflicting SETLKW waits on a thread of its own, never on the queue
//!   worker ([`locks`] has the design);
//! * COPY_FILE_RANGE — `copy_file_range(2)` on the host between the two handles (not
//!   dispatched by fuse-backend-rs 0.14; [`server`] intercepts it).
//!
//! Answered `ENOSYS` (the guest kernel then stops asking or falls back): IOCTL, BMAP, POLL
//! (the passthrough implements none), SETUPMAPPING/REMOVEMAPPING (no DAX window is offered),
//! SYNCFS, TMPFILE, STATX (newer than fuse-backend-rs 0.14's dispatcher; the guest falls back
//! to FSYNC/CREATE/GETATTR), NOTIFY_REPLY (no notifications are sent).

pub mod config;
pub mod confine;
pub mod confined_fs;
pub mod copy_range;
pub mod inode_fd;
pub mod locks;
pub mod passthrough;
pub mod replay;
pub mod resume;
pub mod resume_fs;
pub mod server;
pub mod state;

#[cfg(test)]
mod tests_chain;
#[cfg(test)]
mod tests_locks;
#[cfg(test)]
mod tests_replay;
#[cfg(test)]
mod tests_resume;

pub use config::{
    CacheMode, ConfigError, FsParams, Tag, XattrConfig, XattrPolicy, CONFIG_SPACE_LEN, TAG_LEN,
};
pub use confine::ConfineError;
pub use resume::Resumed;
pub use server::{FsServer, Outcome, ServerError, UsedRing};
pub use state::{StateError, StateFile};
