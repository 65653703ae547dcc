//! AVX2 gathers (VGATHERDPS/DPD/QPS/QPD, VPGATHERDD/DQ/QD/QQ) against the host: random masks,
//! indices into the data buffer with every scale, 128- and 256-bit forms, 32-bit addressing;
//! faulting elements (an unmapped page, a non-canonical address) with the partially updated
//! destination and mask compared; register overlaps (#UD).
//!
//! What a fault leaves behind is specified only for the elements before the faulting one
//! (done: loaded where the mask was set, mask cleared) and the faulting one (mask still
//! set); the rest is the implementation's: Intel's CPUs may already have done later elements
//! (the SDM allows any order), turn the other mask elements into all ones or zero by their
//! sign bit, and zero or keep upper halves; AMD's keep them. A case that faults is built so
//! that those parts come out the same whichever CPU runs it: mask elements after the faulting
//! one clear, the others all ones or zero, upper halves of the destination and mask zero.

use super::avx::have;
use super::harness::{check, random_state, Case, Harness, Rng, ANY, DATA, UNMAPPED};
use super::report;

#[test]
fn avx2_gathers() {
    if !have("AVX2", std::arch::is_x86_feature_detected!("avx2")) {
        return;
    }
    let mut h = Harness::new();
    let mut r = Rng(super::seed::for_test("avx2_gathers"));
    let mut failures = Vec::new();
    let (mut faults, mut uds, mut done) = (0, 0, 0);
    let n = 6000;
    for _ in 0..n {
        let op = 0x90 + r.below(4) as u8; // 90 vpgatherd*, 91 vpgatherq*, 92 vgatherdp*, 93 vgatherqp*
        let w1 = r.below(2) == 0; // 64-bit data
        let l = r.below(2) == 0;
        let qidx = op & 1 != 0;
        let mut st = random_state(&mut r);
        for x in st.ymmh.iter_mut() {
            *x = (u128::from(r.value()) << 64) | u128::from(r.value());
        }
        let overlap = r.below(20) == 0;
        let mut regs = [0u8; 3];
        loop {
            for x in regs.iter_mut() {
                *x = r.below(16) as u8;
            }
            let distinct = regs[0] != regs[1] && regs[0] != regs[2] && regs[1] != regs[2];
            if distinct != overlap {
                break;
            }
        }
        let [dst, idx, mask] = regs;
        let scale = r.below(4) as u8;
        let a32 = r.below(5) == 0;
        st.gpr[3] = DATA + 0x8000;
        // Index elements: offsets within the buffer; some cases fault on one element.
        let fault = r.below(4) == 0;
        let fault_el = r.below(8) as u32;
        let (mut lo, mut hi) = (0u128, 0u128);
        let (iw, count) = if qidx { (64, 4) } else { (32, 8) };
        for i in 0..count {
            let mut off = (r.below(0x1E00) as i64 - 0xF00) as u64;
            if fault && i == fault_el && qidx && !a32 {
                off = if r.below(2) == 0 {
                    // Unmapped (index * scale lands there).
                    (UNMAPPED + r.below(0x800) - st.gpr[3]) >> scale
                } else {
                    // Non-canonical.
                    0x4000_0000_0000_0000u64 >> scale
                };
            }
            let v = if iw == 32 {
                u128::from(off as u32)
            } else {
                u128::from(off)
            };
            let bit = i * iw;
            if bit < 128 {
                lo |= v << bit;
            } else {
                hi |= v << (bit - 128);
            }
        }
        st.xmm[idx as usize] = lo;
        st.ymmh[idx as usize] = hi;
        // Mask: random sign bits per element (sometimes all set).
        let all = r.below(3) == 0;
        let (mut mlo, mut mhi) = (0u128, 0u128);
        for i in 0..(256 / if w1 { 64 } else { 32 }) {
            let ew = if w1 { 64 } else { 32 };
            let set = all || r.below(2) == 0;
            let v = (u128::from(r.next()) & ((1u128 << (ew - 1)) - 1))
                | if set { 1u128 << (ew - 1) } else { 0 };
            let bit = i * ew;
            if bit < 128 {
                mlo |= v << bit;
            } else {
                mhi |= v << (bit - 128);
            }
        }
        if fault && qidx && !a32 {
            // Only the specified state can differ (see the module's comment).
            let ew = if w1 { 64 } else { 32 };
            let (mut lo, mut hi) = (0u128, 0u128);
            for i in 0..(256 / ew) {
                let full = if ew == 64 {
                    u128::from(u64::MAX)
                } else {
                    u128::from(u32::MAX)
                };
                let set = i < fault_el && r.below(2) == 0 || i == fault_el;
                let v = if set { full } else { 0 };
                let bit = i * ew;
                if bit < 128 {
                    lo |= v << bit;
                } else {
                    hi |= v << (bit - 128);
                }
            }
            (mlo, mhi) = (lo, hi);
            st.ymmh[dst as usize] = 0;
        }
        st.xmm[mask as usize] = mlo;
        st.ymmh[mask as usize] = mhi;
        // C4 RXB.00010 W.vvvv.L.01 op modrm(01, dst, 100) sib(scale, idx, rbx) disp8
        let mut code = Vec::new();
        if a32 {
            code.push(0x67);
        }
        let rxb = (if dst < 8 { 0x80 } else { 0 }) | (if idx < 8 { 0x40 } else { 0 }) | 0x20;
        code.extend([
            0xC4,
            rxb | 2,
            (if w1 { 0x80 } else { 0 }) | ((!mask & 15) << 3) | (if l { 4 } else { 0 }) | 1,
            op,
            0x44 | ((dst & 7) << 3),
            (scale << 6) | ((idx & 7) << 3) | 3,
            r.below(64) as u8,
        ]);
        let c = Case {
            code,
            st,
            flag_mask: 0,
            xmm: true,
            data_seed: 0x6A,
            expect: ANY,
        };
        match check(&mut h, &c) {
            Ok(super::harness::End::Done) => done += 1,
            Ok(super::harness::End::Fault { vector: 6, .. }) => uds += 1,
            Ok(_) => faults += 1,
            Err(e) => failures.push(e),
        }
    }
    eprintln!("gathers: {done} completed, {faults} faulted, {uds} #UD");
    report("avx2_gathers", n, &failures);
    assert!(
        faults > 50 && uds > 50 && done > 1000,
        "too few cases of a kind"
    );
}
