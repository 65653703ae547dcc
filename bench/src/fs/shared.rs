//! What the parts of `rqemu-bench fs` share, below them all: the content pattern of the data
//! file, the working set a run works on and the totals it counts.

use crate::stats::Latencies;

/// Content of the data file: each 8-byte word holds its own offset, scrambled.
pub fn pattern_word(off: u64) -> u64 {
    off ^ 0x5251_454d_5f46_5321
}

/// Fills `buf` with the pattern of the file region starting at `off` (a multiple of 8).
pub fn fill_pattern(buf: &mut [u8], off: u64) {
    for (i, w) in buf.chunks_mut(8).enumerate() {
        let v = pattern_word(off + 8 * i as u64).to_le_bytes();
        w.copy_from_slice(&v[..w.len()]);
    }
}

/// What the workload runs on, created through FUSE by `prepare` (`fs/mod.rs`).
#[derive(Debug)]
pub struct WorkingSet {
    /// Name of the directory under the root.
    pub dir_name: String,
    /// Its node id.
    pub dir: u64,
    /// metadata: the files (name, node id).
    pub files: Vec<(String, u64)>,
    /// seqread/randread: the data file's node id, open handle and usable size.
    pub data: Option<(u64, u64, u64)>,
}

/// Totals of a run.
#[derive(Debug)]
pub struct Totals {
    /// Operations completed.
    pub ops: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Operations that failed.
    pub errors: u64,
    /// Reads whose content was wrong.
    pub verify_failures: u64,
    /// Latency of each operation.
    pub lat: Latencies,
    /// metadata: LOOKUPs done per file (lookup counts to FORGET).
    pub lookups: Vec<u64>,
    /// The first error seen.
    pub first_error: Option<String>,
}

impl Totals {
    /// Empty totals.
    pub fn new(files: usize) -> Self {
        Totals {
            ops: 0,
            bytes: 0,
            errors: 0,
            verify_failures: 0,
            lat: Latencies::with_capacity(1 << 16),
            lookups: vec![0; files],
            first_error: None,
        }
    }

    /// Adds another thread's totals.
    pub fn merge(&mut self, o: Totals) {
        self.ops += o.ops;
        self.bytes += o.bytes;
        self.errors += o.errors;
        self.verify_failures += o.verify_failures;
        self.lat.extend(o.lat);
        for (a, b) in self.lookups.iter_mut().zip(o.lookups) {
            *a += b;
        }
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }

    /// Records a failed operation.
    pub fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_offset_dependent() {
        let mut a = vec![0u8; 16];
        let mut b = vec![0u8; 8];
        fill_pattern(&mut a, 0);
        fill_pattern(&mut b, 8);
        assert_eq!(&a[8..], &b[..]);
        assert_ne!(&a[..8], &b[..]);
    }
}
