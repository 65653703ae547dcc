//! CPUID: advertises exactly what this CPU implements.

/// Vendor string: a vendor the kernel and glibc know, so they take their tested paths (as
/// QEMU's TCG CPU models do).
pub const VENDOR: &[u8; 12] = b"GenuineIntel";

const BRAND: &[u8; 48] = b"rqemu TCG x86-64 software CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

/// Leaf 1 EAX: family 6, model 0x86 (Tremont, the Atom core of Snow Ridge: x86-64-v2 with
/// MOVBE, RDRAND, RDSEED, CLFLUSHOPT, CLWB, RDPID and no AVX, as QEMU's `Snowridge`
/// model), stepping 1. Tremont lacks LZCNT, BMI1/BMI2 and AVX/AVX2/FMA/F16C, which this CPU adds
/// (the kernel and glibc key their choices on the feature bits, not on this model; a
/// Haswell identity would fit the features better but brings its errata paths).
pub const SIGNATURE: u32 = (0x8 << 16) | (6 << 8) | (0x6 << 4) | 1;

/// Leaf 1 EDX: FPU, PSE, TSC, MSR, PAE, CX8, APIC, PGE, CMOV, PAT, CLFSH, MMX, FXSR, SSE,
/// SSE2.
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
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26);
/// Leaf 1 ECX: SSE3, SSSE3, CX16, SSE4.1, SSE4.2, MOVBE, POPCNT, XSAVE, AVX, RDRAND,
/// hypervisor (OSXSAVE, bit 27, mirrors CR4.OSXSAVE: see [`cpuid_for`]; FMA and F16C are
/// added when the host has them: [`LEAF1_ECX_HOST`]).
pub const LEAF1_ECX: u32 = (1 << 0)
    | (1 << 9)
    | (1 << 13)
    | (1 << 19)
    | (1 << 20)
    | (1 << 22)
    | (1 << 23)
    | (1 << 26)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
/// Leaf 1 EDX bit 28 (HTT): leaf 1 EBX[23:16] gives the package's logical CPU IDs (set by
/// [`cpuid_for`] when the machine has more than one CPU).
const HTT: u32 = 1 << 28;
/// Leaf 1 ECX: FMA (bit 12) and F16C (bit 29), which run on the host's units
/// (`exec/fma.rs`): advertised only when the host has them.
pub const LEAF1_ECX_HOST: u32 = (1 << 12) | (1 << 29);

/// Leaf 1 ECX as advertised on this host.
fn leaf1_ecx() -> u32 {
    let mut ecx = LEAF1_ECX;
    if crate::exec::fma::host_fma() {
        ecx |= 1 << 12;
    }
    if crate::exec::fma::host_f16c() {
        ecx |= 1 << 29;
    }
    ecx
}
/// Leaf 1 ECX: OSXSAVE.
pub const OSXSAVE: u32 = 1 << 27;
/// Leaf 7 subleaf 0 EBX: TSC_ADJUST, BMI1, AVX2, BMI2, ERMS (REP MOVSB/STOSB), RDSEED,
/// CLFLUSHOPT, CLWB. With the invariant TSC, TSC_ADJUST lets Linux trust the TSC without its clocksource
/// watchdog (which compares against jiffies, and those lag on a slow software CPU).
pub const LEAF7_EBX: u32 =
    (1 << 1) | (1 << 3) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 18) | (1 << 23) | (1 << 24);
/// Leaf 7 subleaf 0 ECX: RDPID.
pub const LEAF7_ECX: u32 = 1 << 22;
/// Leaf 7 subleaf 0 EDX: IA32_ARCH_CAPABILITIES (MSR 0x10A, [`ARCH_CAPABILITIES`]).
pub const LEAF7_EDX: u32 = 1 << 29;
/// IA32_ARCH_CAPABILITIES: the speculative-execution flaws this CPU does not have. The
/// software CPU does not execute speculatively, so it says so instead of being taken for a
/// family-6 Intel part with every flaw of its generation (Linux would then turn on page-table
/// isolation — a CR3 switch, and so a TLB flush, on every kernel entry and exit — and the
/// other mitigations): RDCL_NO (Meltdown, L1TF), SKIP_L1DFL_VMENTRY, SSB_NO, MDS_NO,
/// PSCHANGE_MC_NO, TAA_NO, SBDR_SSDP_NO, FBSDP_NO, PSDP_NO (MMIO stale data), BHI_NO,
/// PBRSB_NO, GDS_NO, RFDS_NO, ITS_NO. Spectre v1/v2 have no "not affected" bit: Linux keeps
/// its barriers and retpolines.
pub const ARCH_CAPABILITIES: u64 = (1 << 0)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 13)
    | (1 << 14)
    | (1 << 15)
    | (1 << 20)
    | (1 << 24)
    | (1 << 26)
    | (1 << 27)
    | (1 << 62);
/// Leaf 0x80000001 EDX: SYSCALL, NX, 1 GiB pages, RDTSCP, LM.
pub const EXT1_EDX: u32 = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29);
/// Leaf 0x80000001 ECX: LAHF/SAHF in 64-bit mode, ABM (LZCNT), PREFETCHW.
pub const EXT1_ECX: u32 = (1 << 0) | (1 << 5) | (1 << 8);

/// Leaf 4 (deterministic cache parameters): L1d 32 KiB, L1i 32 KiB (8-way), L2 1 MiB and
/// L3 4 MiB (16-way), 64-byte lines. Sizes only steer the guest's copy strategies (glibc's
/// non-temporal thresholds); there are no caches.
const CACHES: [[u32; 4]; 4] = [
    [0x121, 63 | (7 << 22), 63, 0],
    [0x122, 63 | (7 << 22), 63, 0],
    [0x143, 63 | (15 << 22), 1023, 0],
    [0x163, 63 | (15 << 22), 4095, 0],
];

/// CPUID as the guest sees it in state `s`: [`cpuid`] plus the bits that follow control
/// registers (OSXSAVE = CR4.OSXSAVE).
pub fn cpuid_for(s: &crate::state::ArchState, leaf: u32, subleaf: u32) -> [u32; 4] {
    let mut r = cpuid(leaf, subleaf);
    // Topology: every CPU of the machine is a core of one package (one thread per core), so
    // the kernel finds its siblings (and e.g. takes the BSP's delay-loop calibration for the
    // APs instead of calibrating each one against the timer).
    let n = u32::from(s.package_cpus.max(1));
    let ids = n.next_power_of_two();
    match leaf {
        1 => {
            r[1] = (r[1] & !0xFF_0000) | (ids.min(255) << 16) | (u32::from(s.apic_id) << 24);
            if n > 1 {
                r[3] |= HTT;
            }
        }
        4 if r[0] & 0x1F != 0 => {
            // Cores per package, and threads sharing the cache: one core for L1/L2, all for L3.
            let shared = if (r[0] >> 5) & 7 == 3 { ids - 1 } else { 0 };
            r[0] |= ((ids - 1) << 26) | (shared << 14);
        }
        0xB => {
            let x2apic = u32::from(s.apic_id);
            r = match subleaf {
                // SMT level: one thread per core.
                0 => [0, 1, 1 << 8, x2apic],
                // Core level: shift to the package ID, cores in the package.
                1 => [ids.trailing_zeros(), n, 1 | (2 << 8), x2apic],
                _ => [0, 0, subleaf & 0xFF, x2apic],
            };
        }
        _ => {}
    }
    if leaf == 1 && s.cr4 & crate::state::cr4::OSXSAVE != 0 {
        r[2] |= OSXSAVE;
    }
    if leaf == 0xD && subleaf == 0 && s.xcr0 & 4 == 0 {
        r[1] = XSAVE_AVX_OFFSET;
    }
    r
}

/// XCR0 bits this CPU supports: x87, SSE and AVX (YMM upper halves).
pub const XCR0_SUPPORTED: u64 = 0b111;
/// Offset of the AVX component (YMM0-15 bits 255:128) in the standard XSAVE format.
pub const XSAVE_AVX_OFFSET: u32 = 576;
/// Size of the AVX component.
pub const XSAVE_AVX_SIZE: u32 = 256;
/// Size of the standard-format XSAVE area for the supported components (legacy region,
/// header and AVX component).
pub const XSAVE_SIZE: u32 = XSAVE_AVX_OFFSET + XSAVE_AVX_SIZE;

/// Frequency of the TSC and of the local APIC timer's bus clock: both count host nanoseconds.
pub const TSC_HZ: u32 = 1_000_000_000;
const TSC_MHZ: u32 = TSC_HZ / 1_000_000;
const MAX_LEAF: u32 = 0x16;

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
        // CLFLUSH line 64 bytes, 1 logical CPU per package, APIC ID 0 (`cpuid_for` puts
        // the machine's topology and the CPU's own ID).
        1 => [SIGNATURE, (8 << 8) | (1 << 16), leaf1_ecx(), LEAF1_EDX],
        // One round; descriptor 0xFF: "use leaf 4".
        2 => [0x0000_FF01, 0, 0, 0],
        4 => CACHES.get(subleaf as usize).copied().unwrap_or([0; 4]),
        // Thermal/power leaf: EAX bit 2 = ARAT, the LAPIC timer keeps running while the CPU
        // halts (it is host time). Without it Linux flags the LAPIC timer C3STOP, finds no
        // broadcast device and stays in periodic ticks: no high-resolution timers, no NOHZ.
        6 => [1 << 2, 0, 0, 0],
        7 if subleaf == 0 => [0, LEAF7_EBX, LEAF7_ECX, LEAF7_EDX],
        // XSAVE: x87, SSE and AVX components, standard format only (no XSAVEOPT/C/S). EBX
        // (the size for the components enabled in XCR0) follows XCR0 in [`cpuid_for`].
        0xD if subleaf == 0 => [XCR0_SUPPORTED as u32, XSAVE_SIZE, XSAVE_SIZE, 0],
        0xD if subleaf == 2 => [XSAVE_AVX_SIZE, XSAVE_AVX_OFFSET, 0, 0],
        // TSC = crystal * EBX / EAX: the TSC and the local APIC timer both count host
        // nanoseconds (1 GHz), so the guest needs no calibration against the PIT.
        0x15 => [1, 1, TSC_HZ, 0],
        // Base, maximum and bus frequencies in MHz.
        0x16 => [TSC_MHZ, TSC_MHZ, TSC_MHZ, 0],
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
    fn topology_is_one_package_of_single_thread_cores() {
        let mut s = crate::state::ArchState {
            apic_id: 2,
            package_cpus: 3,
            ..Default::default()
        };
        let l1 = cpuid_for(&s, 1, 0);
        assert_eq!((l1[1] >> 16) & 0xFF, 4, "addressable IDs: 3 rounded up");
        assert_eq!(l1[1] >> 24, 2, "APIC ID");
        assert_ne!(l1[3] & HTT, 0);
        assert_eq!(
            cpuid_for(&s, 0xB, 0),
            [0, 1, 0x100, 2],
            "SMT level: 1 thread"
        );
        assert_eq!(
            cpuid_for(&s, 0xB, 1),
            [2, 3, 0x201, 2],
            "core level: 3 cores"
        );
        assert_eq!(cpuid_for(&s, 0xB, 2)[2] >> 8, 0, "no more levels");
        assert_eq!(cpuid_for(&s, 4, 0)[0] >> 26, 3, "cores per package - 1");
        assert_eq!(
            (cpuid_for(&s, 4, 3)[0] >> 14) & 0xFFF,
            3,
            "L3 shared by all"
        );
        s.package_cpus = 1;
        let l1 = cpuid_for(&s, 1, 0);
        assert_eq!(
            ((l1[1] >> 16) & 0xFF, l1[3] & HTT),
            (1, 0),
            "one CPU: no HTT"
        );
    }

    #[test]
    fn vendor_and_features() {
        let r = cpuid(0, 0);
        let mut v = Vec::new();
        for x in [r[1], r[3], r[2]] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(&v[..], &VENDOR[..]);
        assert_ne!(cpuid(0x8000_0001, 0)[3] & (1 << 29), 0, "long mode");
        assert_ne!(cpuid(1, 0)[3] & (1 << 23), 0, "MMX (x86-64 baseline)");
        assert_eq!(cpuid(1, 0)[0] >> 8 & 0xF, 6, "family 6");
        assert_eq!(cpuid(7, 1), [0; 4], "no leaf-7 subleaf-1 features");
        assert_ne!(cpuid(7, 0)[3] & (1 << 29), 0, "IA32_ARCH_CAPABILITIES");
        assert_ne!(ARCH_CAPABILITIES & 1, 0, "RDCL_NO: no page-table isolation");
        let l2 = cpuid(4, 2);
        let size = ((l2[1] >> 22) + 1) * (((l2[1] >> 12) & 0x3FF) + 1) * ((l2[1] & 0xFFF) + 1);
        assert_eq!(size * (l2[2] + 1), 1 << 20, "L2 size from leaf 4");
        assert_eq!(
            cpuid(4, 4)[0] & 0x1F,
            0,
            "leaf 4 ends with a null cache type"
        );
        let t = cpuid(0x15, 0);
        assert_eq!(
            u64::from(t[2]) * u64::from(t[1]) / u64::from(t[0]),
            1_000_000_000
        );
        assert!(cpuid(0, 0)[0] >= 0x16, "leaves 0x15/0x16 are reachable");
        assert_eq!(
            cpuid(0xD, 0),
            [7, 832, 832, 0],
            "XSAVE: x87 + SSE + AVX, standard format"
        );
        assert_eq!(cpuid(0xD, 2), [256, 576, 0, 0], "AVX component");
        let mut s = crate::state::ArchState::default();
        assert_eq!(cpuid_for(&s, 1, 0)[2] & OSXSAVE, 0);
        s.cr4 |= crate::state::cr4::OSXSAVE;
        assert_ne!(cpuid_for(&s, 1, 0)[2] & OSXSAVE, 0, "OSXSAVE follows CR4");
        assert_eq!(
            cpuid_for(&s, 0xD, 0)[1],
            576,
            "XSAVE size for XCR0 = x87|SSE"
        );
        s.xcr0 = 7;
        assert_eq!(
            cpuid_for(&s, 0xD, 0)[1],
            832,
            "XSAVE size for XCR0 = x87|SSE|AVX"
        );
    }
}
