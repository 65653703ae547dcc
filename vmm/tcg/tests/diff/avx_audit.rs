//! Audit: every VEX instruction iced-x86 knows whose CPUID features are among AVX, AVX2, FMA
//! and F16C runs in the TCG without #UD, given a valid encoding. The encodings are enumerated
//! (maps 0F/0F38/0F3A, every prefix, opcode, W, L, register and memory forms, VSIB for the
//! gathers) and decoded by iced; each distinct `Code` runs once (a fault other than #UD, such
//! as an alignment #GP, is fine: the instruction exists).

use super::harness::{random_state, End, Harness, TcgOutcome, DATA};
use iced_x86::{Code, CpuidFeature, Decoder, DecoderOptions};
use std::collections::BTreeMap;

fn in_scope(c: Code) -> bool {
    let f = c.cpuid_features();
    !f.is_empty()
        && f.iter().all(|x| {
            matches!(
                x,
                CpuidFeature::AVX | CpuidFeature::AVX2 | CpuidFeature::FMA | CpuidFeature::F16C
            )
        })
}

/// One valid encoding per in-scope `Code`.
fn encodings() -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for map in 1..=3u8 {
        for pp in 0..4u8 {
            for op in 0..=255u8 {
                for w in [0u8, 0x80] {
                    for l in [0u8, 4] {
                        for vvvv in [0u8, 2] {
                            // reg = 1 (then the other ModRM.reg values: groups), rm = 3 /
                            // [rbx + 0], VSIB [rbx + ymm3*1 + 0].
                            let mut forms = vec![vec![0xCBu8], vec![0x4B, 0], vec![0x4C, 0x1B, 0]];
                            for reg in (0..8u8).filter(|&g| g != 1) {
                                forms.push(vec![0xC3 | (reg << 3)]);
                                forms.push(vec![0x43 | (reg << 3), 0]);
                            }
                            for modrm in &forms {
                                let mut b =
                                    vec![0xC4, 0xE0 | map, w | ((!vvvv & 15) << 3) | l | pp, op];
                                b.extend_from_slice(modrm);
                                b.extend([0x20, 0x90, 0x90, 0x90]);
                                let mut d = Decoder::new(64, &b, DecoderOptions::NONE);
                                let ins = d.decode();
                                let c = ins.code();
                                if c == Code::INVALID || !in_scope(c) {
                                    continue;
                                }
                                out.entry(format!("{c:?}"))
                                    .or_insert_with(|| b[..ins.len()].to_vec());
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn every_avx_avx2_fma_f16c_instruction_exists() {
    let all: Vec<Code> = Code::values().filter(|&c| in_scope(c)).collect();
    let enc = encodings();
    let mut h = Harness::new();
    let mut r = super::harness::Rng(0xA0D1);
    let mut missing = Vec::new();
    for (name, code) in &enc {
        let mut st = random_state(&mut r);
        st.gpr[3] = DATA + 0x1000;
        match h.run_tcg(code, &st) {
            TcgOutcome::Ran(_, End::Fault { vector: 6, .. }, _) => missing.push(name.clone()),
            TcgOutcome::Ran(..) => {}
            TcgOutcome::Other(e) => missing.push(format!("{name} ({e})")),
        }
    }
    let not_encoded: Vec<String> = all
        .iter()
        .map(|c| format!("{c:?}"))
        .filter(|n| !enc.contains_key(n))
        .collect();
    eprintln!(
        "audit: {} in-scope codes, {} encoded and run, {} #UD",
        all.len(),
        enc.len(),
        missing.len()
    );
    assert!(
        not_encoded.is_empty(),
        "codes the enumeration did not reach: {not_encoded:?}"
    );
    assert!(missing.is_empty(), "#UD under the TCG: {missing:?}");
}

/// The same enumeration against the host: each in-scope encoding with random register
/// (upper halves included) and memory contents, compared in full.
#[test]
fn every_avx_avx2_fma_f16c_instruction_matches_the_host() {
    if !super::avx::have(
        "AVX2/FMA/F16C",
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c"),
    ) {
        return;
    }
    let enc = encodings();
    let mut h = Harness::new();
    let mut r = super::harness::Rng(super::seed::for_test("avx_audit_host"));
    let mut failures = Vec::new();
    let mut failing = std::collections::BTreeSet::new();
    let per = 12;
    for (name, code) in &enc {
        for _ in 0..per {
            let mut st = random_state(&mut r);
            for x in st.ymmh.iter_mut() {
                *x = (u128::from(r.value()) << 64) | u128::from(r.value());
            }
            st.gpr[3] = DATA + 0x1000;
            st.gpr[7] = DATA + 0x2000;
            // VSIB index ymm3: small offsets whether read as dwords or as qwords (a fault
            // leaves implementation-specific state behind: see gather.rs).
            st.xmm[3] =
                u128::from(r.below(0x100) as u32) * 0x0000_0000_0000_0008_0000_0000_0000_0008;
            st.ymmh[3] = st.xmm[3];
            let c = super::harness::Case {
                code: code.clone(),
                st,
                flag_mask: rqemu_tcg::flags::ARITH,
                xmm: true,
                data_seed: 0x33,
                expect: super::harness::ANY,
            };
            if let Err(e) = super::harness::check(&mut h, &c) {
                failures.push(format!("{name}: {e}"));
                failing.insert(name.clone());
            }
        }
    }
    if !failing.is_empty() {
        eprintln!("failing codes: {failing:?}");
    }
    super::report("avx audit vs host", enc.len() * per, &failures);
}
