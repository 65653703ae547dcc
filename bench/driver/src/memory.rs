//! The driver's "guest memory": one memfd mapped shared, handed to the backend in
//! SET_MEM_TABLE, with a bump allocator for rings and buffers.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

/// Errors of the guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create / ftruncate failed.
    #[error("creating the memfd: {0}")]
    Memfd(std::io::Error),
    /// Mapping failed.
    #[error("mapping guest memory: {0}")]
    Map(String),
    /// The bump allocator is exhausted.
    #[error("out of driver memory ({0} bytes requested)")]
    Exhausted(usize),
    /// An access outside the memory.
    #[error("guest memory access: {0}")]
    Access(#[from] vm_memory::GuestMemoryError),
}

/// One shared region at guest physical address 0.
pub struct DriverMemory {
    file: File,
    mem: GuestMemoryMmap,
    next: u64,
}

impl DriverMemory {
    /// Creates `size` bytes of shared memory.
    pub fn new(size: usize) -> Result<Self, MemoryError> {
        // SAFETY: the name is a valid NUL-terminated string; flags are valid.
        let fd = unsafe { libc::memfd_create(c"rqemu-driver".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64).map_err(MemoryError::Memfd)?;
        let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, 0);
        let mem = GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), size, Some(fo))])
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        // Keep page 0 unused so that a zero address is never a valid buffer.
        Ok(DriverMemory {
            file,
            mem,
            next: 4096,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.mem.iter().map(|r| r.len() as usize).sum()
    }

    /// The memfd.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Host virtual address of guest address 0.
    pub fn host_addr(&self) -> *mut u8 {
        self.mem
            .get_host_address(GuestAddress(0))
            .unwrap_or(std::ptr::null_mut())
    }

    /// The mapping, for `Bytes` access.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Allocates `len` bytes aligned to `align` (a power of two). Never freed.
    pub fn alloc(&mut self, len: usize, align: u64) -> Result<u64, MemoryError> {
        let start = self.next.next_multiple_of(align.max(1));
        let end = start
            .checked_add(len as u64)
            .ok_or(MemoryError::Exhausted(len))?;
        if end > self.size() as u64 {
            return Err(MemoryError::Exhausted(len));
        }
        self.next = end;
        Ok(start)
    }

    /// Writes bytes at a guest address.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        Ok(self.mem.write_slice(data, GuestAddress(gpa))?)
    }

    /// Reads bytes at a guest address.
    pub fn read(&self, gpa: u64, data: &mut [u8]) -> Result<(), MemoryError> {
        Ok(self.mem.read_slice(data, GuestAddress(gpa))?)
    }
}
