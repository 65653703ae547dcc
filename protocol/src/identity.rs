//! Device identity of rqemu vhost-user daemons.
//!
//! vhost-user has no "what device are you" request. rqemu daemons answer one inside the
//! standard protocol: a `VHOST_USER_GET_CONFIG` (protocol feature CONFIG) at offset
//! [`IDENTITY_OFFSET`] for [`IDENTITY_LEN`] bytes returns an identity block. That offset lies in
//! the 4 KiB vhost-user config window but far beyond any virtio device's configuration space
//! (virtio-blk: 60 bytes, virtio-net: 24, virtio-fs: 40, virtio-vsock: 8), so it cannot clash with a real field.
//!
//! A third-party backend answers such a request with an error (zero-size reply) or with bytes
//! that do not start with [`MAGIC`]: the VMM then knows it is not an rqemu daemon and asks the
//! user for an explicit type (`--device-socket blk:PATH`).
//!
//! Layout (little-endian, fixed, [`IDENTITY_LEN`] = 64 bytes):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `"RQEMUDEV"` |
//! | 8 | 2 | identity version ([`VERSION`]) |
//! | 10 | 2 | reserved, 0 |
//! | 12 | 4 | virtio device ID (1 net, 2 blk, 19 vsock, 26 fs) |
//! | 16 | 32 | daemon name, UTF-8, NUL-padded |
//! | 48 | 16 | reserved, 0 |
//!
//! Versioning: a reader accepts any version ≥ 1 and ignores reserved bytes; a new field takes
//! reserved bytes and bumps the version; an incompatible change gets a new magic.

/// Offset of the identity block in the vhost-user config window.
pub const IDENTITY_OFFSET: u32 = 0xf00;
/// Size of the identity block.
pub const IDENTITY_LEN: u32 = 64;
/// Magic at the start of the block.
pub const MAGIC: [u8; 8] = *b"RQEMUDEV";
/// Current identity version.
pub const VERSION: u16 = 1;
/// Largest daemon name.
pub const NAME_LEN: usize = 32;

/// Errors decoding an identity block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Wrong size.
    #[error("identity block is {0} bytes, expected 64")]
    Length(usize),
    /// Not an rqemu identity block.
    #[error("no rqemu identity magic: not an rqemu daemon")]
    Magic,
    /// Version 0 is invalid.
    #[error("invalid identity version {0}")]
    Version(u16),
    /// Name not UTF-8.
    #[error("daemon name is not UTF-8")]
    Name,
    /// Name too long to encode.
    #[error("daemon name longer than 32 bytes")]
    NameTooLong,
}

/// Virtio device kinds rqemu daemons serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-net (ID 1).
    Net,
    /// virtio-blk (ID 2).
    Blk,
    /// virtio-fs (ID 26).
    Fs,
    /// virtio-vsock (ID 19).
    Vsock,
    /// Any other virtio device ID.
    Other(u32),
}

impl DeviceKind {
    /// The virtio device ID.
    pub fn virtio_id(self) -> u32 {
        match self {
            DeviceKind::Net => 1,
            DeviceKind::Blk => 2,
            DeviceKind::Fs => 26,
            DeviceKind::Vsock => 19,
            DeviceKind::Other(id) => id,
        }
    }

    /// From a virtio device ID.
    pub fn from_virtio_id(id: u32) -> Self {
        match id {
            1 => DeviceKind::Net,
            2 => DeviceKind::Blk,
            26 => DeviceKind::Fs,
            19 => DeviceKind::Vsock,
            other => DeviceKind::Other(other),
        }
    }
}

/// A decoded identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Version of the block.
    pub version: u16,
    /// Device kind.
    pub kind: DeviceKind,
    /// Daemon name (e.g. `rqemu-blk`).
    pub name: String,
}

impl Identity {
    /// An identity of the current version.
    pub fn new(kind: DeviceKind, name: &str) -> Result<Self, IdentityError> {
        if name.len() > NAME_LEN {
            return Err(IdentityError::NameTooLong);
        }
        Ok(Identity {
            version: VERSION,
            kind,
            name: name.to_string(),
        })
    }

    /// Encodes the 64-byte block.
    pub fn encode(&self) -> [u8; IDENTITY_LEN as usize] {
        let mut b = [0u8; IDENTITY_LEN as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.kind.virtio_id().to_le_bytes());
        let n = self.name.len().min(NAME_LEN);
        b[16..16 + n].copy_from_slice(&self.name.as_bytes()[..n]);
        b
    }

    /// Decodes a block read at [`IDENTITY_OFFSET`].
    pub fn decode(b: &[u8]) -> Result<Self, IdentityError> {
        if b.len() != IDENTITY_LEN as usize {
            return Err(IdentityError::Length(b.len()));
        }
        if b[0..8] != MAGIC {
            return Err(IdentityError::Magic);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version == 0 {
            return Err(IdentityError::Version(version));
        }
        let id = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        let raw = &b[16..16 + NAME_LEN];
        let end = raw.iter().position(|&c| c == 0).unwrap_or(NAME_LEN);
        let name = std::str::from_utf8(&raw[..end]).map_err(|_| IdentityError::Name)?;
        Ok(Identity {
            version,
            kind: DeviceKind::from_virtio_id(id),
            name: name.to_string(),
        })
    }

    /// Daemon side: answers a GET_CONFIG that falls in the identity window, or `None` when
    /// `[offset, offset+size)` does not lie inside it (then it is a device config read).
    pub fn answer_config(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let start = offset.checked_sub(IDENTITY_OFFSET)? as usize;
        let end = start.checked_add(size as usize)?;
        let block = self.encode();
        block.get(start..end).map(<[u8]>::to_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = Identity::new(DeviceKind::Blk, "rqemu-blk").unwrap();
        let b = id.encode();
        assert_eq!(Identity::decode(&b).unwrap(), id);
        assert_eq!(
            id.answer_config(IDENTITY_OFFSET, IDENTITY_LEN).unwrap(),
            b.to_vec()
        );
        assert_eq!(
            id.answer_config(IDENTITY_OFFSET + 8, 2).unwrap(),
            vec![1, 0]
        );
        assert_eq!(id.answer_config(0, 60), None);
        assert_eq!(id.answer_config(IDENTITY_OFFSET + 60, 8), None);
        assert_eq!(id.answer_config(u32::MAX, u32::MAX), None);
    }

    #[test]
    fn rejects_foreign_blocks() {
        assert_eq!(Identity::decode(&[0u8; 64]), Err(IdentityError::Magic));
        assert_eq!(Identity::decode(&[0u8; 12]), Err(IdentityError::Length(12)));
        let mut b = Identity::new(DeviceKind::Fs, "x").unwrap().encode();
        b[8] = 0;
        assert_eq!(Identity::decode(&b), Err(IdentityError::Version(0)));
        let mut b = Identity::new(DeviceKind::Net, "x").unwrap().encode();
        b[16] = 0xff;
        assert_eq!(Identity::decode(&b), Err(IdentityError::Name));
        assert!(Identity::new(DeviceKind::Net, &"n".repeat(33)).is_err());
    }

    #[test]
    fn kinds_map_to_virtio_ids() {
        for k in [
            DeviceKind::Net,
            DeviceKind::Blk,
            DeviceKind::Fs,
            DeviceKind::Vsock,
            DeviceKind::Other(7),
        ] {
            assert_eq!(DeviceKind::from_virtio_id(k.virtio_id()), k);
        }
        // The encoding is the virtio device ID: a block written as `Other(19)` by an older
        // daemon reads as `Vsock`.
        let old = Identity::new(DeviceKind::Other(19), "rqemu-vsock")
            .unwrap()
            .encode();
        assert_eq!(old[12..16], 19u32.to_le_bytes());
        assert_eq!(Identity::decode(&old).unwrap().kind, DeviceKind::Vsock);
        assert_eq!(
            Identity::new(DeviceKind::Vsock, "rqemu-vsock")
                .unwrap()
                .encode(),
            old
        );
    }
}
