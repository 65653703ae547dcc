//! Soft MMU: virtual-address memory accesses for the executor (TLB fast path, page walk on
//! miss, MMIO through the `Platform`, self-modifying-code detection on writes to code pages).

mod locked;
pub mod tlb;
pub mod walk;

use crate::ctx::vec::{GP, PF};
use crate::ctx::{Ctx, Event, R};
use tlb::Hit;
use walk::{Access, PagingMode};

#[inline]
fn canonical(va: u64) -> bool {
    ((va as i64) << 16 >> 16) as u64 == va
}

impl Ctx<'_> {
    /// Whether accesses are checked as user accesses (CPL 3 and not an implicit supervisor
    /// access such as IDT/GDT/TSS reads).
    #[inline(always)]
    pub fn user(&self) -> bool {
        self.s.cpl() == 3 && !self.implicit_sup
    }

    /// Translates `va` (any byte in the page) for `acc`, filling the TLB on a miss.
    pub fn xlate(&mut self, va: u64, acc: Access) -> R<Hit> {
        let user = self.user();
        if let Some(h) = self.tlb.lookup(va, acc, user) {
            return Ok(h);
        }
        self.xlate_slow(va, acc, user)
    }

    #[cold]
    fn xlate_slow(&mut self, va: u64, acc: Access, user: bool) -> R<Hit> {
        if !canonical(va) {
            return Err(Event::fault(GP, Some(0)));
        }
        let mode = PagingMode {
            cr0: self.s.cr0,
            cr3: self.s.cr3,
            cr4: self.s.cr4,
            efer: self.s.efer,
        };
        let t = match walk::walk(self.ram, &mode, va, acc, user) {
            Ok(t) => t,
            Err(code) => {
                self.s.cr2 = va;
                return Err(Event::fault(PF, Some(code)));
            }
        };
        let host = match self.ram.host_ptr(t.page) {
            Some((p, _)) => p as usize,
            None => 0,
        };
        let hit = Hit { host, phys: t.page };
        let cacheable = match acc {
            Access::Write => t.writable && !self.code.is_code(t.page),
            _ => true,
        };
        if cacheable {
            self.tlb.insert(va, acc, user, hit, t.global);
        }
        Ok(hit)
    }

    /// Reads `size` (1, 2, 4, 8) bytes at linear address `va`.
    #[inline]
    pub fn read(&mut self, va: u64, size: u8) -> R<u64> {
        let off = (va & 0xFFF) as usize;
        if off + size as usize <= 0x1000 {
            if let Some(h) = self.tlb.lookup(va, Access::Read, self.user()) {
                if h.host != 0 {
                    let p = (h.host + off) as *const u8;
                    // SAFETY: `p..p+size` lies inside one RAM page of a live mapping (TLB
                    // entries only hold host pointers from `GuestRam`); unaligned raw reads
                    // tolerate concurrent writers.
                    return Ok(unsafe {
                        match size {
                            1 => u64::from(p.read()),
                            2 => u64::from((p as *const u16).read_unaligned()),
                            4 => u64::from((p as *const u32).read_unaligned()),
                            _ => (p as *const u64).read_unaligned(),
                        }
                    });
                }
            }
        }
        let mut b = [0u8; 8];
        self.read_bytes(va, &mut b[..size as usize])?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes `size` (1, 2, 4, 8) bytes at linear address `va`.
    #[inline]
    pub fn write(&mut self, va: u64, size: u8, v: u64) -> R<()> {
        let off = (va & 0xFFF) as usize;
        if off + size as usize <= 0x1000 {
            if let Some(h) = self.tlb.lookup(va, Access::Write, self.user()) {
                if h.host != 0 {
                    let p = (h.host + off) as *mut u8;
                    // SAFETY: as in `read`; write TLB entries never map code pages, so no
                    // cached block is affected.
                    unsafe {
                        match size {
                            1 => p.write(v as u8),
                            2 => (p as *mut u16).write_unaligned(v as u16),
                            4 => (p as *mut u32).write_unaligned(v as u32),
                            _ => (p as *mut u64).write_unaligned(v),
                        }
                    }
                    return Ok(());
                }
            }
        }
        let b = v.to_le_bytes();
        self.write_bytes(va, &b[..size as usize])
    }

    /// Checks that `len` bytes at `va` can be written (both pages if the access is split),
    /// so that a later write of the same range cannot fault.
    pub fn check_write(&mut self, va: u64, len: usize) -> R<()> {
        self.xlate(va, Access::Write)?;
        let last = va.wrapping_add(len as u64 - 1);
        if last & !0xFFF != va & !0xFFF {
            self.xlate(last, Access::Write)?;
        }
        Ok(())
    }

    /// Reads `buf.len()` (≤ 4096) bytes at `va`, possibly across a page boundary.
    pub fn read_bytes(&mut self, va: u64, buf: &mut [u8]) -> R<()> {
        self.read_bytes_as(va, buf, Access::Read)
    }

    /// [`Ctx::read_bytes`] checked as `acc` (`Access::Exec` for instruction fetches).
    pub fn read_bytes_as(&mut self, va: u64, buf: &mut [u8], acc: Access) -> R<()> {
        let first = (0x1000 - (va & 0xFFF) as usize).min(buf.len());
        let h1 = self.xlate(va, acc)?;
        let h2 = if first < buf.len() {
            Some(self.xlate(va.wrapping_add(first as u64), acc)?)
        } else {
            None
        };
        let (a, b) = buf.split_at_mut(first);
        self.page_read(h1, va & 0xFFF, a);
        if let Some(h2) = h2 {
            self.page_read(h2, 0, b);
        }
        Ok(())
    }

    /// Writes `buf` (≤ 4096 bytes) at `va`; both pages are checked before anything is written.
    pub fn write_bytes(&mut self, va: u64, buf: &[u8]) -> R<()> {
        let first = (0x1000 - (va & 0xFFF) as usize).min(buf.len());
        let h1 = self.xlate(va, Access::Write)?;
        let h2 = if first < buf.len() {
            Some(self.xlate(va.wrapping_add(first as u64), Access::Write)?)
        } else {
            None
        };
        let (a, b) = buf.split_at(first);
        self.page_write(h1, va & 0xFFF, a);
        if let Some(h2) = h2 {
            self.page_write(h2, 0, b);
        }
        Ok(())
    }

    fn page_read(&mut self, h: Hit, off: u64, buf: &mut [u8]) {
        if h.host != 0 {
            // SAFETY: `off + buf.len() <= 4096` by construction; the page is inside a live
            // RAM mapping; `buf` is a Rust buffer distinct from guest memory.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (h.host + off as usize) as *const u8,
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            };
        } else {
            self.plat.mmio_read(h.phys + off, buf);
            self.poll_stop();
        }
    }

    fn page_write(&mut self, h: Hit, off: u64, buf: &[u8]) {
        if h.host != 0 {
            if self.code.is_code(h.phys) {
                self.note_smc(h.phys);
            }
            // SAFETY: as in `page_read`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    buf.as_ptr(),
                    (h.host + off as usize) as *mut u8,
                    buf.len(),
                )
            };
        } else {
            self.plat.mmio_write(h.phys + off, buf);
            self.poll_stop();
        }
    }

    /// Records a write to a page holding translated code: the block cache drops the page's
    /// blocks after the current instruction, and the current block ends.
    fn note_smc(&mut self, phys_page: u64) {
        self.end_block = true;
        self.code.notify_write(phys_page);
        if !self.smc[..self.smc_len].contains(&phys_page) {
            if self.smc_len < self.smc.len() {
                self.smc[self.smc_len] = phys_page;
                self.smc_len += 1;
            } else {
                self.smc_overflow = true;
            }
        }
    }
}
