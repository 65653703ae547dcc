//! The passthrough filesystem rqemu serves — fuse-backend-rs's `PassthroughFs`, wrapped by
//! [`crate::confined_fs::ConfinedFs`] — and its configuration from rqemu's parameters. The
//! modules that work on it (`inode_fd`, `locks`, `copy_range`, `confined_fs`, `server`) name
//! the type from here.

use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

use crate::config::{CacheMode, FsParams};

/// The passthrough filesystem type served.
pub type Passthrough = PassthroughFs<()>;

/// The passthrough's configuration for `params`, serving `root`.
pub(crate) fn config(params: &FsParams, root: &str) -> Config {
    let timeout = params.cache.timeout();
    Config {
        root_dir: root.to_string(),
        xattr: params.xattr,
        cache_policy: match params.cache {
            CacheMode::Auto => CachePolicy::Auto,
            CacheMode::Always => CachePolicy::Always,
            CacheMode::Never => CachePolicy::Never,
            CacheMode::Metadata => CachePolicy::Metadata,
        },
        attr_timeout: timeout,
        entry_timeout: timeout,
        // Import the root at FUSE_INIT (and again after FUSE_DESTROY / a reconnect reset).
        do_import: true,
        ..Config::default()
    }
}
