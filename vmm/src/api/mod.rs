//! The management API of `rqemu-vmm` (`--api-socket PATH`), in Cloud Hypervisor's shape:
//! HTTP/1.1 + JSON over a UNIX stream socket, one request per connection.
//!
//! | request | effect | answer |
//! |---|---|---|
//! | `GET /api/v1/vmm.ping` | — | `{"version": ...}` |
//! | `GET /api/v1/vm.info` | — | [`VmInfo`] |
//! | `GET /api/v1/vm.counters` | — | `{device: {counter: value}}` |
//! | `PUT /api/v1/vm.pause` | every vCPU parked, guest clock held | 204 |
//! | `PUT /api/v1/vm.resume` | vCPUs run again | 204 |
//! | `PUT /api/v1/vm.shutdown` | the VM stops, `rqemu-vmm` exits 0 | 204 |
//! | `PUT /api/v1/vm.reboot` | the VM ends with the reset outcome (exit status 2) | 204 |
//! | `PUT /api/v1/vm.power-button` | ACPI power-button event (GED) | 204 |
//!
//! Errors are `{"error": "..."}` with a 4xx/5xx status. The server runs on one thread
//! ("api"); the VM is reached only through the [`VmApi`] seam.

pub mod http;
mod server;

use std::collections::BTreeMap;

use serde::Serialize;

pub use server::{bind, quiesce, spawn};

/// Errors of the management API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Socket I/O.
    #[error("API socket: {0}")]
    Io(#[source] std::io::Error),
    /// Binding the API socket.
    #[error("API socket {0}: {1}")]
    Listen(
        std::path::PathBuf,
        #[source] rqemu_protocol::listen::ListenError,
    ),
    /// A malformed request.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A request over [`http::MAX_REQUEST`] bytes.
    #[error("request larger than {} bytes", http::MAX_REQUEST)]
    TooLarge,
    /// No such endpoint.
    #[error("no endpoint {0}")]
    NotFound(String),
    /// The endpoint exists but not with this method.
    #[error("{1} takes {2}, not {0}")]
    Method(String, String, &'static str),
    /// The VM is not in a state where the action makes sense.
    #[error("{0}")]
    Conflict(String),
    /// The action failed in the VMM.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::Method(..) => 405,
            ApiError::Conflict(_) => 409,
            ApiError::TooLarge => 413,
            ApiError::Io(_) | ApiError::Listen(..) | ApiError::Internal(_) => 500,
        }
    }
}

/// Run state of the VM, as `vm.info` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// vCPUs run.
    Running,
    /// Every vCPU is parked.
    Paused,
    /// The VM is stopping or stopped.
    Shutdown,
}

/// One device of the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// `virtio-blk`, `virtio-net`, `virtio-fs`, `vhost-user` (type left to the daemon),
    /// `serial`, `rtc`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The daemon's socket (`None`: an in-VMM device).
    pub socket: Option<String>,
    /// `connected`, `disconnected` or `in-vmm`.
    pub connection: String,
}

/// The answer of `vm.info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmInfo {
    /// Run state.
    pub state: VmState,
    /// vCPU count.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// `kvm` or `tcg`.
    pub accelerator: String,
    /// Every device.
    pub devices: Vec<DeviceInfo>,
}

/// Per-device counters: device name → counter name → value.
pub type Counters = BTreeMap<String, BTreeMap<String, u64>>;

/// What the API needs of the VM (implemented by [`crate::vm::VmController`]).
pub trait VmApi: Send + Sync {
    /// The VM's description and state.
    fn info(&self) -> VmInfo;
    /// Parks every vCPU and holds the guest clock.
    fn pause(&self) -> Result<(), ApiError>;
    /// Lets the vCPUs run again.
    fn resume(&self) -> Result<(), ApiError>;
    /// Stops the VM; `rqemu-vmm` exits 0.
    fn shutdown(&self) -> Result<(), ApiError>;
    /// Ends the VM with the reset outcome.
    fn reboot(&self) -> Result<(), ApiError>;
    /// Raises the ACPI power-button event.
    fn power_button(&self) -> Result<(), ApiError>;
    /// Per-device counters.
    fn counters(&self) -> Counters;
}

fn json(v: &impl Serialize) -> Result<Option<Vec<u8>>, ApiError> {
    serde_json::to_vec(v)
        .map(Some)
        .map_err(|e| ApiError::Internal(format!("JSON encoding: {e}")))
}

/// Answers one request: `(status, JSON body)`.
pub fn handle(vm: &dyn VmApi, method: &str, path: &str) -> (u16, Option<Vec<u8>>) {
    match route(vm, method, path) {
        Ok(Some(body)) => (200, Some(body)),
        Ok(None) => (204, None),
        Err(e) => {
            let body = serde_json::json!({ "error": e.to_string() });
            (e.status(), serde_json::to_vec(&body).ok())
        }
    }
}

fn route(vm: &dyn VmApi, method: &str, path: &str) -> Result<Option<Vec<u8>>, ApiError> {
    let Some(endpoint) = path.strip_prefix("/api/v1/") else {
        return Err(ApiError::NotFound(path.to_string()));
    };
    let want = match endpoint {
        "vmm.ping" | "vm.info" | "vm.counters" => "GET",
        "vm.pause" | "vm.resume" | "vm.shutdown" | "vm.reboot" | "vm.power-button" => "PUT",
        _ => return Err(ApiError::NotFound(path.to_string())),
    };
    if method != want {
        return Err(ApiError::Method(method.to_string(), path.to_string(), want));
    }
    match endpoint {
        "vmm.ping" => json(&serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
        })),
        "vm.info" => json(&vm.info()),
        "vm.counters" => json(&vm.counters()),
        "vm.pause" => vm.pause().map(|_| None),
        "vm.resume" => vm.resume().map(|_| None),
        "vm.shutdown" => vm.shutdown().map(|_| None),
        "vm.reboot" => vm.reboot().map(|_| None),
        _ => vm.power_button().map(|_| None),
    }
}

#[cfg(test)]
mod tests;
