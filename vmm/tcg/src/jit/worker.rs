//! The compile thread of one JIT: owns the Cranelift module, translates the blocks the vCPU
//! sends ([`Job`]) and sends back their host code ([`Done`]).
//!
//! Cranelift compiles slowly (hundreds of microseconds for a block of a few instructions),
//! so the vCPU does not wait for it: it sends a block that turned hot and keeps interpreting
//! it until the code arrives ([`super::Jit::prepare`] installs every finished job it finds);
//! on a host with a second core compilation costs the guest nothing. In synchronous mode
//! (`JitConfig::background` off: tests that need a block translated on its first run) the
//! vCPU waits for each job instead; both modes share this thread and this code.
//!
//! Memory: every function is finalized on its own (cranelift-jit then starts fresh pages for
//! the next), so code the vCPU runs is never written or re-protected while the thread adds
//! code beside it. The module is freed only on [`Req::Flush`] (the vCPU runs no host code and
//! has forgotten every entry then) and when the thread ends (the JIT was dropped).

use super::translate;
use super::{InterpOp, JitError, JitStats, Slot, Slots, Translated};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_jit::{JITBuilder, JITModule};
use iced_x86::Instruction;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

/// A block (with the blocks it falls through to) to translate.
pub(crate) struct Job {
    /// The module generation the job was made for (a job for a flushed module is dropped).
    pub module_gen: u64,
    /// Block index of the head and its identity (`Block::serial`): the result is installed
    /// only if that block is still there, unchanged.
    pub idx: u32,
    pub serial: u64,
    /// The blocks: index and instructions (copied: the cache may change meanwhile).
    pub segs: Vec<(u32, Vec<Instruction>)>,
    /// The guest bytes of each block, for re-validation of a superblock.
    pub seg_bytes: Vec<Vec<u8>>,
    /// The successor slots the code refers to (by address: boxed, never moved).
    pub slots: Box<Slots>,
    /// The JIT's jump cache (address), or null to translate without chaining.
    pub jcache: usize,
    /// The CPU's soft TLB (address; see `Jit::tlb`).
    pub tlb: usize,
    pub chain: bool,
    pub smp: bool,
}

/// A finished job.
pub(crate) struct Done {
    pub module_gen: u64,
    pub idx: u32,
    pub serial: u64,
    pub res: Result<Option<Translated>, JitError>,
    pub slots: Box<Slots>,
    /// The instructions the code runs through their handlers (by address: kept with it).
    pub ops: Vec<InterpOp>,
    pub seg_bytes: Vec<Vec<u8>>,
    /// Compile-time counters of this job (`compile_ns`, `codegen_ns`, `finalize_ns`).
    pub stats: JitStats,
}

/// What the vCPU asks of the thread.
pub(crate) enum Req {
    Compile(Box<Job>),
    /// Free the module and start a new one (answered by [`Resp::Module`]).
    Flush,
}

/// What the thread answers.
pub(crate) enum Resp {
    Done(Box<Done>),
    /// A (new) module is ready: its trampoline and chain stub, or why it could not be made.
    Module(Result<(super::Enter, usize), JitError>),
}

/// Cranelift's settings for the host: optimizer off unless `RQEMU_JIT_OPT=speed`.
pub(crate) fn isa() -> Result<cranelift_codegen::isa::OwnedTargetIsa, JitError> {
    let mut flags = settings::builder();
    // Cranelift's optimizer (egraph) costs a quarter of the compile time and gains nothing
    // measurable on these short blocks: off unless RQEMU_JIT_OPT=speed.
    let opt = match std::env::var("RQEMU_JIT_OPT").as_deref() {
        Ok("speed") => "speed",
        _ => "none",
    };
    let regalloc = match std::env::var("RQEMU_JIT_REGALLOC").as_deref() {
        Ok("single_pass") => "single_pass",
        _ => "backtracking",
    };
    for (k, v) in [
        ("opt_level", opt),
        ("regalloc_algorithm", regalloc),
        ("use_colocated_libcalls", "false"),
        ("is_pic", "false"),
        ("enable_verifier", "false"),
        // Cranelift's x64 tail calls (block chaining) rely on frame pointers.
        ("preserve_frame_pointers", "true"),
    ] {
        flags
            .set(k, v)
            .map_err(|e| JitError::Isa(format!("{k}={v}: {e}")))?;
    }
    cranelift_native::builder()
        .map_err(|e| JitError::Isa(e.to_string()))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| JitError::Isa(e.to_string()))
}

/// A fresh module with its trampoline and chain stub ([`translate::chain_stub`]).
fn new_module() -> Result<(JITModule, super::Enter, usize), JitError> {
    let mut m = JITModule::new(JITBuilder::with_isa(
        isa()?,
        cranelift_module::default_libcall_names(),
    ));
    let enter = translate::trampoline(&mut m)?;
    let stub = translate::chain_stub(&mut m)?;
    Ok((m, enter, stub))
}

/// The thread's body: answers with a module first, then serves `rx` until the JIT drops its
/// sender. `ready` counts the answers sent (the vCPU looks for them only when it moved).
pub(crate) fn serve(rx: Receiver<Req>, tx: Sender<Resp>, ready: Arc<AtomicU32>) {
    let send = |r: Resp| {
        let ok = tx.send(r).is_ok();
        ready.fetch_add(1, Ordering::Release);
        ok
    };
    let mut fctx = cranelift_frontend::FunctionBuilderContext::new();
    let mut gen = 0u64;
    let mut module = match new_module() {
        Ok((m, e, s)) => {
            send(Resp::Module(Ok((e, s))));
            Some((m, s))
        }
        Err(e) => {
            send(Resp::Module(Err(e)));
            None
        }
    };
    // Jobs received and not compiled yet, newest last: compiled newest first, since the
    // code the guest runs now is what just turned hot (a backlog from a program that ended
    // would otherwise delay it).
    let mut stack: Vec<Box<Job>> = Vec::new();
    'serve: loop {
        let req = if stack.is_empty() {
            match rx.recv() {
                Ok(r) => Some(r),
                Err(_) => break,
            }
        } else {
            match rx.try_recv() {
                Ok(r) => Some(r),
                Err(std::sync::mpsc::TryRecvError::Empty) => None,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
            }
        };
        match req {
            Some(Req::Compile(job)) => stack.push(job),
            Some(Req::Flush) => {
                // Every job sent before is for the module freed now.
                stack.clear();
                if let Some((m, _)) = module.take() {
                    // SAFETY: the vCPU sends Flush only from its run loop after every block
                    // forgot its host code and the slots were dropped: no code of this
                    // module runs or is referred to any more.
                    unsafe { m.free_memory() };
                }
                gen += 1;
                let r = new_module().map(|(m, e, s)| {
                    module = Some((m, s));
                    (e, s)
                });
                if !send(Resp::Module(r)) {
                    break 'serve;
                }
            }
            None => {
                let Some(job) = stack.pop() else { continue };
                let Some((m, stub)) = module.as_mut() else {
                    continue;
                };
                if job.module_gen != gen {
                    continue;
                }
                let done = compile(m, *stub, &mut fctx, *job);
                if !send(Resp::Done(Box::new(done))) {
                    break 'serve;
                }
            }
        }
    }
    if let Some((m, _)) = module.take() {
        // SAFETY: the JIT dropped its sender: it is being dropped with its CPU, which runs no
        // host code any more (the JIT joins this thread before its slots and ops are freed).
        unsafe { m.free_memory() };
    }
}

fn compile(
    module: &mut JITModule,
    stub: usize,
    fctx: &mut cranelift_frontend::FunctionBuilderContext,
    mut job: Job,
) -> Done {
    let t0 = std::time::Instant::now();
    let mut stats = JitStats::default();
    let segs: Vec<(u32, &[Instruction])> = job.segs.iter().map(|(i, v)| (*i, &v[..])).collect();
    let total: usize = segs.iter().map(|s| s.1.len()).sum();
    let mut ops = Vec::with_capacity(total);
    let (sp, jp) = if job.chain {
        (
            &mut *job.slots as *mut Slots as *mut Slot,
            job.jcache as *mut Slot,
        )
    } else {
        (std::ptr::null_mut(), std::ptr::null_mut())
    };
    let res = translate::translate(
        module, fctx, &segs, sp, jp, job.tlb, stub, &mut ops, job.smp, &mut stats,
    );
    stats.compile_ns = t0.elapsed().as_nanos() as u64;
    Done {
        module_gen: job.module_gen,
        idx: job.idx,
        serial: job.serial,
        res,
        slots: job.slots,
        ops,
        seg_bytes: job.seg_bytes,
        stats,
    }
}
