//! The JIT: translates hot decoded blocks to host code with Cranelift.
//!
//! # Tiering
//! Blocks start in the interpreter. Every interpreted run of a block bumps its counter; at
//! [`JitConfig::threshold`] runs the block is sent to the JIT's compile thread ([`worker`],
//! which owns the Cranelift module and translates it with [`translate`]); the interpreter keeps
//! running it until its code arrives ([`JitConfig::background`]; otherwise the CPU waits for
//! it) and from then on its host code runs instead. An instruction the translator has no code for is run from the
//! middle of the block by a call of its interpreter handler ([`helpers::interp`], with an
//! [`InterpOp`] the JIT keeps), unless it transfers control or changes what translated code
//! assumes fixed ([`translate::in_block_handler`]); there the block stops and the interpreter
//! continues (`Cpu::exec_fetch`).
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
//! The return value is the number of instructions completed in the block it returned from
//! (see Chaining for the blocks before it); RIP is committed.
//!
//! # Chaining
//! Block functions use Cranelift's `tail` calling convention and are entered through a
//! trampoline (`extern "C" fn(jc, entry)`). Every exit of a block that ends in a control
//! transfer (or runs into its size/page limit) has a successor [`Slot`]; the exit tail-calls
//! the module's chain stub ([`translate::chain_stub`]), which tail-calls the successor if the
//! slot was filled for the exit's target RIP under a current chain key ([`chain_keys`]) and the chain
//! budget ([`JitConfig::chain_limit`]) is not used up. Otherwise it returns with
//! [`JitCtx::exit_slot`] set, and the run loop fills that slot with the block it runs next at
//! that RIP ([`Jit::note_next`]). The key moves on whenever a block is dropped (SMC,
//! invalidation), host code is freed (flush), guest memory may have changed behind the CPU
//! (`note_external_writes`) — all through [`BlockCache::chain_gen`] — or the TLB is flushed
//! (a mapping may have changed: the guest must flush after changing one it used; so a target
//! RIP still names the code it named), and it differs between kernel and user mode: a chain
//! never enters stale code. The budget bounds the blocks run without the run loop, which
//! polls for interrupts.
//!
//! # Superblocks and loops
//! A block ending in a conditional branch is translated together with the cached blocks its
//! fall-through leads to in the same guest page ([`fall_through`], at most [`MAX_SEGS`]
//! blocks): a branch not taken runs on in the same function instead of chaining. Sharing the
//! page, the blocks are invalidated together; the first block's bytes cover the others for
//! re-validation after external writes. An exit from a later block counts the blocks before
//! it as chained and sets [`JitCtx::block`], so that the count it returns is relative to its
//! own block, as for a chain. A branch to the function's first instruction jumps back to its
//! start (`Em::back_edge`) and takes one unit of the chain budget, like a chain to itself.
//!
//! # Code cache
//! All code lives in one `JITModule`; when it holds more than [`JitConfig::cache_bytes`] of
//! code, every block forgets its host code and the module is freed whole (with the slots).

mod emit;
mod fpenv;
mod helpers;
mod insn;
mod translate;
mod worker;

use crate::block_cache::{BlockCache, Native};
use crate::state::ArchState;
use cranelift_jit::JITModule;
use cranelift_module::Module;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;
use thiserror::Error;
use worker::Resp;

/// Errors of the JIT.
#[derive(Debug, Error)]
pub enum JitError {
    /// The host ISA is not supported by Cranelift or its flags were rejected.
    #[error("cranelift host ISA: {0}")]
    Isa(String),
    /// Cranelift failed to compile or link a function.
    #[error("cranelift: {0}")]
    Codegen(String),
    /// The compile thread could not be started or ended.
    #[error("JIT compile thread: {0}")]
    Thread(String),
}

/// What translated code receives (layout used by the generated code: `repr(C)`).
#[repr(C)]
#[derive(Debug)]
pub(crate) struct JitCtx {
    /// The architectural state.
    pub arch: *mut ArchState,
    /// The interpreter context (`*mut Ctx<'_>`) the helpers work with.
    pub cx: *mut u8,
    /// Runtime RIP minus the address the block was decoded at.
    pub delta: u64,
    /// TLB tag bits of this privilege level (`VALID`, plus `USER` at CPL 3).
    pub tag_bits: u64,
    /// Set by helpers: [`STATUS_FAULT`] or [`STATUS_END`].
    pub status: u64,
    /// The chain keys at entry ([`chain_keys`]), for non-global and global target pages: a
    /// successor slot filled under another key is stale.
    pub gen: u64,
    pub gen_global: u64,
    /// Chains left before host code must return to the run loop (interrupt polling).
    pub budget: u64,
    /// Set by chaining code: guest instructions completed in blocks left through a chain.
    pub chained_insns: u64,
    /// Set by chaining code: chains taken.
    pub chains: u64,
    /// Set by chaining code (and exits from a superblock's later blocks): index of the block
    /// whose code is running (returned from).
    pub block: u64,
    /// Set by host code returning at a chainable exit: that exit's successor slot, for the
    /// run loop to fill with the block it runs next (null otherwise).
    pub exit_slot: *mut Slot,
    /// A second result of a helper ([`helpers::udiv128`]'s remainder).
    pub scratch: u64,
}

/// The successor cache of one block exit: "if the exit's target RIP is `rip` and the chain
/// key is still `gen` ([`chain_keys`]: no block dropped, no host code freed, no TLB flush
/// since, same privilege), jump to `entry` with `delta`". Filled by the run loop
/// ([`Jit::note_next`]), read by the chain stub ([`translate::chain_stub`]).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot {
    pub rip: u64,
    pub gen: u64,
    pub entry: u64,
    pub delta: u64,
    pub block: u64,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            rip: 0,
            gen: u64::MAX,
            entry: 0,
            delta: 0,
            block: 0,
        }
    }
}

/// Chainable exits per translation (a block ends at its first control transfer: a Jcc has
/// two; a superblock of [`MAX_SEGS`] blocks has one per Jcc plus the last fall-through).
pub(crate) const SLOTS_PER_BLOCK: usize = MAX_SEGS + 1;

/// Most blocks one translation covers: a block and the blocks its conditional branches fall
/// through to ([`fall_through`]). 6 took 0.97 of the compute workload's wall time of 3 (a
/// fifth fewer chains); 10 was no faster than 6 (whole runs, 3 pairs each).
pub(crate) const MAX_SEGS: usize = 6;

/// The slots of one block.
pub(crate) type Slots = [Slot; SLOTS_PER_BLOCK];

/// Entries of the jump cache (exits to computed targets: RET, indirect JMP/CALL).
pub(crate) const JCACHE_SIZE: usize = 1024;

/// The keys a successor slot is valid under, for a target in a non-global and in a global
/// code page: the block cache's chain generation (blocks dropped, host code freed, guest
/// memory changed behind the CPU), the TLB's flush generation of such mappings (a mapping may
/// have changed, so a target RIP may name other code: the guest must flush after changing a
/// mapping it used; CR3 writes keep global pages) and the privilege level (a slot filled in
/// the kernel is not taken in user mode); bit 62 tells the two kinds apart. Computed by the
/// run loop for every run of host code.
pub(crate) fn chain_keys(cache_gen: u64, tlb: &crate::mmu::tlb::Tlb, user: bool) -> (u64, u64) {
    let (any, global) = tlb.generations();
    let key = |g: u64| cache_gen.wrapping_add(g << 32) & !(3 << 62) | (u64::from(user) << 63);
    (key(any), key(global) | 1 << 62)
}

/// The jump cache entry of RIP `rip` (the translated code computes the same).
pub(crate) fn jcache_index(rip: u64) -> usize {
    ((rip ^ (rip >> 10)) as usize) & (JCACHE_SIZE - 1)
}

/// An instruction translated code runs through its interpreter handler ([`helpers::interp`]):
/// the decoded instruction and its handler, at a stable address the code holds as a constant
/// (owned by [`Jit`], freed with the module).
pub(crate) struct InterpOp {
    pub ins: iced_x86::Instruction,
    pub handler: crate::ctx::Handler,
    /// The handler reads or writes MXCSR as a whole ([`fpenv::touches_mxcsr`]): decided at
    /// translation, not on every call.
    pub mxcsr: bool,
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
    /// Blocks translated code may chain to (without returning to the run loop, which polls
    /// for interrupts) per entry; 0 disables chaining.
    pub chain_limit: u32,
    /// Other CPUs share the guest RAM: LOCKed instructions are left to the interpreter,
    /// which runs them as host atomics (one CPU translates them as plain read-modify-writes).
    pub smp: bool,
    /// Translate in the background: a block that turns hot is sent to the compile thread
    /// and interpreted until its code is ready. Off: the CPU waits for the code (a block is
    /// then translated exactly on its run after the threshold: deterministic, for tests).
    pub background: bool,
}

impl Default for JitConfig {
    fn default() -> Self {
        JitConfig {
            threshold: crate::DEFAULT_JIT_THRESHOLD,
            cache_bytes: 64 << 20,
            chain_limit: 256,
            smp: false,
            background: false,
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
    /// Of which run by a call of their interpreter handler from translated code.
    pub helper_insns: u64,
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
    /// Runs of translated code entered from the run loop.
    pub native_runs: u64,
    /// Blocks entered by a chain from translated code (no run loop in between).
    pub chained: u64,
    /// Successor slots filled by the run loop.
    pub slot_fills: u64,
    /// Guest instructions executed in translated code.
    pub native_insns: u64,
    /// Whole code-cache flushes.
    pub flushes: u64,
    /// Translations that cover more than one block (superblocks, [`fall_through`]).
    pub superblocks: u64,
    /// Blocks translated into superblocks after their first block (each a chain saved
    /// whenever a run passes there).
    pub merged: u64,
    /// Translations with a branch back to their first instruction, which loops inside the
    /// function (`Em::back_edge`) instead of chaining to itself.
    pub loops: u64,
    /// Translations dropped when they arrived because their block had been dropped (or the
    /// code cache flushed) while they compiled.
    pub discarded: u64,
}

/// The JIT of one CPU.
pub(crate) struct Jit {
    cfg: JitConfig,
    /// Bytes of code in the current module.
    bytes: usize,
    pub stats: JitStats,
    /// Per mnemonic (`iced_x86::Mnemonic as usize`): times translated code stopped before an
    /// instruction of that mnemonic and left the rest of its block to the interpreter.
    stops: Vec<u64>,
    /// Successor slots of the blocks translated into the current module (their addresses are
    /// constants in the code; freed with it).
    /// Boxed: the code holds their addresses, which must not move when the Vec grows.
    #[allow(clippy::vec_box)]
    slots: Vec<Box<Slots>>,
    /// The instructions translated code runs through their handlers, per translated block
    /// (each `Vec` is allocated with its final capacity, so its elements never move; the code
    /// holds their addresses). Freed with the module.
    ops: Vec<Vec<InterpOp>>,
    /// The exit slot the last run returned at and the RIP it left: filled by the next block
    /// run if that starts at the same RIP ([`Jit::note_next`]).
    pending: (*mut Slot, u64),
    /// Enters host code (System V) and calls a block function (tail calling convention): the
    /// current module's, from the compile thread.
    enter: Option<Enter>,
    /// The jump cache: a slot per [`jcache_index`], filled for every block the run loop runs
    /// with host code. Lives as long as the JIT (its address is a constant in the code); a
    /// flush makes every entry stale by moving the chain generation on.
    jcache: Box<[Slot]>,
    /// The compile thread, once started.
    link: Option<Link>,
    /// Generation of the compile thread's module (moves on with every flush).
    module_gen: u64,
    /// Jobs sent and not answered yet.
    in_flight: usize,
    /// The compile thread could not be started or lost its module: interpret.
    broken: bool,
    /// The CPU's soft TLB, whose address translated code holds as a constant: boxed by the
    /// `Cpu` that owns this JIT too, never replaced, so it outlives the code.
    tlb: *const crate::mmu::tlb::Tlb,
}

/// The channels to the compile thread ([`worker`]).
struct Link {
    tx: Option<Sender<worker::Req>>,
    rx: Receiver<Resp>,
    /// Answers the thread sent; `seen` of them were received.
    ready: Arc<AtomicU32>,
    seen: u32,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The trampoline from Rust into block functions: `enter(jc, entry) -> count`.
type Enter = unsafe extern "C" fn(*mut u8, u64) -> u32;

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

impl Jit {
    /// A JIT for the host ISA (its compile thread starts with [`Jit::start`] or on the first
    /// block to translate), for the CPU whose soft TLB is `tlb` (its code holds the address:
    /// the TLB must outlive the JIT and never move).
    pub fn new(mut cfg: JitConfig, tlb: *const crate::mmu::tlb::Tlb) -> Result<Self, JitError> {
        // Tuning knob for measurements: RQEMU_JIT_CHAIN_LIMIT overrides the chain budget.
        if let Some(n) = std::env::var("RQEMU_JIT_CHAIN_LIMIT")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            cfg.chain_limit = n;
        }
        // Fail here, not on the compile thread, when Cranelift does not support the host.
        worker::isa()?;
        Ok(Jit {
            slots: Vec::new(),
            ops: Vec::new(),
            pending: (std::ptr::null_mut(), 0),
            enter: None,
            jcache: (0..JCACHE_SIZE).map(|_| Slot::default()).collect(),
            cfg,
            bytes: 0,
            stats: JitStats::default(),
            stops: vec![0; iced_x86::Mnemonic::values().len()],
            link: None,
            module_gen: 0,
            in_flight: 0,
            broken: false,
            tlb,
        })
    }

    /// Starts the compile thread (named `rqemu-jit`), which first runs `on_start` (a sandbox
    /// narrowing itself, for instance), and waits for its first module. Done on the first
    /// block to translate when not called before; nothing when already started.
    pub fn start(&mut self, on_start: Option<Box<dyn FnOnce() + Send>>) -> Result<(), JitError> {
        if self.link.is_some() || self.broken {
            return Ok(());
        }
        let (req_tx, req_rx) = std::sync::mpsc::channel();
        let (resp_tx, resp_rx) = std::sync::mpsc::channel();
        let ready = Arc::new(AtomicU32::new(0));
        let r = ready.clone();
        let thread = std::thread::Builder::new()
            .name("rqemu-jit".into())
            .spawn(move || {
                if let Some(f) = on_start {
                    f();
                }
                worker::serve(req_rx, resp_tx, r)
            })
            .map_err(|e| {
                self.broken = true;
                JitError::Thread(e.to_string())
            })?;
        let mut link = Link {
            tx: Some(req_tx),
            rx: resp_rx,
            ready,
            seen: 0,
            thread: Some(thread),
        };
        let first = link.rx.recv();
        link.seen += 1;
        self.link = Some(link);
        match first {
            Ok(Resp::Module(Ok((enter, _)))) => {
                self.enter = Some(enter);
                Ok(())
            }
            Ok(Resp::Module(Err(e))) => {
                self.broken = true;
                Err(e)
            }
            _ => {
                self.broken = true;
                Err(JitError::Thread("the compile thread ended".into()))
            }
        }
    }

    /// Host code for block `idx` if it has some (installing the translations the compile
    /// thread finished); counts the run otherwise, and sends the block to the compile thread
    /// when the count reaches the threshold (in synchronous mode waiting for its code).
    pub fn prepare(&mut self, cache: &mut BlockCache, idx: u32) -> Option<Native> {
        if let Some(l) = &self.link {
            if l.ready.load(Ordering::Acquire) != l.seen {
                self.collect(cache, false);
            }
        }
        let b = cache.get_mut(idx);
        if let Some(n) = b.native {
            return Some(n);
        }
        if b.untranslatable || b.queued {
            return None;
        }
        b.hits = b.hits.saturating_add(1);
        if b.hits <= self.cfg.threshold {
            return None;
        }
        if self.link.is_none() && self.start(None).is_err() {
            return None;
        }
        if self.broken {
            return None;
        }
        if self.bytes >= self.cfg.cache_bytes {
            self.flush(cache);
            if self.broken {
                return None;
            }
        }
        let tails = fall_through(cache, idx);
        let segs: Vec<(u32, Vec<iced_x86::Instruction>)> = std::iter::once(idx)
            .chain(tails.iter().copied())
            .map(|i| (i, cache.get(i).insns.clone()))
            .collect();
        let seg_bytes = segs.iter().map(|s| own_bytes(cache.get(s.0))).collect();
        let b = cache.get_mut(idx);
        b.queued = true;
        let job = worker::Job {
            module_gen: self.module_gen,
            idx,
            serial: b.serial,
            segs,
            seg_bytes,
            slots: Box::default(),
            jcache: self.jcache.as_mut_ptr() as usize,
            tlb: self.tlb as usize,
            chain: self.cfg.chain_limit > 0,
            smp: self.cfg.smp,
        };
        if !self.send(worker::Req::Compile(Box::new(job))) {
            return None;
        }
        self.in_flight += 1;
        if !self.cfg.background {
            self.collect(cache, true);
        }
        cache.get(idx).native
    }

    fn send(&mut self, r: worker::Req) -> bool {
        let ok = self
            .link
            .as_ref()
            .and_then(|l| l.tx.as_ref())
            .is_some_and(|tx| tx.send(r).is_ok());
        if !ok {
            self.broken = true;
        }
        ok
    }

    /// Installs every translation in flight, waiting for them.
    pub fn settle(&mut self, cache: &mut BlockCache) {
        self.collect(cache, true);
    }

    /// Installs the finished translations; with `wait`, until none is in flight.
    fn collect(&mut self, cache: &mut BlockCache, wait: bool) {
        loop {
            let Some(l) = self.link.as_mut() else {
                return;
            };
            let r = if wait && self.in_flight > 0 {
                l.rx.recv().ok()
            } else {
                l.rx.try_recv().ok()
            };
            let Some(r) = r else {
                if wait && self.in_flight > 0 {
                    self.broken = true;
                }
                return;
            };
            l.seen += 1;
            if let Resp::Done(d) = r {
                self.in_flight -= 1;
                self.install(cache, *d);
            }
        }
    }

    /// Installs one finished translation, if its block is still the one it was made from.
    fn install(&mut self, cache: &mut BlockCache, d: worker::Done) {
        self.stats.compile_ns += d.stats.compile_ns;
        self.stats.codegen_ns += d.stats.codegen_ns;
        self.stats.finalize_ns += d.stats.finalize_ns;
        let live = d.module_gen == self.module_gen
            && cache
                .try_get(d.idx)
                .is_some_and(|b| b.serial == d.serial && b.queued);
        if !live {
            // The block was dropped (or the module flushed) while it compiled: its code is
            // never entered (freed with the module).
            self.stats.discarded += 1;
            return;
        }
        let b = cache.get_mut(d.idx);
        b.queued = false;
        match d.res {
            Ok(Some(t)) => {
                if t.segs > 1 {
                    // Re-validation after external writes must cover the tails' bytes too.
                    b.bytes = d.seg_bytes[..t.segs].concat();
                    self.stats.superblocks += 1;
                    self.stats.merged += t.segs as u64 - 1;
                }
                self.stats.loops += u64::from(t.loops);
                // The code refers to the slots and ops by address: they live as long as the
                // module.
                self.slots.push(d.slots);
                self.stats.helper_insns += d.ops.len() as u64;
                if !d.ops.is_empty() {
                    self.ops.push(d.ops);
                }
                self.stats.translated += 1;
                self.stats.translated_insns += t.insns as u64;
                self.stats.code_bytes += t.bytes as u64;
                self.bytes += t.bytes;
                b.native = Some(Native { entry: t.entry });
            }
            Ok(None) => {
                self.stats.untranslatable += 1;
                b.untranslatable = true;
            }
            Err(_) => {
                // A Cranelift failure is a translator bug: keep interpreting this block.
                b.untranslatable = true;
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

    /// Drops all host code (every block forgets its entry first; translations in flight are
    /// dropped) and waits for the compile thread's new module.
    pub fn flush(&mut self, cache: &mut BlockCache) {
        cache.drop_native();
        self.pending = (std::ptr::null_mut(), 0);
        self.enter = None;
        self.bytes = 0;
        self.stats.flushes += 1;
        if self.link.is_none() {
            return;
        }
        // The module's code is freed by the thread before it answers; nothing refers to it
        // any more (`drop_native` above, which also moved the chain generation on, so no
        // slot is valid), and no host code is running (we are in the run loop).
        if !self.send(worker::Req::Flush) {
            return;
        }
        self.module_gen += 1;
        loop {
            let Some(l) = self.link.as_mut() else {
                return;
            };
            let Ok(r) = l.rx.recv() else {
                self.broken = true;
                return;
            };
            l.seen += 1;
            match r {
                Resp::Done(_) => self.in_flight -= 1,
                Resp::Module(Ok((enter, _))) => {
                    self.enter = Some(enter);
                    break;
                }
                Resp::Module(Err(_)) => {
                    self.broken = true;
                    break;
                }
            }
        }
        self.slots.clear();
        self.ops.clear();
    }
}

impl Drop for Jit {
    fn drop(&mut self) {
        if let Some(mut l) = self.link.take() {
            // The thread ends when its requests do, and frees the module's code.
            l.tx = None;
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// The guest bytes of block `b`'s instructions.
fn own_bytes(b: &crate::block_cache::Block) -> Vec<u8> {
    let own = b
        .insns
        .last()
        .map_or(0, |l| l.next_ip().wrapping_sub(b.vip) as usize);
    b.bytes[..own.min(b.bytes.len())].to_vec()
}

impl Jit {
    /// The run loop is about to run host code `n` of block `idx` at RIP `rip` (`delta` from
    /// its decoded address) under chain key `gen` (of its page's kind, [`chain_keys`]): fills
    /// the jump cache entry of `rip`, and the slot of the exit the previous run returned at if
    /// that exit left at this RIP.
    pub fn note_next(&mut self, rip: u64, gen: u64, idx: u32, delta: u64, n: Native) {
        let fill = Slot {
            rip,
            gen,
            entry: n.entry as u64,
            delta,
            block: u64::from(idx),
        };
        self.jcache[jcache_index(rip)] = fill;
        let (slot, at) = std::mem::replace(&mut self.pending, (std::ptr::null_mut(), 0));
        if slot.is_null() || at != rip {
            return;
        }
        // SAFETY: `slot` points into a `Slots` box owned by `self.slots` (pending is cleared
        // whenever they are freed), and no host code runs now.
        unsafe { *slot = fill };
        self.stats.slot_fills += 1;
    }

    /// No block follows through the run loop with host code: forget the pending slot.
    pub fn no_next(&mut self) {
        self.pending = (std::ptr::null_mut(), 0);
    }
}

/// What a run of host code (with its chains) did.
pub(crate) struct RunOut {
    /// Instructions completed in the block it returned from.
    pub count: u32,
    /// Instructions completed in the blocks chained through before.
    pub chained_insns: u64,
    /// Chains taken.
    pub chains: u64,
    /// Chain budget used: chains plus passes of loops inside a function.
    pub passes: u64,
    /// The block it returned from.
    pub block: u32,
    /// That block's delta.
    pub delta: u64,
}

/// The blocks translated together with block `idx` (at most [`MAX_SEGS`] - 1): while the
/// last block ends in a conditional branch, the block its fall-through starts, if it is
/// cached, decoded at that address and current (epoch), lies in the same guest page (so an
/// invalidation of one drops the other: they share the page) and the bytes of all of them fit
/// the re-validation buffer of `Cpu::fetch`. Their code then runs as one function
/// (`translate::translate`), with no chain between them.
fn fall_through(cache: &mut BlockCache, idx: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let (phys, vip, epoch) = {
        let b = cache.get(idx);
        (b.phys, b.vip, cache.epoch)
    };
    let mut cur = idx;
    while out.len() + 1 < MAX_SEGS {
        let Some(last) = cache.get(cur).insns.last() else {
            break;
        };
        let ft = last.next_ip();
        if !last.is_jcc_short_or_near() || (ft ^ vip) & !0xFFF != 0 {
            break;
        }
        let Some(t) = cache.lookup(phys.wrapping_add(ft.wrapping_sub(vip))) else {
            break;
        };
        let tb = cache.get(t);
        let end = tb.insns.last().map_or(ft, |l| l.next_ip());
        if t == idx
            || tb.vip != ft
            || tb.epoch != epoch
            || tb.insns.is_empty()
            || end.wrapping_sub(vip) > crate::block_cache::MAX_BLOCK_INSNS as u64 * 15
        {
            break;
        }
        out.push(t);
        cur = t;
    }
    out
}

/// Compiled code of one block.
pub(crate) struct Translated {
    /// Blocks covered (1, or more for a superblock: see [`fall_through`]).
    pub segs: usize,
    /// The code loops back to its first instruction.
    pub loops: bool,
    /// Address of the block function (`tail` calling convention).
    pub entry: usize,
    /// Guest instructions translated.
    pub insns: usize,
    /// Bytes of host code.
    pub bytes: usize,
}

/// Declares and compiles the function in `ctx`; returns its address and code size.
/// `RQEMU_JIT_DISASM=1` prints every function's machine code (Cranelift's VCode) to stderr.
pub(crate) fn finish(
    module: &mut JITModule,
    ctx: &mut cranelift_codegen::Context,
    stats: &mut JitStats,
) -> Result<(usize, usize), JitError> {
    let id = module
        .declare_anonymous_function(&ctx.func.signature)
        .map_err(|e| JitError::Codegen(e.to_string()))?;
    let disasm = std::env::var_os("RQEMU_JIT_DISASM").is_some();
    ctx.set_disasm(disasm);
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
    if disasm {
        if let Some(v) = ctx.compiled_code().and_then(|c| c.vcode.as_ref()) {
            eprintln!("--- jit function {bytes} bytes ---\n{v}");
        }
    }
    module.clear_context(ctx);
    module
        .finalize_definitions()
        .map_err(|e| JitError::Codegen(e.to_string()))?;
    stats.finalize_ns += t1.elapsed().as_nanos() as u64;
    let p = module.get_finalized_function(id);
    Ok((p as usize, bytes))
}

/// Runs host code `n` of block `idx`, which `cx` is executing (with `cx.delta` set), and the
/// blocks it chains to (at most `jit`'s chain limit, through slots valid under `keys`, see
/// [`chain_keys`]). RIP and the state are committed.
pub(crate) fn run(
    cx: &mut crate::ctx::Ctx<'_>,
    jit: &mut Jit,
    n: Native,
    idx: u32,
    keys: (u64, u64),
) -> RunOut {
    let Some(enter) = jit.enter else {
        // Unreachable: blocks have host code only while the module (and its trampoline) live.
        return RunOut {
            count: 0,
            chained_insns: 0,
            chains: 0,
            passes: 0,
            block: idx,
            delta: cx.delta,
        };
    };
    let user = cx.user();
    debug_assert!(
        std::ptr::eq(&*cx.tlb, jit.tlb),
        "the code holds the TLB's address"
    );
    let mut jc = JitCtx {
        arch: &mut *cx.s as *mut ArchState,
        cx: std::ptr::null_mut(),
        delta: cx.delta,
        tag_bits: crate::mmu::tlb::VALID | if user { crate::mmu::tlb::USER } else { 0 },
        status: 0,
        gen: keys.0,
        gen_global: keys.1,
        budget: u64::from(jit.cfg.chain_limit),
        chained_insns: 0,
        chains: 0,
        block: u64::from(idx),
        exit_slot: std::ptr::null_mut(),
        scratch: 0,
    };
    jc.cx = cx as *mut crate::ctx::Ctx<'_> as *mut u8;
    // Floating point in the code runs under the guest's MXCSR control bits.
    let host_csr = fpenv::enter(cx.s);
    // SAFETY: `enter` is the live module's trampoline and `n.entry` code compiled by
    // `translate` for this block, still owned by that module (blocks forget their code before
    // a flush). Chains only reach code of the same module (slots of older modules are freed
    // with them; stale ones fail the generation check). The code accesses the state and TLB
    // through `jc.arch` and the TLB address it holds (`Jit::tlb`, this CPU's) and calls the
    // helpers with `jc`, whose `cx` is the context of this call; nothing else touches them
    // while it runs.
    let count = unsafe { enter(&mut jc as *mut JitCtx as *mut u8, n.entry as u64) };
    fpenv::leave(cx.s, host_csr);
    jit.pending = (jc.exit_slot, cx.s.rip);
    jit.stats.chained += jc.chains;
    RunOut {
        count,
        chained_insns: jc.chained_insns,
        chains: jc.chains,
        passes: u64::from(jit.cfg.chain_limit).saturating_sub(jc.budget),
        block: jc.block as u32,
        delta: jc.delta,
    }
}
