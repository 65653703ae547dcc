//! Compressed clusters (zlib raw deflate), read-only: writes to a compressed cluster move it
//! to a fresh uncompressed cluster.

use std::fs::File;

use flate2::{Decompress, FlushDecompress, Status};

use super::super::raw::read_upto;
use super::super::{ImageError, Result};
use super::Geom;

/// Host location of a compressed cluster, decoded from its L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CompressedLoc {
    /// Byte offset of the compressed data.
    pub offset: u64,
    /// Number of 512-byte sectors holding it (counted from the sector containing `offset`).
    pub sectors: u64,
}

impl CompressedLoc {
    /// Decodes an L2 entry with the compressed flag set.
    pub(crate) fn from_entry(entry: u64, geom: &Geom) -> Self {
        let shift = 62 - (geom.cluster_bits - 8);
        let size_mask = (1u64 << (geom.cluster_bits - 8)) - 1;
        CompressedLoc {
            offset: entry & ((1u64 << shift) - 1),
            sectors: ((entry >> shift) & size_mask) + 1,
        }
    }

    /// Size in bytes of the compressed data as the spec defines it.
    pub(crate) fn size(&self) -> u64 {
        self.sectors * 512 - (self.offset & 511)
    }

    /// Host clusters `[first, last]` the compressed data touches (their refcounts count it).
    pub(crate) fn clusters(&self, geom: &Geom) -> (u64, u64) {
        let start = self.offset & !511;
        let end = start + self.sectors * 512 - 1;
        (start >> geom.cluster_bits, end >> geom.cluster_bits)
    }
}

/// Decompression state with reusable buffers and a one-cluster cache.
pub(crate) struct Decompressor {
    inflate: Decompress,
    input: Vec<u8>,
    output: Vec<u8>,
    cached: Option<CompressedLoc>,
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Decompressor(cached: {:?})", self.cached)
    }
}

impl Decompressor {
    pub(crate) fn new(geom: &Geom) -> Self {
        Decompressor {
            inflate: Decompress::new(false),
            input: Vec::new(),
            output: Vec::new(),
            cached: None,
        }
        .with_capacity(geom)
    }

    fn with_capacity(mut self, geom: &Geom) -> Self {
        self.output = vec![0u8; geom.cluster_size as usize];
        self.input = Vec::with_capacity(2 * geom.cluster_size as usize);
        self
    }

    /// Forgets the cached cluster (its host clusters are being freed).
    pub(crate) fn invalidate(&mut self) {
        self.cached = None;
    }

    /// The uncompressed contents of the cluster stored at `loc`.
    pub(crate) fn load(&mut self, file: &File, loc: CompressedLoc) -> Result<&[u8]> {
        if self.cached == Some(loc) {
            return Ok(&self.output);
        }
        self.cached = None;
        let size = loc.size() as usize;
        self.input.resize(size, 0);
        // The last compressed cluster may end before its last sector: EOF reads as zeroes.
        read_upto(file, &mut self.input, loc.offset).map_err(|e| {
            ImageError::io(
                format!("reading compressed cluster at {:#x}", loc.offset),
                e,
            )
        })?;
        self.inflate.reset(false);
        let st = self
            .inflate
            .decompress(&self.input, &mut self.output, FlushDecompress::Finish);
        let full = self.inflate.total_out() == self.output.len() as u64;
        match st {
            Ok(Status::StreamEnd) | Ok(Status::BufError) | Ok(Status::Ok) if full => {}
            _ => {
                return Err(ImageError::Corrupt(format!(
                    "compressed cluster at {:#x} ({} bytes) does not inflate to a full cluster",
                    loc.offset, size
                )))
            }
        }
        self.cached = Some(loc);
        Ok(&self.output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn decode_entry_and_inflate() {
        let geom = Geom::new(16, 3);
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        let mut c = flate2::Compress::new(flate2::Compression::default(), false);
        let mut out = vec![0u8; 70_000];
        c.compress(&data, &mut out, flate2::FlushCompress::Finish)
            .unwrap();
        out.truncate(c.total_out() as usize);
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[0u8; 700]).unwrap();
        f.write_all(&out).unwrap();
        let sectors = (700 + out.len() as u64).div_ceil(512) - 1; // sectors after the first
        let shift = 62 - 8;
        let entry = (1 << 62) | (sectors - 1 + 1 - 1) << shift | 700;
        let loc = CompressedLoc::from_entry(entry & !(1 << 62), &geom);
        assert_eq!(loc.offset, 700);
        assert_eq!(loc.sectors, sectors);
        assert!(loc.size() >= out.len() as u64);
        assert_eq!(loc.clusters(&geom), (0, (512 + sectors * 512 - 1) >> 16));
        let mut d = Decompressor::new(&geom);
        assert!(d.load(&f, loc).unwrap() == &data[..]);
        // Garbage does not inflate to a full cluster.
        let bad = CompressedLoc {
            offset: 0,
            sectors: 1,
        };
        assert!(matches!(d.load(&f, bad), Err(ImageError::Corrupt(_))));
    }
}
