//! The accept loop every vhost-user daemon runs: one frontend at a time, forever.
//!
//! For each connection a fresh `VhostUserDaemon` is built over the shared backend, the
//! connection is served until the frontend goes away (guest reboot, VMM restart), the
//! connection's worker threads are stopped through their exit events (the backend must hand out
//! a fresh pair per call of `VhostUserBackend::exit_event`), and `on_disconnect` runs (drop the
//! guest memory mapping, flush) before the next frontend is accepted.

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserBackend, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Errors that end the accept loop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Building the per-connection daemon failed.
    #[error("creating the vhost-user daemon: {0}")]
    Daemon(String),
    /// Duplicating the listening socket failed.
    #[error("duplicating the listener: {0}")]
    Listener(#[source] std::io::Error),
    /// Accepting a frontend failed.
    #[error("accepting a frontend: {0}")]
    Accept(String),
}

/// Serves frontends on `listener` one after another, forever (returns only on error).
pub fn serve_forever<B>(
    name: &str,
    listener: &UnixListener,
    backend: &Arc<B>,
    mut on_disconnect: impl FnMut(),
) -> Result<std::convert::Infallible, ServeError>
where
    B: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + 'static,
{
    loop {
        let mut daemon = VhostUserDaemon::new(
            name.to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
        let mut l = Listener::from(listener.try_clone().map_err(ServeError::Listener)?);
        daemon
            .start(&mut l)
            .map_err(|e| ServeError::Accept(e.to_string()))?;
        tracing::info!("frontend connected");
        match daemon.wait() {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => tracing::info!("frontend disconnected"),
            Err(e) => tracing::warn!("frontend connection ended: {e}"),
        }
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        on_disconnect();
    }
}
