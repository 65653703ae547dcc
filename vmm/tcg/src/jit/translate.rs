//! Translation of one decoded block to a Cranelift function `fn(*mut JitCtx) -> u32`.

use super::emit::Em;
use super::insn::{self, Step};
use super::{finish, Enter, JitError, JitStats, Slot, Translated};
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

/// Translates `insns` (decoded at `vip`) up to the first instruction the translator does not
/// know. `Ok(None)` when not even the first one is known. `slots`: the block's successor
/// slots (`SLOTS_PER_BLOCK` of them), `jcache` the JIT's jump cache; null to translate
/// without chaining. `smp`: LOCKed instructions end the translation (see `JitConfig::smp`).
pub(crate) fn translate(
    module: &mut JITModule,
    fctx: &mut FunctionBuilderContext,
    insns: &[Instruction],
    (slots, jcache): (*mut Slot, *mut Slot),
    smp: bool,
    stats: &mut JitStats,
) -> Result<Option<Translated>, JitError> {
    let ptr = module.target_config().pointer_type();
    let cc = module.isa().default_call_conv();
    let mut ctx = module.make_context();
    ctx.func.signature = block_sig(module);
    let mut done = 0;
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, fctx);
        let tail = b.import_signature(block_sig(module));
        let mut e = Em::new(b, ptr, cc, slots, jcache, tail);
        e.smp = smp;
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
