//! Host atomics on guest RAM: the compare-exchange primitives that make guest LOCKed
//! read-modify-writes atomic against the other vCPUs (and device daemons) sharing the memory.
//!
//! They are `lock cmpxchg` / `lock cmpxchg16b` on the host address, which x86-64 hosts
//! execute atomically at any alignment (an access crossing a cache line is a split lock:
//! slow, but atomic). Rust's `Atomic*` types would require natural alignment, which guest
//! operands need not have.

use std::arch::asm;

/// Mask of the low `size` bytes.
#[inline(always)]
fn mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * u32::from(size))) - 1
    }
}

/// Atomically compares the `size` (1, 2, 4 or 8) bytes at `p` with `old` and stores `new`
/// if equal. Returns the value found (equal to `old` masked to `size` on success).
///
/// # Safety
/// `p..p+size` must be valid, writable memory (guest RAM inside one mapping).
#[inline]
pub unsafe fn cas(p: *mut u8, size: u8, old: u64, new: u64) -> u64 {
    let mut rax = old;
    // SAFETY: the caller guarantees `p..p+size` is valid writable memory; `lock cmpxchg`
    // accepts any alignment on x86-64.
    unsafe {
        match size {
            1 => asm!("lock cmpxchg byte ptr [{p}], {n:l}", p = in(reg) p, n = in(reg) new,
                      inout("rax") rax, options(nostack)),
            2 => asm!("lock cmpxchg word ptr [{p}], {n:x}", p = in(reg) p, n = in(reg) new,
                      inout("rax") rax, options(nostack)),
            4 => asm!("lock cmpxchg dword ptr [{p}], {n:e}", p = in(reg) p, n = in(reg) new,
                      inout("rax") rax, options(nostack)),
            _ => asm!("lock cmpxchg qword ptr [{p}], {n}", p = in(reg) p, n = in(reg) new,
                      inout("rax") rax, options(nostack)),
        }
    }
    rax & mask(size)
}

/// Atomically compares the 16 bytes at `p` with `old` (low, high) and stores `new` if
/// equal. Returns the value found.
///
/// # Safety
/// `p..p+16` must be valid, writable memory aligned to 16 bytes.
#[inline]
pub unsafe fn cas16(p: *mut u8, old: (u64, u64), new: (u64, u64)) -> (u64, u64) {
    let (mut lo, mut hi) = old;
    // SAFETY: the caller guarantees a valid, 16-byte aligned, writable `p`. RBX is reserved
    // by the compiler: the new low half is swapped into it around the instruction and the
    // compiler's value restored (fixed registers: a `reg` operand may be given RBX itself).
    unsafe {
        asm!(
            "xchg rsi, rbx",
            "lock cmpxchg16b xmmword ptr [rdi]",
            "xchg rsi, rbx",
            in("rdi") p,
            inout("rsi") new.0 => _,
            in("rcx") new.1,
            inout("rax") lo,
            inout("rdx") hi,
            options(nostack),
        );
    }
    (lo, hi)
}

/// A full host memory barrier (guest MFENCE, serializing instructions).
#[inline]
pub fn full_fence() {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_sizes_and_unaligned() {
        let mut buf = [0u8; 32];
        let p = buf.as_mut_ptr();
        // SAFETY: all pointers stay inside `buf`; 16 is 16-byte aligned relative to an
        // aligned array only by chance, so cas16 uses an aligned Box below.
        unsafe {
            assert_eq!(cas(p.add(1), 4, 0, 0x1122_3344), 0);
            assert_eq!(
                cas(p.add(1), 4, 0, 5),
                0x1122_3344,
                "mismatch returns the value"
            );
            assert_eq!(cas(p.add(4), 1, 0x11, 0xaa), 0x11);
            assert_eq!(cas(p.add(1), 2, 0x3344, 0xffff), 0x3344);
            assert_eq!(cas(p.add(7), 8, 0, u64::MAX), 0);
        }
        assert_eq!(&buf[1..5], &[0xff, 0xff, 0x22, 0xaa]);
        assert_eq!(&buf[7..15], &[0xff; 8]);
        #[repr(align(16))]
        struct A([u64; 2]);
        let mut a = Box::new(A([1, 2]));
        let q = a.0.as_mut_ptr() as *mut u8;
        // SAFETY: `q` points to 16 aligned bytes owned by `a`.
        unsafe {
            assert_eq!(cas16(q, (1, 2), (3, 4)), (1, 2));
            assert_eq!(cas16(q, (1, 2), (5, 6)), (3, 4));
        }
        assert_eq!(a.0, [3, 4]);
    }
}
