//! AVX differential cases: VEX forms of the SSE-SSE4.2 instructions (128 and 256 bits), the
//! AVX-only data movement and operations, VZEROUPPER/VZEROALL, XSAVE of the AVX component.

use super::avx_table::{run, AL, FL, GREG, GRM, I, IS4, L0, L1, MEM, N, NONAN, REG, V, W1};
use super::harness::{check, host_avx, random_state, Case, Harness, Rng, DATA};

/// VEX forms whose legacy (SSE) handlers on this branch lack the packed conversions
/// (CVTPS2PD, CVTDQ2PS, CVT(T)PD2DQ, ...) or the MXCSR flags of SSE3/SSE4.1 float operations
/// (HADD/HSUB/ADDSUB, ROUND, DPPS/DPPD); the bridge runs them through those handlers.
fn legacy_gaps(t: &[V]) -> (Vec<V>, Vec<V>) {
    let gap = |v: &V| match (v.1, v.0, v.2) {
        (1, _, 0x5A) => v.0 < 2,
        (1, _, 0x5B | 0xE6 | 0x7C | 0x7D | 0xD0) => true,
        (3, 1, 0x08..=0x0B | 0x40 | 0x41) => true,
        _ => false,
    };
    (
        t.iter().filter(|v| !gap(v)).copied().collect(),
        t.iter().filter(|v| gap(v)).copied().collect(),
    )
}

/// Whether the host can serve as the reference (reports why not).
pub fn have(feature: &str, ok: bool) -> bool {
    if !ok {
        eprintln!("SKIPPED: the host CPU lacks {feature}: no reference to compare against");
    }
    ok
}

/// VEX forms of SSE/SSE2/SSE3 instructions in map 0F.
fn map0f() -> Vec<V> {
    let mut t = Vec::new();
    for pp in [0u8, 1] {
        // Packed float: unpck, logic, arithmetic, min/max, shuffles, compares.
        for op in [
            0x14u8, 0x15, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5C, 0x5D, 0x5E, 0x5F,
        ] {
            t.push(V(pp, 1, op, N, None));
        }
        t.push(V(pp, 1, 0x51, 0, None)); // vsqrtp*
        t.push(V(pp, 1, 0x5A, 0, None)); // vcvtps2pd / vcvtpd2ps
        t.push(V(pp, 1, 0x5B, 0, None)); // vcvtdq2ps / vcvtps2dq
        t.push(V(pp, 1, 0xC2, N | I, None)); // vcmpp*
        t.push(V(pp, 1, 0xC6, N | I, None)); // vshufp*
        t.push(V(pp, 1, 0x50, GREG | REG, None)); // vmovmskp*
        t.push(V(pp, 1, 0x10, 0, None)); // vmovup*
        t.push(V(pp, 1, 0x11, 0, None));
        t.push(V(pp, 1, 0x28, AL, None)); // vmovap*
        t.push(V(pp, 1, 0x29, AL, None));
        t.push(V(pp, 1, 0x2B, AL | MEM, None)); // vmovntp*
        t.push(V(pp, 1, 0x12, N | L0 | MEM, None)); // vmovlp*
        t.push(V(pp, 1, 0x13, L0 | MEM, None));
        t.push(V(pp, 1, 0x16, N | L0 | MEM, None)); // vmovhp*
        t.push(V(pp, 1, 0x17, L0 | MEM, None));
        t.push(V(pp, 1, 0x2E, L0 | FL, None)); // vucomis*
        t.push(V(pp, 1, 0x2F, L0 | FL, None)); // vcomis*
    }
    t.push(V(0, 1, 0x12, N | L0 | REG, None)); // vmovhlps
    t.push(V(0, 1, 0x16, N | L0 | REG, None)); // vmovlhps
                                               // Integer (66): unpack/pack/compare/arithmetic/logic.
    for op in (0x60u8..=0x6D)
        .chain(0x74..=0x76)
        .chain(0xD1..=0xD5)
        .chain(0xD8..=0xDF)
    {
        t.push(V(1, 1, op, N, None));
    }
    for op in (0xE0u8..=0xE5)
        .chain(0xE8..=0xEF)
        .chain(0xF1..=0xF6)
        .chain(0xF8..=0xFE)
    {
        t.push(V(1, 1, op, N, None));
    }
    t.push(V(1, 1, 0x7C, N, None)); // vhaddpd
    t.push(V(1, 1, 0x7D, N, None));
    t.push(V(1, 1, 0xD0, N, None)); // vaddsubpd
    t.push(V(3, 1, 0x7C, N, None)); // vhaddps
    t.push(V(3, 1, 0x7D, N, None));
    t.push(V(3, 1, 0xD0, N, None));
    t.push(V(1, 1, 0x6F, AL, None)); // vmovdqa
    t.push(V(1, 1, 0x7F, AL, None));
    t.push(V(2, 1, 0x6F, 0, None)); // vmovdqu
    t.push(V(2, 1, 0x7F, 0, None));
    t.push(V(1, 1, 0xE7, AL | MEM, None)); // vmovntdq
    t.push(V(3, 1, 0xF0, MEM, None)); // vlddqu
    t.push(V(1, 1, 0x70, I, None)); // vpshufd
    t.push(V(2, 1, 0x70, I, None)); // vpshufhw
    t.push(V(3, 1, 0x70, I, None)); // vpshuflw
    for (op, e) in [
        (0x71u8, 2u8),
        (0x71, 4),
        (0x71, 6),
        (0x72, 2),
        (0x72, 4),
        (0x72, 6),
    ] {
        t.push(V(1, 1, op, I | REG, Some(e)));
    }
    for e in [2u8, 3, 6, 7] {
        t.push(V(1, 1, 0x73, I | REG, Some(e)));
    }
    t.push(V(1, 1, 0xD7, GREG | REG, None)); // vpmovmskb
    t.push(V(1, 1, 0xE6, 0, None)); // vcvttpd2dq
    t.push(V(2, 1, 0xE6, 0, None)); // vcvtdq2pd
    t.push(V(3, 1, 0xE6, 0, None)); // vcvtpd2dq
    t.push(V(2, 1, 0x5B, 0, None)); // vcvttps2dq
    t.push(V(2, 1, 0x12, 0, None)); // vmovsldup
    t.push(V(2, 1, 0x16, 0, None)); // vmovshdup
    t.push(V(3, 1, 0x12, 0, None)); // vmovddup
    t.push(V(1, 1, 0xC4, N | I | L0 | GRM, None)); // vpinsrw
    t.push(V(1, 1, 0xC5, I | L0 | GREG | REG, None)); // vpextrw
    t.push(V(1, 1, 0x6E, L0 | GRM, None)); // vmovd xmm, r/m32
    t.push(V(1, 1, 0x6E, L0 | GRM | W1, None)); // vmovq xmm, r/m64
    t.push(V(1, 1, 0x7E, L0 | GRM, None)); // vmovd r/m32, xmm
    t.push(V(1, 1, 0x7E, L0 | GRM | W1, None));
    t.push(V(2, 1, 0x7E, L0, None)); // vmovq xmm, xmm/m64
    t.push(V(1, 1, 0xD6, L0, None)); // vmovq xmm/m64, xmm
                                     // Scalars (F3: ss, F2: sd).
    for pp in [2u8, 3] {
        for op in [0x51u8, 0x58, 0x59, 0x5A, 0x5C, 0x5D, 0x5E, 0x5F] {
            t.push(V(pp, 1, op, N | L0, None));
        }
        t.push(V(pp, 1, 0xC2, N | I | L0, None));
        t.push(V(pp, 1, 0x10, N | L0 | REG, None)); // vmovs* xmm, xmm, xmm
        t.push(V(pp, 1, 0x10, L0 | MEM, None)); // vmovs* xmm, m
        t.push(V(pp, 1, 0x11, L0 | MEM, None)); // vmovs* m, xmm
        t.push(V(pp, 1, 0x2A, N | L0 | GRM, None)); // vcvtsi2s*
        t.push(V(pp, 1, 0x2A, N | L0 | GRM | W1, None));
        t.push(V(pp, 1, 0x2C, L0 | GREG, None)); // vcvtts*2si
        t.push(V(pp, 1, 0x2D, L0 | GREG | W1, None));
    }
    t
}

/// VEX forms of SSSE3/SSE4.1/SSE4.2 and the AVX additions in maps 0F38/0F3A.
fn map38_3a() -> Vec<V> {
    let mut t = Vec::new();
    for op in (0x00u8..=0x0B)
        .chain([0x28, 0x29, 0x2B, 0x37])
        .chain(0x38..=0x40)
    {
        t.push(V(1, 2, op, N, None));
    }
    for op in [0x1Cu8, 0x1D, 0x1E] {
        t.push(V(1, 2, op, 0, None)); // vpabs*
    }
    for op in (0x20u8..=0x25).chain(0x30..=0x35) {
        t.push(V(1, 2, op, 0, None)); // vpmovsx/zx
    }
    t.push(V(1, 2, 0x41, L0, None)); // vphminposuw
    t.push(V(1, 2, 0x17, FL, None)); // vptest
    t.push(V(1, 2, 0x0E, FL, None)); // vtestps
    t.push(V(1, 2, 0x0F, FL, None)); // vtestpd
    t.push(V(1, 2, 0x0C, N, None)); // vpermilps var
    t.push(V(1, 2, 0x0D, N, None)); // vpermilpd var
    t.push(V(1, 2, 0x18, MEM, None)); // vbroadcastss m32
    t.push(V(1, 2, 0x19, MEM | L1, None)); // vbroadcastsd m64
    t.push(V(1, 2, 0x1A, MEM | L1, None)); // vbroadcastf128
    t.push(V(1, 2, 0x2A, MEM | AL, None)); // vmovntdqa
    for op in [0x2Cu8, 0x2D, 0x2E, 0x2F] {
        t.push(V(1, 2, op, N | MEM, None)); // vmaskmovp*
    }
    for op in [0x08u8, 0x09] {
        t.push(V(1, 3, op, I, None)); // vroundp*
    }
    for op in [0x0Au8, 0x0B] {
        t.push(V(1, 3, op, N | I | L0, None)); // vrounds*
    }
    for op in [0x0Cu8, 0x0D, 0x0E, 0x0F, 0x42] {
        t.push(V(1, 3, op, N | I, None)); // blends, palignr, mpsadbw
    }
    t.push(V(1, 3, 0x40, N | I | NONAN, None)); // vdpps
    t.push(V(1, 3, 0x41, N | I | L0 | NONAN, None)); // vdppd
    t.push(V(1, 3, 0x21, N | I | L0, None)); // vinsertps
    t.push(V(1, 3, 0x04, I, None)); // vpermilps imm
    t.push(V(1, 3, 0x05, I, None)); // vpermilpd imm
    t.push(V(1, 3, 0x06, N | I | L1, None)); // vperm2f128
    t.push(V(1, 3, 0x18, N | I | L1, None)); // vinsertf128
    t.push(V(1, 3, 0x19, I | L1, None)); // vextractf128
    for op in [0x4Au8, 0x4B, 0x4C] {
        t.push(V(1, 3, op, N | IS4, None)); // vblendv*
    }
    for op in [0x14u8, 0x15, 0x16, 0x17] {
        t.push(V(1, 3, op, I | L0 | GRM, None)); // vpextr*, vextractps
    }
    t.push(V(1, 3, 0x16, I | L0 | GRM | W1, None)); // vpextrq
    t.push(V(1, 3, 0x20, N | I | L0 | GRM, None)); // vpinsrb
    t.push(V(1, 3, 0x22, N | I | L0 | GRM, None)); // vpinsrd
    t.push(V(1, 3, 0x22, N | I | L0 | GRM | W1, None)); // vpinsrq
    for op in [0x60u8, 0x61, 0x62, 0x63] {
        t.push(V(1, 3, op, I | L0 | FL, None)); // vpcmp[ei]str[im]
    }
    t
}

#[test]
fn avx_sse_forms() {
    if !have("AVX", host_avx()) {
        return;
    }
    let seed = super::seed::for_test("avx_sse_forms");
    run("avx 0F", &legacy_gaps(&map0f()).0, 20000, seed);
}

#[test]
fn avx_0f38_0f3a() {
    if !have("AVX", host_avx()) {
        return;
    }
    let seed = super::seed::for_test("avx_0f38_0f3a");
    run("avx 0F38/0F3A", &legacy_gaps(&map38_3a()).0, 15000, seed);
}

#[test]
fn avx_forms_of_legacy_gaps() {
    let seed = super::seed::for_test("avx_forms_of_legacy_gaps");
    let mut t = legacy_gaps(&map0f()).1;
    t.extend(legacy_gaps(&map38_3a()).1);
    run("avx legacy gaps", &t, 10000, seed);
}

/// VZEROUPPER/VZEROALL, and XSAVE/XRSTOR of the AVX component (with VEX.128 writes zeroing
/// the upper halves in between).
#[test]
fn avx_state() {
    if !have("AVX", host_avx()) {
        return;
    }
    let mut h = Harness::new();
    let mut r = Rng(super::seed::for_test("avx_state"));
    let mut failures = Vec::new();
    let n = 400;
    for _ in 0..n {
        let mut st = random_state(&mut r);
        for x in st.ymmh.iter_mut() {
            *x = (u128::from(r.next()) << 64) | u128::from(r.next());
        }
        st.gpr[3] = DATA + 0x400 + 64 * r.below(0x100);
        let mut code = Vec::new();
        match r.below(4) {
            0 => code.extend([0xC5, 0xF8, 0x77]), // vzeroupper
            1 => code.extend([0xC5, 0xFC, 0x77]), // vzeroall
            _ => {
                // xor edx, edx; mov eax, rfbm; xsave [rbx]; mov qword [rbx+0x200], 0
                // (The x87 component is left out: its init-state handling differs between
                // vendors, and tests/diff/xsave.rs covers it.)
                let rfbm = [2u8, 4, 6][r.below(3) as usize];
                code.extend([0x31, 0xD2, 0xB8, rfbm, 0, 0, 0, 0x0F, 0xAE, 0x23]);
                code.extend([0x48, 0xC7, 0x83, 0x00, 0x02, 0, 0, 0, 0, 0, 0]);
                // mov dword [rbx+28], 0xffff (MXCSR_MASK differs between vendors); mov dword
                // [rbx+24], 0x1f80 (valid even if not saved)
                code.extend([
                    0xC7, 0x43, 0x1C, 0xFF, 0xFF, 0, 0, 0xC7, 0x43, 0x18, 0x80, 0x1F, 0, 0,
                ]);
                // lea rdi, [rbx+0x208]; mov ecx, 56; xor eax, eax; rep stosb (reserved header)
                code.extend([
                    0x48, 0x8D, 0xBB, 0x08, 0x02, 0, 0, 0xB9, 56, 0, 0, 0, 0x31, 0xC0,
                ]);
                code.extend([0xF3, 0xAA]);
                // vpaddd xmm3, xmm4, xmm5 (zeroes ymm3's upper half); vmovdqu ymm6, [rbx+0x240]
                code.extend([
                    0xC5, 0xD9, 0xFE, 0xDD, 0xC5, 0xFE, 0x6F, 0xB3, 0x40, 0x02, 0, 0,
                ]);
                if r.below(2) == 0 {
                    // mov qword [rbx+0x200], bv; mov eax, rfbm; xrstor [rbx]
                    let bv = [0u8, 2, 4, 6][r.below(4) as usize];
                    code.extend([0x48, 0xC7, 0x83, 0x00, 0x02, 0, 0, bv, 0, 0, 0]);
                    code.extend([0xB8, [2u8, 4, 6][r.below(3) as usize], 0, 0, 0]);
                    code.extend([0x0F, 0xAE, 0x2B]);
                }
            }
        }
        let c = Case {
            code,
            st,
            flag_mask: 0,
            xmm: true,
            data_seed: 0xA5,
            expect: None,
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    for f in failures.iter().take(10) {
        eprintln!("avx state: {f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {n} cases differ",
        failures.len()
    );
}

/// AVX2 additions: VPBLENDD, VPERMD/PS/Q/PD, variable shifts, VPBROADCAST*, VBROADCASTI128,
/// VINSERTI128/VEXTRACTI128, VPERM2I128, VPMASKMOV (256-bit integer forms of the SSE
/// instructions run in `avx_sse_forms`).
#[test]
fn avx2_additions() {
    if !have("AVX2", std::arch::is_x86_feature_detected!("avx2")) {
        return;
    }
    let t = [
        V(1, 3, 0x02, N | I, None),       // vpblendd
        V(1, 2, 0x36, N | L1, None),      // vpermd
        V(1, 2, 0x16, N | L1, None),      // vpermps
        V(1, 3, 0x00, I | L1 | W1, None), // vpermq
        V(1, 3, 0x01, I | L1 | W1, None), // vpermpd
        V(1, 2, 0x45, N, None),           // vpsrlvd
        V(1, 2, 0x45, N | W1, None),      // vpsrlvq
        V(1, 2, 0x46, N, None),           // vpsravd
        V(1, 2, 0x47, N, None),           // vpsllvd
        V(1, 2, 0x47, N | W1, None),      // vpsllvq
        V(1, 2, 0x58, 0, None),           // vpbroadcastd
        V(1, 2, 0x59, 0, None),           // vpbroadcastq
        V(1, 2, 0x78, 0, None),           // vpbroadcastb
        V(1, 2, 0x79, 0, None),           // vpbroadcastw
        V(1, 2, 0x18, REG, None),         // vbroadcastss xmm
        V(1, 2, 0x19, REG | L1, None),    // vbroadcastsd xmm
        V(1, 2, 0x5A, MEM | L1, None),    // vbroadcasti128
        V(1, 3, 0x38, N | I | L1, None),  // vinserti128
        V(1, 3, 0x39, I | L1, None),      // vextracti128
        V(1, 3, 0x46, N | I | L1, None),  // vperm2i128
        V(1, 2, 0x8C, N | MEM, None),     // vpmaskmovd load
        V(1, 2, 0x8C, N | MEM | W1, None),
        V(1, 2, 0x8E, N | MEM, None), // vpmaskmovd store
        V(1, 2, 0x8E, N | MEM | W1, None),
    ];
    let seed = super::seed::for_test("avx2_additions");
    run("avx2", &t, 8000, seed);
}

/// VMOVSS/VMOVSD in every form (the 0F11 register forms included) and VMASKMOVDQU (bytes
/// stored to [rdi] under a byte mask, 64- and 32-bit addressing): gaps the audit found.
#[test]
fn avx_scalar_moves_and_maskmovdqu() {
    if !have("AVX", host_avx()) {
        return;
    }
    let mut t = Vec::new();
    for pp in [2u8, 3] {
        for op in [0x10u8, 0x11] {
            t.push(V(pp, 1, op, N | REG | L0, None));
            t.push(V(pp, 1, op, MEM | L0, None));
        }
    }
    let seed = super::seed::for_test("avx_scalar_moves_and_maskmovdqu");
    run("vmovss/sd", &t, 3000, seed);
    let mut h = Harness::new();
    let mut r = Rng(seed);
    let mut failures = Vec::new();
    let n = 2000;
    for _ in 0..n {
        let mut st = random_state(&mut r);
        st.gpr[7] = DATA + 0x2000 + r.below(0x1000);
        let (reg, rm) = (r.below(16) as u8, r.below(16) as u8);
        let mut code = Vec::new();
        if r.below(4) == 0 {
            code.push(0x67);
            st.gpr[7] |= r.next() << 32;
        }
        let rr = if reg < 8 { 0x80 } else { 0 };
        let b = if rm < 8 { 0x20 } else { 0 };
        code.extend([
            0xC4,
            rr | 0x40 | b | 1,
            0x79,
            0xF7,
            0xC0 | ((reg & 7) << 3) | (rm & 7),
        ]);
        let c = Case {
            code,
            st,
            flag_mask: 0,
            xmm: true,
            data_seed: 0x77,
            expect: None,
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    super::report("vmaskmovdqu", n, &failures);
}
