//! Translation of one decoded block to a Cranelift function `fn(*mut JitCtx) -> u32`.

use super::emit::Em;
use super::insn::{self, Step};
use super::{finish, Enter, InterpOp, JitError, JitStats, Slot, Translated};
use cranelift_codegen::ir::types::{I32, I64};
use cranelift_codegen::ir::{AbiParam, InstBuilder, Signature};
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

/// Translates `insns` (decoded at `vip`) up to the first instruction that neither the
/// translator knows nor [`in_block_handler`] allows to run through its interpreter handler;
/// those it allows become calls of [`super::helpers::interp`] with an [`InterpOp`] pushed on
/// `ops` (allocated by the caller with capacity `insns.len()`, so it never reallocates).
/// `Ok(None)` when not even the first instruction is translated. `slots`: the block's successor
/// slots (`SLOTS_PER_BLOCK` of them), `jcache` the JIT's jump cache; null to translate
/// without chaining.
#[allow(clippy::too_many_arguments)]
pub(crate) fn translate(
    module: &mut JITModule,
    fctx: &mut FunctionBuilderContext,
    insns: &[Instruction],
    slots: *mut Slot,
    jcache: *mut Slot,
    ops: &mut Vec<InterpOp>,
    stats: &mut JitStats,
) -> Result<Option<Translated>, JitError> {
    debug_assert!(ops.capacity() >= insns.len());
    let ptr = module.target_config().pointer_type();
    let cc = module.isa().default_call_conv();
    let mut ctx = module.make_context();
    ctx.func.signature = block_sig(module);
    let mut done = 0;
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, fctx);
        let tail = b.import_signature(block_sig(module));
        let mut e = Em::new(b, ptr, cc, slots, jcache, tail);
        let mut ended = false;
        for (i, ins) in insns.iter().enumerate() {
            e.idx = i;
            e.ip = ins.ip();
            e.next_ip = ins.next_ip();
            match insn::translate(&mut e, ins) {
                Step::Next => done = i + 1,
                Step::End => {
                    done = i + 1;
                    ended = true;
                    break;
                }
                Step::Unknown if in_block_handler(ins) && ops.len() < ops.capacity() => {
                    ops.push(InterpOp {
                        ins: *ins,
                        handler: crate::exec::select(ins),
                    });
                    let op = ops
                        .last()
                        .map_or(std::ptr::null(), |o| o as *const InterpOp);
                    e.interp_call(op as usize);
                    done = i + 1;
                }
                Step::Unknown => {
                    e.exit_here();
                    ended = true;
                    break;
                }
            }
        }
        if !ended {
            // The block ended without a control transfer (size or page limit).
            let rip = e.rip_of(e.next_ip);
            e.exit_chain(done, rip);
        }
        e.b.seal_all_blocks();
        let tcfg = module.target_config();
        e.b.finalize(tcfg);
    }
    if done == 0 {
        ops.clear();
        module.clear_context(&mut ctx);
        return Ok(None);
    }
    let (entry, bytes) = finish(module, &mut ctx, stats)?;
    Ok(Some(Translated {
        entry,
        insns: done,
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
