//! Operand access: registers by iced `Register`, effective addresses, generic read/write of
//! instruction operands.

use super::{Ctx, R};
use crate::state::ArchState;
use iced_x86::{Instruction, OpKind, Register};

/// Reads a general-purpose (or segment selector) register, zero-extended.
#[inline(always)]
pub fn get_reg(s: &ArchState, r: Register) -> u64 {
    let n = r as usize;
    match n {
        1..=4 => s.gpr[n - 1] & 0xFF,
        5..=8 => (s.gpr[n - 5] >> 8) & 0xFF,
        9..=20 => s.gpr[n - 5] & 0xFF,
        21..=36 => s.gpr[n - 21] & 0xFFFF,
        37..=52 => s.gpr[n - 37] & 0xFFFF_FFFF,
        53..=68 => s.gpr[n - 53],
        71..=76 => u64::from(s.seg[n - 71].selector),
        _ => 0,
    }
}

/// Writes a general-purpose register with x86-64 semantics (32-bit writes zero-extend,
/// 8/16-bit writes merge).
#[inline(always)]
pub fn set_reg(s: &mut ArchState, r: Register, v: u64) {
    let n = r as usize;
    match n {
        1..=4 => s.gpr[n - 1] = (s.gpr[n - 1] & !0xFF) | (v & 0xFF),
        5..=8 => s.gpr[n - 5] = (s.gpr[n - 5] & !0xFF00) | ((v & 0xFF) << 8),
        9..=20 => s.gpr[n - 5] = (s.gpr[n - 5] & !0xFF) | (v & 0xFF),
        21..=36 => s.gpr[n - 21] = (s.gpr[n - 21] & !0xFFFF) | (v & 0xFFFF),
        37..=52 => s.gpr[n - 37] = v & 0xFFFF_FFFF,
        53..=68 => s.gpr[n - 53] = v,
        _ => {}
    }
}

/// Size in bytes of a general-purpose register.
#[inline(always)]
pub fn reg_size(r: Register) -> u8 {
    match r as usize {
        1..=20 => 1,
        21..=36 => 2,
        37..=52 => 4,
        71..=76 => 2,
        _ => 8,
    }
}

/// Sign-extends the low `size` bytes of `v`.
#[inline(always)]
pub fn sext(v: u64, size: u8) -> u64 {
    let sh = 64 - 8 * u32::from(size.clamp(1, 8));
    (((v << sh) as i64) >> sh) as u64
}

impl Ctx<'_> {
    /// Effective linear address of the instruction's memory operand (segment base applied for
    /// FS/GS; 32-bit address size truncates).
    #[inline]
    pub fn ea(&self, ins: &Instruction) -> u64 {
        if self.legacy {
            return crate::legacy::linear(
                self,
                ins.memory_segment(),
                crate::legacy::offset(self, ins),
            );
        }
        let base = ins.memory_base();
        let mut a = ins.memory_displacement64();
        let mut a32 = false;
        match base {
            Register::None => {}
            Register::RIP => a = a.wrapping_add(self.delta),
            Register::EIP => {
                a = a.wrapping_add(self.delta);
                a32 = true;
            }
            r => {
                a32 = (37..=52).contains(&(r as usize));
                a = a.wrapping_add(get_reg(self.s, r));
            }
        }
        let idx = ins.memory_index();
        if idx != Register::None {
            a32 |= (37..=52).contains(&(idx as usize));
            a = a.wrapping_add(get_reg(self.s, idx) << ins.memory_index_scale().trailing_zeros());
        }
        if a32 {
            a &= 0xFFFF_FFFF;
        }
        self.seg_base(ins.memory_segment()).wrapping_add(a)
    }

    /// Segment base used for addressing (in 64-bit mode only FS and GS have one).
    #[inline(always)]
    pub fn seg_base(&self, seg: Register) -> u64 {
        if self.legacy {
            return crate::legacy::seg(self.s, seg).base;
        }
        match seg {
            Register::FS => self.s.seg[4].base,
            Register::GS => self.s.seg[5].base,
            _ => 0,
        }
    }

    /// Operand size in bytes of operand `i` (register or memory).
    #[inline(always)]
    pub fn op_size(&self, ins: &Instruction, i: u32) -> u8 {
        match ins.op_kind(i) {
            OpKind::Register => reg_size(ins.op_register(i)),
            // Clamped: integer handlers only use 1..=8 (never 0 for odd encodings).
            _ => (ins.memory_size().size() as u8).clamp(1, 8),
        }
    }

    /// Reads operand `i` (register, memory or immediate), masked to `size` bytes.
    #[inline(always)]
    pub fn read_op(&mut self, ins: &Instruction, i: u32, size: u8) -> R<u64> {
        let m = crate::flags::size_mask(size);
        match ins.op_kind(i) {
            OpKind::Register => Ok(get_reg(self.s, ins.op_register(i)) & m),
            OpKind::Memory => {
                let va = self.ea(ins);
                self.read(va, size)
            }
            _ => Ok(ins.immediate(i) & m),
        }
    }

    /// Writes operand `i` (register or memory).
    #[inline(always)]
    pub fn write_op(&mut self, ins: &Instruction, i: u32, size: u8, v: u64) -> R<()> {
        match ins.op_kind(i) {
            OpKind::Register => {
                set_reg(self.s, ins.op_register(i), v);
                Ok(())
            }
            _ => {
                let va = self.ea(ins);
                self.write(va, size, v)
            }
        }
    }

    /// Reads operand 0 for a read-modify-write: for memory, write permission is checked first
    /// so that the following `write_op` cannot fault.
    #[inline(always)]
    pub fn read_rmw(&mut self, ins: &Instruction, size: u8) -> R<u64> {
        match ins.op0_kind() {
            OpKind::Register => {
                Ok(get_reg(self.s, ins.op0_register()) & crate::flags::size_mask(size))
            }
            _ => {
                let va = self.ea(ins);
                self.check_write(va, size as usize)?;
                self.read(va, size)
            }
        }
    }

    /// Pushes `size` bytes; RSP is only updated when the write succeeded.
    #[inline]
    pub fn push(&mut self, v: u64, size: u8) -> R<()> {
        let sp = self.s.gpr[4].wrapping_sub(u64::from(size));
        self.write(sp, size, v)?;
        self.s.gpr[4] = sp;
        Ok(())
    }
}
