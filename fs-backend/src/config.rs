//! Device parameters of a virtio-fs device: mount tag, queue count, cache mode, and the
//! virtio-fs configuration space (virtio spec 5.11.4).

use std::ffi::{CStr, CString};
use std::str::FromStr;
use std::time::Duration;

/// Size of the `tag` field of the configuration space.
pub const TAG_LEN: usize = 36;
/// Bytes of configuration space offered: `tag[36]` + `num_request_queues` (u32, LE).
/// `notify_buf_size` is not offered (`VIRTIO_FS_F_NOTIFICATION` is not negotiated).
pub const CONFIG_SPACE_LEN: usize = TAG_LEN + 4;
/// Largest number of request queues accepted.
pub const MAX_REQUEST_QUEUES: u16 = 64;

/// Errors in device parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Empty tag.
    #[error("the mount tag must not be empty")]
    EmptyTag,
    /// Tag longer than the config field.
    #[error("the mount tag is {0} bytes; at most 36 are allowed")]
    TagTooLong(usize),
    /// Tag contains a NUL byte.
    #[error("the mount tag must not contain NUL bytes")]
    TagNul,
    /// Queue count out of range.
    #[error("request queue count {0} out of range 1..=64")]
    Queues(u16),
    /// Unknown cache mode.
    #[error("unknown cache mode {0:?} (expected auto, always, never or metadata)")]
    CacheMode(String),
}

/// A validated mount tag (1..=36 bytes, no NUL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag(String);

impl Tag {
    /// Validates a tag.
    pub fn new(tag: &str) -> Result<Self, ConfigError> {
        if tag.is_empty() {
            return Err(ConfigError::EmptyTag);
        }
        if tag.len() > TAG_LEN {
            return Err(ConfigError::TagTooLong(tag.len()));
        }
        if tag.bytes().any(|b| b == 0) {
            return Err(ConfigError::TagNul);
        }
        Ok(Tag(tag.to_string()))
    }

    /// The tag text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Tag {
    fn default() -> Self {
        Tag("rqemu".to_string())
    }
}

/// Guest caching policy (`virtiofsd --cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Short attribute/entry timeouts (1 s); page cache kept while the file is unchanged.
    #[default]
    Auto,
    /// Long timeouts (1 day) and the page cache kept across opens: the host must not change
    /// the directory behind the guest's back.
    Always,
    /// No caching: every access goes to the host (host-side changes are seen at once).
    Never,
    /// File data as `Never`, but directory contents, entries and attributes cached with long
    /// timeouts (virtiofsd's `metadata`): the host must not change the tree behind the guest.
    Metadata,
}

impl CacheMode {
    /// Attribute and entry timeout for this mode.
    pub fn timeout(self) -> Duration {
        match self {
            CacheMode::Auto => Duration::from_secs(1),
            CacheMode::Always | CacheMode::Metadata => Duration::from_secs(86_400),
            CacheMode::Never => Duration::ZERO,
        }
    }
}

impl FromStr for CacheMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(CacheMode::Auto),
            "always" => Ok(CacheMode::Always),
            "never" | "none" => Ok(CacheMode::Never),
            "metadata" => Ok(CacheMode::Metadata),
            other => Err(ConfigError::CacheMode(other.to_string())),
        }
    }
}

/// Largest xattr value (Linux `XATTR_SIZE_MAX`): a guest asking for more gets at most this.
pub const XATTR_SIZE_MAX: usize = 65536;
/// Largest xattr name list (Linux `XATTR_LIST_MAX`).
pub const XATTR_LIST_MAX: usize = 65536;
/// Host prefix of the guest's privileged xattrs under [`XattrPolicy::Mapped`].
pub const XATTR_MAP_PREFIX: &str = "user.rqemu.";

/// Namespaces a [`XattrPolicy::Mapped`] guest uses under [`XATTR_MAP_PREFIX`].
const MAPPED_NAMESPACES: [&str; 3] = ["trusted.", "security.", "system."];

/// How guest xattr names reach the host files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XattrPolicy {
    /// `user.*` passes through; the privileged namespaces `trusted.*`, `security.*` and
    /// `system.*` are stored on the host as `user.rqemu.<name>` (virtiofsd's `--xattrmap`
    /// "prefix" rule), so guest root keeps working attributes (overlayfs, SELinux labels)
    /// without setting privileged attributes (file capabilities, trusted.*) on host files.
    /// The guest neither sees nor names the host's own privileged attributes, nor
    /// `user.rqemu.*` directly.
    #[default]
    Mapped,
    /// Every name as is: the guest's root sets `trusted.*`/`security.*` on host files. Only
    /// for a trusted guest.
    Passthrough,
}

impl XattrPolicy {
    /// The host name of guest attribute `guest`, or the errno refusing it.
    pub fn to_host(self, guest: &CStr) -> Result<CString, i32> {
        let bytes = guest.to_bytes();
        match self {
            XattrPolicy::Passthrough => Ok(guest.to_owned()),
            XattrPolicy::Mapped if bytes.starts_with(XATTR_MAP_PREFIX.as_bytes()) => {
                Err(libc::EPERM)
            }
            XattrPolicy::Mapped if bytes.starts_with(b"user.") => Ok(guest.to_owned()),
            XattrPolicy::Mapped
                if MAPPED_NAMESPACES
                    .iter()
                    .any(|ns| bytes.starts_with(ns.as_bytes())) =>
            {
                let mut host = XATTR_MAP_PREFIX.as_bytes().to_vec();
                host.extend_from_slice(bytes);
                CString::new(host).map_err(|_| libc::EINVAL)
            }
            XattrPolicy::Mapped => Err(libc::EOPNOTSUPP),
        }
    }

    /// The guest name of host attribute `host` (no NUL), or `None` if the guest does not
    /// see it.
    pub fn to_guest(self, host: &[u8]) -> Option<&[u8]> {
        match self {
            XattrPolicy::Passthrough => Some(host),
            XattrPolicy::Mapped => {
                if let Some(rest) = host.strip_prefix(XATTR_MAP_PREFIX.as_bytes()) {
                    let mapped = MAPPED_NAMESPACES
                        .iter()
                        .any(|ns| rest.starts_with(ns.as_bytes()));
                    return mapped.then_some(rest);
                }
                host.starts_with(b"user.").then_some(host)
            }
        }
    }

    /// Rewrites a host `listxattr` list (NUL-terminated names) into the guest's.
    pub fn list_to_guest(self, host: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(host.len());
        for name in host.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if let Some(g) = self.to_guest(name) {
                out.extend_from_slice(g);
                out.push(0);
            }
        }
        out
    }
}

/// Extended attribute settings of the filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct XattrConfig {
    /// Serve xattr requests (`ENOSYS` otherwise).
    pub enabled: bool,
    /// Name mapping.
    pub policy: XattrPolicy,
}

impl From<bool> for XattrConfig {
    /// Enabled or not, with the default (safe) policy.
    fn from(enabled: bool) -> Self {
        XattrConfig {
            enabled,
            policy: XattrPolicy::default(),
        }
    }
}

/// Parameters of one virtio-fs device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsParams {
    /// Mount tag (`mount -t virtiofs TAG /mnt`).
    pub tag: Tag,
    /// Request queues (the hiprio queue comes on top).
    pub num_request_queues: u16,
    /// Guest caching policy.
    pub cache: CacheMode,
    /// Serve extended attributes.
    pub xattr: bool,
    /// Which xattr namespaces the guest reaches on the host (with `xattr`).
    pub xattr_policy: XattrPolicy,
    /// Read-only share: the confinement mounts the directory read-only (the kernel answers
    /// writes `EROFS`) and requests served outside the passthrough (`COPY_FILE_RANGE`)
    /// answer `EROFS` too.
    pub readonly: bool,
    /// Largest queue size offered.
    pub max_queue_size: u16,
}

impl Default for FsParams {
    fn default() -> Self {
        FsParams {
            tag: Tag::default(),
            num_request_queues: 1,
            cache: CacheMode::Auto,
            xattr: false,
            xattr_policy: XattrPolicy::default(),
            readonly: false,
            max_queue_size: 1024,
        }
    }
}

impl FsParams {
    /// Checks the queue count.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.num_request_queues == 0 || self.num_request_queues > MAX_REQUEST_QUEUES {
            return Err(ConfigError::Queues(self.num_request_queues));
        }
        Ok(())
    }

    /// The xattr settings of the filesystem.
    pub fn xattr_config(&self) -> XattrConfig {
        XattrConfig {
            enabled: self.xattr,
            policy: self.xattr_policy,
        }
    }

    /// Total virtqueues: one hiprio queue plus the request queues.
    pub fn num_queues(&self) -> usize {
        1 + usize::from(self.num_request_queues)
    }

    /// The configuration space bytes.
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut b = [0u8; CONFIG_SPACE_LEN];
        let tag = self.tag.as_str().as_bytes();
        let n = tag.len().min(TAG_LEN);
        if let (Some(dst), Some(src)) = (b.get_mut(..n), tag.get(..n)) {
            dst.copy_from_slice(src);
        }
        if let Some(dst) = b.get_mut(TAG_LEN..) {
            dst.copy_from_slice(&u32::from(self.num_request_queues).to_le_bytes());
        }
        b
    }

    /// A frontend's config read: the bytes of `[offset, offset+size)` that exist (a read past
    /// the end is cut short; one starting past it is empty).
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let start = (offset as usize).min(CONFIG_SPACE_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_SPACE_LEN);
        space
            .get(start..end)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_validated() {
        assert_eq!(Tag::new("").unwrap_err(), ConfigError::EmptyTag);
        assert_eq!(
            Tag::new(&"t".repeat(37)).unwrap_err(),
            ConfigError::TagTooLong(37)
        );
        assert_eq!(Tag::new("a\0b").unwrap_err(), ConfigError::TagNul);
        assert_eq!(Tag::new(&"t".repeat(36)).unwrap().as_str().len(), 36);
        assert_eq!(Tag::default().as_str(), "rqemu");
    }

    #[test]
    fn config_space_layout() {
        let p = FsParams {
            tag: Tag::new("share").unwrap(),
            num_request_queues: 3,
            ..FsParams::default()
        };
        let c = p.config_space();
        assert_eq!(&c[..5], b"share");
        assert!(c[5..TAG_LEN].iter().all(|&b| b == 0));
        assert_eq!(&c[TAG_LEN..], &[3, 0, 0, 0]);
        assert_eq!(p.read_config(0, 40), c.to_vec());
        assert_eq!(p.read_config(36, 4), vec![3, 0, 0, 0]);
        assert_eq!(p.read_config(38, 100), vec![0, 0]);
        assert!(p.read_config(40, 4).is_empty());
        assert!(p.read_config(u32::MAX, u32::MAX).is_empty());
        let full = FsParams {
            tag: Tag::new(&"x".repeat(36)).unwrap(),
            ..FsParams::default()
        };
        assert_eq!(&full.config_space()[..36], "x".repeat(36).as_bytes());
        assert_eq!(full.num_queues(), 2);
    }

    #[test]
    fn xattr_names_are_mapped_out_of_privileged_namespaces() {
        let m = XattrPolicy::Mapped;
        assert_eq!(m.to_host(c"user.a").unwrap().as_bytes(), b"user.a");
        assert_eq!(
            m.to_host(c"trusted.overlay.opaque").unwrap().as_bytes(),
            b"user.rqemu.trusted.overlay.opaque"
        );
        assert_eq!(
            m.to_host(c"security.capability").unwrap().as_bytes(),
            b"user.rqemu.security.capability"
        );
        assert_eq!(m.to_host(c"user.rqemu.trusted.x"), Err(libc::EPERM));
        assert_eq!(m.to_host(c"weird.x"), Err(libc::EOPNOTSUPP));
        assert_eq!(m.to_guest(b"user.rqemu.trusted.x"), Some(&b"trusted.x"[..]));
        assert_eq!(m.to_guest(b"user.rqemu.other"), None);
        assert_eq!(m.to_guest(b"security.selinux"), None);
        assert_eq!(m.to_guest(b"user.a"), Some(&b"user.a"[..]));
        assert_eq!(
            m.list_to_guest(b"user.a\0security.selinux\0user.rqemu.security.selinux\0"),
            b"user.a\0security.selinux\0"
        );
        let p = XattrPolicy::Passthrough;
        assert_eq!(p.to_host(c"trusted.x").unwrap().as_bytes(), b"trusted.x");
        assert_eq!(p.list_to_guest(b"trusted.x\0"), b"trusted.x\0");
        assert_eq!(FsParams::default().xattr_policy, XattrPolicy::Mapped);
        assert_eq!(XattrConfig::from(true).policy, XattrPolicy::Mapped);
    }

    #[test]
    fn queue_counts_and_cache_modes() {
        let mut p = FsParams::default();
        p.validate().unwrap();
        p.num_request_queues = 0;
        assert_eq!(p.validate(), Err(ConfigError::Queues(0)));
        p.num_request_queues = 65;
        assert!(p.validate().is_err());
        assert_eq!("never".parse::<CacheMode>().unwrap(), CacheMode::Never);
        assert_eq!("always".parse::<CacheMode>().unwrap(), CacheMode::Always);
        assert_eq!("auto".parse::<CacheMode>().unwrap(), CacheMode::Auto);
        assert_eq!(
            "metadata".parse::<CacheMode>().unwrap(),
            CacheMode::Metadata
        );
        assert!("sometimes".parse::<CacheMode>().is_err());
        assert_eq!(CacheMode::Never.timeout(), Duration::ZERO);
        assert!(CacheMode::Always.timeout() > CacheMode::Auto.timeout());
    }
}
