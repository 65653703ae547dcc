//! The code emitter: guest registers cached in Cranelift variables, the lazy-flag record
//! tracked at translation time, soft-MMU accesses (inline TLB lookup, helper on a miss) and
//! block exits that commit the state.
//!
//! A block is straight-line code, so which registers are loaded is known statically: a
//! register is loaded from the state on first use and kept in a variable; writes go to the
//! variable and straight through to the state, so only the lazy-flag record (and RIP) has to
//! be committed at exits and before helper calls.

use super::{helpers, JitCtx, Slot, JCACHE_SIZE, SLOTS_PER_BLOCK, STATUS_FAULT};
use crate::flags::{layout as fl, FlagOp};
use crate::mmu::tlb::{layout as tl, TLB_SIZE};
use crate::mmu::walk::Access;
use crate::state::ArchState;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{I16, I32, I64, I8};
use cranelift_codegen::ir::{AbiParam, InstBuilder, MemFlagsData, SigRef, Signature, Type, Value};
use cranelift_codegen::isa::CallConv;
use cranelift_frontend::{FunctionBuilder, Variable};
use std::mem::offset_of;

mod flags;
mod vec;
pub(crate) use vec::Unit;

const GPR: i32 = offset_of!(ArchState, gpr) as i32;
const RIP: i32 = offset_of!(ArchState, rip) as i32;
const FLAGS: i32 = offset_of!(ArchState, flags) as i32;
const SEG: i32 = offset_of!(ArchState, seg) as i32;
const SEG_SIZE: i32 = std::mem::size_of::<crate::state::Segment>() as i32;
const SEG_BASE: i32 = offset_of!(crate::state::Segment, base) as i32;

/// The lazy-flag record as known at translation time.
#[derive(Clone, Copy)]
pub(crate) enum Flags {
    /// In the architectural state (nothing to write back).
    Mem,
    /// Set by a translated instruction; written back at exits and helper calls.
    Lazy {
        op: FlagOp,
        size: u8,
        res: Value,
        a: Value,
        b: Value,
        carry: Value,
    },
}

/// Helper signatures.
struct Sigs {
    interp: SigRef,
    udiv128: SigRef,
    read: SigRef,
    write: SigRef,
    cond: SigRef,
    carry: SigRef,
}

/// Emits one block's code.
pub(crate) struct Em<'a> {
    pub b: FunctionBuilder<'a>,
    jc: Value,
    arch: Value,
    /// Address of the CPU's soft TLB (boxed, never moved: a constant of the code).
    tlb: usize,
    delta: Value,
    tag_bits: Value,
    regs: [Variable; 16],
    loaded: u16,
    pub flags: Flags,
    sigs: Sigs,
    ptr: Type,
    /// Index in the block of the instruction being translated.
    pub idx: usize,
    /// Its decoded address.
    pub ip: u64,
    /// The decoded address of the next instruction.
    pub next_ip: u64,
    /// The current segment's shared return block (param: the count returned) and exit
    /// block (params: count, RIP), created on first use (see [`Em::ret_to`], [`Em::exit`]):
    /// one epilogue per segment instead of one per helper call.
    shared: (
        Option<cranelift_codegen::ir::Block>,
        Option<cranelift_codegen::ir::Block>,
    ),
    /// Values known to fit in so many low bytes though their definition does not show it
    /// (the joins of a load's fast and slow paths), for [`Em::fits`].
    fit: std::collections::HashMap<Value, u8>,
    /// The flags the current instruction leaves are overwritten before anything observes
    /// them (`insn::flags_dead_after`).
    pub flags_dead: bool,
    /// A helper of the current instruction may have asked to end the block.
    pub may_end: bool,
    /// The statuses helpers returned since the last [`Em::end_check`] (0 or `STATUS_END`;
    /// 0 on paths that called none, so the fast paths pay no load for the check).
    ended: Variable,
    /// LOCKed instructions are left to the interpreter (other CPUs share the RAM).
    pub smp: bool,
    /// The block's successor slots (`SLOTS_PER_BLOCK`), null when not chaining.
    slots: *mut Slot,
    /// Slots used so far.
    next_slot: usize,
    /// The JIT's jump cache (`JCACHE_SIZE` slots indexed by [`super::jcache_index`]) for
    /// exits to a computed target, null when not chaining.
    jcache: *mut Slot,
    /// The module's chain stub (address) and its signature.
    stub: (usize, SigRef),
    /// The current instruction ends a block that falls through into the next block of the
    /// same function (a superblock): a conditional branch continues there when not taken.
    pub merge: bool,
    /// Decoded address of the function's first instruction: a branch there loops
    /// ([`Em::back_edge`]).
    pub head_ip: u64,
    /// Index of the block being translated among the function's blocks (0: the first).
    seg: usize,
    /// Instructions of the function's blocks before the current one.
    prefix: usize,
    /// A branch loops back to the first instruction.
    pub looped: bool,
    /// Block index of the block being translated.
    seg_idx: u32,
    /// The Cranelift block after the entry's loads, where a loop jumps back to.
    head: cranelift_codegen::ir::Block,
    /// The interpreter handler (`InterpOp` address) the current instruction may call on a
    /// side path (vector instructions, `insn::vector`), and whether its code does.
    pub side_op: Option<usize>,
    pub side_op_used: bool,
}

fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Cranelift integer type of `size` bytes.
pub(crate) fn ty(size: u8) -> Type {
    match size {
        1 => I8,
        2 => I16,
        4 => I32,
        _ => I64,
    }
}

/// Mask of `size` bytes.
pub(crate) fn mask(size: u8) -> i64 {
    crate::flags::size_mask(size) as i64
}

impl<'a> Em<'a> {
    /// Sets up the entry block: loads the context pointers.
    pub fn new(
        mut b: FunctionBuilder<'a>,
        ptr: Type,
        cc: CallConv,
        slots: *mut Slot,
        jcache: *mut Slot,
        tlb: usize,
        stub: (usize, SigRef),
    ) -> Self {
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let jc = b.block_params(entry)[0];
        let ld = |b: &mut FunctionBuilder<'a>, off: usize| {
            b.ins().load(I64, MemFlagsData::trusted(), jc, off as i32)
        };
        let arch = ld(&mut b, offset_of!(JitCtx, arch));
        let delta = ld(&mut b, offset_of!(JitCtx, delta));
        let tag_bits = ld(&mut b, offset_of!(JitCtx, tag_bits));
        let regs = std::array::from_fn(|_| b.declare_var(I64));
        let ended = b.declare_var(I64);
        let zero = b.ins().iconst(I64, 0);
        b.def_var(ended, zero);
        let head = b.create_block();
        b.ins().jump(head, &[]);
        b.switch_to_block(head);
        let mut sig = |params: &[Type], ret: Option<Type>| {
            let mut s = Signature::new(cc);
            s.params.extend(params.iter().map(|t| AbiParam::new(*t)));
            s.returns.extend(ret.map(AbiParam::new));
            b.import_signature(s)
        };
        let sigs = Sigs {
            interp: sig(&[ptr, ptr], Some(I64)),
            udiv128: sig(&[ptr, I64, I64, I64], Some(I64)),
            read: sig(&[ptr, I64, I64], Some(I64)),
            write: sig(&[ptr, I64, I64, I64], None),
            cond: sig(&[ptr, I64], Some(I64)),
            carry: sig(&[ptr], Some(I64)),
        };
        Em {
            b,
            jc,
            arch,
            tlb,
            delta,
            tag_bits,
            regs,
            loaded: 0,
            flags: Flags::Mem,
            sigs,
            ptr,
            idx: 0,
            ip: 0,
            next_ip: 0,
            shared: (None, None),
            flags_dead: false,
            fit: std::collections::HashMap::new(),
            may_end: false,
            ended,
            smp: false,
            slots,
            next_slot: 0,
            jcache,
            stub,
            merge: false,
            head_ip: u64::MAX,
            seg: 0,
            prefix: 0,
            looped: false,
            seg_idx: 0,
            head,
            side_op: None,
            side_op_used: false,
        }
    }

    /// Adds `v` to the `u64` field of the `JitCtx` at `off`.
    fn bump(&mut self, off: usize, v: i64) {
        let t = MemFlagsData::trusted();
        let x = self.b.ins().load(I64, t, self.jc, off as i32);
        let x = self.b.ins().iadd_imm_s(x, v);
        self.b.ins().store(t, x, self.jc, off as i32);
    }

    /// Stores `v` to the `u64` field of the `JitCtx` at `off`.
    fn put(&mut self, off: usize, v: i64) {
        let x = self.c(v);
        self.b
            .ins()
            .store(MemFlagsData::trusted(), x, self.jc, off as i32);
    }

    /// The block translated so far (`count` instructions, all completed) falls through into
    /// block `idx`, translated next in the same function. Nothing runs there: the exits of
    /// later blocks account the blocks passed through ([`Em::leave_seg`]), so that their
    /// counts are relative to the block they are in, as the run loop expects.
    pub fn next_seg(&mut self, count: usize, idx: u32) {
        self.seg += 1;
        self.shared = (None, None);
        self.prefix += count;
        self.seg_idx = idx;
    }

    /// Before leaving the function from a block after the first: the instructions of the
    /// blocks passed through since the function's start (or its last loop) count as
    /// chained, and the run loop continues in this block (`JitCtx::block`).
    fn leave_seg(&mut self) {
        if self.seg > 0 {
            self.bump(offset_of!(JitCtx, chained_insns), self.prefix as i64);
            self.put(offset_of!(JitCtx, block), i64::from(self.seg_idx));
        }
    }

    /// A branch to the function's first instruction (runtime RIP `rip`) after `count`
    /// instructions of the current block: while the chain budget lasts, takes one from it
    /// (as a chain to itself would), counts the instructions of this pass through the
    /// function as chained, commits the flag record and jumps back to the start;
    /// otherwise returns to the run loop (which polls for interrupts). Leaves the builder in
    /// a fresh block.
    pub fn back_edge(&mut self, count: usize, rip: Value) {
        let budget = self.b.ins().load(
            I64,
            MemFlagsData::trusted(),
            self.jc,
            offset_of!(JitCtx, budget) as i32,
        );
        let (go, out) = (self.b.create_block(), self.b.create_block());
        self.b.ins().brif(budget, go, &[], out, &[]);
        self.b.switch_to_block(out);
        self.exit(count, rip);
        self.b.switch_to_block(go);
        let nb = self.b.ins().iadd_imm_s(budget, -1);
        self.b.ins().store(
            MemFlagsData::trusted(),
            nb,
            self.jc,
            offset_of!(JitCtx, budget) as i32,
        );
        self.bump(
            offset_of!(JitCtx, chained_insns),
            (self.prefix + count) as i64,
        );
        self.commit();
        self.looped = true;
        self.b.ins().jump(self.head, &[]);
        let next = self.b.create_block();
        self.b.switch_to_block(next);
    }

    /// `v` masked to `size` bytes (nothing to emit for 8: without Cranelift's optimizer an
    /// AND with all ones would be emitted, with its constant loaded from memory).
    /// Nothing is emitted either when `v` is known to fit ([`Em::fits`]); 32 bits are cleared
    /// with a zero-extending move (an AND with 0xFFFF_FFFF would load its constant).
    pub fn and_mask(&mut self, v: Value, size: u8) -> Value {
        if size >= 8 || self.fits(v, size, 3) {
            v
        } else if let Some(k) = self.const_of(v) {
            self.c(k & mask(size))
        } else if size == 4 && self.b.func.dfg.value_type(v) == I64 {
            let lo = self.b.ins().ireduce(I32, v);
            self.b.ins().uextend(I64, lo)
        } else {
            self.b.ins().band_imm_s(v, mask(size))
        }
    }

    /// Whether `v` (I64) has no bit set above its low `size` bytes, from how it was computed
    /// (looking `depth` instructions back): a constant, a zero-extending load or extension,
    /// a mask, a logic operation or shift right of such values, a value recorded in
    /// [`Em::fit`].
    fn fits(&self, v: Value, size: u8, depth: u8) -> bool {
        use cranelift_codegen::ir::{InstructionData as D, Opcode as O};
        if size >= 8 {
            return true;
        }
        if let Some(k) = self.const_of(v) {
            return k & !mask(size) == 0;
        }
        if self.fit.get(&v).is_some_and(|&s| s <= size) {
            return true;
        }
        let dfg = &self.b.func.dfg;
        let Some(inst) = dfg.value_def(v).inst() else {
            return false;
        };
        let d = depth.saturating_sub(1);
        match dfg.insts[inst] {
            D::Load { opcode, .. } => match opcode {
                O::Uload8 => true,
                O::Uload16 => size >= 2,
                O::Uload32 => size >= 4,
                _ => false,
            },
            D::Unary {
                opcode: O::Uextend,
                arg,
            } => dfg.value_type(arg).bytes() <= u32::from(size),
            _ if depth == 0 => false,
            D::Binary {
                opcode: O::Band,
                args: [a, b],
            } => self.fits(a, size, d) || self.fits(b, size, d),
            D::Binary {
                opcode: O::Bor | O::Bxor,
                args: [a, b],
            } => self.fits(a, size, d) && self.fits(b, size, d),
            D::Binary {
                opcode: O::Ushr,
                args: [a, _],
            } => self.fits(a, size, d),
            D::Ternary {
                opcode: O::Select,
                args: [_, a, b],
            } => self.fits(a, size, d) && self.fits(b, size, d),
            _ => false,
        }
    }

    /// The value of `v` when it is an `iconst` (folded here: the optimizer is off).
    fn const_of(&self, v: Value) -> Option<i64> {
        use cranelift_codegen::ir::{InstructionData, Opcode};
        let inst = self.b.func.dfg.value_def(v).inst()?;
        match self.b.func.dfg.insts[inst] {
            InstructionData::UnaryImm {
                opcode: Opcode::Iconst,
                imm,
            } if self.b.func.dfg.value_type(v) == I64 => Some(imm.bits()),
            _ => None,
        }
    }

    /// 64-bit constant.
    pub fn c(&mut self, v: i64) -> Value {
        self.b.ins().iconst(I64, v)
    }

    /// Full 64-bit GPR `n` (hardware numbering).
    pub fn gpr(&mut self, n: usize) -> Value {
        if self.loaded & (1 << n) == 0 {
            let v = self.b.ins().load(I64, mem(), self.arch, GPR + 8 * n as i32);
            self.b.def_var(self.regs[n], v);
            self.loaded |= 1 << n;
        }
        self.b.use_var(self.regs[n])
    }

    /// Sets full 64-bit GPR `n`. Registers are written through to the state at once (the
    /// variable keeps the value for later reads): slow paths and exits then only have the
    /// flag record and RIP to commit, which keeps the code (and Cranelift's work) small.
    pub fn set_gpr(&mut self, n: usize, v: Value) {
        self.b.def_var(self.regs[n], v);
        self.loaded |= 1 << n;
        self.b.ins().store(mem(), v, self.arch, GPR + 8 * n as i32);
    }

    /// Stores the flag record (the translation state is unchanged: used on side paths and at
    /// exits; registers are already written through).
    pub fn commit(&mut self) {
        if let Flags::Lazy {
            op,
            size,
            res,
            a,
            b,
            carry,
        } = self.flags
        {
            let f = self.arch;
            let ins = &mut self.b;
            let opv = ins.ins().iconst(I8, op as u8 as i64);
            ins.ins().store(mem(), opv, f, FLAGS + fl::OP as i32);
            let sv = ins.ins().iconst(I8, i64::from(size));
            ins.ins().store(mem(), sv, f, FLAGS + fl::SIZE as i32);
            ins.ins().store(mem(), res, f, FLAGS + fl::RES as i32);
            ins.ins().store(mem(), a, f, FLAGS + fl::A as i32);
            ins.ins().store(mem(), b, f, FLAGS + fl::B as i32);
            ins.ins().store(mem(), carry, f, FLAGS + fl::EAGER as i32);
        }
    }

    /// Runtime RIP of decoded address `ip`.
    pub fn rip_of(&mut self, ip: u64) -> Value {
        let c = self.c(ip as i64);
        self.b.ins().iadd(c, self.delta)
    }

    /// Ends the function: commits the state, sets RIP, returns `count`. Leaves the builder
    /// in a fresh (unreachable-so-far) block.
    pub fn exit(&mut self, count: usize, rip: Value) {
        self.commit();
        let n = self.b.ins().iconst(I32, count as i64);
        let (blk, new) = self.shared_block(true);
        self.b.ins().jump(blk, &[n.into(), rip.into()]);
        if new {
            // The segment's exit: the state is committed, RIP is the parameter.
            self.b.switch_to_block(blk);
            let (n, rip) = (self.b.block_params(blk)[0], self.b.block_params(blk)[1]);
            self.leave_seg();
            self.b.ins().store(mem(), rip, self.arch, RIP);
            self.b.ins().return_(&[n]);
        }
        let next = self.b.create_block();
        self.b.switch_to_block(next);
    }

    /// The segment's shared exit block (`exit`: params count and RIP) or return block (param
    /// count), and whether it was created now (its body is then the caller's to emit, once
    /// the current block is terminated).
    fn shared_block(&mut self, exit: bool) -> (cranelift_codegen::ir::Block, bool) {
        let slot = if exit { self.shared.1 } else { self.shared.0 };
        if let Some(b) = slot {
            return (b, false);
        }
        let b = self.b.create_block();
        self.b.append_block_param(b, I32);
        if exit {
            self.b.append_block_param(b, I64);
            self.shared.1 = Some(b);
        } else {
            self.shared.0 = Some(b);
        }
        (b, true)
    }

    /// Branches to the segment's shared return of `count` (the state and RIP as they are:
    /// a fault left for the interpreter) when `cond` holds, else continues in a new block.
    fn ret_if(&mut self, cond: Value, count: usize) {
        let n = self.b.ins().iconst(I32, count as i64);
        let (blk, new) = self.shared_block(false);
        let cont = self.b.create_block();
        self.b.ins().brif(cond, blk, &[n.into()], cont, &[]);
        if new {
            self.b.switch_to_block(blk);
            let n = self.b.block_params(blk)[0];
            self.leave_seg();
            self.b.ins().return_(&[n]);
        }
        self.b.switch_to_block(cont);
    }

    /// Ends the function at a block exit to the fixed target `rip` after `count`
    /// instructions, chaining through the exit's own slot (see [`Em::chain`]); on a miss the
    /// function returns with `JitCtx::exit_slot` set for the run loop to fill. Without slots
    /// left: [`Em::exit_indirect`].
    pub fn exit_chain(&mut self, count: usize, rip: Value) {
        if self.slots.is_null() || self.next_slot >= SLOTS_PER_BLOCK {
            self.exit_indirect(count, rip);
            return;
        }
        let slot = self.slots.wrapping_add(self.next_slot) as usize as i64;
        self.next_slot += 1;
        self.commit();
        self.b.ins().store(mem(), rip, self.arch, RIP);
        let sp = self.b.ins().iconst(self.ptr, slot);
        self.chain(count, rip, sp, true);
    }

    /// Ends the function at a block exit to a computed target `rip` (RET, indirect JMP/CALL)
    /// after `count` instructions, chaining through the jump cache entry of `rip` (filled by
    /// the run loop for every block it runs with host code).
    pub fn exit_indirect(&mut self, count: usize, rip: Value) {
        if self.jcache.is_null() {
            self.exit(count, rip);
            return;
        }
        self.commit();
        self.b.ins().store(mem(), rip, self.arch, RIP);
        let b = &mut self.b;
        let hi = b.ins().ushr_imm_s(rip, 10);
        let idx = b.ins().bxor(rip, hi);
        let idx = b.ins().band_imm_s(idx, (JCACHE_SIZE - 1) as i64);
        let off = b.ins().imul_imm_s(idx, std::mem::size_of::<Slot>() as i64);
        let base = b.ins().iconst(self.ptr, self.jcache as usize as i64);
        let sp = b.ins().iadd(base, off);
        self.chain(count, rip, sp, false);
    }

    /// Leaves through the module's chain stub ([`super::translate::chain_stub`]) with slot
    /// `sp`: it tail-calls the successor when the slot is valid for `rip`, else returns
    /// `count` (with `JitCtx::exit_slot` = `sp` if `note`). The state and RIP are committed.
    fn chain(&mut self, count: usize, rip: Value, sp: Value, note: bool) {
        self.leave_seg();
        let stub = self.b.ins().iconst(self.ptr, self.stub.0 as i64);
        let cn = self
            .b
            .ins()
            .iconst(I64, count as i64 | (i64::from(note) << 32));
        let jc = self.jc;
        self.b
            .ins()
            .return_call_indirect(self.stub.1, stub, &[jc, sp, rip, cn]);
        let next = self.b.create_block();
        self.b.switch_to_block(next);
    }

    /// Exit before the current instruction (it is left to the interpreter).
    pub fn exit_here(&mut self) {
        let rip = self.rip_of(self.ip);
        self.exit(self.idx, rip);
    }

    /// When `cond` holds, exit before the current instruction (a case left to the
    /// interpreter); code emitted next runs when it does not.
    pub fn exit_here_if(&mut self, cond: Value) {
        let (out, cont) = (self.b.create_block(), self.b.create_block());
        self.b.ins().brif(cond, out, &[], cont, &[]);
        self.b.switch_to_block(out);
        self.exit_here();
        self.b.switch_to_block(cont);
    }

    /// After an instruction that called helpers: leave if one asked to end the block.
    pub fn end_check(&mut self) {
        if !std::mem::take(&mut self.may_end) {
            return;
        }
        let end = self.b.use_var(self.ended);
        let (out, cont) = (self.b.create_block(), self.b.create_block());
        self.b.ins().brif(end, out, &[], cont, &[]);
        self.b.switch_to_block(out);
        let rip = self.rip_of(self.next_ip);
        self.exit(self.idx + 1, rip);
        self.b.switch_to_block(cont);
        let zero = self.c(0);
        self.b.def_var(self.ended, zero);
    }

    /// Runs the current instruction through its interpreter handler (`op`: the address of its
    /// [`super::InterpOp`]) after committing the flag record and RIP. Afterwards every
    /// register and the flags are taken from the state again (the handler may have changed
    /// any). On a fault the function returns before the instruction; when the handler ended
    /// the block or moved RIP elsewhere, after it with the handler's RIP.
    pub fn interp_call(&mut self, op: usize) {
        self.run_handler(op, false);
    }

    /// The call of [`Em::interp_call`]; `keep`: the translation state (loaded registers,
    /// flag record) stays valid, as the caller knows the handler changes neither (the record
    /// it commits first is then written again, unchanged, at an exit after it).
    fn run_handler(&mut self, op: usize, keep: bool) {
        self.commit();
        let rip = self.rip_of(self.ip);
        self.b.ins().store(mem(), rip, self.arch, RIP);
        let fp = self
            .b
            .ins()
            .iconst(self.ptr, helpers::interp as *const () as usize as i64);
        let opv = self.b.ins().iconst(self.ptr, op as i64);
        let call = self
            .b
            .ins()
            .call_indirect(self.sigs.interp, fp, &[self.jc, opv]);
        let st = self.b.inst_results(call)[0];
        if !keep {
            self.loaded = 0;
            self.flags = Flags::Mem;
        }
        let (out, cont) = (self.b.create_block(), self.b.create_block());
        self.b.ins().brif(st, out, &[], cont, &[]);
        self.b.switch_to_block(out);
        let fault = self
            .b
            .ins()
            .icmp_imm_s(IntCC::Equal, st, STATUS_FAULT as i64);
        self.ret_if(fault, self.idx);
        let rip = self.b.ins().load(I64, mem(), self.arch, RIP);
        self.exit(self.idx + 1, rip);
        self.b.switch_to_block(cont);
    }

    /// Quotient and remainder of the 128-bit `hi:lo` by `d`, which the caller guarantees fit
    /// (`hi < d`): a native division when `hi` is 0, else [`helpers::udiv128`].
    pub fn udiv128(&mut self, hi: Value, lo: Value, d: Value) -> (Value, Value) {
        let (wide, join) = (self.b.create_block(), self.b.create_block());
        let q = self.b.append_block_param(join, I64);
        let r = self.b.append_block_param(join, I64);
        let nq = self.b.ins().udiv(lo, d);
        let nr = self.b.ins().urem(lo, d);
        self.b
            .ins()
            .brif(hi, wide, &[], join, &[nq.into(), nr.into()]);
        self.b.switch_to_block(wide);
        let fp = self
            .b
            .ins()
            .iconst(self.ptr, helpers::udiv128 as *const () as usize as i64);
        let call = self
            .b
            .ins()
            .call_indirect(self.sigs.udiv128, fp, &[self.jc, hi, lo, d]);
        let wq = self.b.inst_results(call)[0];
        let wr = self.b.ins().load(
            I64,
            MemFlagsData::trusted(),
            self.jc,
            offset_of!(JitCtx, scratch) as i32,
        );
        self.b.ins().jump(join, &[wq.into(), wr.into()]);
        self.b.switch_to_block(join);
        (q, r)
    }

    /// Segment base for `seg` (FS/GS only in 64-bit mode).
    pub fn seg_base(&mut self, seg: iced_x86::Register) -> Option<Value> {
        let i = match seg {
            iced_x86::Register::FS => 4,
            iced_x86::Register::GS => 5,
            _ => return None,
        };
        Some(
            self.b
                .ins()
                .load(I64, mem(), self.arch, SEG + i * SEG_SIZE + SEG_BASE),
        )
    }

    /// Calls a helper after committing the state and RIP; on a fault returns `idx` from the
    /// function. Returns the helper's result (if any).
    fn slow_call(&mut self, sig: SigRef, f: usize, args: &[Value]) -> Option<Value> {
        self.commit();
        let rip = self.rip_of(self.ip);
        self.b.ins().store(mem(), rip, self.arch, RIP);
        let fp = self.b.ins().iconst(self.ptr, f as i64);
        let call = self.b.ins().call_indirect(sig, fp, args);
        let ret = self.b.inst_results(call).first().copied();
        let st = self.b.ins().load(
            I64,
            MemFlagsData::trusted(),
            self.jc,
            offset_of!(JitCtx, status) as i32,
        );
        let fault = self
            .b
            .ins()
            .icmp_imm_s(IntCC::Equal, st, STATUS_FAULT as i64);
        self.ret_if(fault, self.idx);
        // Not a fault: 0 or STATUS_END, remembered for the end check after the instruction.
        let prev = self.b.use_var(self.ended);
        let now = self.b.ins().bor(prev, st);
        self.b.def_var(self.ended, now);
        self.may_end = true;
        ret
    }

    /// Inline TLB lookup of `va` for `acc`: branches to `fast` with the host address in
    /// variable `hv`, or to `slow`.
    fn tlb_lookup(
        &mut self,
        va: Value,
        size: u8,
        acc: Access,
    ) -> (Value, cranelift_codegen::ir::Block) {
        self.tlb_lookup_if(va, size, acc, None)
    }

    /// [`Em::tlb_lookup`], taking the slow path also when `extra` (an I8 boolean) is false.
    fn tlb_lookup_if(
        &mut self,
        va: Value,
        size: u8,
        acc: Access,
        extra: Option<Value>,
    ) -> (Value, cranelift_codegen::ir::Block) {
        // One compare decides: the entry's tag must equal the page of the access's last byte
        // with this privilege's tag bits, which fails for a page-crossing access (the entry
        // is indexed by the first byte's page) and for MMIO (`NO_HOST` in the tag).
        let b = &mut self.b;
        let shift = 12 - i64::from(tl::ENTRY.trailing_zeros());
        let idx = b.ins().ushr_imm_s(va, shift);
        let off = b.ins().band_imm_s(idx, ((TLB_SIZE - 1) * tl::ENTRY) as i64);
        let base = tl::BASE + acc as usize * tl::KIND;
        let arr = b.ins().iconst(self.ptr, (self.tlb + base) as i64);
        let e = b.ins().iadd(arr, off);
        let tag = b.ins().load(I64, mem(), e, tl::TAG as i32);
        let last = match size {
            1 => va,
            _ => b.ins().iadd_imm_s(va, i64::from(size) - 1),
        };
        let page = b.ins().band_imm_s(last, !0xFFF);
        let want = b.ins().bor(page, self.tag_bits);
        let ok = b.ins().icmp(IntCC::Equal, tag, want);
        let ok = match extra {
            Some(x) => b.ins().band(ok, x),
            None => ok,
        };
        let (fast, slow) = (b.create_block(), b.create_block());
        b.ins().brif(ok, fast, &[], slow, &[]);
        b.switch_to_block(fast);
        let addend = b.ins().load(I64, mem(), e, tl::ADDEND as i32);
        let addr = b.ins().iadd(va, addend);
        (addr, slow)
    }

    /// Loads `size` bytes at linear `va` (zero-extended to 64 bits). `rmw`: the access is the
    /// read of a read-modify-write (write permission checked).
    pub fn load(&mut self, va: Value, size: u8, rmw: bool) -> Value {
        let acc = if rmw { Access::Write } else { Access::Read };
        let (addr, slow) = self.tlb_lookup(va, size, acc);
        let v = self.b.declare_var(I64);
        let ld = match size {
            1 => self.b.ins().uload8(I64, mem(), addr, 0),
            2 => self.b.ins().uload16(I64, mem(), addr, 0),
            4 => self.b.ins().uload32(mem(), addr, 0),
            _ => self.b.ins().load(I64, mem(), addr, 0),
        };
        self.b.def_var(v, ld);
        let join = self.b.create_block();
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(slow);
        let sz = self.c(i64::from(size));
        let f = if rmw {
            helpers::read_rmw as *const () as usize
        } else {
            helpers::read as *const () as usize
        };
        let r = self
            .slow_call(self.sigs.read, f, &[self.jc, va, sz])
            .unwrap_or(sz);
        self.b.def_var(v, r);
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(join);
        let r = self.b.use_var(v);
        // Both paths zero-extend (the helper returns the `size` bytes read).
        self.fit.insert(r, size);
        r
    }

    /// Stores the low `size` bytes of `val` at linear `va`.
    pub fn store(&mut self, va: Value, size: u8, val: Value) {
        let (addr, slow) = self.tlb_lookup(va, size, Access::Write);
        match size {
            1 => self.b.ins().istore8(mem(), val, addr, 0),
            2 => self.b.ins().istore16(mem(), val, addr, 0),
            4 => self.b.ins().istore32(mem(), val, addr, 0),
            _ => self.b.ins().store(mem(), val, addr, 0),
        };
        let join = self.b.create_block();
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(slow);
        let sz = self.c(i64::from(size));
        self.slow_call(
            self.sigs.write,
            helpers::write as *const () as usize,
            &[self.jc, va, sz, val],
        );
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(join);
    }
}
