//! Messages after the handshake, on the socket. Every message starts with an 8-byte frame
//! header `{tag: u32, payload_len: u32}`; the payload length must equal the received length
//! minus 8. Register accesses (the socket fallback of the hot path) have a fixed layout; control
//! messages are postcard-encoded [`Control`] / [`ControlReply`] values.

use crate::handshake::{Space, Trigger};

/// Socket register access request (fixed layout, 32-byte payload).
pub const TAG_ACCESS: u32 = 0x10;
/// Socket register access response (fixed layout, 24-byte payload).
pub const TAG_ACCESS_REPLY: u32 = 0x11;
/// Control request (postcard [`Control`]).
pub const TAG_CONTROL: u32 = 0x20;
/// Control reply (postcard [`ControlReply`]).
pub const TAG_CONTROL_REPLY: u32 = 0x21;

/// Frame header size.
pub const FRAME_HDR: usize = 8;
/// Access request payload size.
pub const ACCESS_LEN: usize = 32;
/// Access reply payload size.
pub const ACCESS_REPLY_LEN: usize = 24;
/// Largest control payload (snapshots included).
pub const MAX_CONTROL: usize = crate::sys::MAX_MSG - FRAME_HDR;

/// Access operation: read.
pub const OP_READ: u8 = 1;
/// Access operation: write (the VMM waits for completion).
pub const OP_WRITE: u8 = 2;
/// Access operation: posted write (no completion awaited; ring only).
pub const OP_POSTED_WRITE: u8 = 3;

/// Access status: done.
pub const STATUS_OK: u8 = 0;
/// Access status: malformed request (bad op/size/space/address or sequence).
pub const STATUS_BAD_REQUEST: u8 = 1;

/// Framing/decoding errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Shorter than a frame header or payload length disagreeing with the datagram.
    #[error("bad frame length {0}")]
    Length(usize),
    /// Unknown tag.
    #[error("unknown message tag {0:#x}")]
    Tag(u32),
    /// Fixed-layout field out of range.
    #[error("invalid access field: {0}")]
    Field(&'static str),
    /// Postcard decoding failed.
    #[error("malformed control message: {0}")]
    Postcard(String),
    /// Wrong number of fds attached.
    #[error("control message carries {got} fds, expected {want}")]
    Fds {
        /// Received.
        got: usize,
        /// Expected.
        want: usize,
    },
}

/// Splits a received datagram into `(tag, payload)`.
pub fn unframe(b: &[u8]) -> Result<(u32, &[u8]), MessageError> {
    if b.len() < FRAME_HDR {
        return Err(MessageError::Length(b.len()));
    }
    let tag = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
    if len != b.len() - FRAME_HDR {
        return Err(MessageError::Length(b.len()));
    }
    Ok((tag, &b[FRAME_HDR..]))
}

/// Writes a frame header for `payload_len` bytes into `b[..8]`.
pub fn frame(b: &mut [u8], tag: u32, payload_len: usize) {
    b[0..4].copy_from_slice(&tag.to_le_bytes());
    b[4..8].copy_from_slice(&(payload_len as u32).to_le_bytes());
}

/// A register access (ring slot or socket request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Sequence number (per ring or per socket, starts at 1).
    pub seq: u64,
    /// [`OP_READ`], [`OP_WRITE`] or [`OP_POSTED_WRITE`].
    pub op: u8,
    /// Address space.
    pub space: Space,
    /// 1, 2, 4 or 8.
    pub len: u8,
    /// Absolute (granted) address.
    pub addr: u64,
    /// Write data, little-endian in the low `len` bytes.
    pub data: u64,
}

/// Whether `len` is an access size the protocol carries.
pub fn valid_len(len: usize) -> bool {
    matches!(len, 1 | 2 | 4 | 8)
}

impl Access {
    /// Encodes a framed socket request.
    pub fn encode(&self) -> [u8; FRAME_HDR + ACCESS_LEN] {
        let mut b = [0u8; FRAME_HDR + ACCESS_LEN];
        frame(&mut b, TAG_ACCESS, ACCESS_LEN);
        let p = &mut b[FRAME_HDR..];
        p[0..8].copy_from_slice(&self.seq.to_le_bytes());
        p[8] = self.op;
        p[9] = self.space.to_u8();
        p[10] = self.len;
        p[16..24].copy_from_slice(&self.addr.to_le_bytes());
        p[24..32].copy_from_slice(&self.data.to_le_bytes());
        b
    }

    /// Decodes and validates a request payload.
    pub fn decode(p: &[u8]) -> Result<Self, MessageError> {
        if p.len() != ACCESS_LEN {
            return Err(MessageError::Length(p.len()));
        }
        let a = Access {
            seq: le64(&p[0..8]),
            op: p[8],
            space: crate::handshake::Space::from_u8(p[9])
                .map_err(|_| MessageError::Field("space"))?,
            len: p[10],
            addr: le64(&p[16..24]),
            data: le64(&p[24..32]),
        };
        if !matches!(a.op, OP_READ | OP_WRITE | OP_POSTED_WRITE) {
            return Err(MessageError::Field("op"));
        }
        if !valid_len(a.len.into()) {
            return Err(MessageError::Field("len"));
        }
        Ok(a)
    }
}

/// A socket access reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessReply {
    /// Sequence number of the request.
    pub seq: u64,
    /// [`STATUS_OK`] or [`STATUS_BAD_REQUEST`].
    pub status: u8,
    /// Read data (little-endian, low bytes).
    pub data: u64,
}

impl AccessReply {
    /// Encodes a framed reply.
    pub fn encode(&self) -> [u8; FRAME_HDR + ACCESS_REPLY_LEN] {
        let mut b = [0u8; FRAME_HDR + ACCESS_REPLY_LEN];
        frame(&mut b, TAG_ACCESS_REPLY, ACCESS_REPLY_LEN);
        let p = &mut b[FRAME_HDR..];
        p[0..8].copy_from_slice(&self.seq.to_le_bytes());
        p[8] = self.status;
        p[16..24].copy_from_slice(&self.data.to_le_bytes());
        b
    }

    /// Decodes a reply payload.
    pub fn decode(p: &[u8]) -> Result<Self, MessageError> {
        if p.len() != ACCESS_REPLY_LEN {
            return Err(MessageError::Length(p.len()));
        }
        Ok(AccessReply {
            seq: le64(&p[0..8]),
            status: p[8],
            data: le64(&p[16..24]),
        })
    }
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// One interrupt line's eventfds (the fds travel in `SCM_RIGHTS`, in list order: the trigger
/// fd, then the resample fd for level lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IrqLine {
    /// Index of the line in the `HELLO`.
    pub line: u8,
    /// Granted GSI (informational for the daemon).
    pub gsi: u32,
    /// Trigger mode; `Level` carries a resample fd too.
    pub trigger: Trigger,
}

/// One guest memory region for DMA (fd in `SCM_RIGHTS`, list order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in its fd.
    pub offset: u64,
}

/// Control requests, VMM → daemon.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Control {
    /// Install per-vCPU rings. fds: the memfd (`vcpus * ring::RING_BYTES` bytes, sealed), then
    /// per vCPU the to-device doorbell and the to-VMM doorbell.
    SetRings {
        /// Number of rings.
        vcpus: u16,
    },
    /// Install interrupt eventfds.
    SetIrqFds {
        /// Lines, in fd order.
        lines: Vec<IrqLine>,
    },
    /// Install the guest memory table (for devices that DMA).
    SetMemTable {
        /// Regions, in fd order.
        regions: Vec<MemRegion>,
    },
    /// Device reset (machine reset).
    Reset,
    /// Close the connection cleanly; the daemon waits for the next VMM.
    Shutdown,
    /// Return the device state.
    Snapshot,
    /// Load a device state returned by `Snapshot`.
    Restore {
        /// The state blob.
        state: Vec<u8>,
    },
}

impl Control {
    /// Number of fds that must accompany the message.
    pub fn fd_count(&self) -> usize {
        match self {
            Control::SetRings { vcpus } => 1 + 2 * usize::from(*vcpus),
            Control::SetIrqFds { lines } => lines
                .iter()
                .map(|l| match l.trigger {
                    Trigger::Edge => 1,
                    Trigger::Level => 2,
                })
                .sum(),
            Control::SetMemTable { regions } => regions.len(),
            _ => 0,
        }
    }
}

/// Control replies, daemon → VMM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ControlReply {
    /// Done.
    Ok,
    /// Snapshot data.
    State(Vec<u8>),
    /// Failed, with a reason.
    Error(String),
}

/// Encodes a framed postcard message into `buf`, returning the used length.
pub fn encode_postcard<T: serde::Serialize>(
    tag: u32,
    v: &T,
    buf: &mut [u8],
) -> Result<usize, MessageError> {
    let (hdr, rest) = buf.split_at_mut(FRAME_HDR);
    let n = postcard::to_slice(v, rest)
        .map_err(|e| MessageError::Postcard(e.to_string()))?
        .len();
    frame(hdr, tag, n);
    Ok(FRAME_HDR + n)
}

/// Decodes a postcard payload; trailing bytes are an error.
pub fn decode_postcard<'a, T: serde::Deserialize<'a>>(p: &'a [u8]) -> Result<T, MessageError> {
    let (v, rest) =
        postcard::take_from_bytes(p).map_err(|e| MessageError::Postcard(e.to_string()))?;
    if !rest.is_empty() {
        return Err(MessageError::Length(p.len()));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_round_trip_and_validation() {
        let a = Access {
            seq: 7,
            op: OP_READ,
            space: Space::Pio,
            len: 1,
            addr: 0x3fd,
            data: 0,
        };
        let b = a.encode();
        let (tag, p) = unframe(&b).unwrap();
        assert_eq!(tag, TAG_ACCESS);
        assert_eq!(Access::decode(p).unwrap(), a);
        let mut bad = b;
        bad[FRAME_HDR + 8] = 9;
        assert_eq!(
            Access::decode(&bad[FRAME_HDR..]),
            Err(MessageError::Field("op"))
        );
        let mut bad = b;
        bad[FRAME_HDR + 10] = 3;
        assert_eq!(
            Access::decode(&bad[FRAME_HDR..]),
            Err(MessageError::Field("len"))
        );
        let mut bad = b;
        bad[FRAME_HDR + 9] = 2;
        assert_eq!(
            Access::decode(&bad[FRAME_HDR..]),
            Err(MessageError::Field("space"))
        );
        assert!(matches!(unframe(&b[..20]), Err(MessageError::Length(20))));
        assert!(matches!(unframe(&b[..3]), Err(MessageError::Length(3))));
        let r = AccessReply {
            seq: 7,
            status: STATUS_OK,
            data: 0x60,
        };
        assert_eq!(AccessReply::decode(&r.encode()[FRAME_HDR..]).unwrap(), r);
        assert!(AccessReply::decode(&[0u8; 5]).is_err());
    }

    #[test]
    fn control_round_trip_and_fd_counts() {
        let mut buf = [0u8; 256];
        let c = Control::SetIrqFds {
            lines: vec![
                IrqLine {
                    line: 0,
                    gsi: 4,
                    trigger: Trigger::Edge,
                },
                IrqLine {
                    line: 1,
                    gsi: 8,
                    trigger: Trigger::Level,
                },
            ],
        };
        assert_eq!(c.fd_count(), 3);
        let n = encode_postcard(TAG_CONTROL, &c, &mut buf).unwrap();
        let (tag, p) = unframe(&buf[..n]).unwrap();
        assert_eq!(tag, TAG_CONTROL);
        assert_eq!(decode_postcard::<Control>(p).unwrap(), c);
        assert_eq!(Control::SetRings { vcpus: 3 }.fd_count(), 7);
        // Unknown enum variants and trailing garbage are rejected.
        assert!(decode_postcard::<Control>(&[200]).is_err());
        let mut long = p.to_vec();
        long.push(0);
        assert!(decode_postcard::<Control>(&long).is_err());
        assert!(decode_postcard::<Control>(&[]).is_err());
        // A huge announced vector length cannot allocate: postcard checks against the input.
        assert!(decode_postcard::<Control>(&[6, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    }
}
