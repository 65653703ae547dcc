//! Guest RAM: one memfd, mapped `MAP_SHARED` per region so that the same pages can be handed
//! to device daemons (vhost-user `SET_MEM_TABLE` sends the fd + offset of every region).
//!
//! The memfd is sealed against shrinking and growing (`F_SEAL_SHRINK | F_SEAL_GROW`, as QEMU
//! does): a daemon holding it cannot truncate guest RAM under the VMM (a SIGBUS on the next
//! access). Every mapping is `MADV_DONTDUMP`: guest memory never lands in a core file.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::layout::{EBDA_START, HIMEM_START, MMIO_HOLE_END, MMIO_HOLE_START};

/// The guest memory type used throughout the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Errors from building guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is unusable.
    #[error("invalid guest memory size {0:#x} (need at least 2 MiB, page-aligned)")]
    InvalidSize(u64),
    /// memfd_create/ftruncate failed.
    #[error("creating the guest RAM memfd: {0}")]
    Memfd(#[source] std::io::Error),
    /// mmap of a region failed.
    #[error("mapping guest RAM: {0}")]
    Mmap(String),
    /// Sealing the memfd or `madvise` failed.
    #[error("{0}: {1}")]
    Harden(&'static str, #[source] std::io::Error),
}

/// One contiguous RAM region with the file backing it (for sharing with daemons).
#[derive(Debug, Clone)]
pub struct RamRegion {
    /// Guest-physical base address.
    pub guest_base: u64,
    /// Size in bytes.
    pub size: u64,
    /// The memfd backing all of guest RAM.
    pub file: Arc<File>,
    /// Offset of this region inside `file`.
    pub file_offset: u64,
}

/// e820 entry types used by the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved (EBDA, BIOS area with ACPI tables).
    Reserved = 2,
}

/// One entry of the guest's memory map (e820 / PVH memmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Type.
    pub kind: E820Type,
}

/// Guest RAM plus its layout.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemory,
    regions: Vec<RamRegion>,
    size: u64,
}

/// The RAM ranges `(guest_base, size)` for `size` bytes of RAM around the 32-bit MMIO hole.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

/// The e820 map the guest sees for `size` bytes of RAM (consistent with [`ram_ranges`]).
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = Vec::with_capacity(4);
    map.push(E820Entry {
        addr: 0,
        size: EBDA_START,
        kind: E820Type::Ram,
    });
    map.push(E820Entry {
        addr: EBDA_START,
        size: HIMEM_START - EBDA_START,
        kind: E820Type::Reserved,
    });
    for (base, len) in ram_ranges(size) {
        let start = base.max(HIMEM_START);
        let end = base + len;
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820Type::Ram,
            });
        }
    }
    map
}

impl GuestRam {
    /// Creates `size` bytes of memfd-backed RAM laid out around the MMIO hole.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < 2 << 20 || size % 4096 != 0 {
            return Err(MemoryError::InvalidSize(size));
        }
        let file = Arc::new(create_memfd(size)?);
        let mut regions = Vec::new();
        let mut mmaps = Vec::new();
        let mut offset = 0u64;
        for (base, len) in ram_ranges(size) {
            let len_usize = usize::try_from(len).map_err(|_| MemoryError::InvalidSize(size))?;
            let fo = FileOffset::from_arc(file.clone(), offset);
            let mmap = MmapRegion::from_file(fo, len_usize)
                .map_err(|e| MemoryError::Mmap(e.to_string()))?;
            // SAFETY: the range is exactly the mapping `mmap` owns; MADV_DONTDUMP only changes
            // whether it is written to core files.
            if unsafe { libc::madvise(mmap.as_ptr().cast(), len_usize, libc::MADV_DONTDUMP) } != 0 {
                return Err(MemoryError::Harden(
                    "madvise(MADV_DONTDUMP) on guest RAM",
                    std::io::Error::last_os_error(),
                ));
            }
            let region = GuestRegionMmap::new(mmap, GuestAddress(base))
                .ok_or_else(|| MemoryError::Mmap("region overflows the address space".into()))?;
            mmaps.push(region);
            regions.push(RamRegion {
                guest_base: base,
                size: len,
                file: file.clone(),
                file_offset: offset,
            });
            offset += len;
        }
        let mem = GuestMemory::from_regions(mmaps).map_err(|e| MemoryError::Mmap(e.to_string()))?;
        Ok(GuestRam { mem, regions, size })
    }

    /// The `vm-memory` view of guest RAM.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The RAM regions with their backing fd and offset.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// End (exclusive) of RAM below the MMIO hole.
    pub fn low_ram_end(&self) -> u64 {
        self.size.min(MMIO_HOLE_START)
    }

    /// The guest's e820 map.
    pub fn e820(&self) -> Vec<E820Entry> {
        e820_map(self.size)
    }
}

fn create_memfd(size: u64) -> Result<File, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated C string; the return value is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"rqemu-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    // SAFETY: fcntl on the fd `file` owns, with an integer argument.
    let r = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    if r != 0 {
        return Err(MemoryError::Harden(
            "sealing the guest RAM memfd (F_SEAL_SHRINK | F_SEAL_GROW)",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemory as _};

    #[test]
    fn small_ram_is_one_region_below_the_hole() {
        let ram = GuestRam::new(64 << 20).unwrap();
        assert_eq!(ram.regions().len(), 1);
        assert_eq!(ram.memory().num_regions(), 1);
        let e820 = ram.e820();
        assert_eq!(e820.len(), 3);
        assert_eq!(e820[2].addr, HIMEM_START);
        assert_eq!(e820[2].addr + e820[2].size, 64 << 20);
    }

    #[test]
    fn large_ram_is_split_around_the_hole() {
        let size = (4u64 << 30) + (1 << 20);
        let e820 = e820_map(size);
        let ram: u64 = e820
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        // Only the part between EBDA and 1 MiB is not RAM.
        assert_eq!(ram, size - (HIMEM_START - EBDA_START));
        for e in &e820 {
            let end = e.addr + e.size;
            assert!(end <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END, "{e:?}");
        }
        assert_eq!(e820.last().unwrap().addr, MMIO_HOLE_END);
        assert_eq!(e820.last().unwrap().size, size - MMIO_HOLE_START);
    }

    #[test]
    fn regions_share_one_memfd_at_distinct_offsets() {
        // 3 GiB + 8 MiB: memfd pages are only allocated when touched.
        let size = MMIO_HOLE_START + (8 << 20);
        let ram = GuestRam::new(size).unwrap();
        let r = ram.regions();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].guest_base, MMIO_HOLE_END);
        assert_eq!(r[1].file_offset, MMIO_HOLE_START);
        ram.memory()
            .write_obj(0xabcdu32, GuestAddress(MMIO_HOLE_END))
            .unwrap();
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        r[1].file.read_exact_at(&mut buf, r[1].file_offset).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xabcd);
    }

    #[test]
    fn ram_is_sealed_against_resizing_and_not_dumped() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let file = &ram.regions()[0].file;
        // SAFETY: fcntl on an fd we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(
            seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW),
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
        );
        assert!(file.set_len(4 << 20).is_err(), "shrinking must fail");
        assert!(file.set_len(16 << 20).is_err(), "growing must fail");
        // The mapping carries the "dd" (do not dump) flag in smaps.
        let start = ram.memory().iter().next().unwrap().as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        let header = format!("{start:x}-");
        assert!(
            lines.any(|l| l.starts_with(&header)),
            "mapping not in smaps"
        );
        let flags = lines.find(|l| l.starts_with("VmFlags:")).unwrap();
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }

    #[test]
    fn rejects_tiny_or_unaligned_sizes() {
        assert!(GuestRam::new(4096).is_err());
        assert!(GuestRam::new((64 << 20) + 1).is_err());
    }
}
