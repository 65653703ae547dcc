//! Lazy RFLAGS: the arithmetic flags (CF, PF, AF, ZF, SF, OF) are computed on demand from the
//! last flag-setting operation; the other RFLAGS bits are stored directly.

/// Carry flag.
pub const CF: u64 = 1 << 0;
/// Reserved bit 1 (always set).
pub const FIXED1: u64 = 1 << 1;
/// Parity flag.
pub const PF: u64 = 1 << 2;
/// Auxiliary carry flag.
pub const AF: u64 = 1 << 4;
/// Zero flag.
pub const ZF: u64 = 1 << 6;
/// Sign flag.
pub const SF: u64 = 1 << 7;
/// Trap flag.
pub const TF: u64 = 1 << 8;
/// Interrupt enable flag.
pub const IF: u64 = 1 << 9;
/// Direction flag.
pub const DF: u64 = 1 << 10;
/// Overflow flag.
pub const OF: u64 = 1 << 11;
/// I/O privilege level (2 bits).
pub const IOPL: u64 = 3 << 12;
/// Nested task.
pub const NT: u64 = 1 << 14;
/// Resume flag.
pub const RF: u64 = 1 << 16;
/// Virtual-8086 mode.
pub const VM: u64 = 1 << 17;
/// Alignment check.
pub const AC: u64 = 1 << 18;
/// Virtual interrupt flag.
pub const VIF: u64 = 1 << 19;
/// Virtual interrupt pending.
pub const VIP: u64 = 1 << 20;
/// CPUID available.
pub const ID: u64 = 1 << 21;
/// The arithmetic flags that are computed lazily.
pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
/// Bits a guest may change with POPF at CPL 0 (VM and VIF/VIP untouched, RF cleared).
pub const POPF_MASK: u64 = ARITH | TF | IF | DF | IOPL | NT | AC | ID;

/// The kind of the last flag-setting operation (`repr(u8)`: translated code stores it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FlagOp {
    /// Flags are stored in `LazyFlags::eager`.
    Eager,
    /// `res = a + b`.
    Add,
    /// `res = a + b + carry_in` (carry_in in `eager` bit 0).
    Adc,
    /// `res = a - b`.
    Sub,
    /// `res = a - b - borrow_in` (borrow_in in `eager` bit 0).
    Sbb,
    /// Logic op: CF = OF = AF = 0.
    Logic,
    /// `res = a + 1`, CF preserved in `eager`.
    Inc,
    /// `res = a - 1`, CF preserved in `eager`.
    Dec,
}

/// Lazily evaluated RFLAGS.
#[derive(Clone, Copy, Debug)]
pub struct LazyFlags {
    op: FlagOp,
    /// Operand size in bytes (1, 2, 4, 8).
    size: u8,
    res: u64,
    a: u64,
    b: u64,
    /// Eager arithmetic flags (op == Eager), or carry-in / preserved CF.
    eager: u64,
    /// The non-arithmetic bits of RFLAGS (IF, DF, TF, IOPL, ...), always with bit 1 set.
    other: u64,
}

/// Byte offsets of the [`LazyFlags`] fields, for translated code that writes the same record.
#[cfg_attr(not(feature = "jit"), allow(dead_code))]
pub(crate) mod layout {
    use super::LazyFlags;
    use std::mem::offset_of;
    /// `op` (one byte, a [`super::FlagOp`] discriminant).
    pub const OP: usize = offset_of!(LazyFlags, op);
    /// `size` (one byte).
    pub const SIZE: usize = offset_of!(LazyFlags, size);
    /// `res`.
    pub const RES: usize = offset_of!(LazyFlags, res);
    /// `a`.
    pub const A: usize = offset_of!(LazyFlags, a);
    /// `b`.
    pub const B: usize = offset_of!(LazyFlags, b);
    /// `eager`.
    pub const EAGER: usize = offset_of!(LazyFlags, eager);
}

impl Default for LazyFlags {
    fn default() -> Self {
        LazyFlags {
            op: FlagOp::Eager,
            size: 8,
            res: 0,
            a: 0,
            b: 0,
            eager: 0,
            other: FIXED1,
        }
    }
}

/// Mask of an operand of `size` bytes.
#[inline]
pub fn size_mask(size: u8) -> u64 {
    u64::MAX >> (64 - 8 * u32::from(size.clamp(1, 8)))
}

/// Sign bit of an operand of `size` bytes.
#[inline]
pub fn sign_bit(size: u8) -> u64 {
    1u64 << (8 * u32::from(size.clamp(1, 8)) - 1)
}

#[inline]
fn parity(v: u64) -> u64 {
    if (v as u8).count_ones() % 2 == 0 {
        PF
    } else {
        0
    }
}

impl LazyFlags {
    /// Records an arithmetic operation whose flags will be computed lazily.
    #[inline]
    pub fn set_lazy(&mut self, op: FlagOp, size: u8, res: u64, a: u64, b: u64, carry: u64) {
        self.op = op;
        self.size = size;
        self.res = res;
        self.a = a;
        self.b = b;
        self.eager = carry;
    }

    /// Sets the arithmetic flags eagerly (only bits in `ARITH` are used).
    #[inline]
    pub fn set_arith(&mut self, flags: u64) {
        self.op = FlagOp::Eager;
        self.eager = flags & ARITH;
    }

    /// Replaces only the bits of `mask` (within `ARITH`) with those of `flags`.
    #[inline]
    pub fn update_arith(&mut self, mask: u64, flags: u64) {
        let cur = self.arith();
        self.set_arith((cur & !mask) | (flags & mask));
    }

    /// Computes the arithmetic flags.
    pub fn arith(&self) -> u64 {
        let size = self.size;
        let m = size_mask(size);
        let sb = sign_bit(size);
        let res = self.res & m;
        let (a, b) = (self.a & m, self.b & m);
        let szp = |r: u64| -> u64 {
            (if r == 0 { ZF } else { 0 }) | (if r & sb != 0 { SF } else { 0 }) | parity(r)
        };
        match self.op {
            FlagOp::Eager => self.eager,
            FlagOp::Logic => szp(res),
            FlagOp::Add | FlagOp::Adc => {
                let cin = self.op == FlagOp::Adc && self.eager & 1 != 0;
                let cf = res < a || (cin && res == a);
                let of = (a ^ res) & (b ^ res) & sb != 0;
                szp(res)
                    | (if cf { CF } else { 0 })
                    | (if of { OF } else { 0 })
                    | ((a ^ b ^ res) & AF)
            }
            FlagOp::Sub | FlagOp::Sbb => {
                let bin = self.op == FlagOp::Sbb && self.eager & 1 != 0;
                let cf = a < b || (bin && a == b);
                let of = (a ^ b) & (a ^ res) & sb != 0;
                szp(res)
                    | (if cf { CF } else { 0 })
                    | (if of { OF } else { 0 })
                    | ((a ^ b ^ res) & AF)
            }
            FlagOp::Inc => {
                let of = res == sb;
                szp(res) | (self.eager & CF) | (if of { OF } else { 0 }) | ((a ^ 1 ^ res) & AF)
            }
            FlagOp::Dec => {
                let of = res == sb - 1;
                szp(res) | (self.eager & CF) | (if of { OF } else { 0 }) | ((a ^ 1 ^ res) & AF)
            }
        }
    }

    /// Carry flag (fast path for the common ops).
    #[inline]
    pub fn cf(&self) -> bool {
        match self.op {
            FlagOp::Sub => {
                let m = size_mask(self.size);
                self.a & m < self.b & m
            }
            FlagOp::Logic => false,
            _ => self.arith() & CF != 0,
        }
    }

    /// Zero flag (fast path).
    #[inline]
    pub fn zf(&self) -> bool {
        match self.op {
            FlagOp::Eager => self.eager & ZF != 0,
            _ => self.res & size_mask(self.size) == 0,
        }
    }

    /// Evaluates condition code `cc` (0..=15, the low nibble of Jcc/SETcc/CMOVcc opcodes).
    #[inline]
    pub fn cond(&self, cc: u8) -> bool {
        let r = match cc >> 1 {
            0 => self.arith() & OF != 0,
            1 => self.cf(),
            2 => self.zf(),
            3 => self.cf() || self.zf(),
            4 => self.arith() & SF != 0,
            5 => self.arith() & PF != 0,
            6 => {
                let f = self.arith();
                (f & SF != 0) != (f & OF != 0)
            }
            _ => {
                let f = self.arith();
                f & ZF != 0 || ((f & SF != 0) != (f & OF != 0))
            }
        };
        r ^ (cc & 1 != 0)
    }

    /// Full RFLAGS value.
    #[inline]
    pub fn get(&self) -> u64 {
        self.other | self.arith()
    }

    /// Sets the full RFLAGS value (bit 1 forced on, reserved bits cleared).
    pub fn set(&mut self, v: u64) {
        self.other = (v & !ARITH & 0x003F_7FD5) | FIXED1;
        self.set_arith(v);
    }

    /// The non-arithmetic bits (IF, DF, ...).
    #[inline]
    pub fn other(&self) -> u64 {
        self.other
    }

    /// Sets or clears one non-arithmetic bit.
    #[inline]
    pub fn set_bit(&mut self, bit: u64, on: bool) {
        if on {
            self.other |= bit;
        } else {
            self.other &= !bit;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_sub_flags() {
        let mut f = LazyFlags::default();
        f.set_lazy(FlagOp::Add, 1, 0x00, 0xFF, 0x01, 0);
        assert_eq!(f.arith() & (CF | ZF | OF | SF), CF | ZF);
        f.set_lazy(FlagOp::Add, 1, 0x80, 0x7F, 0x01, 0);
        assert_eq!(f.arith() & (CF | ZF | OF | SF | AF), OF | SF | AF);
        f.set_lazy(FlagOp::Sub, 4, 0xFFFF_FFFF, 0, 1, 0);
        assert!(f.cf());
        assert!(f.cond(2)); // jb
        assert!(!f.cond(4)); // je
        assert!(f.cond(0xC)); // jl
    }

    #[test]
    fn set_get_roundtrip() {
        let mut f = LazyFlags::default();
        f.set(0x0000_0ED7 | IF);
        assert_eq!(f.get(), 0x0000_0ED7 | IF | FIXED1);
    }
}
