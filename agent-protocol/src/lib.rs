//! The control channel between `rqemu-run` (host) and `rqemu-agent` (guest PID 1).
//!
//! One vsock stream carries everything, multiplexed: the container description, the start
//! signal, stdio in both directions, signals, terminal size and the exit status. The agent
//! opens it: as soon as it has loaded the vsock modules it connects to the host's
//! [`CONTROL_PORT`]; in Firecracker's hybrid-vsock convention (rqemu-vsock `--uds-path P`)
//! the host listens on the UNIX socket `P_1024` before the VM boots, so no side polls.
//!
//! Conversation:
//! ```text
//! agent → host  Ready { kernel }            agent up, modules loaded
//! host  → agent Create(ContainerSpec)       mounts, hostname, files, network; process prepared
//! agent → host  Created | Error(..)
//! host  → agent Start                       (rqemu-run start)
//! agent → host  Started { pid } | Error(..)
//! both          Stdin / Stdout / Stderr / CloseStdin / Signal / Resize, any order
//! agent → host  Exited(status)              then the guest powers off
//! ```
//! Each frame is a little-endian `u32` length followed by that many bytes of a
//! postcard-encoded [`HostMsg`] or [`AgentMsg`]; a frame over [`MAX_FRAME`] is refused.

mod codec;
mod spec;

pub use codec::{read_msg, write_msg, Error, MAX_FRAME};
pub use spec::{
    ContainerSpec, FileCopy, Ipv4Cidr, Ipv4Route, Mount, NetInterface, Process, Rlimit, Rootfs,
    VIRTIOFS,
};

use serde::{Deserialize, Serialize};

/// Version of this protocol; the agent reports it in [`AgentMsg::Ready`] and the host refuses
/// an agent of another version (the initramfs and rqemu-run come from one build).
/// 2: `ContainerSpec::network`.
pub const VERSION: u32 = 2;

/// The vsock port the host listens on (guest → host connection).
pub const CONTROL_PORT: u32 = 1024;

/// Largest payload of one stdio frame a sender should produce (readers accept up to
/// [`MAX_FRAME`]).
pub const STDIO_CHUNK: usize = 32 * 1024;

/// Host → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMsg {
    /// Set the container up (everything but running the process).
    Create(Box<ContainerSpec>),
    /// Run `process.args`.
    Start,
    /// Bytes for the process's standard input (or its terminal).
    Stdin(Vec<u8>),
    /// End of the host's standard input: the agent closes the process's stdin.
    CloseStdin,
    /// Deliver this signal (Linux x86-64 number) to the container process.
    Signal(i32),
    /// The host terminal's size changed (`terminal: true` only).
    Resize { rows: u16, cols: u16 },
}

/// Agent → host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// The agent is up: protocol version and the guest kernel's release (`uname -r`).
    Ready {
        version: u32,
        kernel: String,
    },
    /// `Create` done.
    Created,
    /// The process runs with this guest pid.
    Started {
        pid: u32,
    },
    /// Output of the process (with a terminal, all output comes as `Stdout`).
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The process ended; the agent powers the guest off after sending this.
    Exited(ExitStatus),
    /// A request failed; the text says what and why.
    Error(String),
}

/// How the container process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// `exit(code)`.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// The shell's convention, which runtimes report: the code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c & 0xff,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}
