//! virtio-fs over a [`Device`]: the driver is the FUSE client.
//!
//! A virtio-fs device (virtio device ID 26) has queue 0 as the high-priority queue (FORGET,
//! INTERRUPT) and queues 1..=N as request queues; its configuration space is `tag[36]` (UTF-8,
//! NUL-padded) followed by `num_request_queues` (le32). Every FUSE request is one descriptor
//! chain: the `fuse_in_header` and the arguments device-readable, then room for the
//! `fuse_out_header` and the reply device-writable (absent for FORGET, which has no reply).
//!
//! * [`Slots`], [`post`] and [`complete`]: pre-allocated request buffers and asynchronous
//!   submission, so that many requests can be in flight on several queues;
//! * [`FuseClient`]: a synchronous session (connect, config, `FUSE_INIT`, one call per
//!   operation) for set-up, clean-up and conformance checks;
//! * [`abi`]: the FUSE structures, defined here from `linux/fuse.h`.

pub mod abi;
mod client;

use std::path::Path;
use std::time::Duration;

use vm_memory::ByteValued;

use crate::{
    Device, DriverError, DriverMemory, DriverOptions, MemoryError, QueueError, SplitQueue,
};
use abi::{InHeader, OutHeader};

pub use client::{parse_dirents, DirEntry, FuseClient, INIT_FLAGS};

/// virtio device ID of virtio-fs.
pub const VIRTIO_ID_FS: u32 = 26;
/// Length of the tag field of the configuration space.
pub const TAG_LEN: usize = 36;
/// Room reserved in each slot for headers and fixed-size arguments or replies.
pub const SLOT_OVERHEAD: usize = 4096;

/// Errors of the FUSE client.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The vhost-user / virtio layer failed.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The server answered with an error.
    #[error("{op}: {} (-{errno} {})", abi::errno_name(*errno), std::io::Error::from_raw_os_error(*errno))]
    Errno {
        /// The FUSE operation.
        op: &'static str,
        /// The (positive) errno.
        errno: i32,
    },
    /// The reply does not follow the protocol.
    #[error("{op}: malformed reply: {what}")]
    BadReply {
        /// The FUSE operation.
        op: &'static str,
        /// What is wrong.
        what: String,
    },
    /// The configuration space is not a virtio-fs one, or does not match what was asked.
    #[error("virtio-fs config: {0}")]
    Config(String),
    /// The request does not fit in a slot.
    #[error("{op}: request of {len} bytes exceeds the slot's {cap}")]
    TooLarge {
        /// The FUSE operation.
        op: &'static str,
        /// Request length.
        len: usize,
        /// Slot capacity.
        cap: usize,
    },
    /// No reply in time.
    #[error("{op}: no reply within {timeout:?}")]
    Timeout {
        /// The FUSE operation.
        op: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
}

impl From<MemoryError> for FsError {
    fn from(e: MemoryError) -> Self {
        FsError::Driver(e.into())
    }
}

impl From<QueueError> for FsError {
    fn from(e: QueueError) -> Self {
        FsError::Driver(e.into())
    }
}

impl FsError {
    /// The errno of a server error reply, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            FsError::Errno { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// The virtio-fs configuration space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The mount tag.
    pub tag: String,
    /// Number of request queues (queues 1..=N).
    pub num_request_queues: u32,
}

impl FsConfig {
    /// Parses the 40-byte configuration space.
    pub fn parse(b: &[u8]) -> Result<Self, FsError> {
        if b.len() < TAG_LEN + 4 {
            return Err(FsError::Config(format!(
                "{} bytes, expected at least 40",
                b.len()
            )));
        }
        let raw = &b[..TAG_LEN];
        let end = raw.iter().position(|&c| c == 0).unwrap_or(TAG_LEN);
        if raw[end..].iter().any(|&c| c != 0) {
            return Err(FsError::Config(
                "tag has bytes after its NUL padding".into(),
            ));
        }
        let tag = std::str::from_utf8(&raw[..end])
            .map_err(|_| FsError::Config(format!("tag is not UTF-8: {:x?}", &raw[..end])))?;
        if tag.is_empty() {
            return Err(FsError::Config("empty tag".into()));
        }
        let mut n = [0u8; 4];
        n.copy_from_slice(&b[TAG_LEN..TAG_LEN + 4]);
        let num_request_queues = u32::from_le_bytes(n);
        if num_request_queues == 0 {
            return Err(FsError::Config("num_request_queues is 0".into()));
        }
        Ok(FsConfig {
            tag: tag.to_string(),
            num_request_queues,
        })
    }
}

/// Options of a virtio-fs connection.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Request queues to set up (plus the hiprio queue).
    pub request_queues: u16,
    /// Size of each queue.
    pub queue_size: u16,
    /// Driver memory (rings and every slot).
    pub mem_size: usize,
    /// Largest READ/WRITE payload of the synchronous client's slot.
    pub max_payload: usize,
    /// If set, the backend's tag must be this one.
    pub tag: Option<String>,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when offered.
    pub event_idx: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            request_queues: 1,
            queue_size: 128,
            mem_size: 32 << 20,
            max_payload: 1 << 20,
            tag: None,
            event_idx: true,
        }
    }
}

/// Connects to a virtio-fs backend and starts its queues (no FUSE traffic yet). Accepts only
/// VERSION_1 and EVENT_IDX of the device features (not LOG_ALL, INDIRECT_DESC ...). Returns the
/// device and its configuration (`None` if the backend does not offer
/// `VHOST_USER_PROTOCOL_F_CONFIG`, e.g. virtiofsd without `--tag`); checks the tag when
/// `opts.tag` is set and the queue count.
pub fn connect_device(
    path: &Path,
    opts: &FsOptions,
) -> Result<(Device, Option<FsConfig>), FsError> {
    let dopts = DriverOptions {
        mem_size: opts.mem_size,
        num_queues: opts.request_queues.saturating_add(1),
        queue_size: opts.queue_size,
        accept_features: (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
            | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX),
        event_idx: opts.event_idx,
    };
    let mut dev = Device::connect(path, &dopts).map_err(|e| match e {
        DriverError::Queues { wanted, offered } => FsError::Config(format!(
            "{} request queues asked, the backend has {} (GET_QUEUE_NUM {offered}, hiprio \
             included)",
            wanted.saturating_sub(1),
            offered.saturating_sub(1)
        )),
        e => e.into(),
    })?;
    let config = if dev
        .protocol_features
        .contains(crate::ProtocolFeatures::CONFIG)
    {
        Some(FsConfig::parse(&dev.config(0, 40)?)?)
    } else {
        None
    };
    if let Some(c) = &config {
        if let Some(want) = &opts.tag {
            if &c.tag != want {
                return Err(FsError::Config(format!(
                    "the backend's tag is {:?}, not {want:?}",
                    c.tag
                )));
            }
        }
        if u32::from(opts.request_queues) > c.num_request_queues {
            return Err(FsError::Config(format!(
                "{} request queues asked, the backend has {}",
                opts.request_queues, c.num_request_queues
            )));
        }
    }
    Ok((dev, config))
}

/// One request's buffers in driver memory.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    /// Device-readable buffer: in-header, arguments, write data.
    pub req: u64,
    /// Its size.
    pub req_cap: u32,
    /// Device-writable buffer: out-header and reply.
    pub reply: u64,
    /// Its size.
    pub reply_cap: u32,
}

/// A set of slots.
#[derive(Debug)]
pub struct Slots {
    slots: Vec<Slot>,
}

impl Slots {
    /// Allocates `count` slots for payloads (READ/WRITE data) of up to `max_payload` bytes.
    pub fn new(mem: &mut DriverMemory, count: usize, max_payload: usize) -> Result<Self, FsError> {
        let cap = max_payload + SLOT_OVERHEAD;
        let cap32 = u32::try_from(cap).map_err(|_| MemoryError::Exhausted(cap))?;
        let mut slots = Vec::with_capacity(count);
        for _ in 0..count {
            slots.push(Slot {
                req: mem.alloc(cap, 4096)?,
                req_cap: cap32,
                reply: mem.alloc(cap, 4096)?,
                reply_cap: cap32,
            });
        }
        Ok(Slots { slots })
    }

    /// Slot `i` (modulo the count).
    pub fn get(&self, i: usize) -> Slot {
        self.slots[i % self.slots.len()]
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// A FUSE request to post.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// FUSE opcode.
    pub opcode: u32,
    /// Target node.
    pub nodeid: u64,
    /// Request id, echoed in the reply.
    pub unique: u64,
    /// Arguments after the in-header, concatenated.
    pub args: &'a [&'a [u8]],
    /// Room for the reply after the out-header; `None`: no writable part (FORGET).
    pub reply_len: Option<u32>,
}

/// Builds the in-header for `req` with `len` total bytes.
pub fn in_header(req: &Request<'_>, len: u32) -> InHeader {
    InHeader {
        len,
        opcode: req.opcode,
        unique: req.unique,
        nodeid: req.nodeid,
        uid: 0,
        gid: 0,
        pid: std::process::id(),
        total_extlen: 0,
        padding: 0,
    }
}

/// Writes `req` into `slot` and posts it on `queue` (no kick). Returns the chain head.
pub fn post(
    mem: &DriverMemory,
    queue: &mut SplitQueue,
    slot: Slot,
    req: &Request<'_>,
) -> Result<u16, FsError> {
    let op = abi::opcode::name(req.opcode);
    let args_len: usize = req.args.iter().map(|a| a.len()).sum();
    let len = std::mem::size_of::<InHeader>() + args_len;
    if len > slot.req_cap as usize {
        return Err(FsError::TooLarge {
            op,
            len,
            cap: slot.req_cap as usize,
        });
    }
    let h = in_header(req, len as u32);
    mem.write(slot.req, h.as_slice())?;
    let mut at = slot.req + std::mem::size_of::<InHeader>() as u64;
    for a in req.args {
        mem.write(at, a)?;
        at += a.len() as u64;
    }
    let mut chain = vec![(slot.req, len as u32, false)];
    if let Some(r) = req.reply_len {
        let room = r as usize + std::mem::size_of::<OutHeader>();
        if room > slot.reply_cap as usize {
            return Err(FsError::TooLarge {
                op,
                len: room,
                cap: slot.reply_cap as usize,
            });
        }
        // Poison the out-header so that a reply the device did not write is noticed.
        mem.write(slot.reply, &[0xffu8; 16])?;
        chain.push((slot.reply, room as u32, true));
    }
    Ok(queue.add(mem, &chain)?)
}

/// Checks the out-header of a completed request (`used_len` from the used ring) and returns the
/// length of the reply body (at `slot.reply + 16`), or the server's error.
pub fn complete(
    mem: &DriverMemory,
    slot: Slot,
    opcode: u32,
    unique: u64,
    used_len: u32,
) -> Result<u32, FsError> {
    let op = abi::opcode::name(opcode);
    let bad = |what: String| FsError::BadReply { op, what };
    let mut oh = OutHeader::default();
    mem.read(slot.reply, oh.as_mut_slice())?;
    if used_len < 16 {
        return Err(bad(format!(
            "used length {used_len} is shorter than the out-header (out-header {oh:?})"
        )));
    }
    if oh.len != used_len {
        return Err(bad(format!(
            "out-header len {} differs from the used length {used_len}",
            oh.len
        )));
    }
    if oh.unique != unique {
        return Err(bad(format!(
            "unique {:#x} answered for request {unique:#x}",
            oh.unique
        )));
    }
    if oh.error > 0 || oh.error < -4095 {
        return Err(bad(format!("error field {} is not 0 or -errno", oh.error)));
    }
    if oh.error < 0 {
        if oh.len != 16 {
            return Err(bad(format!(
                "error reply {} carries {} bytes after the header",
                oh.error,
                oh.len - 16
            )));
        }
        return Err(FsError::Errno {
            op,
            errno: -oh.error,
        });
    }
    Ok(oh.len - 16)
}

/// Reads a fixed-size reply body of a completed request.
pub fn reply_obj<T: ByteValued + Default>(
    mem: &DriverMemory,
    slot: Slot,
    opcode: u32,
    body_len: u32,
) -> Result<T, FsError> {
    let n = std::mem::size_of::<T>();
    if (body_len as usize) < n {
        return Err(FsError::BadReply {
            op: abi::opcode::name(opcode),
            what: format!("{body_len}-byte reply, expected {n}"),
        });
    }
    let mut v = T::default();
    mem.read(slot.reply + 16, v.as_mut_slice())?;
    Ok(v)
}

/// Encodes a name argument (NUL-terminated).
pub fn name_arg(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(name.len() + 1);
    v.extend_from_slice(name.as_bytes());
    v.push(0);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parse() {
        let mut b = vec![0u8; 40];
        b[..4].copy_from_slice(b"myfs");
        b[36] = 2;
        assert_eq!(
            FsConfig::parse(&b).unwrap(),
            FsConfig {
                tag: "myfs".into(),
                num_request_queues: 2
            }
        );
        let mut full = vec![b'x'; 36];
        full.extend_from_slice(&[1, 0, 0, 0]);
        assert_eq!(FsConfig::parse(&full).unwrap().tag.len(), 36);
        let mut z = b.clone();
        z[36] = 0;
        assert!(FsConfig::parse(&z).is_err());
        let mut junk = b.clone();
        junk[10] = b'j';
        assert!(FsConfig::parse(&junk).is_err());
        assert!(FsConfig::parse(&[0u8; 40]).is_err());
        assert!(FsConfig::parse(&b[..39]).is_err());
    }

    #[test]
    fn post_and_complete_round_trip() {
        let mut mem = DriverMemory::new(1 << 20).unwrap();
        let mut q = SplitQueue::new(&mut mem, 8, false).unwrap();
        let slots = Slots::new(&mut mem, 1, 4096).unwrap();
        let s = slots.get(0);
        let name = name_arg("f");
        let req = Request {
            opcode: abi::opcode::LOOKUP,
            nodeid: 1,
            unique: 7,
            args: &[&name],
            reply_len: Some(128),
        };
        post(&mem, &mut q, s, &req).unwrap();
        let mut h = InHeader::default();
        mem.read(s.req, h.as_mut_slice()).unwrap();
        assert_eq!((h.len, h.opcode, h.unique, h.nodeid), (42, 1, 7, 1));
        // The "device" answers ENOENT.
        let oh = OutHeader {
            len: 16,
            error: -libc::ENOENT,
            unique: 7,
        };
        mem.write(s.reply, oh.as_slice()).unwrap();
        let e = complete(&mem, s, abi::opcode::LOOKUP, 7, 16).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOENT));
        assert!(e.to_string().contains("ENOENT"), "{e}");
        assert!(complete(&mem, s, abi::opcode::LOOKUP, 8, 16).is_err());
        assert!(complete(&mem, s, abi::opcode::LOOKUP, 7, 20).is_err());
        let ok = OutHeader {
            len: 16 + 128,
            error: 0,
            unique: 7,
        };
        mem.write(s.reply, ok.as_slice()).unwrap();
        assert_eq!(complete(&mem, s, abi::opcode::LOOKUP, 7, 144).unwrap(), 128);
    }
}
