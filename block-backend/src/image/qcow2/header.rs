//! qcow2 header parsing and validation (pure: no I/O, fuzzable through [`parse_header`]).

use super::super::{ImageError, Result};
use super::MAGIC;

/// Incompatible feature bit 0: the image was not closed cleanly (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image was marked corrupt by an implementation.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Byte offset of `refcount_table_offset` (followed by `refcount_table_clusters`).
pub(crate) const OFF_REFCOUNT_TABLE: u64 = 48;
/// Byte offset of `incompatible_features` (v3).
pub(crate) const OFF_INCOMPAT: u64 = 72;
/// Byte offset of `autoclear_features` (v3).
pub(crate) const OFF_AUTOCLEAR: u64 = 88;

/// Length of the fixed v2 header.
const V2_HEADER_LEN: usize = 72;
/// Length of the fixed v3 header up to (excluding) `compression_type`.
const V3_HEADER_LEN: usize = 104;
/// Largest refcount table we accept (same limit as QEMU).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest L1 table we accept (same limit as QEMU).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Host offsets are below 2^56 (the offset bits of L1/L2 entries).
pub(crate) const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Largest virtual disk size (same limit as QEMU: 32 PiB... kept well inside u64 math).
const MAX_VIRTUAL_SIZE: u64 = 1 << 55;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

/// A named feature bit from the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 = incompatible, 1 = compatible, 2 = autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Human-readable name.
    pub name: String,
}

/// A parsed and validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
    /// Backing format from the header extension, if any.
    pub backing_format: Option<String>,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (0..=6; always 4 for v2).
    pub refcount_order: u32,
    /// Header length (72 for v2).
    pub header_length: u32,
    /// Feature name table.
    pub feature_names: Vec<FeatureName>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn feature_name(names: &[FeatureName], kind: u8, bit: u8) -> String {
        names
            .iter()
            .find(|n| n.kind == kind && n.bit == bit)
            .map(|n| format!(" ({})", n.name))
            .unwrap_or_default()
    }
}

fn be32(b: &[u8], off: usize) -> Result<u32> {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| ImageError::Corrupt(format!("qcow2 header truncated at byte {off}")))
}

fn be64(b: &[u8], off: usize) -> Result<u64> {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| ImageError::Corrupt(format!("qcow2 header truncated at byte {off}")))
}

fn corrupt(msg: String) -> ImageError {
    ImageError::Corrupt(msg)
}

/// Parses and validates a qcow2 header from the first bytes of an image (ideally its whole
/// first cluster, which holds the header extensions and the backing file name).
///
/// Pure function: it checks everything that can be checked without the file (feature bits,
/// alignment, sizes); checks against the file length are done when opening.
pub fn parse_header(bytes: &[u8]) -> Result<Header> {
    if bytes.len() < 4 || bytes[..4] != MAGIC {
        return Err(corrupt("bad qcow2 magic".into()));
    }
    if bytes.len() < V2_HEADER_LEN {
        return Err(corrupt(format!(
            "qcow2 header truncated ({} bytes)",
            bytes.len()
        )));
    }
    let version = be32(bytes, 4)?;
    if version != 2 && version != 3 {
        return Err(ImageError::Unsupported(format!("qcow2 version {version}")));
    }
    let cluster_bits = be32(bytes, 20)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(ImageError::Unsupported(format!(
            "qcow2 cluster_bits {cluster_bits} (supported: 9..=21)"
        )));
    }
    let cs = 1u64 << cluster_bits;
    let crypt_method = be32(bytes, 32)?;
    if crypt_method != 0 {
        let what = match crypt_method {
            1 => "AES",
            2 => "LUKS",
            _ => "unknown",
        };
        return Err(ImageError::Unsupported(format!(
            "qcow2 encryption (crypt_method {crypt_method}, {what})"
        )));
    }
    let mut h = Header {
        version,
        backing_file: None,
        backing_format: None,
        cluster_bits,
        size: be64(bytes, 24)?,
        l1_size: be32(bytes, 36)?,
        l1_table_offset: be64(bytes, 40)?,
        refcount_table_offset: be64(bytes, 48)?,
        refcount_table_clusters: be32(bytes, 56)?,
        nb_snapshots: be32(bytes, 60)?,
        snapshots_offset: be64(bytes, 64)?,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: V2_HEADER_LEN as u32,
        feature_names: Vec::new(),
    };
    let mut compression_type = 0u8;
    if version == 3 {
        if bytes.len() < V3_HEADER_LEN {
            return Err(corrupt(format!(
                "qcow2 v3 header truncated ({} bytes)",
                bytes.len()
            )));
        }
        h.incompatible_features = be64(bytes, 72)?;
        h.compatible_features = be64(bytes, 80)?;
        h.autoclear_features = be64(bytes, 88)?;
        h.refcount_order = be32(bytes, 96)?;
        h.header_length = be32(bytes, 100)?;
        let hl = h.header_length as usize;
        if hl < V3_HEADER_LEN || hl as u64 > cs {
            return Err(corrupt(format!("qcow2 header_length {hl} out of range")));
        }
        if hl > bytes.len() {
            return Err(corrupt(format!(
                "qcow2 header truncated (header_length {hl})"
            )));
        }
        if hl > V3_HEADER_LEN {
            compression_type = bytes[V3_HEADER_LEN];
        }
    }
    // Header extensions: between the header and the backing file name (or the cluster end).
    let bfo = be64(bytes, 8)?;
    let mut ext_end = bytes.len().min(cs as usize);
    if bfo > u64::from(h.header_length) && bfo < ext_end as u64 {
        ext_end = bfo as usize;
    }
    parse_extensions(bytes, h.header_length as usize, ext_end, &mut h)?;
    check_features(&h, compression_type)?;
    if h.refcount_order > 6 {
        return Err(ImageError::Unsupported(format!(
            "qcow2 refcount_order {} (max 6)",
            h.refcount_order
        )));
    }
    check_geometry(&h)?;
    // Backing file name.
    let bfs = be32(bytes, 16)?;
    if bfo != 0 && bfs != 0 {
        if bfs > 1023 {
            return Err(corrupt(format!(
                "qcow2 backing file name too long ({bfs} bytes)"
            )));
        }
        let end = bfo.checked_add(u64::from(bfs)).filter(|&e| e <= cs);
        let Some(end) = end else {
            return Err(corrupt(format!(
                "qcow2 backing file name at {bfo}+{bfs} outside the first cluster"
            )));
        };
        let name = bytes.get(bfo as usize..end as usize).ok_or_else(|| {
            corrupt(format!(
                "qcow2 header truncated before the backing file name at {bfo}"
            ))
        })?;
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| corrupt("qcow2 backing file name is not UTF-8".into()))?;
        h.backing_file = Some(name);
    }
    Ok(h)
}

fn parse_extensions(bytes: &[u8], start: usize, end: usize, h: &mut Header) -> Result<()> {
    let mut off = start;
    // A header without room for even the end marker simply has no extensions.
    while off + 8 <= end {
        let ty = be32(bytes, off)?;
        let len = be32(bytes, off + 4)? as usize;
        if ty == EXT_END {
            return Ok(());
        }
        let data_start = off + 8;
        let data = data_start
            .checked_add(len)
            .filter(|&e| e <= end)
            .and_then(|e| bytes.get(data_start..e))
            .ok_or_else(|| {
                corrupt(format!(
                    "qcow2 header extension {ty:#x} at {off} overruns the header"
                ))
            })?;
        match ty {
            EXT_BACKING_FORMAT => {
                let s = std::str::from_utf8(data)
                    .map_err(|_| corrupt("qcow2 backing format is not UTF-8".into()))?;
                h.backing_format = Some(s.trim_end_matches('\0').to_string());
            }
            EXT_FEATURE_NAMES => {
                for e in data.chunks_exact(48) {
                    let name = &e[2..];
                    let n = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                    h.feature_names.push(FeatureName {
                        kind: e[0],
                        bit: e[1],
                        name: String::from_utf8_lossy(&name[..n]).into_owned(),
                    });
                }
            }
            // Bitmaps, encryption header, external data file name, unknown: skipped.
            _ => {}
        }
        off = data_start + len.div_ceil(8) * 8;
    }
    Ok(())
}

fn check_features(h: &Header, compression_type: u8) -> Result<()> {
    let inc = h.incompatible_features;
    if inc & INCOMPAT_DATA_FILE != 0 {
        return Err(ImageError::Unsupported(
            "qcow2 external data file (incompatible feature bit 2)".into(),
        ));
    }
    if inc & INCOMPAT_EXTL2 != 0 {
        return Err(ImageError::Unsupported(
            "qcow2 extended L2 entries / subclusters (incompatible feature bit 4)".into(),
        ));
    }
    if compression_type != 0 {
        let what = if compression_type == 1 {
            "zstd"
        } else {
            "unknown"
        };
        return Err(ImageError::Unsupported(format!(
            "qcow2 compression type {compression_type} ({what}); only zlib is supported"
        )));
    }
    if inc & INCOMPAT_COMPRESSION != 0 {
        return Err(corrupt(
            "qcow2 compression type bit (incompatible bit 3) set with zlib compression".into(),
        ));
    }
    let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION;
    let unknown = inc & !(known | INCOMPAT_EXTL2);
    if unknown != 0 {
        let bit = unknown.trailing_zeros();
        return Err(ImageError::Unsupported(format!(
            "qcow2 unknown incompatible feature bit {bit}{} (features {inc:#x})",
            Header::feature_name(&h.feature_names, 0, bit as u8)
        )));
    }
    Ok(())
}

fn check_geometry(h: &Header) -> Result<()> {
    let cs = h.cluster_size();
    let aligned = |v: u64| v & (cs - 1) == 0;
    if h.size > MAX_VIRTUAL_SIZE {
        return Err(ImageError::Unsupported(format!(
            "qcow2 virtual size {} too large",
            h.size
        )));
    }
    // One L2 table maps cs/8 clusters.
    let l2_span = cs * (cs / 8);
    let l1_needed = h.size.div_ceil(l2_span);
    if u64::from(h.l1_size) < l1_needed {
        return Err(corrupt(format!(
            "qcow2 L1 table too small: {} entries for size {} (need {l1_needed})",
            h.l1_size, h.size
        )));
    }
    if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
        return Err(ImageError::Unsupported(format!(
            "qcow2 L1 table too large ({} entries)",
            h.l1_size
        )));
    }
    if h.l1_size > 0 && (!aligned(h.l1_table_offset) || h.l1_table_offset < cs) {
        return Err(corrupt(format!(
            "qcow2 L1 table offset {:#x} is not cluster aligned or overlaps the header",
            h.l1_table_offset
        )));
    }
    if !aligned(h.refcount_table_offset) || h.refcount_table_offset < cs {
        return Err(corrupt(format!(
            "qcow2 refcount table offset {:#x} is not cluster aligned or overlaps the header",
            h.refcount_table_offset
        )));
    }
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    if h.refcount_table_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
        return Err(corrupt(format!(
            "qcow2 refcount table size {} clusters out of range",
            h.refcount_table_clusters
        )));
    }
    let l1 = (
        h.l1_table_offset,
        table_end(h.l1_table_offset, u64::from(h.l1_size) * 8, "L1")?,
    );
    let rt = (
        h.refcount_table_offset,
        table_end(h.refcount_table_offset, rt_bytes, "refcount")?,
    );
    if h.l1_size > 0 && l1.0 < rt.1 && rt.0 < l1.1 {
        return Err(corrupt(format!(
            "qcow2 L1 table at {:#x} overlaps the refcount table at {:#x}",
            l1.0, rt.0
        )));
    }
    if h.nb_snapshots > 0
        && (!aligned(h.snapshots_offset)
            || h.snapshots_offset < cs
            || h.snapshots_offset >= MAX_HOST_OFFSET)
    {
        return Err(corrupt(format!(
            "qcow2 snapshot table offset {:#x} is not cluster aligned",
            h.snapshots_offset
        )));
    }
    Ok(())
}

/// End of a table at host offset `off` of `bytes` bytes; refused when it overflows or lies
/// beyond what an L2 entry can address (host offsets are below 2^56).
fn table_end(off: u64, bytes: u64, what: &str) -> Result<u64> {
    off.checked_add(bytes)
        .filter(|&end| end <= MAX_HOST_OFFSET)
        .ok_or_else(|| {
            corrupt(format!(
                "qcow2 {what} table at {off:#x} ({bytes} bytes) lies beyond the largest host offset"
            ))
        })
}

/// Builds a minimal v2/v3 header for tests (no extensions).
#[cfg(test)]
pub(crate) fn test_header(version: u32, cluster_bits: u32) -> Vec<u8> {
    let cs = 1usize << cluster_bits;
    let mut b = vec![0u8; cs];
    b[..4].copy_from_slice(&MAGIC);
    b[4..8].copy_from_slice(&version.to_be_bytes());
    b[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
    b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
    b[36..40].copy_from_slice(&1u32.to_be_bytes());
    b[40..48].copy_from_slice(&(3 * cs as u64).to_be_bytes());
    b[48..56].copy_from_slice(&(cs as u64).to_be_bytes());
    b[56..60].copy_from_slice(&1u32.to_be_bytes());
    if version == 3 {
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn put64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }
    fn err(b: &[u8]) -> String {
        parse_header(b)
            .expect_err("header should be refused")
            .to_string()
    }

    #[test]
    fn valid_headers_parse() {
        for v in [2, 3] {
            let h = parse_header(&test_header(v, 16)).unwrap();
            assert_eq!(h.version, v);
            assert_eq!(h.cluster_size(), 65536);
            assert_eq!(h.refcount_order, 4);
            assert_eq!(h.backing_file, None);
        }
    }

    #[test]
    fn extensions_and_backing_name() {
        let mut b = test_header(3, 12);
        let mut off = 112;
        // Unknown extension, skipped.
        put32(&mut b, off, 0x1234_5678);
        put32(&mut b, off + 4, 3);
        off += 16;
        put32(&mut b, off, EXT_BACKING_FORMAT);
        put32(&mut b, off + 4, 3);
        b[off + 8..off + 11].copy_from_slice(b"raw");
        off += 16;
        put32(&mut b, off, EXT_FEATURE_NAMES);
        put32(&mut b, off + 4, 48);
        b[off + 8] = 0;
        b[off + 9] = 9;
        b[off + 10..off + 15].copy_from_slice(b"shiny");
        off += 56;
        put32(&mut b, off, 0);
        put64(&mut b, 8, 1000);
        put32(&mut b, 16, 8);
        b[1000..1008].copy_from_slice(b"base.img");
        let h = parse_header(&b).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert_eq!(h.feature_names.len(), 1);
        // The named unknown incompatible bit is reported by name.
        put64(&mut b, 72, 1 << 9);
        let e = err(&b);
        assert!(e.contains("bit 9") && e.contains("shiny"), "{e}");
    }

    #[test]
    fn refusals_name_the_problem() {
        let mut b = test_header(3, 16);
        b[0] = b'X';
        assert!(err(&b).contains("magic"));

        let mut b = test_header(3, 16);
        put32(&mut b, 4, 4);
        assert!(err(&b).contains("version 4"));

        let mut b = test_header(2, 16);
        put32(&mut b, 32, 1);
        assert!(err(&b).contains("encryption"));

        let mut b = test_header(3, 16);
        put64(&mut b, 72, INCOMPAT_DATA_FILE);
        assert!(err(&b).contains("external data file"));

        let mut b = test_header(3, 16);
        put64(&mut b, 72, INCOMPAT_EXTL2);
        assert!(err(&b).contains("extended L2"));

        let mut b = test_header(3, 16);
        put64(&mut b, 72, 1 << 40);
        assert!(err(&b).contains("incompatible feature bit 40"));

        let mut b = test_header(3, 16);
        b[104] = 1;
        assert!(err(&b).contains("zstd"));

        let mut b = test_header(3, 16);
        put32(&mut b, 20, 22);
        assert!(err(&b).contains("cluster_bits 22"));
        put32(&mut b, 20, 8);
        assert!(err(&b).contains("cluster_bits 8"));

        let mut b = test_header(3, 16);
        put64(&mut b, 40, 65536 + 512);
        assert!(err(&b).contains("L1 table offset"));

        let mut b = test_header(3, 16);
        put64(&mut b, 48, 0);
        assert!(err(&b).contains("refcount table offset"));

        let mut b = test_header(3, 16);
        put32(&mut b, 96, 7);
        assert!(err(&b).contains("refcount_order 7"));

        let mut b = test_header(3, 16);
        put32(&mut b, 36, 0);
        assert!(err(&b).contains("L1 table too small"));

        let mut b = test_header(3, 16);
        put64(&mut b, 40, 65536);
        assert!(err(&b).contains("overlaps the refcount table"));

        // Found by the qcow2_header fuzz target (overflow checks on): tables whose end
        // overflows u64 are refused, not wrapped around.
        let mut b = test_header(3, 16);
        put64(&mut b, 40, 0xffff_ffff_ffff_0000);
        put32(&mut b, 36, 8192); // 64 KiB of L1 table: ends at 2^64
        assert!(err(&b).contains("L1 table at"), "{}", err(&b));
        let mut b = test_header(3, 16);
        put64(&mut b, 48, 0xffff_ffff_ffff_0000);
        assert!(err(&b).contains("refcount table at"), "{}", err(&b));

        let mut b = test_header(3, 16);
        put32(&mut b, 112, EXT_BACKING_FORMAT);
        put32(&mut b, 116, 100_000);
        assert!(err(&b).contains("overruns"));

        assert!(err(&test_header(3, 16)[..80]).contains("truncated"));
    }

    #[test]
    fn table_offsets_near_the_end_of_u64_are_refused_not_overflowed() {
        // L1 table: offset + l1_size * 8 overflows u64 (a panic in debug builds).
        let mut b = test_header(3, 16);
        put64(&mut b, 40, !0xffff);
        put32(&mut b, 36, 0x10000);
        assert!(err(&b).contains("L1 table"), "{}", err(&b));
        // Refcount table: offset + clusters * cluster size overflows.
        let mut b = test_header(3, 16);
        put64(&mut b, 48, !0xffff);
        assert!(err(&b).contains("refcount table"), "{}", err(&b));
        // In range of u64 but not addressable by an L2 entry.
        let mut b = test_header(3, 16);
        put64(&mut b, 40, 1 << 60);
        assert!(err(&b).contains("largest host offset"), "{}", err(&b));
    }

    #[test]
    fn fuzz_like_inputs_never_panic() {
        // Deterministic byte flips over a valid header: parse must return, never panic.
        let base = test_header(3, 9);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut b = base.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % 128;
                b[i] = (x >> 32) as u8;
            }
            let len = (x >> 40) as usize % (b.len() + 1);
            let _ = parse_header(&b[..len]);
            let _ = parse_header(&b);
        }
    }
}
