//! Loading a guest kernel: bzImage (64-bit Linux boot protocol) or ELF (the PVH 32-bit entry
//! when the image has a PVH note, otherwise the 64-bit entry like a bzImage), plus initrd and
//! command line. Produces the boot vCPU's [`BootState`].
//!
//! Guest memory used: kernel at 1 MiB (`HIMEM_START`), initrd at the top of low RAM
//! (below the header's `initrd_addr_max`), command line at `CMDLINE_START`, boot_params at
//! `ZERO_PAGE_START` or `hvm_start_info` at `PVH_INFO_START`, GDT/IDT/page tables below
//! 64 KiB (see [`crate::layout`]).

mod params;
pub mod x86;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemory as _};

use crate::accel::BootState;
use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::memory::GuestRam;
use x86::EntryMode;

/// Errors from loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel/initrd file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// linux-loader rejected the kernel image.
    #[error("loading {format} kernel {path} ({size} bytes): {msg}")]
    Kernel {
        /// File.
        path: PathBuf,
        /// "ELF" or "bzImage" (what the first bytes say it is).
        format: &'static str,
        /// File size.
        size: u64,
        /// linux-loader's error.
        msg: String,
    },
    /// The kernel file is too short for either header, or shorter than its header says.
    #[error("kernel {path} is truncated: {what}")]
    KernelTruncated {
        /// File.
        path: PathBuf,
        /// What is missing.
        what: String,
    },
    /// The kernel does not fit in guest RAM above 1 MiB.
    #[error(
        "kernel {path} needs {need} bytes of guest RAM from {HIMEM_START:#x}, but RAM below \
         4 GiB ends at {ram_end:#x}: give the guest more memory (--memory)"
    )]
    KernelTooBig {
        /// File.
        path: PathBuf,
        /// Bytes needed from `HIMEM_START` (image, or the header's `init_size`).
        need: u64,
        /// End of low RAM.
        ram_end: u64,
    },
    /// Invalid command line.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// The initrd does not fit.
    #[error(
        "initrd {path} of {size} bytes does not fit in guest RAM between the kernel end \
         {kernel_end:#x} and {max:#x}: give the guest more memory (--memory)"
    )]
    InitrdTooBig {
        /// File.
        path: PathBuf,
        /// Initrd size.
        size: u64,
        /// End of the kernel image.
        kernel_end: u64,
        /// Highest allowed end.
        max: u64,
    },
    /// Writing a boot structure to guest memory failed.
    #[error("writing {0} to guest memory")]
    GuestWrite(&'static str),
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// Result of loading: the entry state and facts for diagnostics.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// Boot vCPU state.
    pub state: BootState,
    /// Entry convention used.
    pub mode: EntryMode,
    /// Where the initrd was placed, if any: `(addr, size)`.
    pub initrd: Option<(u64, u64)>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BootError + '_ {
    move |source| BootError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Loads kernel, initrd and command line into `ram` and writes the boot structures.
/// `rsdp` is the guest address of the ACPI RSDP (already written).
pub fn load(ram: &GuestRam, cfg: &BootConfig, rsdp: u64) -> Result<LoadedKernel, BootError> {
    let mem = ram.memory();
    let mut kernel = File::open(&cfg.kernel).map_err(io_err(&cfg.kernel))?;
    let size = kernel.metadata().map_err(io_err(&cfg.kernel))?.len();
    // The bzImage header ends before 0x268; an ELF header is 64 bytes.
    let mut head = vec![0u8; 0x268.min(size as usize)];
    kernel.read_exact(&mut head).map_err(io_err(&cfg.kernel))?;
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(io_err(&cfg.kernel))?;
    let is_elf = head.starts_with(b"\x7fELF");
    if size < 64 {
        return Err(BootError::KernelTruncated {
            path: cfg.kernel.clone(),
            what: format!("{size} bytes, too short for an ELF or bzImage header"),
        });
    }
    if !is_elf {
        check_bzimage(&cfg.kernel, &head, size, ram.low_ram_end())?;
    }
    let kerr = |e: linux_loader::loader::Error| BootError::Kernel {
        path: cfg.kernel.clone(),
        format: if is_elf { "ELF" } else { "bzImage" },
        size,
        msg: e.to_string(),
    };
    let result = if is_elf {
        Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(kerr)?
    } else {
        BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(kerr)?
    };

    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !cfg.cmdline.is_empty() {
        cmdline
            .insert_str(&cfg.cmdline)
            .map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len() as u32;

    let initrd_max = result
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(0x7fff_ffff);
    let initrd = match &cfg.initrd {
        Some(path) => Some(load_initrd(ram, path, result.kernel_end, initrd_max)?),
        None => None,
    };

    let (mode, state) = match (is_elf, result.pvh_boot_cap) {
        (true, PvhBootCapability::PvhEntryPresent(entry)) => {
            let info = params::write_pvh_info(ram, initrd, rsdp)?;
            let st = x86::setup_entry(mem, EntryMode::Pvh32, entry.0, info)?;
            (EntryMode::Pvh32, st)
        }
        _ => {
            let zero_page =
                params::write_boot_params(ram, result.setup_header, cmdline_len, initrd, rsdp)?;
            // bzImage: the 64-bit entry is 0x200 past the protected-mode kernel start.
            let entry = if is_elf {
                result.kernel_load.0
            } else {
                result.kernel_load.0 + 0x200
            };
            let st = x86::setup_entry(mem, EntryMode::Long64, entry, zero_page)?;
            (EntryMode::Long64, st)
        }
    };
    debug_assert!(mem.address_in_range(GuestAddress(state.rip)));
    Ok(LoadedKernel {
        state,
        mode,
        initrd,
    })
}

/// What linux-loader does not check of a bzImage (`head`: its first bytes, `size`: the file
/// size): a file shorter than its header's `syssize`, and a kernel (or its `init_size`, the
/// memory it needs to decompress itself) that does not fit in RAM from `HIMEM_START` to
/// `ram_end`. Files without the `HdrS` magic are left to linux-loader's diagnosis.
fn check_bzimage(path: &Path, head: &[u8], size: u64, ram_end: u64) -> Result<(), BootError> {
    let u16_at = |o: usize| head.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if head.get(0x202..0x206) != Some(b"HdrS") {
        return Ok(());
    }
    let setup_sects = match head.get(0x1f1).copied().unwrap_or(0) {
        0 => 4,
        n => u64::from(n),
    };
    let setup = (setup_sects + 1) * 512;
    let syssize = u64::from(u32_at(0x1f4).unwrap_or(0)) * 16;
    if size < setup + syssize {
        return Err(BootError::KernelTruncated {
            path: path.to_path_buf(),
            what: format!(
                "its bzImage header announces {setup} bytes of setup and {syssize} of \
                 kernel, the file has {size} bytes"
            ),
        });
    }
    let version = u16_at(0x206).unwrap_or(0);
    let init_size = if version >= 0x20a {
        u64::from(u32_at(0x260).unwrap_or(0))
    } else {
        0
    };
    let need = size.saturating_sub(setup).max(init_size);
    if HIMEM_START.saturating_add(need) > ram_end {
        return Err(BootError::KernelTooBig {
            path: path.to_path_buf(),
            need,
            ram_end,
        });
    }
    Ok(())
}

fn load_initrd(
    ram: &GuestRam,
    path: &Path,
    kernel_end: u64,
    initrd_max: u64,
) -> Result<(u64, u64), BootError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let size = f.metadata().map_err(io_err(path))?.len();
    let top = ram.low_ram_end().min(initrd_max.saturating_add(1));
    let too_big = || BootError::InitrdTooBig {
        path: path.to_path_buf(),
        size,
        kernel_end,
        max: top,
    };
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end.max(HIMEM_START))
        .ok_or_else(too_big)?;
    let len = usize::try_from(size).map_err(|_| too_big())?;
    ram.memory()
        .read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|_| BootError::GuestWrite("initrd"))?;
    Ok((addr, size))
}
