//! Watching forwarded devices: saving their state while they run, noticing a daemon that
//! died, and reattaching it when it is back.
//!
//! Behaviour (documented in `protocol/README.md`, "Daemon restart"):
//! * while a daemon is up, its device state is saved every [`SAVE_EVERY`] (when the device
//!   supports snapshots);
//! * when it dies, the guest keeps running: reads of its windows return all ones, writes are
//!   dropped (the handle fails fast once it saw the hang-up);
//! * the socket path is retried every [`POLL`]; a daemon listening there again is handshaken
//!   with a policy that only grants exactly the windows and GSIs of the first connection (so a
//!   different device cannot take the place), the last saved state is restored into it, its
//!   lines are registered in place of the old ones, and accesses flow to it again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rqemu_protocol::sys::SeqSocket;
use rqemu_protocol::{ClientError, ForwardedDevice, GrantPolicy, Space};

use super::{register_irqs, unregister_irqs, Link};
use crate::accel::Accelerator;
use crate::exit::ExitRequester;

/// How often links are checked.
pub const POLL: Duration = Duration::from_millis(100);
/// How often a live device's state is saved.
pub const SAVE_EVERY: Duration = Duration::from_secs(1);
/// How long to wait before retrying a daemon whose claims did not match.
const REFUSED_BACKOFF: Duration = Duration::from_secs(1);

struct Watch {
    link: Arc<Link>,
    last_save: Option<Instant>,
    down_since: Option<Instant>,
    retry_at: Instant,
}

/// Starts the supervisor thread for `links`; it ends when `exit` says the VM stops.
pub fn spawn(
    accel: Arc<dyn Accelerator>,
    links: Vec<Arc<Link>>,
    exit: ExitRequester,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("fwd-supervisor".into())
        .spawn(move || {
            crate::sandbox::confine_current(crate::sandbox::VmmThread::Supervisor);
            let mut watches: Vec<Watch> = links
                .into_iter()
                .map(|link| Watch {
                    link,
                    last_save: None,
                    down_since: None,
                    retry_at: Instant::now(),
                })
                .collect();
            while !exit.should_stop() {
                for w in &mut watches {
                    tick(&*accel, w);
                }
                std::thread::sleep(POLL);
            }
        })
}

fn tick(accel: &dyn Accelerator, w: &mut Watch) {
    let link = &w.link;
    let h = link.handle();
    if h.check_alive() {
        if link.snapshots.load(Ordering::Relaxed)
            && w.last_save.is_none_or(|t| t.elapsed() >= SAVE_EVERY)
        {
            w.last_save = Some(Instant::now());
            match h.snapshot() {
                Ok(s) => *link.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(s),
                Err(ClientError::Daemon(e)) => {
                    tracing::info!(
                        "device daemon {} keeps no snapshots ({e}); a restarted daemon starts from its power-on state",
                        link.name
                    );
                    link.snapshots.store(false, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!("device daemon {}: snapshot: {e}", link.name),
            }
        }
        return;
    }
    let now = Instant::now();
    if w.down_since.is_none() {
        tracing::warn!(
            "device daemon {} at {} is gone: its registers read as all ones until it is back",
            link.name,
            link.path.display()
        );
        w.down_since = Some(now);
    }
    if now < w.retry_at {
        return;
    }
    let Ok(sock) = SeqSocket::connect(&link.path) else {
        return; // not back yet
    };
    match reattach(accel, link, sock) {
        Ok(()) => {
            tracing::warn!(
                "device daemon {} at {} reattached after {:?}",
                link.name,
                link.path.display(),
                w.down_since.map(|t| t.elapsed()).unwrap_or_default()
            );
            w.down_since = None;
            w.last_save = None;
        }
        Err(e) => {
            tracing::error!(
                "device daemon at {} cannot take the place of {}: {e}",
                link.path.display(),
                link.name
            );
            w.retry_at = now + REFUSED_BACKOFF;
        }
    }
}

/// The policy of a reattach: exactly the first connection's windows and GSIs.
fn reattach_policy(link: &Link) -> GrantPolicy {
    let ranges = |space| {
        link.windows
            .iter()
            .filter(|w| w.space == space)
            .map(|w| (w.base, w.base + w.size))
            .collect()
    };
    GrantPolicy {
        pio: ranges(Space::Pio),
        mmio: ranges(Space::Mmio),
        taken: Vec::new(),
        free_gsis: link.gsis.clone(),
        ..link.policy.clone()
    }
}

fn reattach(accel: &dyn Accelerator, link: &Link, sock: SeqSocket) -> Result<(), String> {
    let (claims, handle) =
        ForwardedDevice::attach(sock, &reattach_policy(link)).map_err(|e| e.to_string())?;
    let gsis: Vec<u32> = claims.irqs.iter().map(|i| i.gsi).collect();
    if claims.class != link.class || claims.windows != link.windows || gsis != link.gsis {
        let _ = handle.shutdown();
        return Err(format!(
            "it claims {:?} {:?} GSIs {gsis:?}, the device had {:?} {:?} GSIs {:?}",
            claims.class, claims.windows, link.class, link.windows, link.gsis
        ));
    }
    if let Some(state) = link
        .saved
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_deref()
    {
        if let Err(e) = handle.restore(state) {
            tracing::warn!(
                "device daemon {}: restoring its saved state: {e}; it runs from its power-on state",
                link.name
            );
        }
    }
    let new_irqfds = register_irqs(accel, claims).map_err(|e| e.to_string())?;
    let mut irqfds = link.irqfds.lock().unwrap_or_else(|e| e.into_inner());
    unregister_irqs(accel, &irqfds);
    *irqfds = new_irqfds;
    *link.handle.write().unwrap_or_else(|e| e.into_inner()) = handle;
    link.reattached.fetch_add(1, Ordering::Relaxed);
    Ok(())
}
