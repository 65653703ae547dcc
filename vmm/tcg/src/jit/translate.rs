//! Translation of one decoded block to a Cranelift function `fn(*mut JitCtx) -> u32`.

use super::emit::Em;
use super::insn::{self, Step};
use super::{finish, Enter, InterpOp, JitCtx, JitError, JitStats, Slot, Translated};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{I32, I64};
use cranelift_codegen::ir::{AbiParam, InstBuilder, MemFlagsData, Signature};
use cranelift_codegen::isa::CallConv;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::JITModule;
use cranelift_module::Module;
use iced_x86::Instruction;

/// The signature of block functions: `fn(jc: *mut JitCtx) -> u32` in Cranelift's `tail`
/// calling convention, so that a block can end in a tail call of its successor.
pub(crate) fn block_sig(module: &JITModule) -> Signature {
    let ptr = module.target_config().pointer_type();
    let mut s = Signature::new(CallConv::Tail);
    s.params.push(AbiParam::new(ptr));
    s.returns.push(AbiParam::new(I32));
    s
}

/// The signature of the chain stub: `fn(jc, slot, rip: u64, count_note: u64) -> u32` in the
/// `tail` convention (see [`chain_stub`]).
pub(crate) fn stub_sig(module: &JITModule) -> Signature {
    let ptr = module.target_config().pointer_type();
    let mut s = Signature::new(CallConv::Tail);
    s.params.extend([ptr, ptr, I64, I64].map(AbiParam::new));
    s.returns.push(AbiParam::new(I32));
    s
}

/// Compiles the chain stub every block exit tail-calls (one copy per module instead of the
/// same instructions in every exit of every block): with the exit's successor slot, its
/// target RIP (committed) and `count_note` = the block's completed instructions, plus bit 32
/// when a miss should leave the slot for the run loop to fill. It tail-calls the successor
/// when the slot is for this RIP, was filled under a current chain key
/// ([`super::chain_keys`], `JitCtx::gen`/`gen_global`) and the chain budget is not used up (setting
/// `JitCtx::delta`/`block`, adding `count` to `chained_insns`); otherwise it returns `count`,
/// with `JitCtx::exit_slot` = the slot if asked.
pub(crate) fn chain_stub(module: &mut JITModule) -> Result<usize, JitError> {
    let mut ctx = module.make_context();
    ctx.func.signature = stub_sig(module);
    let mut fctx = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        let tail = b.import_signature(block_sig(module));
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry);
        let (jc, sp, rip, cn) = (p[0], p[1], p[2], p[3]);
        let t = MemFlagsData::trusted();
        let so = |f: usize| f as i32;
        let budget = b
            .ins()
            .load(I64, t, jc, so(std::mem::offset_of!(JitCtx, budget)));
        let gen = b
            .ins()
            .load(I64, t, jc, so(std::mem::offset_of!(JitCtx, gen)));
        let gen_global = b
            .ins()
            .load(I64, t, jc, so(std::mem::offset_of!(JitCtx, gen_global)));
        let s_rip = b
            .ins()
            .load(I64, t, sp, so(std::mem::offset_of!(Slot, rip)));
        let s_gen = b
            .ins()
            .load(I64, t, sp, so(std::mem::offset_of!(Slot, gen)));
        let ok = b.ins().icmp_imm_s(IntCC::NotEqual, budget, 0);
        let c1 = b.ins().icmp(IntCC::Equal, s_rip, rip);
        let ok = b.ins().band(ok, c1);
        let c2 = b.ins().icmp(IntCC::Equal, s_gen, gen);
        let c3 = b.ins().icmp(IntCC::Equal, s_gen, gen_global);
        let c2 = b.ins().bor(c2, c3);
        let ok = b.ins().band(ok, c2);
        let count = b.ins().band_imm_s(cn, 0xFFFF_FFFF);
        let (hit, miss) = (b.create_block(), b.create_block());
        b.ins().brif(ok, hit, &[], miss, &[]);
        b.switch_to_block(hit);
        let nb = b.ins().iadd_imm_s(budget, -1);
        b.ins()
            .store(t, nb, jc, so(std::mem::offset_of!(JitCtx, budget)));
        let ci = b
            .ins()
            .load(I64, t, jc, so(std::mem::offset_of!(JitCtx, chained_insns)));
        let ci = b.ins().iadd(ci, count);
        b.ins()
            .store(t, ci, jc, so(std::mem::offset_of!(JitCtx, chained_insns)));
        let ch = b
            .ins()
            .load(I64, t, jc, so(std::mem::offset_of!(JitCtx, chains)));
        let ch = b.ins().iadd_imm_s(ch, 1);
        b.ins()
            .store(t, ch, jc, so(std::mem::offset_of!(JitCtx, chains)));
        let blk = b
            .ins()
            .load(I64, t, sp, so(std::mem::offset_of!(Slot, block)));
        b.ins()
            .store(t, blk, jc, so(std::mem::offset_of!(JitCtx, block)));
        let d = b
            .ins()
            .load(I64, t, sp, so(std::mem::offset_of!(Slot, delta)));
        b.ins()
            .store(t, d, jc, so(std::mem::offset_of!(JitCtx, delta)));
        let target = b
            .ins()
            .load(I64, t, sp, so(std::mem::offset_of!(Slot, entry)));
        b.ins().return_call_indirect(tail, target, &[jc]);
        b.switch_to_block(miss);
        let note = b.ins().ushr_imm_s(cn, 32);
        let (fill, out) = (b.create_block(), b.create_block());
        b.ins().brif(note, fill, &[], out, &[]);
        b.switch_to_block(fill);
        b.ins()
            .store(t, sp, jc, so(std::mem::offset_of!(JitCtx, exit_slot)));
        b.ins().jump(out, &[]);
        b.switch_to_block(out);
        let n = b.ins().ireduce(I32, count);
        b.ins().return_(&[n]);
        b.seal_all_blocks();
        b.finalize(module.target_config());
    }
    let mut stats = JitStats::default();
    let (p, _) = finish(module, &mut ctx, &mut stats)?;
    Ok(p)
}

/// Compiles the trampoline `extern "C" fn(jc, entry) -> u32` that calls block function
/// `entry` (and so the chain of blocks it tail-calls) and returns what the last one returns.
pub(crate) fn trampoline(module: &mut JITModule) -> Result<Enter, JitError> {
    let ptr = module.target_config().pointer_type();
    let mut ctx = module.make_context();
    ctx.func.signature.params.push(AbiParam::new(ptr));
    ctx.func.signature.params.push(AbiParam::new(I64));
    ctx.func.signature.returns.push(AbiParam::new(I32));
    let mut fctx = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        let blk = b.create_block();
        b.append_block_params_for_function_params(blk);
        b.switch_to_block(blk);
        let (jc, entry) = (b.block_params(blk)[0], b.block_params(blk)[1]);
        let sig = b.import_signature(block_sig(module));
        let call = b.ins().call_indirect(sig, entry, &[jc]);
        let r = b.inst_results(call)[0];
        b.ins().return_(&[r]);
        b.seal_all_blocks();
        b.finalize(module.target_config());
    }
    let mut stats = JitStats::default();
    let (p, _) = finish(module, &mut ctx, &mut stats)?;
    // SAFETY: `p` is the finalized code of the function built above with the signature
    // `extern "C" fn(*mut u8, u64) -> u32` (the host's default C calling convention).
    Ok(unsafe { std::mem::transmute::<*const u8, Enter>(p as *const u8) })
}

/// Translates the blocks `segs` (block index, instructions; each after the first the
/// fall-through of the conditional branch ending the one before, all decoded in one guest
/// page: see `super::fall_through`) into one function, up to the first instruction that neither
/// the translator knows nor [`in_block_handler`] allows to run through its interpreter
/// handler; those it allows become calls of [`super::helpers::interp`] with an [`InterpOp`]
/// pushed on `ops` (allocated by the caller with capacity for every instruction of `segs`, so
/// it never reallocates). `stub`: the module's [`chain_stub`].
///
/// Passing from one block into the next costs nothing; an exit from a later block counts the
/// blocks before it as chained (`JitCtx::chained_insns`) and names its own (`JitCtx::block`),
/// so that its count is relative to the block it is in, as the run loop expects. A branch
/// back to the first instruction (a loop) jumps to the start of the function while the
/// chain budget lasts.
///
/// `Ok(None)` when not even the first instruction is translated. `slots`: the function's
/// successor slots (`SLOTS_PER_BLOCK` of them), `jcache` the JIT's jump cache; null to
/// translate without chaining. `tlb`: the address of the CPU's soft TLB. `smp`: LOCKed
/// instructions are not translated (see `JitConfig::smp`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn translate(
    module: &mut JITModule,
    fctx: &mut FunctionBuilderContext,
    segs: &[(u32, &[Instruction])],
    slots: *mut Slot,
    jcache: *mut Slot,
    tlb: usize,
    stub: usize,
    ops: &mut Vec<InterpOp>,
    smp: bool,
    stats: &mut JitStats,
) -> Result<Option<Translated>, JitError> {
    debug_assert!(ops.capacity() >= segs.iter().map(|s| s.1.len()).sum());
    let ptr = module.target_config().pointer_type();
    let cc = module.isa().default_call_conv();
    let mut ctx = module.make_context();
    ctx.func.signature = block_sig(module);
    let (mut done, mut total, mut used) = (0, 0, 0);
    let loops;
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, fctx);
        let stub_sig = b.import_signature(stub_sig(module));
        let mut e = Em::new(b, ptr, cc, slots, jcache, tlb, (stub, stub_sig));
        e.smp = smp;
        e.head_ip = segs
            .first()
            .and_then(|s| s.1.first())
            .map_or(u64::MAX, |i| i.ip());
        let mut ended = false;
        'segs: for (k, (_, insns)) in segs.iter().enumerate() {
            if k > 0 {
                // The previous block fell through into this one.
                e.next_seg(done, segs[k].0);
                total += done;
                done = 0;
            }
            used = k + 1;
            e.merge = false;
            for (i, ins) in insns.iter().enumerate() {
                e.idx = i;
                e.ip = ins.ip();
                e.next_ip = ins.next_ip();
                e.merge = k + 1 < segs.len() && i + 1 == insns.len();
                // (Not for an instruction with a memory operand: a helper that ends the block
                // after it would commit its flags.)
                e.flags_dead = insn::regs_only(ins) && insn::flags_dead_after(&insns[i + 1..]);
                // The handler, for a side path of the translation or a call of it instead.
                let push_op = |ops: &mut Vec<InterpOp>| {
                    ops.push(InterpOp {
                        ins: *ins,
                        handler: crate::exec::select(ins),
                        mxcsr: super::fpenv::touches_mxcsr(ins.mnemonic()),
                    });
                    ops.last().map_or(0, |o| o as *const InterpOp as usize)
                };
                let can_call = in_block_handler(ins) && ops.len() < ops.capacity();
                e.side_op = (can_call && insn::wants_side_op(ins)).then(|| push_op(ops));
                e.side_op_used = false;
                let step = insn::translate(&mut e, ins);
                if e.side_op.is_some() && !e.side_op_used && step != Step::Unknown {
                    // Translated without it: nothing refers to it.
                    ops.pop();
                }
                match step {
                    Step::Next => done = i + 1,
                    Step::End => {
                        done = i + 1;
                        ended = true;
                        break 'segs;
                    }
                    Step::Unknown if can_call => {
                        let op = match e.side_op {
                            Some(op) => op,
                            None => push_op(ops),
                        };
                        e.interp_call(op);
                        done = i + 1;
                    }
                    Step::Unknown => {
                        e.exit_here();
                        ended = true;
                        break 'segs;
                    }
                }
            }
            if !e.merge {
                break;
            }
        }
        if !ended {
            // The block ended without a control transfer (size or page limit).
            let rip = e.rip_of(e.next_ip);
            e.exit_chain(done, rip);
        }
        loops = e.looped;
        e.b.seal_all_blocks();
        let tcfg = module.target_config();
        e.b.finalize(tcfg);
    }
    total += done;
    if total == 0 {
        ops.clear();
        module.clear_context(&mut ctx);
        return Ok(None);
    }
    let (entry, bytes) = finish(module, &mut ctx, stats)?;
    Ok(Some(Translated {
        segs: used,
        loops,
        entry,
        insns: total,
        bytes,
    }))
}

/// Whether translated code may run `ins` through its interpreter handler in the middle of a
/// block: it must fall through to the next instruction (no control transfer: those end
/// blocks) and change nothing that translated code or the run loop assume fixed within a
/// block: privilege level, mode, paging, descriptor tables, the interrupt flag or its
/// shadow, single-stepping (privileged and I/O instructions — `is_privileged` covers IN/OUT/
/// INS/OUTS/CLI/STI —, POPF, segment-register loads).
pub(crate) fn in_block_handler(ins: &Instruction) -> bool {
    use iced_x86::{FlowControl, Mnemonic as M, OpKind};
    if ins.flow_control() != FlowControl::Next || ins.is_privileged() {
        return false;
    }
    let seg_dest = ins.op_count() > 0
        && ins.op0_kind() == OpKind::Register
        && ins.op0_register().is_segment_register();
    !seg_dest
        && !matches!(
            ins.mnemonic(),
            M::Popf
                | M::Popfd
                | M::Popfq
                | M::Lss
                | M::Lfs
                | M::Lgs
                | M::Lds
                | M::Les
                | M::Sysenter
                | M::Sysexit
        )
}
