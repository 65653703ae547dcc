//! FMA3 and F16C differential cases: every FMA opcode (132/213/231, PS/PD/SS/SD, 128 and 256
//! bits) and VCVTPH2PS/VCVTPS2PH with special lanes, random rounding modes, DAZ/FTZ and
//! unmasked exceptions (#XM and the MXCSR flags compared with the host).

use super::avx::have;
use super::avx_table::{run, I, L0, N, V, W1, XM};

/// Every FMA3 encoding: map 0F38, 66, W0 = single, W1 = double.
fn fma_table() -> Vec<V> {
    let mut t = Vec::new();
    for base in [0x96u8, 0xA6, 0xB6] {
        for k in 0..10u8 {
            let op = base + k;
            // 0x96/0x97 (+0x10, +0x20): FMADDSUB/FMSUBADD, packed only; then pairs of a
            // packed and a scalar opcode (FMADD, FMSUB, FNMADD, FNMSUB).
            let scalar = k >= 2 && k % 2 == 1;
            let f = N | XM | if scalar { L0 } else { 0 };
            t.push(V(1, 2, op, f, None));
            t.push(V(1, 2, op, f | W1, None));
        }
    }
    t
}

#[test]
fn fma3_all_forms() {
    if !have("FMA", std::arch::is_x86_feature_detected!("fma")) {
        return;
    }
    let seed = super::seed::for_test("fma3_all_forms");
    run("fma3", &fma_table(), 20000, seed);
}

#[test]
fn f16c_conversions() {
    if !have("F16C", std::arch::is_x86_feature_detected!("f16c")) {
        return;
    }
    let t = [
        V(1, 2, 0x13, XM, None),     // vcvtph2ps
        V(1, 3, 0x1D, I | XM, None), // vcvtps2ph (ModRM.reg: the source)
    ];
    let seed = super::seed::for_test("f16c_conversions");
    run("f16c", &t, 8000, seed);
}
