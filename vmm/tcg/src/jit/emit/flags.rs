//! The lazy-flag record at translation time: recording an instruction's flag operation,
//! computing the arithmetic flags, the carry or a condition from it — inline from a record a
//! translated instruction made, through a helper from the state's record otherwise.

use super::{helpers, ty, Em, Flags};
use crate::flags::FlagOp;
use cranelift_codegen::ir::condcodes::{CondCode, IntCC};
use cranelift_codegen::ir::types::{I64, I8};
use cranelift_codegen::ir::{InstBuilder, SigRef, Value};
use cranelift_frontend::FunctionBuilder;

impl Em<'_> {
    /// Records a lazy-flag operation (values already masked to `size`).
    pub fn set_flags(
        &mut self,
        op: FlagOp,
        size: u8,
        res: Value,
        a: Value,
        b: Value,
        carry: Value,
    ) {
        self.flags = Flags::Lazy {
            op,
            size,
            res,
            a,
            b,
            carry,
        };
    }

    /// Narrows `v` to `size` bytes (for signed comparisons).
    fn narrow(&mut self, v: Value, size: u8) -> Value {
        if size >= 8 {
            v
        } else {
            self.b.ins().ireduce(ty(size), v)
        }
    }

    /// Calls a flag helper on the committed record.
    fn flag_helper(&mut self, sig: SigRef, f: usize, args: &[Value]) -> Value {
        self.commit();
        let fp = self.b.ins().iconst(self.ptr, f as i64);
        let call = self.b.ins().call_indirect(sig, fp, args);
        self.b.inst_results(call)[0]
    }

    /// All arithmetic flags as RFLAGS bits (I64): the eager value of a translated
    /// instruction that set them eagerly, computed inline from a lazy record of a translated
    /// instruction (`LazyFlags::arith`'s formulas), else by a helper from the state's record.
    pub fn arith(&mut self) -> Value {
        use crate::flags::{AF, CF, OF};
        let Flags::Lazy {
            op,
            size,
            res,
            a,
            b: bv,
            carry,
        } = self.flags
        else {
            let arch = self.arch;
            return self.flag_helper(
                self.sigs.carry,
                helpers::arith as *const () as usize,
                &[arch],
            );
        };
        if op == FlagOp::Eager {
            return carry;
        }
        let szp = self.szp(res, size);
        if op == FlagOp::Logic {
            return szp;
        }
        let top = i64::from(8 * u32::from(size) - 1);
        let b = &mut self.b;
        // Bit 0 of `v` (I64) as flag `f`.
        let flag = |b: &mut FunctionBuilder<'_>, v: Value, f: u64| {
            let v = b.ins().band_imm_s(v, 1);
            b.ins().imul_imm_s(v, f as i64)
        };
        let bool64 = |b: &mut FunctionBuilder<'_>, c: Value| b.ins().uextend(I64, c);
        let (cf, of, af) = match op {
            FlagOp::Add | FlagOp::Adc | FlagOp::Sub | FlagOp::Sbb => {
                let add = matches!(op, FlagOp::Add | FlagOp::Adc);
                let (lo, hi) = if add { (res, a) } else { (a, bv) };
                let mut c = b.ins().icmp(IntCC::UnsignedLessThan, lo, hi);
                if matches!(op, FlagOp::Adc | FlagOp::Sbb) {
                    let cin = b.ins().band_imm_s(carry, 1);
                    let cin = b.ins().icmp_imm_s(IntCC::NotEqual, cin, 0);
                    let eq = b.ins().icmp(IntCC::Equal, lo, hi);
                    let both = b.ins().band(cin, eq);
                    c = b.ins().bor(c, both);
                }
                let c = bool64(b, c);
                let cf = flag(b, c, CF);
                let o = if add {
                    let x = b.ins().bxor(a, res);
                    let y = b.ins().bxor(bv, res);
                    b.ins().band(x, y)
                } else {
                    let x = b.ins().bxor(a, bv);
                    let y = b.ins().bxor(a, res);
                    b.ins().band(x, y)
                };
                let o = b.ins().ushr_imm_s(o, top);
                let of = flag(b, o, OF);
                let ab = b.ins().bxor(a, bv);
                let abr = b.ins().bxor(ab, res);
                (cf, of, b.ins().band_imm_s(abr, AF as i64))
            }
            // Inc, Dec: CF kept in the record, OF at the signed overflow value.
            _ => {
                let cf = b.ins().band_imm_s(carry, CF as i64);
                let sb = 1i64 << top;
                let at = if op == FlagOp::Inc { sb } else { sb - 1 };
                let o = b.ins().icmp_imm_s(IntCC::Equal, res, at);
                let o = bool64(b, o);
                let of = flag(b, o, OF);
                let a1 = b.ins().bxor_imm_s(a, 1);
                let abr = b.ins().bxor(a1, res);
                (cf, of, b.ins().band_imm_s(abr, AF as i64))
            }
        };
        let x = b.ins().bor(szp, cf);
        let y = b.ins().bor(of, af);
        b.ins().bor(x, y)
    }

    /// `f` (eager RFLAGS bits), or when `cond` holds the current arithmetic flags (computed in
    /// a side block: they may need a helper call).
    pub fn keep_flags_if(&mut self, cond: Value, f: Value) -> Value {
        let (side, join) = (self.b.create_block(), self.b.create_block());
        let out = self.b.append_block_param(join, I64);
        self.b.ins().brif(cond, side, &[], join, &[f.into()]);
        self.b.switch_to_block(side);
        let old = self.arith();
        self.b.ins().jump(join, &[old.into()]);
        self.b.switch_to_block(join);
        out
    }

    /// The carry flag as 0/1 (I64).
    pub fn carry(&mut self) -> Value {
        let cf = match self.flags {
            Flags::Lazy {
                op: FlagOp::Sub,
                a,
                b,
                ..
            } => self.b.ins().icmp(IntCC::UnsignedLessThan, a, b),
            Flags::Lazy {
                op: FlagOp::Add,
                a,
                res,
                ..
            } => self.b.ins().icmp(IntCC::UnsignedLessThan, res, a),
            Flags::Lazy {
                op: FlagOp::Logic, ..
            } => return self.c(0),
            Flags::Lazy {
                op: FlagOp::Inc | FlagOp::Dec | FlagOp::Eager,
                carry,
                ..
            } => return self.b.ins().band_imm_s(carry, 1),
            _ => {
                let arch = self.arch;
                return self.flag_helper(
                    self.sigs.carry,
                    helpers::carry as *const () as usize,
                    &[arch],
                );
            }
        };
        self.b.ins().uextend(I64, cf)
    }

    /// Condition `cc` (0..=15) as an I8 boolean.
    pub fn cond(&mut self, cc: u8) -> Value {
        let (op, size, res, a, bv, carry) = match self.flags {
            Flags::Lazy {
                op,
                size,
                res,
                a,
                b,
                carry,
            } if !matches!(op, FlagOp::Adc | FlagOp::Sbb) => (op, size, res, a, b, carry),
            _ => {
                let arch = self.arch;
                let k = self.c(i64::from(cc));
                let r = self.flag_helper(
                    self.sigs.cond,
                    helpers::cond as *const () as usize,
                    &[arch, k],
                );
                return self.b.ins().icmp_imm_s(IntCC::NotEqual, r, 0);
            }
        };
        let neg = cc & 1 != 0;
        let r = if op == FlagOp::Sub && matches!(cc >> 1, 1 | 2 | 3 | 6 | 7) {
            let (na, nb) = (self.narrow(a, size), self.narrow(bv, size));
            let c = match cc >> 1 {
                1 => IntCC::UnsignedLessThan,
                2 => IntCC::Equal,
                3 => IntCC::UnsignedLessThanOrEqual,
                6 => IntCC::SignedLessThan,
                _ => IntCC::SignedLessThanOrEqual,
            };
            let c = if neg { c.complement() } else { c };
            return self.b.ins().icmp(c, na, nb);
        } else {
            self.generic_cond(op, size, res, a, bv, carry, cc >> 1)
        };
        if neg {
            self.b.ins().bxor_imm_s(r, 1)
        } else {
            r
        }
    }

    /// Condition `c` (0..=7, before negation) from the full flag computation.
    #[allow(clippy::too_many_arguments)]
    fn generic_cond(
        &mut self,
        op: FlagOp,
        size: u8,
        res: Value,
        a: Value,
        bv: Value,
        carry: Value,
        c: u8,
    ) -> Value {
        if op == FlagOp::Eager {
            return self.eager_cond(carry, c);
        }
        let sb = crate::flags::sign_bit(size) as i64;
        let zf = |e: &mut Self| e.b.ins().icmp_imm_s(IntCC::Equal, res, 0);
        let sf = |e: &mut Self| {
            let n = e.narrow(res, size);
            e.b.ins().icmp_imm_s(IntCC::SignedLessThan, n, 0)
        };
        let cf = |e: &mut Self| match op {
            FlagOp::Add => e.b.ins().icmp(IntCC::UnsignedLessThan, res, a),
            FlagOp::Sub => e.b.ins().icmp(IntCC::UnsignedLessThan, a, bv),
            FlagOp::Inc | FlagOp::Dec => {
                let c1 = e.b.ins().band_imm_s(carry, 1);
                e.b.ins().icmp_imm_s(IntCC::NotEqual, c1, 0)
            }
            _ => e.b.ins().iconst(I8, 0),
        };
        let of = |e: &mut Self| match op {
            FlagOp::Add | FlagOp::Sub => {
                let x = if op == FlagOp::Add {
                    let x1 = e.b.ins().bxor(a, res);
                    let x2 = e.b.ins().bxor(bv, res);
                    e.b.ins().band(x1, x2)
                } else {
                    let x1 = e.b.ins().bxor(a, bv);
                    let x2 = e.b.ins().bxor(a, res);
                    e.b.ins().band(x1, x2)
                };
                let x = e.b.ins().band_imm_s(x, sb);
                e.b.ins().icmp_imm_s(IntCC::NotEqual, x, 0)
            }
            FlagOp::Inc => e.b.ins().icmp_imm_s(IntCC::Equal, res, sb),
            FlagOp::Dec => e.b.ins().icmp_imm_s(IntCC::Equal, res, sb - 1),
            _ => e.b.ins().iconst(I8, 0),
        };
        match c {
            0 => of(self),
            1 => cf(self),
            2 => zf(self),
            3 => {
                let (x, y) = (cf(self), zf(self));
                self.b.ins().bor(x, y)
            }
            4 => sf(self),
            5 => {
                let lo = self.b.ins().band_imm_s(res, 0xFF);
                let p = self.b.ins().popcnt(lo);
                let p = self.b.ins().band_imm_s(p, 1);
                self.b.ins().icmp_imm_s(IntCC::Equal, p, 0)
            }
            6 => {
                let (x, y) = (sf(self), of(self));
                self.b.ins().bxor(x, y)
            }
            _ => {
                let (x, y, z) = (sf(self), of(self), zf(self));
                let l = self.b.ins().bxor(x, y);
                self.b.ins().bor(l, z)
            }
        }
    }

    /// Condition `c` (0..=7, before negation) from eager flag bits.
    fn eager_cond(&mut self, eager: Value, c: u8) -> Value {
        use crate::flags::{CF, OF, PF, SF, ZF};
        let bit = |e: &mut Self, f: u64| {
            let x = e.b.ins().band_imm_s(eager, f as i64);
            e.b.ins().icmp_imm_s(IntCC::NotEqual, x, 0)
        };
        match c {
            0 => bit(self, OF),
            1 => bit(self, CF),
            2 => bit(self, ZF),
            3 => bit(self, CF | ZF),
            4 => bit(self, SF),
            5 => bit(self, PF),
            _ => {
                let (s, o) = (bit(self, SF), bit(self, OF));
                let l = self.b.ins().bxor(s, o);
                if c == 6 {
                    l
                } else {
                    let z = bit(self, ZF);
                    self.b.ins().bor(l, z)
                }
            }
        }
    }

    /// Eager SF/ZF/PF bits of `res` (`size` bytes, masked).
    pub fn szp(&mut self, res: Value, size: u8) -> Value {
        use crate::flags::{PF, SF, ZF};
        let b = &mut self.b;
        let z = b.ins().icmp_imm_s(IntCC::Equal, res, 0);
        let z = b.ins().uextend(I64, z);
        let z = b.ins().imul_imm_s(z, ZF as i64);
        let s = b.ins().ushr_imm_s(res, i64::from(8 * u32::from(size) - 1));
        let s = b.ins().band_imm_s(s, 1);
        let s = b.ins().imul_imm_s(s, SF as i64);
        let lo = b.ins().band_imm_s(res, 0xFF);
        let p = b.ins().popcnt(lo);
        let p = b.ins().band_imm_s(p, 1);
        let p = b.ins().bxor_imm_s(p, 1);
        let p = b.ins().imul_imm_s(p, PF as i64);
        let zs = b.ins().bor(z, s);
        b.ins().bor(zs, p)
    }
}
