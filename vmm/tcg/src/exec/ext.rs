//! Miscellaneous extensions: RDRAND/RDSEED (host `getrandom`), MOVBE, RDPID.

use super::{Ctx, R};
use crate::flags::CF;
use iced_x86::{Instruction, Mnemonic as M, OpKind};

/// Host randomness, buffered per thread (one `getrandom` call per 32 draws).
fn random_u64() -> Option<u64> {
    use std::cell::RefCell;
    thread_local! {
        static POOL: RefCell<(usize, [u64; 32])> = const { RefCell::new((32, [0; 32])) };
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.0 == 32 {
            let mut buf = [0u64; 32];
            let len = std::mem::size_of_val(&buf);
            // SAFETY: getrandom writes at most `len` bytes into `buf`, which is that large.
            let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), len, 0) };
            if n != len as isize {
                return None;
            }
            p.1 = buf;
            p.0 = 0;
        }
        let i = p.0;
        p.0 += 1;
        Some(p.1[i])
    })
}

pub fn exec(cx: &mut Ctx<'_>, ins: &Instruction) -> R<()> {
    match ins.mnemonic() {
        M::Rdrand | M::Rdseed => {
            let size = cx.op_size(ins, 0);
            // CF=1: a valid random value; CF=0 and a zero destination if the host failed.
            let (v, f) = match random_u64() {
                Some(v) => (v & crate::flags::size_mask(size), CF),
                None => (0, 0),
            };
            cx.write_op(ins, 0, size, v)?;
            cx.s.flags.set_arith(f);
            Ok(())
        }
        M::Rdpid => {
            let v = cx.s.msr.tsc_aux;
            super::operand::set_reg(cx.s, ins.op0_register(), v);
            Ok(())
        }
        _ => {
            // MOVBE r, m / m, r.
            let size = if ins.op0_kind() == OpKind::Register {
                cx.op_size(ins, 0)
            } else {
                cx.op_size(ins, 1)
            };
            let v = cx.read_op(ins, 1, size)?;
            let swapped = v.swap_bytes() >> (64 - 8 * u32::from(size));
            cx.write_op(ins, 0, size, swapped)
        }
    }
}
