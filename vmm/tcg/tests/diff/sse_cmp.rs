//! SSE/SSE2 float compares into masks (CMPPS/PD/SS/SD, all predicates, NaNs).

use super::xmm_table::{run, Op};

#[test]
fn sse_float_compares() {
    let table = [
        Op::new(0, &[0xC2], true, 16),
        Op::new(0x66, &[0xC2], true, 16),
        Op::new(0xF3, &[0xC2], true, 4),
        Op::new(0xF2, &[0xC2], true, 8),
    ];
    run("sse_cmp", &table, 4000, 0xC0C2);
}
