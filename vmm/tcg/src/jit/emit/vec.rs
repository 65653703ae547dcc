//! Vector state and vector memory accesses for translated SSE/AVX instructions: XMM and YMM
//! upper halves are read and written in the state (not cached), guest memory through the
//! inline TLB lookup; every other case — a TLB miss, MMIO, a page crossing, a misaligned
//! operand of an aligned form, SSE/AVX not enabled (CR0.EM/TS, CR4.OSFXSR, CR4.OSXSAVE and
//! XCR0) — runs the whole instruction through its interpreter handler on a side path
//! ([`Em::interp_side`]), which raises its fault exactly as the interpreter would.

use super::{mem, Em, FLAGS, GPR};
use crate::flags::layout as fl;
use crate::mmu::walk::Access;
use crate::state::{cr0, cr4, ArchState};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{I32, I64, I8X16};
use cranelift_codegen::ir::{Block, InstBuilder, Type, Value};
use cranelift_frontend::Variable;
use std::mem::offset_of;

const XMM: i32 = offset_of!(ArchState, xmm) as i32;
const YMMH: i32 = offset_of!(ArchState, ymmh) as i32;
const CR0: i32 = offset_of!(ArchState, cr0) as i32;
const CR4: i32 = offset_of!(ArchState, cr4) as i32;
const XCR0: i32 = offset_of!(ArchState, xcr0) as i32;
const MXCSR: i32 = offset_of!(ArchState, mxcsr) as i32;
/// The six exception mask bits of MXCSR.
const MASKS: i64 = 0x1F80;

/// Which unit an instruction needs enabled.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Legacy SSE: CR0.EM and CR0.TS clear, CR4.OSFXSR set.
    Sse,
    /// VEX: CR4.OSXSAVE set, XCR0 SSE and AVX set, CR0.TS clear.
    Avx,
}

/// A guest memory operand of a vector instruction, checked on the fast path.
pub(crate) struct VMem {
    /// Host address of the operand (valid on the fast path only).
    pub host: Value,
}

impl Em<'_> {
    /// Offset in the state of XMM register `n` (`hi`: its YMM upper half) plus `off` bytes.
    pub fn xmm_off(n: usize, hi: bool, off: i32) -> i32 {
        (if hi { YMMH } else { XMM }) + 16 * n as i32 + off
    }

    /// Loads `ty` from the state at `off`.
    pub fn sload(&mut self, ty: Type, off: i32) -> Value {
        self.b.ins().load(ty, mem(), self.arch, off)
    }

    /// Stores `v` to the state at `off`.
    pub fn sstore(&mut self, v: Value, off: i32) {
        self.b.ins().store(mem(), v, self.arch, off);
    }

    /// XMM register `n` (bits 127:0; `hi`: bits 255:128) as I8X16.
    pub fn xget(&mut self, n: usize, hi: bool) -> Value {
        self.sload(I8X16, Self::xmm_off(n, hi, 0))
    }

    /// Sets XMM register `n` (bits 127:0; `hi`: bits 255:128).
    pub fn xset(&mut self, n: usize, hi: bool, v: Value) {
        self.sstore(v, Self::xmm_off(n, hi, 0));
    }

    /// Clears bits 255:128 of register `n`.
    pub fn yzero(&mut self, n: usize) {
        let z = self.c(0);
        self.sstore(z, Self::xmm_off(n, true, 0));
        self.sstore(z, Self::xmm_off(n, true, 8));
    }

    /// Whether `unit` is enabled (I8 boolean), from CR0, CR4 (and XCR0).
    fn unit_ok(&mut self, unit: Unit) -> Value {
        let c0 = self.sload(I64, CR0);
        let c4 = self.sload(I64, CR4);
        match unit {
            Unit::Sse => {
                let bad0 = self.b.ins().band_imm_s(c0, (cr0::EM | cr0::TS) as i64);
                let good4 = self.b.ins().band_imm_s(c4, cr4::OSFXSR as i64);
                let a = self.b.ins().icmp_imm_s(IntCC::Equal, bad0, 0);
                let b = self.b.ins().icmp_imm_s(IntCC::NotEqual, good4, 0);
                self.b.ins().band(a, b)
            }
            Unit::Avx => {
                let x = self.sload(I64, XCR0);
                let bad0 = self.b.ins().band_imm_s(c0, cr0::TS as i64);
                let good4 = self.b.ins().band_imm_s(c4, cr4::OSXSAVE as i64);
                let xs = self.b.ins().band_imm_s(x, 6);
                let a = self.b.ins().icmp_imm_s(IntCC::Equal, bad0, 0);
                let b = self.b.ins().icmp_imm_s(IntCC::NotEqual, good4, 0);
                let c = self.b.ins().icmp_imm_s(IntCC::Equal, xs, 6);
                let ab = self.b.ins().band(a, b);
                self.b.ins().band(ab, c)
            }
        }
    }

    /// Starts a vector instruction: branches to a fast block when `unit` is enabled and the
    /// memory operand at `va` (`size` bytes, `acc`, aligned to `align` bytes when not 0) is a
    /// RAM page of the TLB; returns the memory operand (when there is one) and the side
    /// block, which the caller completes with [`Em::interp_side`].
    pub fn vstart(
        &mut self,
        unit: Unit,
        memop: Option<(Value, u8, Access, u8)>,
    ) -> (Option<VMem>, Block) {
        self.vstart_with(unit, memop, false)
    }

    /// [`Em::vstart`] for an instruction that computes in floating point on the host
    /// (`insn::fp`): also takes the side path unless every MXCSR exception is masked, so that
    /// the host instruction, run under the guest's MXCSR control bits (`super::super::fpenv`),
    /// only sets sticky flags and never has to raise #XM.
    pub fn vstart_fp(
        &mut self,
        unit: Unit,
        memop: Option<(Value, u8, Access, u8)>,
    ) -> (Option<VMem>, Block) {
        self.vstart_with(unit, memop, true)
    }

    fn vstart_with(
        &mut self,
        unit: Unit,
        memop: Option<(Value, u8, Access, u8)>,
        fp: bool,
    ) -> (Option<VMem>, Block) {
        let mut ok = self.unit_ok(unit);
        if fp {
            let csr = self.sload(I32, MXCSR);
            let masks = self.b.ins().band_imm_s(csr, MASKS);
            let masked = self.b.ins().icmp_imm_s(IntCC::Equal, masks, MASKS);
            ok = self.b.ins().band(ok, masked);
        }
        let Some((va, size, acc, align)) = memop else {
            let (fast, slow) = (self.b.create_block(), self.b.create_block());
            self.b.ins().brif(ok, fast, &[], slow, &[]);
            self.b.switch_to_block(fast);
            return (None, slow);
        };
        if align > 1 {
            let low = self.b.ins().band_imm_s(va, i64::from(align) - 1);
            let al = self.b.ins().icmp_imm_s(IntCC::Equal, low, 0);
            ok = self.b.ins().band(ok, al);
        }
        let (host, slow) = self.tlb_lookup_if(va, size, acc, Some(ok));
        (Some(VMem { host }), slow)
    }

    /// Finishes a vector instruction started with [`Em::vstart`]: the fast path (current
    /// block) joins after the side block `slow`, which runs the instruction through its
    /// interpreter handler `op` (an [`super::super::InterpOp`]); `gpr_out`: the general
    /// register the instruction writes, reloaded after the handler. The translation state
    /// (flag record, loaded registers) stays as it was: these instructions change no flags
    /// and no other register, and the record is committed on the side path only.
    pub fn vfinish(&mut self, slow: Block, op: usize, gpr_out: Option<usize>) {
        let join = self.b.create_block();
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(slow);
        self.interp_side(op, gpr_out);
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(join);
    }

    /// [`Em::vfinish`] for an instruction whose handler sets the arithmetic flags eagerly
    /// (`LazyFlags::set_arith`): `var` (already defined on the fast path) takes them from the
    /// state's record on the side path.
    pub fn vfinish_flags(&mut self, slow: Block, op: usize, var: Variable) {
        let join = self.b.create_block();
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(slow);
        self.interp_side(op, None);
        let f = self.sload(I64, FLAGS + fl::EAGER as i32);
        self.b.def_var(var, f);
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(join);
    }

    /// The side path of [`Em::vfinish`].
    fn interp_side(&mut self, op: usize, gpr_out: Option<usize>) {
        self.run_handler(op, true);
        if let Some(n) = gpr_out {
            let v = self.b.ins().load(I64, mem(), self.arch, GPR + 8 * n as i32);
            self.b.def_var(self.regs[n], v);
            self.loaded |= 1 << n;
        }
    }
}
