//! Exactly-once replies for the non-idempotent requests a restarted `rqemu-fs` pops again.
//!
//! A SIGKILLed daemon may have executed a request without publishing its reply to the used
//! ring; the VMM resumes the avail ring at the used index, so the next daemon pops the same
//! chain — the same FUSE `unique`. For CREATE, MKDIR, MKNOD, SYMLINK, LINK, UNLINK, RMDIR,
//! RENAME, RENAME2, SETXATTR (`XATTR_CREATE`) and REMOVEXATTR a second execution would answer
//! `EEXIST`/`ENOENT`/`ENODATA` although the first one succeeded, and a WRITE on an `O_APPEND`
//! handle would append the data twice, so [`crate::server`] keeps each of their replies (`fuse_out_header` + body,
//! as written into the chain) in the state file's reply ring ([`StateFile::put_reply`]) after
//! the operation and before returning the chain to be published. A restarted daemon loads the
//! ring ([`Replies::load`]) and answers a request whose `unique` and opcode match a record
//! with the saved bytes instead of executing it again.
//!
//! The saved reply's node ids and handle ids are the guest's: its entry was counted in the
//! node table (and its CREATE handle saved in the handle table, reopened by the resume under
//! the same guest id) before the record was written, so the replayed reply needs no
//! accounting of its own — the guest receives it once, and the lookup it implies was counted
//! once.
//!
//! Records are written in ring order over [`crate::state::REPLY_SLOTS`] slots. A queue worker
//! puts each chain on the used ring right after serving it, so at a kill at most one request
//! per queue is done but unpublished, and its record is among the last ones written; the next
//! daemon loads the whole ring before serving. A new INIT, or the frontend leaving, clears
//! them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use fuse_backend_rs::abi::fuse_abi::Opcode;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::state::{ReplyRec, StateFile};

/// Whether requests of `opcode` are answered from a saved reply when replayed.
pub fn is_recorded(opcode: u32) -> bool {
    [
        Opcode::Create,
        Opcode::Mkdir,
        Opcode::Mknod,
        Opcode::Symlink,
        Opcode::Link,
        Opcode::Unlink,
        Opcode::Rmdir,
        Opcode::Rename,
        Opcode::Rename2,
        Opcode::Setxattr,
        Opcode::Removexattr,
        Opcode::Write,
    ]
    .iter()
    .any(|&o| o as u32 == opcode)
}

/// The reply ring of a server with a state file.
#[derive(Debug, Default)]
pub struct Replies {
    /// The next record's sequence number.
    next: AtomicU64,
    /// The previous daemon's records, by `(unique, opcode)`.
    saved: RwLock<HashMap<(u64, u32), ReplyRec>>,
    too_long_warned: std::sync::atomic::AtomicBool,
}

impl Replies {
    /// Takes the previous daemon's records (at the resume); new ones follow them.
    pub fn load(&self, state: &StateFile) -> usize {
        let recs = state.live_replies();
        let next = recs.iter().map(|r| r.seq + 1).max().unwrap_or(0);
        self.next.store(next, Ordering::Relaxed);
        let map: HashMap<(u64, u32), ReplyRec> = recs
            .into_iter()
            .map(|r| ((r.unique, r.opcode), r))
            .collect();
        let n = map.len();
        *self.saved.write().unwrap_or_else(|p| p.into_inner()) = map;
        n
    }

    /// Forgets every record (a new session, or none).
    pub fn clear(&self, state: &StateFile) {
        state.clear_replies();
        self.next.store(0, Ordering::Relaxed);
        self.saved
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Keeps the reply `bytes` given to request `unique` of `opcode`.
    pub fn save(&self, state: &StateFile, unique: u64, opcode: u32, bytes: &[u8]) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        if !state.put_reply(seq, unique, opcode, bytes)
            && !self.too_long_warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "state file {}: a reply of {} bytes (opcode {opcode}) is too long to keep",
                state.path(),
                bytes.len()
            );
        }
    }

    /// The reply the previous daemon gave request `unique` of `opcode`, if it kept one.
    pub fn saved(&self, unique: u64, opcode: u32) -> Option<Vec<u8>> {
        let saved = self.saved.read().unwrap_or_else(|p| p.into_inner());
        saved.get(&(unique, opcode)).map(|r| r.reply.clone())
    }
}

/// Writes `bytes` into the device-writable areas `writable` of a chain; returns the bytes
/// written (fewer if the guest gave too little room or a bad address).
pub fn write_to(mem: &GuestMemoryMmap, writable: &[(GuestAddress, u32)], bytes: &[u8]) -> u32 {
    let mut rest = bytes;
    let mut written = 0u32;
    for &(addr, cap) in writable {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(cap as usize);
        let Some((now, later)) = rest.split_at_checked(n) else {
            break;
        };
        if mem.write_slice(now, addr).is_err() {
            break;
        }
        written = written.saturating_add(n as u32);
        rest = later;
    }
    written
}

/// Reads back the first `len` bytes written into `writable` (the reply just sent).
pub fn read_from(
    mem: &GuestMemoryMmap,
    writable: &[(GuestAddress, u32)],
    len: usize,
) -> Option<Vec<u8>> {
    let mut out = vec![0u8; len];
    let mut at = 0;
    for &(addr, cap) in writable {
        if at == len {
            break;
        }
        let n = (len - at).min(cap as usize);
        mem.read_slice(&mut out[at..at + n], addr).ok()?;
        at += n;
    }
    (at == len).then_some(out)
}
