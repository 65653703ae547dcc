//! XSAVE/XRSTOR/XGETBV for the x87 and SSE components against the host (whose XCR0 has more:
//! the requested-feature bitmap EDX:EAX limits both to x87|SSE). XSTATE_BV after XSAVE is
//! erased before comparing: hardware may report components in their init state as 0.

use super::harness::{check, random_state, Case, Harness, Rng, DATA};
use super::host_quirks::clear_mask_extra;
use super::mmx::load_mm_from_r8_r15;

fn mov_eax(v: u8) -> [u8; 5] {
    [0xB8, v, 0, 0, 0]
}

#[test]
fn xsave_xrstor_x87_sse() {
    let mut h = Harness::new();
    let mut r = Rng(0x75AE);
    let mut failures = Vec::new();
    let n = 600;
    for _ in 0..n {
        let mut st = random_state(&mut r);
        st.gpr[3] = DATA + 0x400 + 64 * r.below(0x100);
        // A non-init x87 state with known registers (FNINIT keeps their contents): MM0-7
        // from R8-R15, EMMS, FNINIT, FLDCW 0x27F (a control instruction: FIP stays 0).
        let mut code = load_mm_from_r8_r15();
        code.extend([0x0F, 0x77, 0xDB, 0xE3]);
        // mov word [rbx+0x240], 0x27f; fldcw [rbx+0x240]
        code.extend([0x66, 0xC7, 0x83, 0x40, 0x02, 0, 0, 0x7F, 0x02]);
        code.extend([0xD9, 0xAB, 0x40, 0x02, 0, 0]);
        // xor edx, edx; mov eax, rfbm; xsave [rbx]; mov qword [rbx+0x200], 0
        code.extend([0x31, 0xD2]);
        code.extend(mov_eax([1, 2, 3][r.below(3) as usize]));
        code.extend([0x0F, 0xAE, 0x23]);
        code.extend(clear_mask_extra(0));
        code.extend([0x48, 0xC7, 0x83, 0x00, 0x02, 0, 0, 0, 0, 0, 0]);
        if r.below(2) == 0 {
            // Modify the image, then XRSTOR some of it back:
            // mov [rbx+0xA0], r8 (XMM0 low); mov [rbx+0xB8], r9 (XMM1 high)
            code.extend([0x4C, 0x89, 0x83, 0xA0, 0, 0, 0]);
            code.extend([0x4C, 0x89, 0x8B, 0xB8, 0, 0, 0]);
            // mov dword [rbx+24], 0x1f80: a valid MXCSR even if XSAVE did not write it
            code.extend([0xC7, 0x43, 0x18, 0x80, 0x1F, 0, 0]);
            // lea rdi, [rbx+0x208]; mov ecx, 56; xor eax, eax; rep stosb (reserved header)
            code.extend([
                0x48, 0x8D, 0xBB, 0x08, 0x02, 0, 0, 0xB9, 56, 0, 0, 0, 0x31, 0xC0,
            ]);
            code.extend([0xF3, 0xAA]);
            // mov qword [rbx+0x200], xstate_bv; mov eax, rfbm; xor edx, edx; xrstor [rbx]
            let bv = r.below(4) as u8;
            code.extend([0x48, 0xC7, 0x83, 0x00, 0x02, 0, 0, bv, 0, 0, 0]);
            code.extend(mov_eax(r.below(4) as u8));
            code.extend([0x31, 0xD2, 0x0F, 0xAE, 0x2B]);
        }
        // xgetbv is compared too: ecx = 0; xgetbv; and eax, 3 (the host enables more)
        code.extend([0x31, 0xC9, 0x0F, 0x01, 0xD0, 0x83, 0xE0, 0x03, 0x31, 0xD2]);
        code.extend([0xDB, 0xE3]);
        let c = Case {
            code,
            st,
            flag_mask: 0,
            xmm: true,
            data_seed: 0x75,
            expect: None,
        };
        if let Err(e) = check(&mut h, &c) {
            failures.push(e);
        }
    }
    for f in failures.iter().take(10) {
        eprintln!("xsave: {f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {n} XSAVE cases differ",
        failures.len()
    );
}
