//! Termination signals, handled synchronously on a dedicated thread (SIGHUP: ignored there).
//!
//! [`block_termination_signals`] must run in `main` before any other thread is spawned, so
//! every thread inherits the mask and the signals are only ever taken by [`wait_for_signal`]
//! (via `sigwait`), never delivered asynchronously in the middle of device work.

use std::io;

const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in SIGNALS {
        // SAFETY: `set` is a valid, initialised sigset_t and `s` a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and threads it spawns later).
pub fn block_termination_signals() -> io::Result<()> {
    let set = set();
    // SAFETY: valid sigset; a null old-set pointer is allowed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Waits for one of the blocked termination signals and returns its number.
pub fn wait_for_signal() -> io::Result<libc::c_int> {
    let set = set();
    let mut sig: libc::c_int = 0;
    // SAFETY: valid sigset and out pointer.
    let r = unsafe { libc::sigwait(&set, &mut sig) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(sig)
}

/// Spawns a thread that waits for SIGTERM or SIGINT and then runs `on_signal`. SIGHUP (a
/// service manager's "reload", a closed terminal) never ends the daemon: it has no
/// configuration to re-read and logs to stderr, which needs no reopening, so it is logged
/// and ignored.
pub fn spawn_handler<F>(on_signal: F) -> io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce(libc::c_int) + Send + 'static,
{
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match wait_for_signal() {
                Ok(libc::SIGHUP) => {
                    tracing::info!("SIGHUP: nothing to reload (logs go to stderr); ignored");
                }
                Ok(sig) => return on_signal(sig),
                Err(e) => return tracing::error!("sigwait failed: {e}"),
            }
        })
}
