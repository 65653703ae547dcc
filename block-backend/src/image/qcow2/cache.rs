//! A bounded LRU cache of metadata clusters (L2 tables, refcount blocks).
//!
//! Metadata is written through (every change goes to the file at once, in the order the
//! caller chooses), so cached clusters are never dirty and eviction is free. Evicted buffers
//! are reused: a warm cache does no heap allocation.

use std::collections::HashMap;
use std::fs::File;

use super::super::raw::read_upto;
use super::super::{ImageError, Result};

struct Slot {
    offset: u64,
    last_use: u64,
    data: Box<[u8]>,
}

/// Cache of whole clusters keyed by host offset.
pub(crate) struct ClusterCache {
    what: &'static str,
    cluster_size: usize,
    capacity: usize,
    map: HashMap<u64, usize>,
    slots: Vec<Slot>,
    tick: u64,
}

impl std::fmt::Debug for ClusterCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClusterCache({}, {}/{})",
            self.what,
            self.slots.len(),
            self.capacity
        )
    }
}

impl ClusterCache {
    /// A cache holding at most `capacity` clusters of `cluster_size` bytes.
    pub(crate) fn new(what: &'static str, cluster_size: usize, capacity: usize) -> Self {
        ClusterCache {
            what,
            cluster_size,
            capacity: capacity.max(2),
            map: HashMap::with_capacity(capacity),
            slots: Vec::with_capacity(capacity),
            tick: 0,
        }
    }

    fn slot_for(&mut self, offset: u64) -> usize {
        self.tick += 1;
        let i = if self.slots.len() < self.capacity {
            self.slots.push(Slot {
                offset,
                last_use: 0,
                data: vec![0u8; self.cluster_size].into_boxed_slice(),
            });
            self.slots.len() - 1
        } else {
            let (i, _) = self
                .slots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.last_use)
                .unwrap_or((0, &self.slots[0]));
            self.map.remove(&self.slots[i].offset);
            self.slots[i].offset = offset;
            i
        };
        self.slots[i].last_use = self.tick;
        self.map.insert(offset, i);
        i
    }

    /// The cluster at `offset`, read from `file` if not cached.
    pub(crate) fn get(&mut self, file: &File, offset: u64) -> Result<&mut [u8]> {
        if let Some(&i) = self.map.get(&offset) {
            self.tick += 1;
            self.slots[i].last_use = self.tick;
            return Ok(&mut self.slots[i].data);
        }
        let i = self.slot_for(offset);
        // A table whose tail lies past the end of the file reads as zeroes there; one that
        // starts past it is corrupt.
        let r = read_upto(file, &mut self.slots[i].data, offset);
        if !matches!(r, Ok(n) if n > 0) {
            self.map.remove(&offset);
            self.slots[i].last_use = 0;
            return Err(match r {
                Err(e) => ImageError::io(format!("reading {} at {offset:#x}", self.what), e),
                Ok(_) => ImageError::Corrupt(format!(
                    "{} at {offset:#x} lies beyond the end of the file",
                    self.what
                )),
            });
        }
        Ok(&mut self.slots[i].data)
    }

    /// Inserts a new all-zero cluster for `offset` (a table being created) and returns it.
    pub(crate) fn insert_zeroed(&mut self, offset: u64) -> &mut [u8] {
        let i = match self.map.get(&offset) {
            Some(&i) => i,
            None => self.slot_for(offset),
        };
        self.slots[i].data.fill(0);
        &mut self.slots[i].data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn lru_eviction_and_reload() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..8 * 512).map(|i| (i / 512) as u8).collect();
        f.write_all(&data).unwrap();
        let mut c = ClusterCache::new("test", 512, 2);
        assert_eq!(c.get(&f, 0).unwrap()[0], 0);
        assert_eq!(c.get(&f, 512).unwrap()[0], 1);
        c.get(&f, 0).unwrap()[1] = 99; // in-memory change, kept while cached
        assert_eq!(c.get(&f, 1024).unwrap()[0], 2); // evicts 512 (least recent)
        assert_eq!(c.get(&f, 0).unwrap()[1], 99);
        assert_eq!(c.slots.len(), 2);
        assert!(matches!(c.get(&f, 8 * 512), Err(ImageError::Corrupt(_))));
        assert_eq!(c.insert_zeroed(4096)[5], 0);
    }
}
