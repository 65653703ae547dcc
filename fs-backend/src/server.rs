//! The FUSE server over virtio descriptor chains: fuse-backend-rs's [`Server`] dispatching to
//! its [`PassthroughFs`], with rqemu's parameters.

use std::io;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use crate::config::{CacheMode, FsParams};
use crate::confined_fs::ConfinedFs;

/// The passthrough filesystem type served.
pub type Passthrough = PassthroughFs<()>;

/// Errors of the FUSE server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Creating the passthrough filesystem failed (`/proc/self/fd` not openable, ...).
    #[error("creating the passthrough filesystem")]
    Create(#[source] io::Error),
    /// The shared root could not be opened.
    #[error("opening the shared directory")]
    Import(#[source] io::Error),
    /// The root path is not UTF-8 (fuse-backend-rs takes a `String`).
    #[error("the shared directory path must be UTF-8")]
    NonUtf8Root,
    /// The descriptor chain does not describe guest memory.
    #[error("descriptor chain: {0}")]
    Chain(fuse_backend_rs::transport::Error),
    /// Decoding or answering the FUSE request failed.
    #[error("FUSE request: {0}")]
    Request(fuse_backend_rs::Error),
}

fn passthrough_config(params: &FsParams, root: &str) -> Config {
    let timeout = params.cache.timeout();
    Config {
        root_dir: root.to_string(),
        xattr: params.xattr,
        cache_policy: match params.cache {
            CacheMode::Auto => CachePolicy::Auto,
            CacheMode::Always => CachePolicy::Always,
            CacheMode::Never => CachePolicy::Never,
        },
        attr_timeout: timeout,
        entry_timeout: timeout,
        // Import the root at FUSE_INIT (and again after FUSE_DESTROY / a reconnect reset).
        do_import: true,
        ..Config::default()
    }
}

/// A virtio-fs server for one shared directory.
pub struct FsServer {
    fs: Arc<Passthrough>,
    server: Server<ConfinedFs>,
}

impl std::fmt::Debug for FsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsServer").finish_non_exhaustive()
    }
}

impl FsServer {
    /// Creates the server for `root` (`/` once [`crate::confine::enter`] has made the shared
    /// directory the root). This opens `/proc/self/fd` and `/proc/self/mountinfo`, so it must
    /// run *before* confinement; `root` itself is opened at the guest's `FUSE_INIT`.
    pub fn new(params: &FsParams, root: &Path) -> Result<Self, ServerError> {
        let root = root.to_str().ok_or(ServerError::NonUtf8Root)?;
        let fs = Arc::new(
            PassthroughFs::new(passthrough_config(params, root)).map_err(ServerError::Create)?,
        );
        let server = Server::new(ConfinedFs::new(fs.clone(), params.xattr));
        Ok(FsServer { server, fs })
    }

    /// Opens the root now (FUSE_INIT does it too): checks the shared directory is usable.
    pub fn import(&self) -> Result<(), ServerError> {
        self.fs.import().map_err(ServerError::Import)
    }

    /// The filesystem (tests drive it directly).
    pub fn passthrough(&self) -> &Arc<Passthrough> {
        &self.fs
    }

    /// Forgets every inode and handle of a frontend that went away (as on `FUSE_DESTROY`), so
    /// the next guest starts from a clean table.
    pub fn reset(&self) {
        self.fs.destroy();
    }

    /// Serves one request chain; returns the number of bytes written to its device-writable
    /// part (the used length). Guest-controlled: never panics on a malformed chain.
    pub fn process_chain<M>(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<M>,
    ) -> Result<u32, ServerError>
    where
        M: Deref<Target = GuestMemoryMmap> + Clone,
    {
        let reader =
            Reader::from_descriptor_chain::<M>(mem, chain.clone()).map_err(ServerError::Chain)?;
        let writer = VirtioFsWriter::new::<M>(mem, chain).map_err(ServerError::Chain)?;
        let n = self
            .server
            .handle_message(reader, writer.into(), None, None)
            .map_err(ServerError::Request)?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use fuse_backend_rs::abi::fuse_abi::ROOT_ID;
    use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions};

    use super::*;
    use crate::confine;

    fn lookup_ino(fs: &Passthrough, parent: u64, name: &CStr) -> io::Result<(u64, u64)> {
        let e = fs.lookup(&Context::new(), parent, name)?;
        Ok((e.inode, e.attr.st_ino))
    }

    /// The rename race: the guest holds directory `d`, then `d` is moved out of the shared
    /// directory (host side) and the guest looks up `..` from it. Returns whether `secret`
    /// (next to the shared dir) was then found.
    fn rename_race(confined: bool) -> bool {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let shared = outside.path().join("shared");
        std::fs::create_dir_all(shared.join("d")).unwrap();
        let (looked_up, wait_lookup) = std::sync::mpsc::channel::<()>();
        let (moved, wait_move) = std::sync::mpsc::channel::<()>();
        let guest = std::thread::spawn(move || {
            let root = if confined {
                Path::new("/")
            } else {
                shared.as_path()
            };
            let srv = FsServer::new(&FsParams::default(), root).unwrap();
            if confined {
                confine::enter(&shared, false).unwrap();
            }
            let fs = srv.passthrough();
            fs.init(FsOptions::empty()).unwrap();
            // `..` at the root is the root itself.
            assert_eq!(lookup_ino(fs, ROOT_ID, c"..").unwrap().0, ROOT_ID);
            let (d, _) = lookup_ino(fs, ROOT_ID, c"d").unwrap();
            // The host moves `d` out (in its own view: the test thread, not confined).
            looked_up.send(()).unwrap();
            wait_move.recv().unwrap();
            let Ok((parent, _)) = lookup_ino(fs, d, c"..") else {
                return false;
            };
            lookup_ino(fs, parent, c"secret").is_ok()
        });
        wait_lookup.recv().unwrap();
        std::fs::rename(outside.path().join("shared/d"), outside.path().join("d")).unwrap();
        moved.send(()).unwrap();
        guest.join().unwrap()
    }

    /// Without confinement the rename race reaches outside files: the hole
    /// [`confine::enter`] closes (and why the daemon always confines).
    #[test]
    fn unconfined_rename_race_escapes() {
        assert!(
            rename_race(false),
            "expected the unconfined passthrough to escape"
        );
    }

    #[test]
    fn confined_rename_race_stays_inside() {
        assert!(confine::is_root(), "this test needs root (pivot_root)");
        assert!(
            !rename_race(true),
            "a file outside the shared directory was found"
        );
    }

    #[test]
    fn names_with_slashes_are_refused() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        let srv = FsServer::new(&FsParams::default(), t.path()).unwrap();
        srv.passthrough().init(FsOptions::empty()).unwrap();
        assert!(lookup_ino(srv.passthrough(), ROOT_ID, c"d/..").is_err());
        assert!(lookup_ino(srv.passthrough(), ROOT_ID, c"d").is_ok());
    }
}
