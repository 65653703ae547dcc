//! The JIT: translates hot decoded blocks to host code with Cranelift.
//!
//! # Tiering
//! Blocks start in the interpreter. Every interpreted run of a block bumps its counter; at
//! [`JitConfig::threshold`] runs the block is translated ([`translate`]) and from then on its
//! host code runs instead. A block is translated up to its first instruction the translator
//! does not know; the interpreter continues from there (`Cpu::exec_fetch`).
//!
//! # Contract between host code and the interpreter
//! Host code gets a [`JitCtx`] and works on the same [`ArchState`] as the interpreter:
//! - general registers are cached in Cranelift variables and written through to the state,
//!   so the interpreter sees exactly its own state at every exit and helper call;
//! - flags are written as the interpreter's lazy-flag record (`flags::layout`);
//! - memory accesses look the soft TLB up inline (`mmu::tlb::layout`) and call a helper
//!   ([`helpers`]) on a miss, an MMIO page, a page-crossing access or a write to a code page;
//! - precise exceptions: before a helper call RIP is set to the instruction's address and
//!   the state is as before the instruction. A helper that meets a fault returns without
//!   side effects; the host code then returns the index of that instruction and the
//!   interpreter re-executes it, raising the fault exactly as it would have;
//! - a helper whose access ended the block (self-modifying code, a device stop request) lets
//!   the instruction finish and the host code returns after it (`Ctx::end_block` is set).
//!
//! The return value is the number of instructions completed; RIP is committed.
//!
//! # Code cache
//! All code lives in one `JITModule`; when it holds more than [`JitConfig::cache_bytes`] of
//! code, every block forgets its host code and the module is freed whole.

mod emit;
mod helpers;
mod insn;
mod translate;

use crate::block_cache::{BlockCache, Native};
use crate::state::ArchState;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::Module;
use std::time::Instant;
use thiserror::Error;

/// Errors of the JIT.
#[derive(Debug, Error)]
pub enum JitError {
    /// The host ISA is not supported by Cranelift or its flags were rejected.
    #[error("cranelift host ISA: {0}")]
    Isa(String),
    /// Cranelift failed to compile or link a function.
    #[error("cranelift: {0}")]
    Codegen(String),
}

/// What translated code receives (layout used by the generated code: `repr(C)`).
#[repr(C)]
#[derive(Debug)]
pub(crate) struct JitCtx {
    /// The architectural state.
    pub arch: *mut ArchState,
    /// The soft TLB.
    pub tlb: *const crate::mmu::tlb::Tlb,
    /// The interpreter context (`*mut Ctx<'_>`) the helpers work with.
    pub cx: *mut u8,
    /// Runtime RIP minus the address the block was decoded at.
    pub delta: u64,
    /// TLB tag bits of this privilege level (`VALID`, plus `USER` at CPL 3).
    pub tag_bits: u64,
    /// Set by helpers: [`STATUS_FAULT`] or [`STATUS_END`].
    pub status: u64,
}

/// A helper met a fault: the instruction did not happen.
pub(crate) const STATUS_FAULT: u64 = 1;
/// A helper's access ended the block: stop after this instruction.
pub(crate) const STATUS_END: u64 = 2;

/// Tuning of the JIT.
#[derive(Clone, Copy, Debug)]
pub struct JitConfig {
    /// Interpreted runs of a block before it is translated (0: translate on first run).
    pub threshold: u32,
    /// Bytes of host code after which the whole code cache is flushed.
    pub cache_bytes: usize,
}

impl Default for JitConfig {
    fn default() -> Self {
        JitConfig {
            threshold: 1000,
            cache_bytes: 64 << 20,
        }
    }
}

/// Counters of the JIT (see [`crate::Cpu::jit_stats`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct JitStats {
    /// Blocks translated.
    pub translated: u64,
    /// Guest instructions translated (sum over translated blocks).
    pub translated_insns: u64,
    /// Blocks whose first instruction the translator does not know.
    pub untranslatable: u64,
    /// Time spent translating and compiling, in nanoseconds.
    pub compile_ns: u64,
    /// Of which Cranelift's code generation (`define_function`), in nanoseconds.
    pub codegen_ns: u64,
    /// Of which making the code executable (`finalize_definitions`), in nanoseconds.
    pub finalize_ns: u64,
    /// Bytes of host code generated.
    pub code_bytes: u64,
    /// Runs of translated code.
    pub native_runs: u64,
    /// Guest instructions executed in translated code.
    pub native_insns: u64,
    /// Whole code-cache flushes.
    pub flushes: u64,
}

/// The JIT of one CPU.
pub(crate) struct Jit {
    module: Option<JITModule>,
    cfg: JitConfig,
    /// Bytes of code in the current module.
    bytes: usize,
    pub stats: JitStats,
    fctx: cranelift_frontend::FunctionBuilderContext,
    /// Per mnemonic (`iced_x86::Mnemonic as usize`): times translated code stopped before an
    /// instruction of that mnemonic and left the rest of its block to the interpreter.
    stops: Vec<u64>,
}

// SAFETY: the JIT module is owned by one `Cpu` and only ever used by the thread that owns
// the `Cpu`; it is moved between threads as a whole (never shared), which is all `Send`
// promises. Its raw pointers refer to memory it owns.
unsafe impl Send for Jit {}

impl std::fmt::Debug for Jit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jit")
            .field("cfg", &self.cfg)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn new_module() -> Result<JITModule, JitError> {
    let mut flags = settings::builder();
    let opt = match std::env::var("RQEMU_JIT_OPT").as_deref() {
        Ok("none") => "none",
        _ => "speed",
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
    ] {
        flags
            .set(k, v)
            .map_err(|e| JitError::Isa(format!("{k}={v}: {e}")))?;
    }
    let isa = cranelift_native::builder()
        .map_err(|e| JitError::Isa(e.to_string()))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| JitError::Isa(e.to_string()))?;
    Ok(JITModule::new(JITBuilder::with_isa(
        isa,
        cranelift_module::default_libcall_names(),
    )))
}

impl Jit {
    /// A JIT for the host ISA.
    pub fn new(cfg: JitConfig) -> Result<Self, JitError> {
        Ok(Jit {
            module: Some(new_module()?),
            cfg,
            bytes: 0,
            stats: JitStats::default(),
            fctx: cranelift_frontend::FunctionBuilderContext::new(),
            stops: vec![0; iced_x86::Mnemonic::values().len()],
        })
    }

    /// Host code for block `idx` if it has (or now earns) some; counts the run otherwise.
    pub fn prepare(&mut self, cache: &mut BlockCache, idx: u32) -> Option<Native> {
        let b = cache.get_mut(idx);
        if let Some(n) = b.native {
            return Some(n);
        }
        if b.untranslatable {
            return None;
        }
        b.hits = b.hits.saturating_add(1);
        if b.hits <= self.cfg.threshold {
            return None;
        }
        if self.bytes >= self.cfg.cache_bytes {
            self.flush(cache);
        }
        let b = cache.get_mut(idx);
        let t0 = Instant::now();
        let module = self.module.as_mut()?;
        let res = translate::translate(module, &mut self.fctx, &b.insns, &mut self.stats);
        self.stats.compile_ns += t0.elapsed().as_nanos() as u64;
        match res {
            Ok(Some(t)) => {
                self.stats.translated += 1;
                self.stats.translated_insns += t.insns as u64;
                self.stats.code_bytes += t.bytes as u64;
                self.bytes += t.bytes;
                b.native = Some(Native { entry: t.entry });
                b.native
            }
            Ok(None) => {
                self.stats.untranslatable += 1;
                b.untranslatable = true;
                None
            }
            Err(_) => {
                // A Cranelift failure is a translator bug: keep interpreting this block.
                b.untranslatable = true;
                None
            }
        }
    }

    /// Counts a stop of translated code before an instruction with mnemonic `m`.
    #[inline]
    pub fn note_stop(&mut self, m: iced_x86::Mnemonic) {
        if let Some(c) = self.stops.get_mut(m as usize) {
            *c += 1;
        }
    }

    /// The `n` mnemonics translated code most often stopped at, with their counts.
    pub fn top_stops(&self, n: usize) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = iced_x86::Mnemonic::values()
            .filter_map(|m| {
                let c = *self.stops.get(m as usize)?;
                (c > 0).then(|| (format!("{m:?}"), c))
            })
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v.truncate(n);
        v
    }

    /// Drops all host code (every block forgets its entry first).
    pub fn flush(&mut self, cache: &mut BlockCache) {
        cache.drop_native();
        if let Some(m) = self.module.take() {
            // SAFETY: no block refers to the module's code any more (`drop_native` above),
            // and no host code is running (we are in the run loop, between blocks).
            unsafe { m.free_memory() };
        }
        self.module = new_module().ok();
        self.bytes = 0;
        self.stats.flushes += 1;
    }
}

/// Compiled code of one block.
pub(crate) struct Translated {
    pub entry: unsafe extern "C" fn(*mut u8) -> u32,
    /// Guest instructions translated.
    pub insns: usize,
    /// Bytes of host code.
    pub bytes: usize,
}

/// Declares and compiles the function in `ctx`; returns its entry and code size.
pub(crate) fn finish(
    module: &mut JITModule,
    ctx: &mut cranelift_codegen::Context,
    stats: &mut JitStats,
) -> Result<(unsafe extern "C" fn(*mut u8) -> u32, usize), JitError> {
    let id = module
        .declare_anonymous_function(&ctx.func.signature)
        .map_err(|e| JitError::Codegen(e.to_string()))?;
    let t0 = Instant::now();
    module
        .define_function(id, ctx)
        .map_err(|e| JitError::Codegen(format!("{e:?}")))?;
    let t1 = Instant::now();
    stats.codegen_ns += (t1 - t0).as_nanos() as u64;
    let bytes = ctx
        .compiled_code()
        .map(|c| c.code_buffer().len())
        .unwrap_or(0);
    module.clear_context(ctx);
    module
        .finalize_definitions()
        .map_err(|e| JitError::Codegen(e.to_string()))?;
    stats.finalize_ns += t1.elapsed().as_nanos() as u64;
    let p = module.get_finalized_function(id);
    // SAFETY: `p` is the finalized (executable) code of a function built with the signature
    // `extern "C" fn(*mut u8) -> u32` (pointer in, i32 out, the host's default C calling
    // convention) by `translate`.
    let entry =
        unsafe { std::mem::transmute::<*const u8, unsafe extern "C" fn(*mut u8) -> u32>(p) };
    Ok((entry, bytes))
}

/// Runs host code `n` of the block `cx` is executing (with `cx.delta` set); returns the
/// number of instructions it completed. RIP and the state are committed.
pub(crate) fn run(cx: &mut crate::ctx::Ctx<'_>, n: Native) -> u32 {
    let user = cx.user();
    let mut jc = JitCtx {
        arch: &mut *cx.s as *mut ArchState,
        tlb: &*cx.tlb as *const crate::mmu::tlb::Tlb,
        cx: std::ptr::null_mut(),
        delta: cx.delta,
        tag_bits: crate::mmu::tlb::VALID | if user { crate::mmu::tlb::USER } else { 0 },
        status: 0,
    };
    jc.cx = cx as *mut crate::ctx::Ctx<'_> as *mut u8;
    // SAFETY: `n.entry` is code compiled by `translate` for this block, still owned by the
    // live JIT module (blocks forget their code before a flush). It accesses the state and
    // TLB through `jc.arch`/`jc.tlb` and calls the helpers with `jc`, whose `cx` is the
    // context of this call; nothing else touches them while it runs.
    unsafe { (n.entry)(&mut jc as *mut JitCtx as *mut u8) }
}
