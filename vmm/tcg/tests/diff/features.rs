//! CPUID advertises exactly what is implemented: every feature bit the software CPU sets
//! must have a probe here, and every user-mode probe runs one instruction of its class
//! through the differential harness (the host must have the feature too).

use super::harness::{check, random_state, Case, End, Harness, Rng, DATA};
use super::mmx::{load_mm_from_r8_r15, store_mm_and_emms};
use rqemu_tcg::cpuid::cpuid;
use rqemu_tcg::flags::{ARITH, CF, ZF};

/// How a feature bit is verified.
enum Probe {
    /// Instruction bytes (RBX = 16-aligned pointer into the data buffer) and compared flags.
    Code(fn() -> Vec<u8>, u64),
    /// Not observable from user mode: covered by the guest boot tests.
    System(&'static str),
}

/// (leaf, subleaf, register index EAX=0..EDX=3, bit, name, probe).
type Entry = (u32, u32, usize, u32, &'static str, Probe);

fn v(b: &[u8]) -> Vec<u8> {
    b.to_vec()
}

fn table() -> Vec<Entry> {
    use Probe::{Code, System};
    const EBX: usize = 1;
    const ECX: usize = 2;
    const EDX: usize = 3;
    const E1: u32 = 0x8000_0001;
    vec![
        // fninit; fnstcw [rbx]
        (
            1,
            0,
            EDX,
            0,
            "fpu",
            Code(|| v(&[0xDB, 0xE3, 0xD9, 0x3B]), 0),
        ),
        (1, 0, EDX, 3, "pse", System("page tables")),
        // rdtsc; xor eax, eax; xor edx, edx (virtual time: only that it executes)
        (
            1,
            0,
            EDX,
            4,
            "tsc",
            Code(|| v(&[0x0F, 0x31, 0x31, 0xC0, 0x31, 0xD2]), 0),
        ),
        (1, 0, EDX, 5, "msr", System("RDMSR/WRMSR are privileged")),
        (1, 0, EDX, 6, "pae", System("page tables")),
        // cmpxchg8b [rbx]
        (1, 0, EDX, 8, "cx8", Code(|| v(&[0x0F, 0xC7, 0x0B]), ARITH)),
        (1, 0, EDX, 9, "apic", System("local APIC")),
        (1, 0, EDX, 13, "pge", System("page tables")),
        // cmovz rax, rcx
        (
            1,
            0,
            EDX,
            15,
            "cmov",
            Code(|| v(&[0x48, 0x0F, 0x44, 0xC1]), ARITH),
        ),
        (1, 0, EDX, 16, "pat", System("MSR")),
        // clflush [rbx]
        (
            1,
            0,
            EDX,
            19,
            "clflush",
            Code(|| v(&[0x0F, 0xAE, 0x3B]), ARITH),
        ),
        (1, 0, EDX, 23, "mmx", Code(mmx_probe, ARITH)),
        (1, 0, EDX, 24, "fxsr", Code(fxsave_probe, 0)),
        // addps xmm0, xmm1
        (1, 0, EDX, 25, "sse", Code(|| v(&[0x0F, 0x58, 0xC1]), ARITH)),
        // paddq xmm0, xmm1
        (
            1,
            0,
            EDX,
            26,
            "sse2",
            Code(|| v(&[0x66, 0x0F, 0xD4, 0xC1]), ARITH),
        ),
        // haddps xmm0, xmm1; fninit; fisttp: see sse3.rs
        (
            1,
            0,
            ECX,
            0,
            "sse3",
            Code(|| v(&[0xF2, 0x0F, 0x7C, 0xC1]), ARITH),
        ),
        // pshufb xmm0, xmm1
        (
            1,
            0,
            ECX,
            9,
            "ssse3",
            Code(|| v(&[0x66, 0x0F, 0x38, 0x00, 0xC1]), ARITH),
        ),
        // ptest xmm0, xmm1
        (
            1,
            0,
            ECX,
            19,
            "sse4_1",
            Code(|| v(&[0x66, 0x0F, 0x38, 0x17, 0xC1]), ARITH),
        ),
        // pcmpistri xmm0, xmm1, 0x0c; crc32 eax, ecx
        (
            1,
            0,
            ECX,
            20,
            "sse4_2",
            Code(
                || {
                    v(&[
                        0x66, 0x0F, 0x3A, 0x63, 0xC1, 0x0C, 0xF2, 0x0F, 0x38, 0xF1, 0xC1,
                    ])
                },
                ARITH,
            ),
        ),
        // cmpxchg16b [rbx]
        (
            1,
            0,
            ECX,
            13,
            "cx16",
            Code(|| v(&[0x48, 0x0F, 0xC7, 0x0B]), ARITH),
        ),
        // movbe rax, [rbx]; movbe [rbx+8], ecx
        (
            1,
            0,
            ECX,
            22,
            "movbe",
            Code(
                || v(&[0x48, 0x0F, 0x38, 0xF0, 0x03, 0x0F, 0x38, 0xF1, 0x4B, 0x08]),
                ARITH,
            ),
        ),
        // popcnt rax, rcx
        (
            1,
            0,
            ECX,
            23,
            "popcnt",
            Code(|| v(&[0xF3, 0x48, 0x0F, 0xB8, 0xC1]), ARITH),
        ),
        // xor ecx, ecx; xgetbv; and eax, 3; xor edx, edx (XSAVE/XRSTOR: see xsave.rs)
        (
            1,
            0,
            ECX,
            26,
            "xsave",
            Code(
                || v(&[0x31, 0xC9, 0x0F, 0x01, 0xD0, 0x83, 0xE0, 0x03, 0x31, 0xD2]),
                0,
            ),
        ),
        // rdrand rax; mov eax, 0 (random: only CF=1 and the other flags clear are compared)
        (
            1,
            0,
            ECX,
            30,
            "rdrand",
            Code(|| v(&[0x48, 0x0F, 0xC7, 0xF0, 0xB8, 0, 0, 0, 0]), ARITH),
        ),
        (1, 0, ECX, 31, "hypervisor", System("no instruction")),
        // andn rax, rcx, rdx; tzcnt rax, rcx
        (
            7,
            0,
            EBX,
            3,
            "bmi1",
            Code(
                || v(&[0xC4, 0xE2, 0xF0, 0xF2, 0xC2, 0xF3, 0x48, 0x0F, 0xBC, 0xC1]),
                CF | ZF,
            ),
        ),
        // pdep rax, rcx, rdx
        (
            7,
            0,
            EBX,
            8,
            "bmi2",
            Code(|| v(&[0xC4, 0xE2, 0xF3, 0xF5, 0xC2]), ARITH),
        ),
        (7, 0, EBX, 1, "tsc_adjust", System("an MSR")),
        (7, 0, EDX, 29, "arch_capabilities", System("an MSR")),
        // rep movsb from [rbx] to [rbx+0x100]
        (7, 0, EBX, 9, "erms", Code(rep_movsb_probe, ARITH)),
        // rdseed rax; mov eax, 0
        (
            7,
            0,
            EBX,
            18,
            "rdseed",
            Code(|| v(&[0x48, 0x0F, 0xC7, 0xF8, 0xB8, 0, 0, 0, 0]), ARITH),
        ),
        // clflushopt [rbx]
        (
            7,
            0,
            EBX,
            23,
            "clflushopt",
            Code(|| v(&[0x66, 0x0F, 0xAE, 0x3B]), ARITH),
        ),
        // clwb [rbx]
        (
            7,
            0,
            EBX,
            24,
            "clwb",
            Code(|| v(&[0x66, 0x0F, 0xAE, 0x33]), ARITH),
        ),
        // rdpid rax; xor eax, eax (the host's TSC_AUX is its CPU number)
        (
            7,
            0,
            ECX,
            22,
            "rdpid",
            Code(|| v(&[0xF3, 0x0F, 0xC7, 0xF8, 0x31, 0xC0]), 0),
        ),
        // lahf
        (E1, 0, ECX, 0, "lahf_lm", Code(|| v(&[0x9F]), ARITH)),
        // lzcnt rax, rcx
        (
            E1,
            0,
            ECX,
            5,
            "abm",
            Code(|| v(&[0xF3, 0x48, 0x0F, 0xBD, 0xC1]), CF | ZF),
        ),
        // prefetchw [rbx]
        (
            E1,
            0,
            ECX,
            8,
            "3dnowprefetch",
            Code(|| v(&[0x0F, 0x0D, 0x0B]), ARITH),
        ),
        (E1, 0, EDX, 11, "syscall", System("SYSCALL needs a kernel")),
        (E1, 0, EDX, 20, "nx", System("page tables")),
        (E1, 0, EDX, 26, "pdpe1gb", System("page tables")),
        // rdtscp; xor eax, eax; xor edx, edx; xor ecx, ecx
        (
            E1,
            0,
            EDX,
            27,
            "rdtscp",
            Code(
                || v(&[0x0F, 0x01, 0xF9, 0x31, 0xC0, 0x31, 0xD2, 0x31, 0xC9]),
                0,
            ),
        ),
        (E1, 0, EDX, 29, "lm", System("long mode")),
        // vaddps ymm0, ymm1, ymm2; vpermilps ymm3, ymm4, 0x1b
        (
            1,
            0,
            ECX,
            28,
            "avx",
            Code(
                || v(&[0xC5, 0xF4, 0x58, 0xC2, 0xC4, 0xE3, 0x7D, 0x04, 0xDC, 0x1B]),
                0,
            ),
        ),
        // vfmadd231ps ymm0, ymm1, ymm2; vfnmsub213sd xmm3, xmm4, [rbx]
        (
            1,
            0,
            ECX,
            12,
            "fma",
            Code(
                || v(&[0xC4, 0xE2, 0x75, 0xB8, 0xC2, 0xC4, 0xE2, 0xD9, 0xAF, 0x1B]),
                0,
            ),
        ),
        // vcvtph2ps ymm0, xmm1; vcvtps2ph [rbx], ymm2, 0
        (
            1,
            0,
            ECX,
            29,
            "f16c",
            Code(
                || {
                    v(&[
                        0xC4, 0xE2, 0x7D, 0x13, 0xC1, 0xC4, 0xE3, 0x7D, 0x1D, 0x13, 0x00,
                    ])
                },
                0,
            ),
        ),
        // vpaddd ymm0, ymm1, ymm2; vpermd ymm3, ymm4, ymm5; vpcmpeqd ymm6, ymm6, ymm6;
        // vpgatherdd ymm7, [rbx + ymm8*1], ymm6 (ymm8 = 0: all elements read [rbx])
        (
            7,
            0,
            EBX,
            5,
            "avx2",
            Code(
                || {
                    let mut c = vec![0xC5, 0xF5, 0xFE, 0xC2, 0xC4, 0xE2, 0x5D, 0x36, 0xDD];
                    c.extend([0xC5, 0xCD, 0x76, 0xF6, 0xC4, 0x41, 0x3D, 0xEF, 0xC0]);
                    c.extend([0xC4, 0xA2, 0x4D, 0x90, 0x3C, 0x03]);
                    c
                },
                0,
            ),
        ),
        (0x8000_0007, 0, EDX, 8, "invariant tsc", System("timing")),
    ]
}

fn mmx_probe() -> Vec<u8> {
    let mut c = load_mm_from_r8_r15();
    // paddb mm1, mm2; pmaddwd mm3, [rbx]
    c.extend([0x0F, 0xFC, 0xCA, 0x0F, 0xF5, 0x1B]);
    c.extend(store_mm_and_emms());
    c
}

fn fxsave_probe() -> Vec<u8> {
    let mut c = vec![0x0F, 0xAE, 0x83, 0x00, 0x01, 0x00, 0x00]; // fxsave [rbx+0x100]
                                                                // mov r8d, [rbx+0x118] (MXCSR); mov r9, [rbx+0x1A0] (XMM0 low)
    c.extend([0x44, 0x8B, 0x83, 0x18, 0x01, 0x00, 0x00]);
    c.extend([0x4C, 0x8B, 0x8B, 0xA0, 0x01, 0x00, 0x00]);
    // lea rdi, [rbx+0x100]; mov ecx, 64; xor eax, eax; rep stosq
    c.extend([0x48, 0x8D, 0xBB, 0x00, 0x01, 0x00, 0x00]);
    c.extend([0xB9, 0x40, 0x00, 0x00, 0x00, 0x31, 0xC0, 0xF3, 0x48, 0xAB]);
    c
}

fn rep_movsb_probe() -> Vec<u8> {
    // mov rsi, rbx; lea rdi, [rbx+0x100]; mov ecx, 200; rep movsb
    let mut c = vec![0x48, 0x89, 0xDE, 0x48, 0x8D, 0xBB, 0x00, 0x01, 0x00, 0x00];
    c.extend([0xB9, 0xC8, 0x00, 0x00, 0x00, 0xF3, 0xA4]);
    c
}

const LEAVES: [(u32, u32); 5] = [(1, 0), (7, 0), (7, 1), (0x8000_0001, 0), (0x8000_0007, 0)];

#[test]
fn every_advertised_feature_has_a_passing_probe() {
    let table = table();
    let mut missing = Vec::new();
    for (leaf, sub) in LEAVES {
        let regs = cpuid(leaf, sub);
        // Leaf 1 EBX/EAX and leaf 7 EAX are not feature bits.
        for reg in if leaf == 1 { 2..4 } else { 1..4 } {
            for bit in 0..32 {
                if regs[reg] & (1 << bit) == 0 {
                    continue;
                }
                if !table
                    .iter()
                    .any(|e| (e.0, e.1, e.2, e.3) == (leaf, sub, reg, bit))
                {
                    missing.push(format!("leaf {leaf:#x}.{sub} reg {reg} bit {bit}"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "advertised without a probe: {missing:?}"
    );

    let mut h = Harness::new();
    let mut r = Rng(0xFEA7);
    let mut ran = 0;
    for (leaf, sub, reg, bit, name, probe) in &table {
        let advertised = cpuid(*leaf, *sub)[*reg] & (1 << bit) != 0;
        let host_dependent =
            (*leaf, *reg) == (1, 2) && rqemu_tcg::cpuid::LEAF1_ECX_HOST & (1 << bit) != 0;
        if host_dependent && !advertised {
            eprintln!("features: {name}: not advertised (the host lacks it: runs on its unit)");
            continue;
        }
        assert!(
            advertised,
            "{name}: probe for a feature that is not advertised"
        );
        let (code, flag_mask) = match probe {
            Probe::Code(code, flag_mask) => (code, flag_mask),
            Probe::System(why) => {
                eprintln!("features: {name}: not a user-mode instruction ({why})");
                continue;
            }
        };
        let host = std::arch::x86_64::__cpuid_count(*leaf, *sub);
        let host_reg = [host.eax, host.ebx, host.ecx, host.edx][*reg];
        assert!(
            host_reg & (1 << bit) != 0,
            "{name}: the host CPU lacks the feature, the probe cannot run"
        );
        let mut st = random_state(&mut r);
        st.gpr[3] = DATA + 0x1000;
        let c = Case {
            code: code(),
            st,
            flag_mask: *flag_mask,
            xmm: true,
            data_seed: 0x42,
            expect: None,
        };
        if let Err(e) = check(&mut h, &c) {
            panic!("{name}: {e}");
        }
        ran += 1;
    }
    eprintln!("features: {ran} advertised features executed and match the host");
}

/// IA32_TSC_ADJUST (advertised in leaf 7): writing it moves the TSC by the difference, and
/// a TSC write moves it by the TSC's change (CPL 0 in the TCG only: the host test runs in
/// user mode). Bounds are generous (2^40 ns) and only guard against wild values.
#[test]
fn tsc_adjust_msr() {
    use super::harness::TcgOutcome;
    let mut h = Harness::new();
    let mut code = Vec::new();
    let tsc_to = |reg: u8| {
        vec![
            0x48,
            0xC1,
            0xE2,
            0x20,
            0x48,
            0x09,
            0xD0,
            0x49,
            0x89,
            0xC0 | reg,
        ]
    };
    // TSC_ADJUST := 2^32; r8 := TSC
    code.extend([
        0xB9, 0x3B, 0, 0, 0, 0x31, 0xC0, 0xBA, 1, 0, 0, 0, 0x0F, 0x30, 0x0F, 0x31,
    ]);
    code.extend(tsc_to(0));
    // TSC := 0; r9 := TSC_ADJUST; r10 := TSC
    code.extend([0xB9, 0x10, 0, 0, 0, 0x31, 0xC0, 0x31, 0xD2, 0x0F, 0x30]);
    code.extend([0xB9, 0x3B, 0, 0, 0, 0x0F, 0x32]);
    code.extend(tsc_to(1));
    code.extend([0x0F, 0x31]);
    code.extend(tsc_to(2));
    let st = random_state(&mut Rng(3));
    let s = match h.run_tcg(&code, &st) {
        TcgOutcome::Ran(s, End::Done, _) => s,
        other => panic!("TSC_ADJUST sequence: {other:?}"),
    };
    let (tsc1, adj, tsc2) = (s.gpr[8], s.gpr[9] as i64, s.gpr[10]);
    assert!(
        tsc1 >= 1 << 32,
        "TSC_ADJUST did not move the TSC: {tsc1:#x}"
    );
    // adj = 2^32 + (0 - TSC just before the write) = 2^32 - tsc1 - (a little).
    let expect = (1i64 << 32) - tsc1 as i64;
    assert!(
        adj <= expect && adj > expect - (1 << 40),
        "TSC_ADJUST {adj:#x}, expected about {expect:#x}"
    );
    assert!(tsc2 < 1 << 40, "TSC after writing 0: {tsc2:#x}");
}

/// IA32_ARCH_CAPABILITIES (advertised in leaf 7 EDX): RDMSR 0x10A gives the "not affected"
/// bits (RDCL_NO among them: no page-table isolation in Linux), WRMSR is #GP (read-only).
/// CPL 0 in the TCG only.
#[test]
fn arch_capabilities_msr() {
    use super::harness::{End, TcgOutcome};
    let mut h = Harness::new();
    let st = random_state(&mut Rng(4));
    // mov ecx, 0x10A; rdmsr
    match h.run_tcg(&[0xB9, 0x0A, 0x01, 0, 0, 0x0F, 0x32], &st) {
        TcgOutcome::Ran(s, End::Done, _) => {
            let v = (s.gpr[2] << 32) | (s.gpr[0] & 0xFFFF_FFFF);
            assert_eq!(v, rqemu_tcg::cpuid::ARCH_CAPABILITIES);
            assert_ne!(v & 1, 0, "RDCL_NO");
        }
        other => panic!("RDMSR 0x10A: {other:?}"),
    }
    // mov ecx, 0x10A; xor eax, eax; xor edx, edx; wrmsr
    let w = [0xB9, 0x0A, 0x01, 0, 0, 0x31, 0xC0, 0x31, 0xD2, 0x0F, 0x30];
    match h.run_tcg(&w, &st) {
        TcgOutcome::Ran(_, End::Fault { vector: 13, .. }, _) => {}
        other => panic!("WRMSR 0x10A must be #GP: {other:?}"),
    }
}
