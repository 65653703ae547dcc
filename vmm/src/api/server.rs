//! The API thread: accepts on the `--api-socket` listener and answers each connection's one
//! request in turn.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rqemu_protocol::listen::{Endpoint, SocketType};

use super::{handle, http, ApiError, VmApi};

/// How long a client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `path` (a stale socket is replaced, a live one or a non-socket refused). Bind before
/// the VMM is confined (its root is empty then); serve with [`spawn`] afterwards.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let fd = Endpoint::Path(path.to_path_buf())
        .listen(SocketType::Stream)
        .map_err(|e| ApiError::Listen(path.to_path_buf(), e))?;
    Ok(UnixListener::from(fd))
}

/// Serves the API on `listener` on a thread named "api" for the rest of the process; the
/// thread narrows itself to its sandbox kind first.
pub fn spawn(listener: UnixListener, vm: Arc<dyn VmApi>) -> Result<JoinHandle<()>, ApiError> {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            crate::sandbox::confine_current(crate::sandbox::VmmThread::Api);
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => serve(s, &*vm),
                    Err(e) => tracing::warn!("API socket: accept: {e}"),
                }
            }
        })
        .map_err(ApiError::Io)
}

/// Held while a request is answered: the VMM waits for it before exiting, so that the answer
/// to `vm.shutdown` (which ends the VM) still reaches its client.
static ANSWERING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Waits (at most `timeout`) until no request is being answered; call it before the process
/// exits.
pub fn quiesce(timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        match ANSWERING.try_lock() {
            Ok(_) | Err(std::sync::TryLockError::Poisoned(_)) => return,
            Err(std::sync::TryLockError::WouldBlock) => {
                std::thread::sleep(Duration::from_millis(2))
            }
        }
    }
}

fn serve(mut stream: UnixStream, vm: &dyn VmApi) {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let (status, body) = match http::read_request(&mut stream) {
        Ok(req) => {
            tracing::debug!(method = %req.method, path = %req.path, "API request");
            let answering = ANSWERING.lock().unwrap_or_else(|p| p.into_inner());
            let (status, body) = handle(vm, &req.method, &req.path);
            if let Err(e) = http::write_response(&mut stream, status, body.as_deref()) {
                tracing::debug!("API client: writing the answer: {e}");
            }
            drop(answering);
            return;
        }
        Err(ApiError::Io(e)) => {
            tracing::debug!("API client: {e}");
            return;
        }
        Err(e) => {
            let body = serde_json::json!({ "error": e.to_string() });
            (e.status(), serde_json::to_vec(&body).ok())
        }
    };
    if let Err(e) = http::write_response(&mut stream, status, body.as_deref()) {
        tracing::debug!("API client: writing the answer: {e}");
    }
}
