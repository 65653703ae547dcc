//! What every vhost-user daemon shares: the accept loop (one frontend at a time, forever) and
//! the queue worker's drain loop.
//!
//! For each connection a fresh `VhostUserDaemon` is built over the shared [`QueueBackend`],
//! the device's extra worker fds (a tap queue) are registered with its workers, the frontend
//! is accepted — through the [`relay`](crate::relay) if the device opts in — and served until it
//! goes away (guest reboot, VMM restart); then the connection's worker threads are stopped
//! through their exit events (the backend hands out a fresh pair per connection) and
//! [`QueueBackend::disconnected`] runs (drop the guest memory mapping, flush) before the next
//! frontend is accepted.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::inflight::Tracker;
use crate::notify;
use crate::queue_backend::{MemGuard, QueueBackend, QueueDevice, QueueError};
use crate::relay::{self, RelayError};

/// The listening socket's path (also for an inherited socket), for status lines.
fn describe(listener: &UnixListener) -> String {
    match listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.to_owned()))
    {
        Some(p) => p.display().to_string(),
        None => format!("fd {}", std::os::fd::AsRawFd::as_raw_fd(listener)),
    }
}

/// Errors that end the accept loop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Building the per-connection daemon failed.
    #[error("creating the vhost-user daemon: {0}")]
    Daemon(String),
    /// Registering a device fd with a worker failed.
    #[error("polling fd {fd} on worker {worker}: {reason}")]
    WorkerFd {
        /// The worker thread.
        worker: usize,
        /// The fd.
        fd: i32,
        /// Why.
        reason: String,
    },
    /// Duplicating the listening socket failed.
    #[error("duplicating the listener")]
    Listener(#[source] std::io::Error),
    /// Accepting a frontend failed.
    #[error("accepting a frontend: {0}")]
    Accept(String),
    /// The relay could not be started.
    #[error("starting the relay")]
    Relay(#[source] RelayError),
}

fn accept(listener: &UnixListener) -> Result<UnixStream, ServeError> {
    loop {
        match listener.accept() {
            Ok((c, _)) => {
                if rqemu_protocol::listen::peer_allowed(std::os::fd::AsRawFd::as_raw_fd(&c)) {
                    return Ok(c);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => return Err(ServeError::Accept(e.to_string())),
        }
    }
}

/// Serves frontends on `listener` one after another, forever (returns only on error).
pub fn serve_forever<D: QueueDevice>(
    name: &str,
    listener: &UnixListener,
    backend: &Arc<QueueBackend<D>>,
) -> Result<std::convert::Infallible, ServeError> {
    let waiting = format!("waiting for a frontend on {}", describe(listener));
    notify::ready(&waiting);
    loop {
        let mut daemon = VhostUserDaemon::new(
            name.to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
        for (worker, h) in daemon.get_epoll_handlers().iter().enumerate() {
            for (i, fd) in backend.device().worker_fds(worker).into_iter().enumerate() {
                h.register_listener(
                    fd,
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    backend.fd_event(i),
                )
                .map_err(|e| ServeError::WorkerFd {
                    worker,
                    fd,
                    reason: e.to_string(),
                })?;
            }
        }
        let inflight = backend
            .device()
            .inflight_tracking()
            .then(|| backend.inflight());
        let relay_threads = if backend.device().relay_vring_enable() || inflight.is_some() {
            let front = accept(listener)?;
            let (inner, threads) =
                relay::start(front, backend.rings(), inflight).map_err(ServeError::Relay)?;
            let check = inner.try_clone().map_err(ServeError::Listener)?;
            daemon
                .start(&mut Listener::from(inner))
                .map_err(|e| ServeError::Accept(format!("from the relay: {e}")))?;
            if !relay::only_ours(&check).map_err(ServeError::Relay)? {
                // Another local process connected to the relay's abstract socket before the
                // relay did: the handler serves it, not the frontend. Give up (and let the
                // supervisor restart the daemon) rather than serve a stranger.
                return Err(ServeError::Accept(
                    "the relay's private socket was connected to by another process".into(),
                ));
            }
            Some(threads)
        } else {
            let mut l = Listener::from(listener.try_clone().map_err(ServeError::Listener)?);
            daemon
                .start(&mut l)
                .map_err(|e| ServeError::Accept(e.to_string()))?;
            None
        };
        tracing::info!("frontend connected");
        notify::status("serving a frontend");
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
        for t in relay_threads.into_iter().flatten() {
            let _ = t.join();
        }
        backend.disconnected();
        notify::status(&waiting);
    }
}

/// Serves every available chain of `vring`: `handle` executes one chain and returns its used
/// length; the chain then goes on the used ring. With EVENT_IDX, notifications are off while
/// draining and the ring is re-checked after re-enabling them (no lost kick), and the driver
/// is notified as soon as the completion it asked to hear about (its used_event) is used;
/// without EVENT_IDX, once per batch.
pub fn drain_queue(
    vring: &VringRwLock,
    mem: &MemGuard,
    event_idx: bool,
    mut handle: impl FnMut(DescriptorChain<MemGuard>) -> u32,
) -> Result<(), QueueError> {
    drain_queue_deferrable(vring, mem, event_idx, |chain| Some(handle(chain)))
}

/// [`drain_queue`] for devices that may answer a chain later: `handle` returns `None` for a
/// chain it kept, which then goes on the used ring when the device completes it (from any
/// thread, e.g. `add_used` + `signal_used_queue` on a clone of the vring).
pub fn drain_queue_deferrable(
    vring: &VringRwLock,
    mem: &MemGuard,
    event_idx: bool,
    handle: impl FnMut(DescriptorChain<MemGuard>) -> Option<u32>,
) -> Result<(), QueueError> {
    drain_tracked(vring, mem, event_idx, &mut Tracker::untracked(0), handle)
}

/// [`drain_queue_deferrable`] popping and completing through `tracker` (inflight tracking:
/// [`Worker::tracker`](crate::queue_backend::Worker::tracker)).
pub fn drain_tracked(
    vring: &VringRwLock,
    mem: &MemGuard,
    event_idx: bool,
    tracker: &mut Tracker,
    mut handle: impl FnMut(DescriptorChain<MemGuard>) -> Option<u32>,
) -> Result<(), QueueError> {
    let mut used_any = false;
    // Passes in a row that popped nothing although re-enabling notifications said the driver
    // had made more available: one is a buffer that raced the re-check (the next pass takes
    // it); two is a ring whose avail index promises chains it cannot give (a broken or hostile
    // driver: `pop` refuses the index), which must not spin this worker forever.
    let mut fruitless = 0;
    loop {
        if event_idx {
            vring.disable_notification()?;
        }
        let mut popped = false;
        while let Some(chain) = tracker.pop(vring, mem) {
            popped = true;
            let head = chain.head_index();
            if let Some(used) = handle(chain) {
                tracker.add_used(vring, head, used)?;
                // With EVENT_IDX the driver says which completion it wants to hear about:
                // telling it as soon as that one is used lets it refill the ring while this
                // batch goes on (the two sides overlap instead of taking turns).
                if event_idx && vring.needs_notification()? {
                    vring.signal_used_queue().map_err(QueueError::Signal)?;
                }
                used_any = true;
            }
        }
        if !event_idx || !vring.enable_notification()? {
            break;
        }
        fruitless = if popped { 0 } else { fruitless + 1 };
        if fruitless >= 2 {
            tracing::warn!("queue: the avail index promises chains the ring does not give");
            break;
        }
    }
    // Without EVENT_IDX every signal is an interrupt: once per batch. (With it, this only
    // fires if the driver moved its used_event meanwhile.)
    if used_any && vring.needs_notification()? {
        vring.signal_used_queue().map_err(QueueError::Signal)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

    /// A driver whose avail index runs 100 entries ahead of a ring of 16 (which `pop` refuses)
    /// must not keep a worker spinning: with EVENT_IDX, re-enabling notifications keeps
    /// saying "more", and the drain used to go round forever.
    #[test]
    fn a_ring_promising_more_than_it_holds_ends_the_drain() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(m);
        let vring = VringRwLock::new(atomic.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_info(0x1000, 0x2000, 0x3000).unwrap();
        vring.set_queue_event_idx(true);
        vring.set_queue_ready(true);
        let mem = atomic.memory();
        mem.write_obj(100u16, GuestAddress(0x2002)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut handled = 0;
            let r = drain_queue(&vring, &mem, true, |_| {
                handled += 1;
                0
            });
            let _ = tx.send((r.is_ok(), handled));
        });
        // Generous: the drain ends at once; a spinning one never does.
        let (ok, handled) = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the drain is still spinning");
        assert!(ok);
        assert_eq!(handled, 0, "no chain from a refused avail index");
    }
}
