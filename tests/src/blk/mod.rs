//! vhost-user-blk backends under test: `rqemu-blk`, and `qemu-storage-daemon`'s vhost-user-blk
//! export as a reference (it validates the tests themselves).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::daemon::{Daemon, DaemonError, DEFAULT_START_TIMEOUT};
use crate::paths::{host_tool, project_binary, PathError};
use crate::qemu_img::Format;

pub mod reconnect;

/// Errors starting a block backend.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// Binary missing.
    #[error(transparent)]
    Path(#[from] PathError),
    /// The daemon failed to start.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The backend cannot do what was asked.
    #[error("{0}")]
    Unsupported(String),
}

/// Which vhost-user-blk implementation serves the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkBackend {
    /// Our `rqemu-blk`.
    Rqemu,
    /// `qemu-storage-daemon --export type=vhost-user-blk` (no serial support).
    Qsd,
}

/// Options of a block backend.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    /// Image format (passed explicitly).
    pub format: Format,
    /// Export read-only.
    pub readonly: bool,
    /// Number of virtqueues.
    pub queues: u16,
    /// Serial / GET_ID string.
    pub serial: Option<String>,
    /// More `rqemu-blk` arguments (`--cache none`, `--aio sync`, ...); refused for QSD.
    pub extra: Vec<String>,
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            format: Format::Raw,
            readonly: false,
            queues: 1,
            serial: None,
            extra: Vec::new(),
        }
    }
}

impl BlkBackend {
    /// Short name for messages and file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rqemu => "rqemu-blk",
            Self::Qsd => "qemu-storage-daemon",
        }
    }

    /// The command serving `image` on `socket`.
    pub fn command(
        self,
        socket: &Path,
        image: &Path,
        opts: &BlkOptions,
    ) -> Result<Command, BlkError> {
        match self {
            Self::Rqemu => {
                let mut cmd = Command::new(project_binary("rqemu-blk")?);
                cmd.arg("--socket")
                    .arg(socket)
                    .arg("--image")
                    .arg(image)
                    .args(["--format", opts.format.name()])
                    .args(["--queues", &opts.queues.to_string()]);
                if opts.readonly {
                    cmd.arg("--readonly");
                }
                if let Some(serial) = &opts.serial {
                    cmd.args(["--serial", serial]);
                }
                cmd.args(&opts.extra);
                Ok(cmd)
            }
            Self::Qsd => {
                if !opts.extra.is_empty() {
                    return Err(BlkError::Unsupported(format!(
                        "rqemu-blk arguments {:?} for qemu-storage-daemon",
                        opts.extra
                    )));
                }
                if opts.serial.is_some() {
                    return Err(BlkError::Unsupported(
                        "qemu-storage-daemon's vhost-user-blk export has no serial option".into(),
                    ));
                }
                let esc = |p: &Path| p.to_string_lossy().replace(',', ",,");
                let ro = if opts.readonly { "on" } else { "off" };
                let mut cmd = Command::new(host_tool("qemu-storage-daemon")?);
                cmd.arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=file0,filename={},discard=unmap,read-only={ro}",
                        esc(image)
                    ))
                    .arg("--blockdev")
                    .arg(format!(
                        "driver={},node-name=disk0,file=file0,discard=unmap,read-only={ro}",
                        opts.format.name()
                    ))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable={},num-queues={}",
                        esc(socket),
                        if opts.readonly { "off" } else { "on" },
                        opts.queues
                    ));
                Ok(cmd)
            }
        }
    }

    /// Starts the backend for `image`, with socket and log in `dir`, named `name`.
    pub fn spawn(
        self,
        dir: &Path,
        name: &str,
        image: &Path,
        opts: &BlkOptions,
    ) -> Result<Daemon, BlkError> {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let cmd = self.command(&socket, image, opts)?;
        Ok(Daemon::spawn(
            self.name(),
            cmd,
            &socket,
            &log,
            DEFAULT_START_TIMEOUT,
        )?)
    }
}

/// How long a block daemon may take to exit after SIGTERM (it flushes first).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

pub mod scenario;
