//! The virtio-vsock packet header (virtio spec 5.10.6): 44 bytes, little-endian, in front of
//! every packet on the RX and TX queues. [`Header::parse`] is the one place guest bytes become
//! a header; it checks nothing but the size, [`Header::validate`] the rest.

/// Size of the header on the wire.
pub const HDR_LEN: usize = 44;
/// Largest payload of one packet (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;

/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Packet operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection reset (refused, or closed).
    Rst = 3,
    /// Half or full shutdown (`flags`: [`SHUTDOWN_RCV`], [`SHUTDOWN_SEND`]).
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// The sender's receive buffer and forward counter changed.
    CreditUpdate = 6,
    /// Asks the peer for a [`Op::CreditUpdate`].
    CreditRequest = 7,
}

impl Op {
    /// From the wire value.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// Why a guest packet is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer bytes than a header.
    #[error("packet of {0} bytes is shorter than the 44-byte header")]
    Short(usize),
    /// `len` beyond [`MAX_PAYLOAD`].
    #[error("payload length {0} exceeds 64 KiB")]
    TooLong(u32),
    /// `len` beyond the bytes the chain holds.
    #[error("payload length {len} but only {have} bytes follow the header")]
    Truncated {
        /// The header's `len`.
        len: u32,
        /// Bytes after the header.
        have: usize,
    },
    /// Source CID other than the guest's.
    #[error("source CID {0} is not the guest's")]
    SrcCid(u64),
    /// Destination CID other than the host's.
    #[error("destination CID {0} is not the host (2)")]
    DstCid(u64),
    /// Socket type other than stream.
    #[error("socket type {0} not supported")]
    Type(u16),
    /// Unknown operation.
    #[error("unknown operation {0}")]
    Op(u16),
    /// Data on an operation that carries none.
    #[error("{op:?} with a {len}-byte payload")]
    Payload {
        /// The operation.
        op: Op,
        /// The payload length.
        len: u32,
    },
}

/// A packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation ([`Op`] as a number: guest bytes may hold anything).
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Header {
    /// Decodes the first [`HDR_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, PacketError> {
        let b = bytes
            .get(..HDR_LEN)
            .ok_or(PacketError::Short(bytes.len()))?;
        Ok(Header {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks a packet the guest sent (`payload_bytes`: what follows the header in its chain):
    /// addressed from `guest_cid` to the host, a stream, a known operation, a payload only on
    /// [`Op::Rw`] and within both [`MAX_PAYLOAD`] and the chain. Returns the operation.
    pub fn validate(&self, guest_cid: u64, payload_bytes: usize) -> Result<Op, PacketError> {
        if self.src_cid != guest_cid {
            return Err(PacketError::SrcCid(self.src_cid));
        }
        if self.dst_cid != HOST_CID {
            return Err(PacketError::DstCid(self.dst_cid));
        }
        if self.type_ != TYPE_STREAM {
            return Err(PacketError::Type(self.type_));
        }
        let op = Op::from_u16(self.op).ok_or(PacketError::Op(self.op))?;
        if self.len as usize > MAX_PAYLOAD {
            return Err(PacketError::TooLong(self.len));
        }
        if self.len as usize > payload_bytes {
            return Err(PacketError::Truncated {
                len: self.len,
                have: payload_bytes,
            });
        }
        if op != Op::Rw && self.len != 0 {
            return Err(PacketError::Payload { op, len: self.len });
        }
        Ok(op)
    }

    /// The [`Op`], if known.
    pub fn op(&self) -> Option<Op> {
        Op::from_u16(self.op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 80,
            len,
            type_: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn encode_parse_round_trip_and_layout() {
        let h = rw(5);
        let b = h.encode();
        assert_eq!(Header::parse(&b).unwrap(), h);
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes(), "op at offset 30");
        assert_eq!(&b[40..44], &7u32.to_le_bytes(), "fwd_cnt last");
        assert_eq!(Header::parse(&b[..43]), Err(PacketError::Short(43)));
    }

    #[test]
    fn validation_rejects_what_the_guest_may_not_send() {
        assert_eq!(rw(5).validate(3, 5), Ok(Op::Rw));
        assert_eq!(rw(5).validate(4, 5), Err(PacketError::SrcCid(3)));
        assert_eq!(
            rw(6).validate(3, 5),
            Err(PacketError::Truncated { len: 6, have: 5 })
        );
        let big = rw(MAX_PAYLOAD as u32 + 1);
        assert!(matches!(
            big.validate(3, usize::MAX),
            Err(PacketError::TooLong(_))
        ));
        let mut h = rw(0);
        h.dst_cid = 1;
        assert_eq!(h.validate(3, 0), Err(PacketError::DstCid(1)));
        let mut h = rw(0);
        h.type_ = 2;
        assert_eq!(h.validate(3, 0), Err(PacketError::Type(2)));
        let mut h = rw(0);
        h.op = 99;
        assert_eq!(h.validate(3, 0), Err(PacketError::Op(99)));
        let mut h = rw(1);
        h.op = Op::Request as u16;
        assert!(matches!(
            h.validate(3, 1),
            Err(PacketError::Payload {
                op: Op::Request,
                ..
            })
        ));
    }
}
