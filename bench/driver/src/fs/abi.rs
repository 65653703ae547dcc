//! The small part of the FUSE ABI the driver speaks, as fixed-layout `repr(C)` types.
//!
//! Layouts follow Linux `include/uapi/linux/fuse.h` (protocol 7.38); every size is checked at
//! compile time against the header's. Defined here rather than taken from a FUSE server crate
//! so that the driver stays independent of the servers it tests. All fields little-endian
//! (virtio-fs is little-endian; the driver only runs on little-endian hosts).

use vm_memory::ByteValued;

/// FUSE major version spoken.
pub const FUSE_KERNEL_VERSION: u32 = 7;
/// FUSE minor version offered in `FUSE_INIT`.
pub const FUSE_KERNEL_MINOR_VERSION: u32 = 38;
/// Lowest minor version the driver accepts from a server.
pub const FUSE_MIN_MINOR_VERSION: u32 = 31;
/// Node id of the root directory.
pub const FUSE_ROOT_ID: u64 = 1;

/// FUSE opcodes (`enum fuse_opcode`).
pub mod opcode {
    #![allow(missing_docs)]
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const CREATE: u32 = 35;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;

    /// The name of an opcode, for messages.
    pub fn name(op: u32) -> &'static str {
        match op {
            LOOKUP => "LOOKUP",
            FORGET => "FORGET",
            GETATTR => "GETATTR",
            SETATTR => "SETATTR",
            READLINK => "READLINK",
            SYMLINK => "SYMLINK",
            MKDIR => "MKDIR",
            UNLINK => "UNLINK",
            RMDIR => "RMDIR",
            RENAME => "RENAME",
            LINK => "LINK",
            OPEN => "OPEN",
            READ => "READ",
            WRITE => "WRITE",
            STATFS => "STATFS",
            RELEASE => "RELEASE",
            FSYNC => "FSYNC",
            FLUSH => "FLUSH",
            INIT => "INIT",
            OPENDIR => "OPENDIR",
            READDIR => "READDIR",
            RELEASEDIR => "RELEASEDIR",
            CREATE => "CREATE",
            DESTROY => "DESTROY",
            BATCH_FORGET => "BATCH_FORGET",
            READDIRPLUS => "READDIRPLUS",
            RENAME2 => "RENAME2",
            _ => "opcode",
        }
    }
}

/// `FUSE_INIT` flags (`fuse_init_in.flags`).
pub mod init_flags {
    #![allow(missing_docs)]
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const POSIX_LOCKS: u32 = 1 << 1;
    pub const ATOMIC_O_TRUNC: u32 = 1 << 3;
    pub const EXPORT_SUPPORT: u32 = 1 << 4;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const DONT_MASK: u32 = 1 << 6;
    pub const FLOCK_LOCKS: u32 = 1 << 10;
    pub const AUTO_INVAL_DATA: u32 = 1 << 12;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const READDIRPLUS_AUTO: u32 = 1 << 14;
    pub const ASYNC_DIO: u32 = 1 << 15;
    pub const WRITEBACK_CACHE: u32 = 1 << 16;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const HANDLE_KILLPRIV: u32 = 1 << 19;
    pub const MAX_PAGES: u32 = 1 << 22;
    pub const INIT_EXT: u32 = 1 << 30;
}

/// `struct fuse_in_header`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub total_extlen: u16,
    pub padding: u16,
}

/// `struct fuse_out_header`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutHeader {
    pub len: u32,
    /// 0 or a negative errno.
    pub error: i32,
    pub unique: u64,
}

/// `struct fuse_attr`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
    pub flags: u32,
}

/// `struct fuse_entry_out`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EntryOut {
    pub nodeid: u64,
    pub generation: u64,
    pub entry_valid: u64,
    pub attr_valid: u64,
    pub entry_valid_nsec: u32,
    pub attr_valid_nsec: u32,
    pub attr: Attr,
}

/// `struct fuse_attr_out`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AttrOut {
    pub attr_valid: u64,
    pub attr_valid_nsec: u32,
    pub dummy: u32,
    pub attr: Attr,
}

/// `struct fuse_init_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub flags2: u32,
    pub unused: [u32; 11],
}

/// `struct fuse_init_out`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
    pub map_alignment: u16,
    pub flags2: u32,
    pub unused: [u32; 7],
}

/// `struct fuse_getattr_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GetattrIn {
    pub getattr_flags: u32,
    pub dummy: u32,
    pub fh: u64,
}

/// `struct fuse_mkdir_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MkdirIn {
    pub mode: u32,
    pub umask: u32,
}

/// `struct fuse_open_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OpenIn {
    pub flags: u32,
    pub open_flags: u32,
}

/// `struct fuse_create_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CreateIn {
    pub flags: u32,
    pub mode: u32,
    pub umask: u32,
    pub open_flags: u32,
}

/// `struct fuse_open_out`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OpenOut {
    pub fh: u64,
    pub open_flags: u32,
    pub padding: u32,
}

/// `struct fuse_release_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseIn {
    pub fh: u64,
    pub flags: u32,
    pub release_flags: u32,
    pub lock_owner: u64,
}

/// `struct fuse_flush_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushIn {
    pub fh: u64,
    pub unused: u32,
    pub padding: u32,
    pub lock_owner: u64,
}

/// `struct fuse_read_in` (also used by READDIR/READDIRPLUS).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub read_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}

/// `struct fuse_write_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub write_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}

/// `struct fuse_write_out`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteOut {
    pub size: u32,
    pub padding: u32,
}

/// `struct fuse_kstatfs` (the whole of `struct fuse_statfs_out`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatfsOut {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
    pub padding: u32,
    pub spare: [u32; 6],
}

/// `struct fuse_forget_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ForgetIn {
    pub nlookup: u64,
}

/// `struct fuse_forget_one` (an element of BATCH_FORGET).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ForgetOne {
    pub nodeid: u64,
    pub nlookup: u64,
}

/// `struct fuse_batch_forget_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchForgetIn {
    pub count: u32,
    pub dummy: u32,
}

/// `struct fuse_fsync_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FsyncIn {
    pub fh: u64,
    pub fsync_flags: u32,
    pub padding: u32,
}

/// `struct fuse_dirent` without its name.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dirent {
    pub ino: u64,
    pub off: u64,
    pub namelen: u32,
    pub typ: u32,
}

macro_rules! byte_valued {
    ($($t:ty => $size:expr),* $(,)?) => {
        $(
            // SAFETY: `repr(C)` with only integer (or integer array) fields laid out without
            // padding (the size assertion below matches the sum of the fields, as in fuse.h),
            // so every byte pattern is a valid value.
            unsafe impl ByteValued for $t {}
            const _: () = assert!(std::mem::size_of::<$t>() == $size);
        )*
    };
}

byte_valued! {
    InHeader => 40,
    OutHeader => 16,
    Attr => 88,
    EntryOut => 128,
    AttrOut => 104,
    InitIn => 64,
    InitOut => 64,
    GetattrIn => 16,
    MkdirIn => 8,
    OpenIn => 8,
    CreateIn => 16,
    OpenOut => 16,
    ReleaseIn => 24,
    FlushIn => 24,
    ReadIn => 40,
    WriteIn => 40,
    WriteOut => 8,
    StatfsOut => 80,
    ForgetIn => 8,
    ForgetOne => 16,
    BatchForgetIn => 8,
    FsyncIn => 16,
    Dirent => 24,
}

/// Size of `struct fuse_direntplus` without its name: `fuse_entry_out` + `fuse_dirent`.
pub const DIRENTPLUS_HEADER: usize = 128 + 24;

/// Decodes a `T` from the start of `b`, if long enough.
pub fn decode<T: ByteValued + Default>(b: &[u8]) -> Option<T> {
    let n = std::mem::size_of::<T>();
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(b.get(..n)?);
    Some(v)
}

/// Symbolic name of an errno, for messages ("ENOENT").
pub fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EPROTO => "EPROTO",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ESTALE => "ESTALE",
        libc::E2BIG => "E2BIG",
        _ => "E?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_offsets_match_fuse_h() {
        let h = InHeader {
            len: 1,
            opcode: 2,
            unique: 3,
            nodeid: 4,
            uid: 5,
            gid: 6,
            pid: 7,
            total_extlen: 8,
            padding: 0,
        };
        let b = h.as_slice();
        assert_eq!(b[4], 2);
        assert_eq!(b[8], 3);
        assert_eq!(b[16], 4);
        assert_eq!(b[24], 5);
        assert_eq!(b[32], 7);
        assert_eq!(b[36], 8);
        let mut e = EntryOut::default();
        e.attr.mode = 0o40755;
        let b = e.as_slice();
        // fuse_entry_out.attr at 40, fuse_attr.mode at 60.
        assert_eq!(u32::from_le_bytes(b[100..104].try_into().unwrap()), 0o40755);
        let i = InitOut {
            max_write: 0x1234,
            max_pages: 0x56,
            ..Default::default()
        };
        assert_eq!(i.as_slice()[20], 0x34);
        assert_eq!(i.as_slice()[28], 0x56);
        let w = WriteIn {
            size: 9,
            ..Default::default()
        };
        assert_eq!(w.as_slice()[16], 9);
        assert_eq!(decode::<OutHeader>(&[0u8; 15]), None);
        assert_eq!(errno_name(libc::ENOSYS), "ENOSYS");
    }
}
