//! POSIX record locks and `flock` locks of the guest, taken on the host (`FUSE_GETLK`,
//! `FUSE_SETLK`, `FUSE_SETLKW`), so they conflict with each other *and* with host processes.
//!
//! # Design (as C virtiofsd)
//!
//! The guest kernel names the holder of a lock by a 64-bit *lock owner*: for POSIX locks its
//! `files_struct` (≈ the process), for `flock` its open file. [`Locks`] keeps, per (inode,
//! owner), an open file description of its own ([`crate::inode_fd::reopen`]) and locks on it:
//!
//! * POSIX: open-file-description locks (`F_OFD_GETLK`/`F_OFD_SETLK`): locks of one owner
//!   merge and split like a process's, locks of different owners conflict, and OFD locks
//!   conflict with classic POSIX locks and OFD locks of host processes. The guest's `close()`
//!   sends `FUSE_FLUSH` with the owner: the owner's fd is closed, releasing all its locks on
//!   the file — POSIX close semantics. `GETLK` answers pid 0 for a conflicting lock (host
//!   pids mean nothing in the guest; OFD locks have none).
//! * `flock` (`FUSE_LK_FLOCK`): `flock(2)` on the owner's fd. The owner *is* the guest's open
//!   file, so dup'ed/forked fds share the lock and different opens conflict, as `flock`
//!   wants; `flock` locks do not interact with POSIX locks (as on Linux). Released by
//!   `LOCK_UN` or by `FUSE_RELEASE` with `FUSE_RELEASE_FLOCK_UNLOCK` (the fd is closed).
//!
//! The handle's own fd cannot be used: the passthrough keeps it private, and one guest
//! handle may carry locks of several owners (POSIX locks are per process, not per open).
//!
//! # Blocking requests
//!
//! A `SETLKW` that conflicts must not block the queue's worker: the unlock that ends the wait
//! may come on the same queue. [`Locks::wait_in_background`] parks it on a thread of its own
//! that retries the non-blocking lock with a backoff (1 ms doubling to 32 ms) and answers
//! the request when it is granted. Polling rather than a blocking `F_OFD_SETLKW`/`flock`
//! because a blocked syscall cannot be cancelled reliably (closing the fd does not wake it; a
//! signal can be lost before the call blocks): a waiter notices within one backoff step that
//! its guest session ended ([`Locks::reset`]: `FUSE_INIT`, `FUSE_DESTROY`, frontend
//! disconnect) or its queue stopped, and ends without answering. The price is up to 32 ms of
//! extra latency after the conflicting unlock, and no FIFO fairness against host processes
//! that block in the kernel. At most [`MAX_WAITERS`] requests wait at once; beyond that the
//! answer is `ENOLCK` ("too many locks", the errno POSIX gives `fcntl` for exhausted lock
//! resources) — never `EAGAIN`, which a blocking lock must not return.
//!
//! virtiofs has no `FUSE_INTERRUPT` from the guest (the Linux driver does not send it), so a
//! guest process waiting in `F_SETLKW`/`flock` stays until the lock is granted, as it would
//! on a local filesystem with a fatal signal pending.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::inode_fd::reopen;
use crate::passthrough::Passthrough;

/// Most (inode, owner) fds kept; further owners get `ENOLCK` (a guest picks owners freely).
pub const MAX_OWNER_FDS: usize = 1024;
/// Most `SETLKW` requests waiting at once; further ones get `ENOLCK`.
pub const MAX_WAITERS: usize = 64;
/// FUSE's "to the end of file" (`OFFSET_MAX`).
pub const OFFSET_MAX: u64 = i64::MAX as u64;
/// `lk_flags` bit: the request is a `flock` (`FUSE_LK_FLOCK`).
pub const LK_FLOCK: u32 = 1;

const FIRST_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_millis(32);

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// Whether `e` means "held by someone else" (`EAGAIN`, after mapping `EACCES`).
pub fn is_conflict(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN))
}

/// Which lock family a request is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// `fcntl` record locks (per guest process).
    Posix,
    /// `flock` (per guest open file).
    Flock,
}

/// A validated lock request of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockRequest {
    /// The inode.
    pub inode: u64,
    /// The guest's lock owner.
    pub owner: u64,
    /// POSIX or flock.
    pub kind: LockKind,
    /// `F_RDLCK`, `F_WRLCK` or `F_UNLCK`.
    pub typ: i32,
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive), [`OFFSET_MAX`] for "to the end".
    pub end: u64,
}

impl LockRequest {
    /// Validates the fields of a `fuse_lk_in`: the type must be one of the three, and a POSIX
    /// range must satisfy `start <= end <= OFFSET_MAX` (`EINVAL` otherwise).
    pub fn new(
        inode: u64,
        owner: u64,
        start: u64,
        end: u64,
        typ: u32,
        lk_flags: u32,
    ) -> io::Result<Self> {
        let typ = match i32::try_from(typ) {
            Ok(t @ (libc::F_RDLCK | libc::F_WRLCK | libc::F_UNLCK)) => t,
            _ => return Err(errno(libc::EINVAL)),
        };
        let kind = if lk_flags & LK_FLOCK != 0 {
            LockKind::Flock
        } else {
            if start > end || end > OFFSET_MAX {
                return Err(errno(libc::EINVAL));
            }
            LockKind::Posix
        };
        Ok(LockRequest {
            inode,
            owner,
            kind,
            typ,
            start,
            end,
        })
    }

    fn flock(&self) -> libc::flock {
        // Both fit: start <= end <= OFFSET_MAX = i64::MAX.
        let start = i64::try_from(self.start).unwrap_or(i64::MAX);
        let len = if self.end == OFFSET_MAX {
            0
        } else {
            i64::try_from(self.end - self.start + 1).unwrap_or(0)
        };
        libc::flock {
            l_type: self.typ as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: start,
            l_len: len,
            l_pid: 0,
        }
    }
}

/// The answer to a `GETLK`: the first conflicting lock, or `F_UNLCK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockStatus {
    /// `F_UNLCK` if the request could be granted, else the conflicting lock's type.
    pub typ: i32,
    /// First byte of the conflicting lock.
    pub start: u64,
    /// Last byte (inclusive) or [`OFFSET_MAX`].
    pub end: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Bumped by [`Locks::reset`]: waiters of an older generation end silently.
    generation: u64,
    owners: HashMap<(u64, u64), Arc<File>>,
    waiters: usize,
}

/// The lock table of one guest session.
pub struct Locks {
    fs: Arc<Passthrough>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Locks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state();
        f.debug_struct("Locks")
            .field("generation", &st.generation)
            .field("owners", &st.owners.len())
            .field("waiters", &st.waiters)
            .finish()
    }
}

fn fcntl_lock(file: &File, cmd: i32, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: `fl` is a valid, writable struct flock for the duration of the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) } < 0 {
        let e = io::Error::last_os_error();
        // POSIX allows EACCES for a conflict; FUSE and callers expect EAGAIN.
        if e.raw_os_error() == Some(libc::EACCES) {
            return Err(errno(libc::EAGAIN));
        }
        return Err(e);
    }
    Ok(())
}

fn flock(file: &File, op: i32) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), op) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Locks {
    /// An empty table over `fs`'s inodes.
    pub fn new(fs: Arc<Passthrough>) -> Self {
        Locks {
            fs,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current session generation (pass it to [`Locks::setlk`]).
    pub fn generation(&self) -> u64 {
        self.state().generation
    }

    /// Number of (inode, owner) fds held.
    pub fn owner_count(&self) -> usize {
        self.state().owners.len()
    }

    /// Number of `SETLKW` requests waiting.
    pub fn waiter_count(&self) -> usize {
        self.state().waiters
    }

    fn existing_fd(&self, inode: u64, owner: u64) -> Option<Arc<File>> {
        self.state().owners.get(&(inode, owner)).cloned()
    }

    fn owner_fd(&self, inode: u64, owner: u64, generation: u64) -> io::Result<Arc<File>> {
        {
            let st = self.state();
            if st.generation != generation {
                return Err(errno(libc::ECANCELED));
            }
            if let Some(f) = st.owners.get(&(inode, owner)) {
                return Ok(f.clone());
            }
            if st.owners.len() >= MAX_OWNER_FDS {
                return Err(errno(libc::ENOLCK));
            }
        }
        // Read-write so both lock types work; read-only shares and executing files fall back
        // to read-only (the guest kernel already refused write locks on read-only opens).
        let file = match reopen(&self.fs, inode, libc::O_RDWR) {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EROFS | libc::EACCES | libc::ETXTBSY | libc::EPERM)
                ) =>
            {
                reopen(&self.fs, inode, libc::O_RDONLY)?
            }
            r => r?,
        };
        let mut st = self.state();
        if st.generation != generation {
            return Err(errno(libc::ECANCELED));
        }
        Ok(st
            .owners
            .entry((inode, owner))
            .or_insert_with(|| Arc::new(file))
            .clone())
    }

    /// `GETLK`: would `req` be granted? (`EINVAL` for flock requests: flock has no test.)
    pub fn getlk(&self, req: &LockRequest) -> io::Result<LockStatus> {
        if req.kind == LockKind::Flock || req.typ == libc::F_UNLCK {
            return Err(errno(libc::EINVAL));
        }
        // The owner's own fd, so its own locks do not conflict; an owner without one holds
        // no locks and a fresh description answers the same.
        let file = match self.existing_fd(req.inode, req.owner) {
            Some(f) => f,
            None => Arc::new(reopen(&self.fs, req.inode, libc::O_RDONLY)?),
        };
        let mut fl = req.flock();
        fcntl_lock(&file, libc::F_OFD_GETLK, &mut fl)?;
        if i32::from(fl.l_type) == libc::F_UNLCK {
            return Ok(LockStatus {
                typ: libc::F_UNLCK,
                start: req.start,
                end: req.end,
            });
        }
        let start = u64::try_from(fl.l_start).unwrap_or(0);
        let end = match u64::try_from(fl.l_len) {
            Ok(0) | Err(_) => OFFSET_MAX,
            Ok(len) => start.saturating_add(len - 1).min(OFFSET_MAX),
        };
        Ok(LockStatus {
            typ: i32::from(fl.l_type),
            start,
            end,
        })
    }

    /// `SETLK` (and each try of a waiting `SETLKW`): takes or releases `req` without blocking;
    /// a conflict is `EAGAIN`. `generation` is the session the request belongs to
    /// (`ECANCELED` if it ended).
    pub fn setlk(&self, req: &LockRequest, generation: u64) -> io::Result<()> {
        match (req.kind, req.typ) {
            (LockKind::Posix, libc::F_UNLCK) => {
                // No fd: the owner holds nothing here.
                if let Some(file) = self.existing_fd(req.inode, req.owner) {
                    fcntl_lock(&file, libc::F_OFD_SETLK, &mut req.flock())?;
                }
                Ok(())
            }
            (LockKind::Posix, _) => {
                let file = self.owner_fd(req.inode, req.owner, generation)?;
                fcntl_lock(&file, libc::F_OFD_SETLK, &mut req.flock())
            }
            (LockKind::Flock, libc::F_UNLCK) => {
                // A flock owner's fd carries nothing else: closing it is the unlock.
                let file = self.state().owners.remove(&(req.inode, req.owner));
                if let Some(file) = file {
                    flock(&file, libc::LOCK_UN)?;
                }
                Ok(())
            }
            (LockKind::Flock, typ) => {
                let file = self.owner_fd(req.inode, req.owner, generation)?;
                let op = if typ == libc::F_WRLCK {
                    libc::LOCK_EX
                } else {
                    libc::LOCK_SH
                };
                flock(&file, op | libc::LOCK_NB)
            }
        }
    }

    /// `FLUSH` / `RELEASE` of `owner` on `inode`: drops (closes) its fd, releasing every lock
    /// it held there.
    pub fn release_owner(&self, inode: u64, owner: u64) {
        let file = self.state().owners.remove(&(inode, owner));
        drop(file);
    }

    /// A new guest session (or none): every lock of the old one is released and its waiters
    /// end without answering.
    pub fn reset(&self) {
        let owners = {
            let mut st = self.state();
            st.generation = st.generation.wrapping_add(1);
            std::mem::take(&mut st.owners)
        };
        drop(owners);
    }

    /// Parks a `SETLKW` that conflicted: a thread retries `req` until it is granted or fails,
    /// then calls `done` with the result. `done` is not called if the session ends
    /// ([`Locks::reset`]) or `alive` turns false (the queue stopped) first. Errors with
    /// `ENOLCK` when [`MAX_WAITERS`] are already waiting or no thread can be started.
    pub fn wait_in_background(
        self: &Arc<Self>,
        req: LockRequest,
        generation: u64,
        alive: impl Fn() -> bool + Send + 'static,
        done: impl FnOnce(io::Result<()>) + Send + 'static,
    ) -> io::Result<()> {
        {
            let mut st = self.state();
            if st.generation != generation {
                return Err(errno(libc::ECANCELED));
            }
            if st.waiters >= MAX_WAITERS {
                return Err(errno(libc::ENOLCK));
            }
            st.waiters += 1;
        }
        let locks = self.clone();
        let spawned = std::thread::Builder::new()
            .name("rqemu-fs-lockwait".into())
            .spawn(move || {
                locks.wait(&req, generation, alive, done);
                locks.state().waiters -= 1;
            });
        if spawned.is_err() {
            self.state().waiters -= 1;
            return Err(errno(libc::ENOLCK));
        }
        Ok(())
    }

    fn wait(
        &self,
        req: &LockRequest,
        generation: u64,
        alive: impl Fn() -> bool,
        done: impl FnOnce(io::Result<()>),
    ) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
            if !alive() || self.generation() != generation {
                return;
            }
            let r = self.setlk(req, generation);
            if matches!(&r, Err(e) if is_conflict(e)) {
                continue;
            }
            // Answer under the table lock: once `reset` has returned, no waiter of the old
            // session can still answer (into a ring that may have been re-initialised).
            let st = self.state();
            if st.generation == generation && alive() {
                done(r);
            }
            drop(st);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use fuse_backend_rs::abi::fuse_abi::ROOT_ID;
    use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions};

    use super::*;
    use crate::{FsParams, FsServer};

    fn setup() -> (tempfile::TempDir, Arc<Locks>, u64) {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), vec![0u8; 4096]).unwrap();
        let srv = FsServer::new(&FsParams::default(), t.path()).unwrap();
        let fs = srv.passthrough().clone();
        fs.init(FsOptions::empty()).unwrap();
        let ino = fs.lookup(&Context::new(), ROOT_ID, c"f").unwrap().inode;
        (t, Arc::new(Locks::new(fs)), ino)
    }

    fn posix(ino: u64, owner: u64, typ: i32, start: u64, end: u64) -> LockRequest {
        LockRequest::new(ino, owner, start, end, typ as u32, 0).unwrap()
    }

    #[test]
    fn requests_are_validated() {
        let bad = |s, e, t, f| {
            LockRequest::new(1, 1, s, e, t, f)
                .unwrap_err()
                .raw_os_error()
        };
        assert_eq!(bad(5, 4, 1, 0), Some(libc::EINVAL));
        assert_eq!(bad(0, u64::MAX, 1, 0), Some(libc::EINVAL));
        assert_eq!(bad(0, 1, 7, 0), Some(libc::EINVAL));
        // flock ignores the range.
        assert!(LockRequest::new(1, 1, 5, 4, 1, LK_FLOCK).is_ok());
        let r = posix(1, 1, libc::F_WRLCK, 10, OFFSET_MAX).flock();
        assert_eq!((r.l_start, r.l_len), (10, 0));
        let r = posix(1, 1, libc::F_WRLCK, 10, 19).flock();
        assert_eq!((r.l_start, r.l_len), (10, 10));
    }

    #[test]
    fn host_posix_lock_conflicts_and_waiter_completes() {
        let (t, locks, ino) = setup();
        // A host process-associated lock (classic POSIX) on bytes 0..=99.
        let host = File::options()
            .read(true)
            .write(true)
            .open(t.path().join("f"))
            .unwrap();
        let mut fl = posix(0, 0, libc::F_WRLCK, 0, 99).flock();
        fcntl_lock(&host, libc::F_SETLK, &mut fl).unwrap();
        let g = locks.generation();
        let r = locks.setlk(&posix(ino, 7, libc::F_RDLCK, 50, 50), g);
        assert!(is_conflict(&r.unwrap_err()));
        let st = locks.getlk(&posix(ino, 7, libc::F_RDLCK, 50, 60)).unwrap();
        assert_eq!((st.typ, st.start, st.end), (libc::F_WRLCK, 0, 99));
        let (tx, rx) = mpsc::channel();
        locks
            .wait_in_background(
                posix(ino, 7, libc::F_RDLCK, 50, 50),
                g,
                || true,
                move |r| tx.send(r.map_err(|e| e.raw_os_error())).unwrap(),
            )
            .unwrap();
        assert_eq!(locks.waiter_count(), 1);
        drop(host); // closing the host fd releases its POSIX lock
        let r = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("waiter never answered");
        assert_eq!(r, Ok(()));
        // Now the guest's read lock is visible to the host.
        let host = File::open(t.path().join("f")).unwrap();
        let mut fl = posix(0, 0, libc::F_WRLCK, 0, OFFSET_MAX).flock();
        fcntl_lock(&host, libc::F_OFD_GETLK, &mut fl).unwrap();
        assert_eq!(
            (i32::from(fl.l_type), fl.l_start, fl.l_len),
            (libc::F_RDLCK, 50, 1)
        );
    }

    #[test]
    fn reset_cancels_waiters_and_releases() {
        let (_t, locks, ino) = setup();
        let g = locks.generation();
        locks.setlk(&posix(ino, 1, libc::F_WRLCK, 0, 9), g).unwrap();
        let (tx, rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<bool>();
        locks
            .wait_in_background(
                posix(ino, 2, libc::F_WRLCK, 0, 9),
                g,
                || true,
                move |_| tx.send(()).unwrap(),
            )
            .unwrap();
        locks.reset();
        assert_eq!(locks.owner_count(), 0);
        // A new session's owner gets the range at once; the old waiter never answers.
        let g2 = locks.generation();
        locks
            .setlk(&posix(ino, 3, libc::F_WRLCK, 0, 9), g2)
            .unwrap();
        // The old waiter's generation is gone: it cannot take a lock in the new table.
        assert_eq!(
            locks
                .setlk(&posix(ino, 2, libc::F_WRLCK, 20, 29), g)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ECANCELED)
        );
        std::thread::spawn(move || {
            while locks.waiter_count() != 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
            done_tx.send(true).unwrap();
        });
        assert!(done_rx.recv_timeout(Duration::from_secs(30)).unwrap());
        assert!(rx.try_recv().is_err(), "a cancelled waiter answered");
    }

    #[test]
    fn waiters_are_bounded() {
        let (_t, locks, ino) = setup();
        let g = locks.generation();
        locks.setlk(&posix(ino, 1, libc::F_WRLCK, 0, 0), g).unwrap();
        for owner in 0..MAX_WAITERS as u64 {
            locks
                .wait_in_background(
                    posix(ino, 100 + owner, libc::F_WRLCK, 0, 0),
                    g,
                    || true,
                    |_| {},
                )
                .unwrap();
        }
        let e = locks
            .wait_in_background(posix(ino, 99, libc::F_WRLCK, 0, 0), g, || true, |_| {})
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOLCK));
        locks.reset();
    }
}
