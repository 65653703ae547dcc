//! CPUID: advertises exactly what this CPU implements.

/// Vendor string (a neutral vendor: the guest takes generic, quirk-free code paths).
pub const VENDOR: &[u8; 12] = b"GenuineIntel";

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
/// Leaf 7 subleaf 0 EBX: TSC_ADJUST (MSR 0x3B).
pub const LEAF7_EBX: u32 = 1 << 1;
/// Leaf 0x80000001 EDX: SYSCALL, NX, 1 GiB pages, RDTSCP, LM.
pub const EXT1_EDX: u32 = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29);
/// Leaf 0x80000001 ECX: LAHF/SAHF in 64-bit mode, ABM (LZCNT).
pub const EXT1_ECX: u32 = (1 << 0) | (1 << 5);

/// The highest basic leaf.
const MAX_LEAF: u32 = 0x16;

/// The frequency of the TSC and of the LAPIC timer's input clock: both count host nanoseconds.
pub const CLOCK_HZ: u64 = 1_000_000_000;

fn le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Returns EAX, EBX, ECX, EDX for `leaf`/`subleaf`.
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    match leaf {
        0 => [
            MAX_LEAF,
            le(&VENDOR[0..4]),
            le(&VENDOR[8..12]),
            le(&VENDOR[4..8]),
        ],
        // Family 6, model 0x0F, stepping 1; CLFLUSH line 64 bytes, 1 logical CPU, APIC ID 0.
        1 => [0x0000_06F1, (8 << 8) | (1 << 16), LEAF1_ECX, LEAF1_EDX],
        // Thermal/power leaf: EAX bit 2 = ARAT, the LAPIC timer keeps running while the CPU
        // halts (it is host time). Without it Linux flags the LAPIC timer C3STOP, finds no
        // broadcast device and stays in periodic ticks: no high-resolution timers, no NOHZ.
        6 => [1 << 2, 0, 0, 0],
        // Structured extended features, subleaf 0: EBX = TSC_ADJUST. With the invariant TSC
        // (leaf 0x8000_0007) it tells Linux the TSC needs no clocksource watchdog, which would
        // otherwise compare it with jiffies that a busy host delays.
        7 if subleaf == 0 => [0, LEAF7_EBX, 0, 0],
        // TSC and core-crystal frequencies, so that the guest needs no calibration against the
        // PIT (which fails or drifts when the host is busy, leaving the TSC "unstable" and the
        // kernel without a usable clock): TSC = crystal * EBX / EAX, the crystal (ECX, Hz) being
        // the LAPIC timer's input clock; Linux then also skips calibrating the LAPIC timer.
        0x15 => [1, 1, CLOCK_HZ as u32, 0],
        // Base, maximum and bus frequencies in MHz.
        0x16 => {
            let mhz = (CLOCK_HZ / 1_000_000) as u32;
            [mhz, mhz, mhz, 0]
        }
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
        assert_eq!(cpuid(7, 0), [0, LEAF7_EBX, 0, 0], "leaf 7: TSC_ADJUST only");
        assert_eq!(cpuid(7, 1), [0; 4], "no leaf-7 subleaf 1");
        assert!(cpuid(0, 0)[0] >= 0x16, "leaves 0x15/0x16 reachable");
        assert_eq!(cpuid(6, 0), [1 << 2, 0, 0, 0], "leaf 6: ARAT only");
        let [den, num, crystal, _] = cpuid(0x15, 0);
        assert_eq!(
            u64::from(crystal) * u64::from(num) / u64::from(den),
            CLOCK_HZ,
            "TSC = crystal * EBX / EAX"
        );
    }
}
