//! Translation of one decoded block to a Cranelift function `fn(*mut JitCtx) -> u32`.

use super::emit::Em;
use super::insn::{self, Step};
use super::{finish, JitError, JitStats, Translated};
use cranelift_codegen::ir::types::I32;
use cranelift_codegen::ir::AbiParam;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::JITModule;
use cranelift_module::Module;
use iced_x86::Instruction;

/// Translates `insns` (decoded at `vip`) up to the first instruction the translator does not
/// know. `Ok(None)` when not even the first one is known.
pub(crate) fn translate(
    module: &mut JITModule,
    fctx: &mut FunctionBuilderContext,
    insns: &[Instruction],
    stats: &mut JitStats,
) -> Result<Option<Translated>, JitError> {
    let ptr = module.target_config().pointer_type();
    let cc = module.isa().default_call_conv();
    let mut ctx = module.make_context();
    ctx.func.signature.params.push(AbiParam::new(ptr));
    ctx.func.signature.returns.push(AbiParam::new(I32));
    let mut done = 0;
    {
        let b = FunctionBuilder::new(&mut ctx.func, fctx);
        let mut e = Em::new(b, ptr, cc);
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
            e.exit(done, rip);
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
