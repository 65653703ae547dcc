//! irqfd emulation for TCG: a thread polls the registered eventfds and raises an edge on the
//! bound GSI of the userspace [`IrqChip`] when one is signalled (what `KVM_IRQFD` does).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::chip::IrqChip;
use crate::accel::{AccelError, Result};

struct Binding {
    /// The caller's fd number (the key for unregistering).
    key: RawFd,
    gsi: u32,
    fd: EventFd,
}

struct Shared {
    bindings: Mutex<Vec<Binding>>,
    /// Signalled when the binding list changes or the thread must stop.
    wake: EventFd,
    stop: AtomicBool,
}

/// The irqfd poller: its thread starts at the first registration after [`Irqfds::start`]
/// (none before: the VMM enters its sandbox with a single thread, after registering the
/// irqfds of the devices it attached).
pub(super) struct Irqfds {
    shared: Arc<Shared>,
    chip: Arc<IrqChip>,
    thread: Mutex<Option<JoinHandle<()>>>,
    started: AtomicBool,
}

fn os(op: &'static str) -> impl FnOnce(std::io::Error) -> AccelError {
    move |source| AccelError::Hypervisor { op, source }
}

impl Irqfds {
    pub(super) fn new(chip: Arc<IrqChip>) -> Result<Self> {
        Ok(Irqfds {
            shared: Arc::new(Shared {
                bindings: Mutex::new(Vec::new()),
                wake: EventFd::new(libc::EFD_NONBLOCK).map_err(os("creating an eventfd"))?,
                stop: AtomicBool::new(false),
            }),
            chip,
            thread: Mutex::new(None),
            started: AtomicBool::new(false),
        })
    }

    /// Allows the poller thread; starts it now if irqfds are registered.
    pub(super) fn start(&self) -> Result<()> {
        self.started.store(true, Ordering::SeqCst);
        let any = !self
            .shared
            .bindings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if any {
            self.spawn_once()?;
        }
        Ok(())
    }

    fn spawn_once(&self) -> Result<()> {
        let mut t = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if t.is_none() {
            let shared = self.shared.clone();
            let chip = self.chip.clone();
            let h = std::thread::Builder::new()
                .name("tcg-irqfd".into())
                .spawn(move || {
                    crate::sandbox::confine_current(crate::sandbox::VmmThread::IrqfdPoller);
                    poll_loop(&shared, &chip)
                })
                .map_err(os("spawning the irqfd thread"))?;
            *t = Some(h);
        }
        Ok(())
    }

    pub(super) fn register(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        let clone = fd.try_clone().map_err(os("cloning an irqfd"))?;
        self.shared
            .bindings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Binding {
                key: fd.as_raw_fd(),
                gsi,
                fd: clone,
            });
        if self.started.load(Ordering::SeqCst) {
            self.spawn_once()?;
        }
        self.shared
            .wake
            .write(1)
            .map_err(os("waking the irqfd thread"))
    }

    pub(super) fn unregister(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.shared
            .bindings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|b| !(b.key == fd.as_raw_fd() && b.gsi == gsi));
        self.shared
            .wake
            .write(1)
            .map_err(os("waking the irqfd thread"))
    }
}

impl Drop for Irqfds {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.wake.write(1);
        if let Some(h) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

/// Blocks every blockable signal on the calling thread: process-directed signals
/// (SIGINT/SIGTERM, handled by the VMM's signal thread) must never land here.
fn block_signals() {
    // SAFETY: an all-zero sigset_t is valid to initialise with sigfillset; `set` is a
    // valid, exclusively borrowed sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn poll_loop(shared: &Shared, chip: &IrqChip) {
    block_signals();
    let mut pfds: Vec<libc::pollfd> = Vec::new();
    let mut gsis: Vec<u32> = Vec::new();
    let mut dirty = true;
    while !shared.stop.load(Ordering::SeqCst) {
        if dirty {
            pfds.clear();
            gsis.clear();
            pfds.push(libc::pollfd {
                fd: shared.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for b in shared
                .bindings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                pfds.push(libc::pollfd {
                    fd: b.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                gsis.push(b.gsi);
            }
            dirty = false;
        }
        // SAFETY: `pfds` is a valid array of pollfd of the given length; the fds stay open
        // (owned by `shared.bindings`; removal is followed by a wake and a rebuild here, and
        // a removed fd at worst reports POLLNVAL once).
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 200) };
        if r <= 0 {
            continue;
        }
        for (i, p) in pfds.iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            let mut v: u64 = 0;
            // SAFETY: reading 8 bytes from an eventfd into a local u64.
            let n = unsafe { libc::read(p.fd, (&mut v as *mut u64).cast(), 8) };
            if i == 0 {
                dirty = true;
            } else if let Some(&gsi) = gsis.get(i - 1) {
                if n == 8 {
                    chip.pulse_gsi(gsi);
                } else if p.revents & (libc::POLLNVAL | libc::POLLERR) != 0 {
                    dirty = true;
                }
            }
        }
    }
}
