//! The vCPU: architectural state plus the TLB and block cache, and the run loop (block
//! lookup/decoding and the interpreter-based block executor).

use crate::block_cache::{Block, BlockCache, MAX_BLOCK_INSNS};
use crate::ctx::{vec, Ctx, Event, Handler};
use crate::exec;
use crate::interrupt::{self, IntKind};
use crate::memory::GuestRam;
use crate::mmu::tlb::Tlb;
use crate::mmu::walk::Access;
use crate::platform::{Exit, Platform, ShutdownReason};
use crate::state::{ArchState, SegReg, Segment};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction};
use std::time::Instant;

/// One software x86-64 CPU.
pub struct Cpu {
    /// Architectural registers. After changing paging/mode registers directly, call
    /// [`Cpu::state_changed`].
    pub arch: ArchState,
    tlb: Box<Tlb>,
    cache: BlockCache,
    clock: Instant,
    irq_shadow: bool,
    /// The interrupt shadow (after STI, MOV SS, POP SS) was consumed at the last poll: run
    /// exactly one instruction, then poll again.
    shadow_step: bool,
    /// Blocks run since the platform was last polled for interrupts.
    since_poll: u32,
    /// Instructions retired since creation.
    pub icount: u64,
    /// `SharedCode::added` when this CPU last dropped its write-TLB entries.
    code_added_seen: u64,
    /// The JIT, when enabled ([`Cpu::enable_jit`]).
    #[cfg(feature = "jit")]
    jit: Option<Box<crate::jit::Jit>>,
}

impl Default for Cpu {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cpu")
            .field("arch", &self.arch)
            .field("icount", &self.icount)
            .finish()
    }
}

/// Maximum number of blocks run between two polls of the platform for interrupts.
const POLL_BLOCKS: u32 = 16;

/// Where the next instruction(s) come from.
enum Fetch {
    Block(u32),
    /// An instruction crossing a page boundary (decoded every time, not cached).
    Single(Instruction),
}

impl Cpu {
    /// A CPU in the reset state (use `arch.set_linux_boot_state` for the 64-bit boot entry).
    pub fn new() -> Self {
        Cpu {
            arch: ArchState::default(),
            tlb: Box::default(),
            cache: BlockCache::default(),
            clock: Instant::now(),
            irq_shadow: false,
            shadow_step: false,
            since_poll: u32::MAX,
            icount: 0,
            code_added_seen: 0,
            #[cfg(feature = "jit")]
            jit: None,
        }
    }

    /// Joins the code-page masks shared by the CPUs of a machine as CPU `index` (< 8): a
    /// write to a page another CPU translated drops that CPU's blocks of the page before it
    /// runs them again (see [`crate::memory::SharedCode`]).
    pub fn share_code(&mut self, shared: std::sync::Arc<crate::memory::SharedCode>, index: u8) {
        self.cache.invalidate_all();
        self.code_added_seen = shared.added();
        self.cache.code.share(shared, index);
        self.tlb.flush_all();
    }

    /// Applies what the other CPUs did to shared code pages (at a block boundary).
    #[inline]
    fn sync_shared_code(&mut self) {
        let Some(added) = self.cache.code.shared().map(|s| s.added()) else {
            return;
        };
        if added != self.code_added_seen {
            self.code_added_seen = added;
            self.tlb.flush_writes();
        }
        for p in self.cache.code.take_mail() {
            self.cache.invalidate_page(p);
        }
    }

    /// Translates hot blocks to host code from now on.
    #[cfg(feature = "jit")]
    pub fn enable_jit(&mut self, cfg: crate::jit::JitConfig) -> Result<(), crate::jit::JitError> {
        // Blocks must not keep host code (nor chain slots) of a JIT about to be dropped.
        self.disable_jit();
        self.jit = Some(Box::new(crate::jit::Jit::new(cfg, &*self.tlb)?));
        Ok(())
    }

    /// Starts the JIT's compile thread, which runs `on_start` first (else it starts with the
    /// first block to translate, from the vCPU's thread).
    #[cfg(feature = "jit")]
    pub fn start_jit(
        &mut self,
        on_start: Option<Box<dyn FnOnce() + Send>>,
    ) -> Result<(), crate::jit::JitError> {
        match self.jit.as_mut() {
            Some(j) => j.start(on_start),
            None => Ok(()),
        }
    }

    /// Installs every translation the JIT's compile thread has in flight, waiting for them
    /// (background compilation; for tests that need a deterministic point).
    #[cfg(feature = "jit")]
    pub fn jit_settle(&mut self) {
        if let Some(j) = self.jit.as_mut() {
            j.settle(&mut self.cache);
        }
    }

    /// Interprets everything from now on (drops all host code).
    #[cfg(feature = "jit")]
    pub fn disable_jit(&mut self) {
        if let Some(mut j) = self.jit.take() {
            j.flush(&mut self.cache);
        }
    }

    /// The `n` mnemonics translated code most often handed back to the interpreter at (the
    /// instructions to translate next), with their counts.
    #[cfg(feature = "jit")]
    pub fn jit_top_stops(&self, n: usize) -> Vec<(String, u64)> {
        self.jit
            .as_ref()
            .map(|j| j.top_stops(n))
            .unwrap_or_default()
    }

    /// Counters of the JIT, when enabled.
    #[cfg(feature = "jit")]
    pub fn jit_stats(&self) -> Option<crate::jit::JitStats> {
        self.jit.as_ref().map(|j| j.stats)
    }

    /// Sets the instant the virtual TSC counts from: one base for every CPU of a machine
    /// keeps their TSCs in sync (Linux checks that when it brings CPUs online).
    pub fn set_clock(&mut self, base: Instant) {
        self.clock = base;
    }

    /// Holds the virtual TSC for `paused`: it continues from the value it had before the
    /// host paused this CPU, instead of jumping by the time the pause lasted.
    pub fn hold_clock(&mut self, paused: std::time::Duration) {
        self.clock += paused;
    }

    /// Must be called after the VMM changed CR0/CR3/CR4/EFER or segment state directly:
    /// flushes the TLB.
    pub fn state_changed(&mut self) {
        self.tlb.flush_all();
    }

    /// Drops cached translations of guest-physical `gpa..gpa+len` (call after something
    /// other than this CPU — device DMA, the VMM loading an image — wrote code there).
    pub fn invalidate_code(&mut self, gpa: u64, len: u64) {
        self.cache.invalidate_range(gpa, len);
    }

    /// Tells the CPU that guest RAM may have been written by someone else (device DMA, the
    /// VMM). Cheap: cached blocks are re-validated against memory lazily, on their next run.
    /// Call it e.g. before injecting a device interrupt and after loading images.
    pub fn note_external_writes(&mut self) {
        self.cache.epoch = self.cache.epoch.wrapping_add(1);
        self.cache.chain_gen += 1;
    }

    /// Drops all cached translations.
    pub fn invalidate_all_code(&mut self) {
        self.cache.invalidate_all();
    }

    /// Statistics: (blocks decoded, code pages invalidated by writes).
    pub fn cache_stats(&self) -> (u64, u64) {
        (self.cache.decoded, self.cache.invalidations)
    }

    /// Runs until an [`Exit`]: at most about `budget` instructions (a block in flight
    /// finishes).
    pub fn run(&mut self, ram: &GuestRam, plat: &mut dyn Platform, budget: u64) -> Exit {
        let start = self.icount;
        // Poll for interrupts on entry.
        self.since_poll = u32::MAX;
        loop {
            self.sync_shared_code();
            if self.icount.wrapping_sub(start) >= budget {
                return Exit::BudgetExhausted;
            }
            // Interrupts are polled every POLL_BLOCKS blocks, and right after any block that
            // ended on a system instruction (STI, POPF, IRET, HLT, I/O, ...).
            if self.since_poll >= POLL_BLOCKS || self.arch.halted {
                self.since_poll = 0;
                if let Err(x) = self.check_interrupts(ram, plat) {
                    return x;
                }
            }
            self.since_poll += 1;
            if self.arch.halted {
                return Exit::Halted {
                    interrupts_enabled: self.arch.flags.other() & crate::flags::IF != 0,
                };
            }
            let fetched = if self.arch.long_mode_64() {
                self.fetch(ram, plat)
            } else {
                self.fetch_legacy(ram, plat)
            };
            let fetch = match fetched {
                Ok(f) => f,
                Err(Event::Fault { vector, error }) => {
                    let mut cx = self.ctx(ram, plat);
                    let rip = cx.s.rip;
                    if let Err(x) =
                        interrupt::raise(&mut cx, vector, error, IntKind::Exception, rip)
                    {
                        return x;
                    }
                    continue;
                }
                Err(Event::Exit(x)) => return x,
            };
            // The shadow covers only the instruction after STI/MOV SS: the guest's `sti`
            // windows are often a handful of instructions long (`sti; ...; cli` in the
            // scheduler and lock paths), so interrupts are polled right after it, not
            // POLL_BLOCKS blocks later when IF may already be clear again.
            let step = std::mem::take(&mut self.shadow_step);
            let limit = if step { 1 } else { usize::MAX };
            if let Some(x) = self.exec_fetch(ram, plat, fetch, limit) {
                return x;
            }
            if step {
                self.since_poll = POLL_BLOCKS;
            }
        }
    }

    fn ctx<'a>(&'a mut self, ram: &'a GuestRam, plat: &'a mut dyn Platform) -> Ctx<'a> {
        let legacy = !self.arch.long_mode_64();
        Ctx {
            s: &mut self.arch,
            tlb: &mut self.tlb,
            ram,
            plat,
            code: &self.cache.code,
            clock: &self.clock,
            next_rip: 0,
            delta: 0,
            end_block: false,
            irq_shadow: false,
            implicit_sup: false,
            smc: [0; 4],
            smc_len: 0,
            smc_overflow: false,
            stop: None,
            legacy,
        }
    }

    fn check_interrupts(&mut self, ram: &GuestRam, plat: &mut dyn Platform) -> Result<(), Exit> {
        if self.irq_shadow {
            self.irq_shadow = false;
            self.shadow_step = true;
            return Ok(());
        }
        let nmi = plat.take_nmi();
        let vector = if nmi {
            Some(vec::NMI)
        } else if self.arch.flags.other() & crate::flags::IF != 0 && plat.interrupt_pending() {
            plat.acknowledge_interrupt()
        } else {
            None
        };
        if let Some(v) = vector {
            self.arch.halted = false;
            let mut cx = self.ctx(ram, plat);
            let rip = cx.s.rip;
            interrupt::raise(&mut cx, v, None, IntKind::External, rip)?;
        }
        Ok(())
    }

    /// Translates RIP and finds (or decodes) the block there.
    fn fetch(&mut self, ram: &GuestRam, plat: &mut dyn Platform) -> Result<Fetch, Event> {
        let rip = self.arch.rip;
        let hit = self.ctx(ram, plat).xlate(rip, Access::Exec)?;
        if hit.host == 0 {
            return Err(Event::Exit(Exit::Shutdown(ShutdownReason::Unsupported(
                format!(
                    "instruction fetch from MMIO at RIP {rip:#x} (gpa {:#x})",
                    hit.phys
                ),
            ))));
        }
        let phys = hit.phys | (rip & 0xFFF);
        let off = (rip & 0xFFF) as usize;
        if let Some(idx) = self.cache.lookup(phys) {
            // Same physical code reached at a different virtual page keeps working through
            // `delta`; only the page offset must agree (always true for the same phys).
            let b = self.cache.get(idx);
            if b.epoch == self.cache.epoch {
                return Ok(Fetch::Block(idx));
            }
            // Guest memory may have been written externally since: compare the bytes.
            let mut cur = [0u8; MAX_BLOCK_INSNS * 15];
            let len = b.bytes.len().min(cur.len()).min(4096 - off);
            // SAFETY: `hit.host + off .. + len` stays inside the RAM page (`len <= 4096 -
            // off`); `cur` is a local buffer.
            unsafe {
                std::ptr::copy_nonoverlapping((hit.host + off) as *const u8, cur.as_mut_ptr(), len)
            };
            if cur[..len] == b.bytes[..] {
                self.cache.validated(idx);
                return Ok(Fetch::Block(idx));
            }
            self.cache.invalidate_page(phys);
        }
        // Decode a new block from the rest of the page.
        let mut buf = [0u8; 4096];
        let n = 4096 - off;
        // SAFETY: `hit.host` is the host address of a RAM page (TLB invariant); `off + n`
        // is 4096, so the copy stays inside the page; `buf` is a local buffer.
        unsafe {
            std::ptr::copy_nonoverlapping((hit.host + off) as *const u8, buf.as_mut_ptr(), n)
        };
        let mut block: Block = self.cache.take_empty();
        block.phys = phys;
        block.vip = rip;
        let mut dec = Decoder::with_ip(64, &buf[..n], rip, DecoderOptions::NONE);
        let mut ins = Instruction::default();
        let mut end = 0;
        while block.insns.len() < MAX_BLOCK_INSNS {
            dec.decode_out(&mut ins);
            if ins.is_invalid() && dec.last_error() == iced_x86::DecoderError::NoMoreBytes {
                if block.insns.is_empty() {
                    return self.fetch_crossing(ram, plat, (rip, rip, 64), &buf[..n]);
                }
                break;
            }
            end = dec.position();
            block.insns.push(ins);
            block.handlers.push(exec::select(&ins));
            if ins.is_invalid() || ins.flow_control() != FlowControl::Next {
                break;
            }
        }
        block.bytes.extend_from_slice(&buf[..end]);
        let (idx, new_page) = self.cache.insert(block);
        if new_page {
            self.tlb.flush_phys_writes(phys & !0xFFF);
        }
        Ok(Fetch::Block(idx))
    }

    /// Outside 64-bit mode: decodes the instruction at CS:IP at the code segment's bitness
    /// (never cached; see [`crate::legacy`]).
    fn fetch_legacy(&mut self, ram: &GuestRam, plat: &mut dyn Platform) -> Result<Fetch, Event> {
        let bits = self.arch.code_bits();
        let ip = self.arch.rip & if bits == 16 { 0xFFFF } else { 0xFFFF_FFFF };
        self.arch.rip = ip;
        let lin = self.arch.seg[SegReg::Cs as usize].base.wrapping_add(ip) & 0xFFFF_FFFF;
        let mut bytes = [0u8; 15];
        // Only the rest of the page first: the next page is touched only if the instruction
        // continues there.
        let first = ((0x1000 - (lin & 0xFFF)) as usize).min(bytes.len());
        self.ctx(ram, plat)
            .read_bytes_as(lin, &mut bytes[..first], Access::Exec)?;
        let mut dec = Decoder::with_ip(bits, &bytes[..first], ip, DecoderOptions::NONE);
        let ins = dec.decode();
        if ins.is_invalid() && dec.last_error() == iced_x86::DecoderError::NoMoreBytes {
            return self.fetch_crossing(ram, plat, (lin, ip, bits), &bytes[..first]);
        }
        Ok(Fetch::Single(ins))
    }

    /// Decodes one instruction at `bits` bitness that straddles a page boundary: `first`, the
    /// bytes up to the end of the page at linear address `lin` (IP `ip`), then the next page.
    fn fetch_crossing(
        &mut self,
        ram: &GuestRam,
        plat: &mut dyn Platform,
        (lin, ip, bits): (u64, u64, u32),
        first: &[u8],
    ) -> Result<Fetch, Event> {
        let mut bytes = [0u8; 15];
        let k = first.len().min(15);
        bytes[..k].copy_from_slice(&first[..k]);
        let next = lin.wrapping_add(k as u64);
        let h2 = self.ctx(ram, plat).xlate(next, Access::Exec)?;
        if h2.host == 0 {
            return Err(Event::Exit(Exit::Shutdown(ShutdownReason::Unsupported(
                "instruction fetch from MMIO".into(),
            ))));
        }
        // SAFETY: reads 15-k (< 4096) bytes from the start of a RAM page.
        unsafe {
            std::ptr::copy_nonoverlapping(h2.host as *const u8, bytes[k..].as_mut_ptr(), 15 - k)
        };
        let mut dec = Decoder::with_ip(bits, &bytes, ip, DecoderOptions::NONE);
        Ok(Fetch::Single(dec.decode()))
    }

    /// Executes a block (or single instruction); returns an exit if `run` must return.
    /// At most `limit` instructions of the block run.
    fn exec_fetch(
        &mut self,
        ram: &GuestRam,
        plat: &mut dyn Platform,
        f: Fetch,
        limit: usize,
    ) -> Option<Exit> {
        let Cpu {
            arch,
            tlb,
            cache,
            clock,
            irq_shadow,
            shadow_step: _,
            since_poll,
            icount,
            code_added_seen: _,
            #[cfg(feature = "jit")]
            jit,
        } = self;
        #[cfg(feature = "jit")]
        let native = match (&f, jit.as_mut()) {
            (Fetch::Block(i), Some(j)) if limit == usize::MAX => j.prepare(cache, *i),
            _ => None,
        };
        let legacy = !arch.long_mode_64();
        let (single, single_h);
        #[allow(unused_mut)]
        let (mut insns, mut handlers, vip): (&[Instruction], &[Handler], u64) = match &f {
            Fetch::Block(i) => {
                let b = cache.get(*i);
                (&b.insns, &b.handlers, b.vip)
            }
            Fetch::Single(ins) => {
                single = [*ins];
                single_h = [if legacy {
                    crate::legacy::select(ins)
                } else {
                    exec::select(ins)
                }];
                (&single, &single_h, ins.ip())
            }
        };
        let mut cx = Ctx {
            s: arch,
            tlb,
            ram,
            plat,
            code: &cache.code,
            clock,
            next_rip: 0,
            delta: 0,
            end_block: false,
            irq_shadow: false,
            implicit_sup: false,
            smc: [0; 4],
            smc_len: 0,
            smc_overflow: false,
            stop: None,
            legacy,
        };
        cx.delta = cx.s.rip.wrapping_sub(vip);
        #[allow(unused_mut)]
        let mut start = 0;
        #[cfg(feature = "jit")]
        if let (Some(n), Some(j), Fetch::Block(idx)) = (native, jit.as_mut(), &f) {
            let user = cx.user();
            let keys = crate::jit::chain_keys(cache.chain_gen, cx.tlb, user);
            if let Some(global) = cx.tlb.exec_global(cx.s.rip, user) {
                let gen = if global { keys.1 } else { keys.0 };
                j.note_next(cx.s.rip, gen, *idx, cx.delta, n);
            }
            let out = crate::jit::run(&mut cx, j, n, *idx, keys);
            let k = out.count as usize;
            j.stats.native_runs += 1;
            j.stats.native_insns += k as u64 + out.chained_insns;
            *icount += k as u64 + out.chained_insns;
            if out.chains > 0 || out.block != *idx {
                // The run ended in another block (chained to, or translated with this one
                // into a superblock): the interpreter continues in that one.
                let b = cache.get(out.block);
                (insns, handlers) = (&b.insns[..], &b.handlers[..]);
                cx.delta = out.delta;
            }
            // Blocks run without the run loop (chains and loops inside a function) count
            // towards the next interrupt poll.
            *since_poll = since_poll.saturating_add(out.passes as u32);
            start = if cx.end_block { insns.len() } else { k };
            if let Some(ins) = insns.get(start) {
                j.note_stop(ins.mnemonic());
            }
        }
        #[cfg(feature = "jit")]
        if native.is_none() {
            if let Some(j) = jit.as_mut() {
                j.no_next();
            }
        }
        let mut exit = None;
        for (ins, handler) in insns.iter().zip(handlers).skip(start).take(limit) {
            cx.next_rip = ins.next_ip().wrapping_add(cx.delta);
            *icount += 1;
            match handler(&mut cx, ins) {
                Ok(()) => {
                    cx.s.rip = cx.next_rip;
                    if cx.end_block {
                        break;
                    }
                }
                Err(Event::Fault { vector, error }) => {
                    // The MMU sees linear addresses only: a non-canonical address through SS
                    // (RSP/RBP-based operands, pushes and pops) is #SS(0), not #GP(0).
                    let noncanonical = |v: u64| ((v as i64) << 16 >> 16) as u64 != v;
                    let vector = if vector == vec::GP && error == Some(0) && {
                        let explicit = (0..ins.op_count())
                            .any(|i| ins.op_kind(i) == iced_x86::OpKind::Memory)
                            && ins.memory_segment() == iced_x86::Register::SS
                            && noncanonical(cx.ea(ins));
                        let sp = cx.s.gpr[4];
                        let inc = ins.stack_pointer_increment();
                        explicit
                            || (inc != 0
                                && (noncanonical(sp)
                                    || noncanonical(sp.wrapping_add(inc as i64 as u64))))
                    } {
                        vec::SS
                    } else {
                        vector
                    };
                    let rip = cx.s.rip;
                    if let Err(x) =
                        interrupt::raise(&mut cx, vector, error, IntKind::Exception, rip)
                    {
                        exit = Some(x);
                    }
                    break;
                }
                Err(Event::Exit(x)) => {
                    exit = Some(x);
                    break;
                }
            }
        }
        if cx.irq_shadow {
            *irq_shadow = true;
        }
        if cx.end_block {
            *since_poll = POLL_BLOCKS;
        }
        if exit.is_none() {
            if let Some(r) = cx.stop {
                exit = Some(Exit::Stop(r));
            }
        }
        let (smc, smc_len, overflow) = (cx.smc, cx.smc_len, cx.smc_overflow);
        if overflow {
            cache.invalidate_all();
        } else {
            for p in &smc[..smc_len] {
                cache.invalidate_page(*p);
            }
        }
        let _ = Segment::default;
        exit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_ram_can_move_to_a_vcpu_thread() {
        fn send<T: Send>() {}
        fn sync<T: Sync>() {}
        send::<Cpu>();
        send::<GuestRam>();
        sync::<GuestRam>();
    }
}
