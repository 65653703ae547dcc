//! Cache of decoded blocks keyed by the guest-physical address of their first instruction.
//!
//! A block holds straight-line decoded instructions inside one 4 KiB guest page, ending at a
//! control-flow instruction (or earlier). Pages holding blocks are marked in a bitmap; writes
//! to such pages (by this CPU) invalidate every block of the page. The executor that runs a
//! block is a separate module so a JIT can replace it.

use crate::ctx::Handler;
use crate::memory::CodeBitmap;
use iced_x86::Instruction;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Maximum instructions per block.
pub const MAX_BLOCK_INSNS: usize = 64;

/// A cheap multiplicative hasher for u64 keys (guest-physical addresses).
#[derive(Default)]
pub struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type FastMap<V> = HashMap<u64, V, BuildHasherDefault<AddrHasher>>;

/// One decoded block.
#[derive(Debug, Clone, Default)]
pub struct Block {
    /// Guest-physical address of the first instruction.
    pub phys: u64,
    /// Virtual address the block was decoded at (`Instruction::ip` base); when it runs at a
    /// different virtual address the executor adds the difference to RIP-relative operands
    /// and branch targets.
    pub vip: u64,
    /// The instructions.
    pub insns: Vec<Instruction>,
    /// The handler of each instruction (selected at decode time).
    pub(crate) handlers: Vec<Handler>,
    /// The raw instruction bytes, to re-validate the block after external writes.
    pub bytes: Vec<u8>,
    /// The cache epoch at which the bytes were last known to match guest memory.
    pub epoch: u64,
    /// Times the block ran without host code (the JIT's tiering counter).
    pub(crate) hits: u32,
    /// Host code translated from (a prefix of) the block, if any.
    pub(crate) native: Option<Native>,
    /// The translator could not translate the block's first instruction: do not retry.
    pub(crate) untranslatable: bool,
    /// Sent to the JIT's compile thread, code not installed yet.
    pub(crate) queued: bool,
    /// Identity of this block among every block the cache held (`BlockCache::decoded` at
    /// insertion): a translation finished later is installed only in the block it was made
    /// from.
    pub(crate) serial: u64,
}

/// Host code of a block: `entry(ctx)` runs the first `len` instructions or fewer and returns
/// how many it completed (see `crate::jit`).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "jit"), allow(dead_code))]
pub(crate) struct Native {
    /// Address of the translated function (Cranelift's `tail` calling convention, entered
    /// through the JIT's trampoline; `ctx` is a `*mut crate::jit::JitCtx`).
    pub entry: usize,
}

/// Entries of the direct-mapped lookup table in front of the hash map.
const FAST_SIZE: usize = 4096;

/// The block cache.
#[derive(Debug)]
pub struct BlockCache {
    blocks: Vec<Block>,
    /// Direct-mapped (phys, block index) cache; validated against the block's `phys`.
    fast: Box<[(u64, u32)]>,
    map: FastMap<u32>,
    page_blocks: FastMap<Vec<u32>>,
    free: Vec<u32>,
    /// Pages holding cached code.
    pub code: CodeBitmap,
    /// Incremented when guest memory may have been written behind the CPU's back (device
    /// DMA); blocks from an older epoch are re-validated against memory before running.
    pub epoch: u64,
    /// Moves on whenever a block is dropped or forgets its host code, or guest memory may
    /// have changed behind the CPU (`epoch`): translated code chains to a successor only if
    /// the slot was filled at the current generation.
    pub chain_gen: u64,
    /// Statistics: blocks decoded.
    pub decoded: u64,
    /// Statistics: pages invalidated by writes.
    pub invalidations: u64,
}

impl Default for BlockCache {
    fn default() -> Self {
        BlockCache {
            blocks: Vec::new(),
            fast: vec![(u64::MAX, 0); FAST_SIZE].into_boxed_slice(),
            map: FastMap::default(),
            page_blocks: FastMap::default(),
            free: Vec::new(),
            code: CodeBitmap::default(),
            epoch: 0,
            chain_gen: 0,
            decoded: 0,
            invalidations: 0,
        }
    }
}

#[inline(always)]
fn fast_slot(phys: u64) -> usize {
    ((phys ^ (phys >> 12)) as usize) & (FAST_SIZE - 1)
}

impl BlockCache {
    /// Looks up the block starting at `phys`.
    #[inline]
    pub fn lookup(&mut self, phys: u64) -> Option<u32> {
        let slot = fast_slot(phys);
        let (p, i) = self.fast[slot];
        if p == phys && self.blocks.get(i as usize).is_some_and(|b| b.phys == phys) {
            return Some(i);
        }
        let i = self.map.get(&phys).copied()?;
        self.fast[slot] = (phys, i);
        Some(i)
    }

    /// The block with index `idx`.
    #[inline]
    pub fn get(&self, idx: u32) -> &Block {
        &self.blocks[idx as usize]
    }

    /// Takes an empty block (reusing a freed one's allocation) to be filled by the decoder.
    pub fn take_empty(&mut self) -> Block {
        match self.free.last() {
            Some(&i) => {
                let mut b = std::mem::take(&mut self.blocks[i as usize]);
                self.blocks[i as usize].phys = u64::MAX;
                b.insns.clear();
                b.handlers.clear();
                b.bytes.clear();
                b.phys = u64::MAX;
                b.hits = 0;
                b.native = None;
                b.untranslatable = false;
                b.queued = false;
                b
            }
            None => Block {
                insns: Vec::with_capacity(16),
                handlers: Vec::with_capacity(16),
                ..Block::default()
            },
        }
    }

    /// Inserts a filled block; returns its index and whether its page just became a code page
    /// (the caller must then drop write-TLB entries for the page).
    pub fn insert(&mut self, mut block: Block) -> (u32, bool) {
        block.epoch = self.epoch;
        block.serial = self.decoded;
        let phys = block.phys;
        let idx = match self.free.pop() {
            Some(i) => {
                self.blocks[i as usize] = block;
                i
            }
            None => {
                self.blocks.push(block);
                (self.blocks.len() - 1) as u32
            }
        };
        self.decoded += 1;
        self.map.insert(phys, idx);
        let page = phys & !0xFFF;
        let new_page = !self.code.is_code(page);
        self.code.set(page, true);
        self.page_blocks.entry(page).or_default().push(idx);
        (idx, new_page)
    }

    /// The block with index `idx`, if the cache has that many.
    #[cfg_attr(not(feature = "jit"), allow(dead_code))]
    #[inline]
    pub(crate) fn try_get(&self, idx: u32) -> Option<&Block> {
        self.blocks.get(idx as usize)
    }

    /// The block with index `idx`, mutably (tiering state).
    #[cfg_attr(not(feature = "jit"), allow(dead_code))]
    #[inline]
    pub(crate) fn get_mut(&mut self, idx: u32) -> &mut Block {
        &mut self.blocks[idx as usize]
    }

    /// Forgets every block's host code (the JIT's code cache is about to be freed).
    #[cfg_attr(not(feature = "jit"), allow(dead_code))]
    pub(crate) fn drop_native(&mut self) {
        self.chain_gen += 1;
        for b in &mut self.blocks {
            b.native = None;
            b.hits = 0;
            b.untranslatable = false;
            b.queued = false;
        }
    }

    /// Marks block `idx` as validated in the current epoch.
    pub fn validated(&mut self, idx: u32) {
        let e = self.epoch;
        if let Some(b) = self.blocks.get_mut(idx as usize) {
            b.epoch = e;
        }
    }

    /// Drops every block of the guest-physical page containing `phys`.
    pub fn invalidate_page(&mut self, phys: u64) {
        let page = phys & !0xFFF;
        if let Some(list) = self.page_blocks.get_mut(&page) {
            self.invalidations += 1;
            self.chain_gen += 1;
            for idx in list.drain(..) {
                let b = &mut self.blocks[idx as usize];
                self.map.remove(&b.phys);
                b.phys = u64::MAX;
                b.native = None;
                b.queued = false;
                self.free.push(idx);
            }
        }
        self.code.set(page, false);
    }

    /// Drops every block overlapping `gpa..gpa+len` (e.g. after device DMA into RAM).
    pub fn invalidate_range(&mut self, gpa: u64, len: u64) {
        let mut p = gpa & !0xFFF;
        let end = gpa.saturating_add(len);
        while p < end {
            if self.code.is_code(p) {
                self.invalidate_page(p);
            }
            p += 0x1000;
        }
    }

    /// Drops every block.
    pub fn invalidate_all(&mut self) {
        self.chain_gen += 1;
        self.blocks.clear();
        self.fast.fill((u64::MAX, 0));
        self.map.clear();
        self.page_blocks.clear();
        self.free.clear();
        self.code.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_lookup_invalidate() {
        let mut c = BlockCache::default();
        let mut b = c.take_empty();
        b.phys = 0x5010;
        let (i, new) = c.insert(b);
        assert!(new);
        let mut b = c.take_empty();
        b.phys = 0x5020;
        let (j, new) = c.insert(b);
        assert!(!new);
        assert_ne!(i, j);
        assert_eq!(c.lookup(0x5010), Some(i));
        assert!(c.code.is_code(0x5FFF));
        assert!(!c.code.is_code(0x6000));
        c.invalidate_range(0x5800, 1);
        assert_eq!(c.lookup(0x5010), None);
        assert_eq!(c.lookup(0x5020), None);
        assert!(!c.code.is_code(0x5000));
        let mut b = c.take_empty();
        b.phys = 0x9000;
        let (k, _) = c.insert(b);
        assert!(k == i || k == j, "freed slot reused");
    }
}
