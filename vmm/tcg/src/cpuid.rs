//! CPUID: advertises exactly what this CPU implements.

/// Vendor string (a neutral vendor: the guest takes generic, quirk-free code paths).
pub const VENDOR: &[u8; 12] = b"RqemuTCGx64!";

const BRAND: &[u8; 48] = b"rqemu TCG x86-64 software CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

/// Leaf 1 EDX: FPU, PSE, TSC, MSR, PAE, CX8, APIC, PGE, CMOV, PAT, CLFSH, FXSR, SSE, SSE2.
pub const LEAF1_EDX: u32 = (1 << 0)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 9)
    | (1 << 13)
    | (1 << 15)
    | (1 << 16)
    | (1 << 19)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26);
/// Leaf 1 ECX: CX16, POPCNT, hypervisor.
pub const LEAF1_ECX: u32 = (1 << 13) | (1 << 23) | (1 << 31);
/// Leaf 0x80000001 EDX: SYSCALL, NX, 1 GiB pages, RDTSCP, LM.
pub const EXT1_EDX: u32 = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29);
/// Leaf 0x80000001 ECX: LAHF/SAHF in 64-bit mode, ABM (LZCNT).
pub const EXT1_ECX: u32 = (1 << 0) | (1 << 5);

fn le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Returns EAX, EBX, ECX, EDX for `leaf`/`subleaf`.
pub fn cpuid(leaf: u32, _subleaf: u32) -> [u32; 4] {
    match leaf {
        0 => [7, le(&VENDOR[0..4]), le(&VENDOR[8..12]), le(&VENDOR[4..8])],
        // Family 6, model 0x0F, stepping 1; CLFLUSH line 64 bytes, 1 logical CPU, APIC ID 0.
        1 => [0x0000_06F1, (8 << 8) | (1 << 16), LEAF1_ECX, LEAF1_EDX],
        0x8000_0000 => [0x8000_0008, 0, 0, 0],
        0x8000_0001 => [0, 0, EXT1_ECX, EXT1_EDX],
        0x8000_0002..=0x8000_0004 => {
            let o = (leaf - 0x8000_0002) as usize * 16;
            let b = &BRAND[o..o + 16];
            [le(&b[0..4]), le(&b[4..8]), le(&b[8..12]), le(&b[12..16])]
        }
        // Invariant TSC (the TSC is derived from host monotonic time).
        0x8000_0007 => [0, 0, 0, 1 << 8],
        0x8000_0008 => [crate::mmu::walk::PHYS_BITS | (48 << 8), 0, 0, 0],
        _ => [0; 4],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_and_features() {
        let r = cpuid(0, 0);
        let mut v = Vec::new();
        for x in [r[1], r[3], r[2]] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(&v[..], &VENDOR[..]);
        assert_ne!(cpuid(0x8000_0001, 0)[3] & (1 << 29), 0, "long mode");
        assert_eq!(cpuid(7, 0), [0; 4], "no leaf-7 features advertised");
    }
}
