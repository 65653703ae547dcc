//! Disk workloads run by the guest on a virtio-blk disk, and the host-side model of what the
//! disk must contain afterwards.
//!
//! One list of [`DiskOp`]s is the single source of truth: it generates the guest shell script
//! (`dd`, util-linux `blkdiscard`/`fallocate`, busybox `cmp`/`sha256sum`), the data files
//! shipped in the test initramfs, and the expected image bytes ([`DiskModel`]). The guest reads
//! every range back right after writing it (`cmp` against the data file, or against zeroes) and
//! finally prints the SHA-256 of the whole disk read with `O_DIRECT`; the host compares the image
//! byte for byte with the model and the guest's digest with its own.

use std::fmt::Write as _;

/// Pattern bytes: a xorshift64* stream seeded by `seed` (deterministic, incompressible).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// How a write reaches the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Page cache, no sync (reaches the device at the final `sync`).
    Buffered,
    /// Page cache then `fsync` (`dd conv=fsync`): a FLUSH request.
    Fsync,
    /// `O_DIRECT` (`dd oflag=direct`); offset, length and `bs` must be 512-aligned.
    Direct,
}

/// How a range is zeroed or discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// `blkdiscard -o -l` (BLKDISCARD → VIRTIO_BLK_T_DISCARD); contents afterwards unspecified.
    Discard,
    /// util-linux `blkdiscard -z` (BLKZEROOUT, no unmap → WRITE_ZEROES without UNMAP).
    ZeroNoUnmap,
    /// util-linux `fallocate -p` on the device (PUNCH_HOLE → WRITE_ZEROES with UNMAP allowed,
    /// no fallback: fails if the device lacks WRITE_ZEROES).
    ZeroUnmap,
    /// `dd if=/dev/zero conv=fsync`: ordinary writes of zeroes.
    DdZeroes,
}

/// One guest operation on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    /// Writes `pattern(seed, len)` at `offset` with `dd bs=<bs>`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: usize,
        /// dd block size.
        bs: usize,
        /// Write path.
        mode: WriteMode,
        /// Pattern seed.
        seed: u64,
    },
    /// Zeroes or discards `len` bytes at `offset` (512-aligned for all but `DdZeroes`).
    Zero {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Method.
        mode: ZeroMode,
    },
}

/// What the host expects the image to hold.
#[derive(Debug, Clone)]
pub struct DiskModel {
    bytes: Vec<u8>,
    /// Per byte: false where the contents are unspecified (discarded, not rewritten since).
    defined: Vec<bool>,
}

impl DiskModel {
    /// A disk of `size` bytes whose initial contents are `initial` (zero-extended/truncated),
    /// e.g. empty for a fresh image or the backing file's bytes.
    pub fn new(size: u64, initial: &[u8]) -> Self {
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let mut bytes = vec![0u8; size];
        let n = initial.len().min(size);
        bytes[..n].copy_from_slice(&initial[..n]);
        Self {
            bytes,
            defined: vec![true; size],
        }
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The expected bytes (meaningful where defined).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Applies `op` (panics if the op lies outside the disk: a bug in the test itself).
    pub fn apply(&mut self, op: &DiskOp) {
        let (start, end) = op.range();
        assert!(
            end <= self.size(),
            "{op:?} ends beyond the {} byte disk",
            self.size()
        );
        let (s, e) = (start as usize, end as usize);
        match op {
            DiskOp::Write { len, seed, .. } => {
                self.bytes[s..e].copy_from_slice(&pattern(*seed, *len));
                self.defined[s..e].fill(true);
            }
            DiskOp::Zero { mode, .. } => {
                self.bytes[s..e].fill(0);
                self.defined[s..e].fill(*mode != ZeroMode::Discard);
            }
        }
    }

    /// Compares `actual` (the raw image contents) with the model. `ops` only serve the message:
    /// on a mismatch it names the first differing offset and the last op that touched it.
    pub fn check(&self, actual: &[u8], ops: &[DiskOp]) -> Result<(), String> {
        if actual.len() as u64 != self.size() {
            return Err(format!(
                "image is {} bytes, expected {}",
                actual.len(),
                self.size()
            ));
        }
        let mut bad =
            (0..self.bytes.len()).filter(|&i| self.defined[i] && self.bytes[i] != actual[i]);
        let Some(first) = bad.next() else {
            return Ok(());
        };
        let count = 1 + bad.count();
        let culprit = ops.iter().enumerate().rev().find(|(_, op)| {
            let (s, e) = op.range();
            (s..e).contains(&(first as u64))
        });
        let culprit = match culprit {
            Some((i, op)) => format!("last written by op{i} {op:?}"),
            None => "never written by the guest (initial contents)".to_string(),
        };
        let end = (first + 16).min(self.bytes.len());
        Err(format!(
            "{count} bytes differ; first at offset {first} ({culprit}): expected {:02x?}, image has {:02x?}",
            &self.bytes[first..end],
            &actual[first..end]
        ))
    }
}

impl DiskOp {
    /// `[start, end)` byte range.
    pub fn range(&self) -> (u64, u64) {
        match self {
            Self::Write { offset, len, .. } => (*offset, offset + *len as u64),
            Self::Zero { offset, len, .. } => (*offset, offset + len),
        }
    }
}

/// A guest workload on one disk.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Guest device path, e.g. `/dev/vda`.
    pub dev: String,
    /// Expected disk size in bytes.
    pub disk_size: u64,
    /// Operations in order.
    pub ops: Vec<DiskOp>,
    /// Tag used in file names and console lines (distinguishes several disks/phases).
    pub tag: String,
}

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

impl Workload {
    /// The standard mix on a disk of `disk_size` bytes (at least 24 MiB): direct, buffered and
    /// fsync'ed writes of 512 B … 2 MiB at aligned and unaligned offsets (crossing 64 KiB qcow2
    /// clusters), the first and last sectors, overwrites, a discard, zeroing with and without
    /// unmap and with plain writes, and a rewrite inside the discarded range. `seed` varies the
    /// data so several phases on one disk differ.
    pub fn standard(dev: &str, tag: &str, disk_size: u64, seed: u64) -> Self {
        assert!(disk_size >= 24 * MIB, "standard workload needs >= 24 MiB");
        let s = disk_size;
        let w = |offset: u64, len: u64, bs: u64, mode: WriteMode, n: u64| DiskOp::Write {
            offset,
            len: len as usize,
            bs: bs as usize,
            mode,
            seed: seed.wrapping_mul(1000).wrapping_add(n),
        };
        let z = |offset: u64, len: u64, mode: ZeroMode| DiskOp::Zero { offset, len, mode };
        use WriteMode::*;
        use ZeroMode::*;
        let ops = vec![
            w(0, 4 * KIB, 4 * KIB, Direct, 0),
            w(MIB, MIB, 64 * KIB, Direct, 1),
            w(3 * MIB + 12345, 100_000, 4 * KIB, Buffered, 2),
            w(5 * MIB - 333, 70_001, 4 * KIB, Fsync, 3),
            w(8 * MIB + 32 * KIB, 192 * KIB, 192 * KIB, Direct, 4),
            w(s - 512, 512, 512, Direct, 5),
            w(s - 3000 - 512, 3000, 1000, Fsync, 6),
            w(12 * MIB, 2 * MIB, MIB, Fsync, 7),
            z(12 * MIB + 256 * KIB, 512 * KIB, Discard),
            z(MIB + 64 * KIB, 128 * KIB, ZeroNoUnmap),
            z(MIB + 512 * KIB, 64 * KIB, ZeroUnmap),
            z(8 * MIB + 36 * KIB, 4 * KIB, ZeroUnmap),
            z(3 * MIB + 20_000, 8 * KIB + 7, DdZeroes),
            w(12 * MIB + 300 * KIB, 64 * KIB, 64 * KIB, Direct, 8),
            w(20 * MIB + 512, 4 * KIB, 512, Direct, 9),
            w(100, 10_000, 4 * KIB, Fsync, 10),
            w(16 * MIB - 2 * KIB, 4 * KIB, 4 * KIB, Direct, 11),
        ];
        Self {
            dev: dev.to_string(),
            disk_size,
            ops,
            tag: tag.to_string(),
        }
    }

    fn data_path(&self, i: usize) -> String {
        format!("/data/{}-op{i}", self.tag)
    }

    /// Data files for the guest initramfs: `(path, bytes)`.
    pub fn guest_files(&self) -> Vec<(String, Vec<u8>)> {
        self.ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| match op {
                DiskOp::Write { len, seed, .. } => Some((self.data_path(i), pattern(*seed, *len))),
                DiskOp::Zero { .. } => None,
            })
            .collect()
    }

    /// Applies all ops to `model`.
    pub fn apply(&self, model: &mut DiskModel) {
        for op in &self.ops {
            model.apply(op);
        }
    }

    /// Shell fragment performing the ops with read-back checks. Needs [`GUEST_HELPERS`] first.
    /// Ends with `sync`; see [`sha256_script`] for the whole-disk digest.
    pub fn guest_script(&self) -> String {
        let dev = &self.dev;
        let mut sh = String::new();
        let _ = writeln!(sh, "# workload {} on {dev}", self.tag);
        let name = dev.trim_start_matches("/dev/");
        let sectors = self.disk_size / 512;
        let _ = writeln!(
            sh,
            "[ \"$(cat /sys/block/{name}/size)\" = {sectors} ] || fail \"{dev}: $(cat /sys/block/{name}/size) sectors, expected {sectors}\""
        );
        for (i, op) in self.ops.iter().enumerate() {
            let what = format!("{}-op{i}", self.tag);
            match op {
                DiskOp::Write {
                    offset,
                    len,
                    bs,
                    mode,
                    ..
                } => {
                    let data = self.data_path(i);
                    let bs64 = *bs as u64;
                    let mut oflags = Vec::new();
                    let seek = if offset % bs64 == 0 {
                        offset / bs64
                    } else {
                        oflags.push("seek_bytes");
                        *offset
                    };
                    let mut conv = "notrunc";
                    match mode {
                        WriteMode::Buffered => {}
                        WriteMode::Fsync => conv = "notrunc,fsync",
                        WriteMode::Direct => oflags.push("direct"),
                    }
                    let oflag = if oflags.is_empty() {
                        String::new()
                    } else {
                        format!(" oflag={}", oflags.join(","))
                    };
                    let direct = *mode == WriteMode::Direct;
                    let _ = writeln!(
                        sh,
                        "run \"{what} write\" dd if={data} of={dev} bs={bs} seek={seek} conv={conv}{oflag}"
                    );
                    let _ = writeln!(
                        sh,
                        "readback \"{what}\" {dev} {offset} {len} {direct} {data}"
                    );
                }
                DiskOp::Zero { offset, len, mode } => {
                    let cmd = match mode {
                        ZeroMode::Discard => format!("{UL_BLKDISCARD} -o {offset} -l {len} {dev}"),
                        ZeroMode::ZeroNoUnmap => format!("{UL_BLKDISCARD} -z -o {offset} -l {len} {dev}"),
                        ZeroMode::ZeroUnmap => format!("{UL_FALLOCATE} -p -o {offset} -l {len} {dev}"),
                        ZeroMode::DdZeroes => format!(
                            "dd if=/dev/zero of={dev} bs={len} count=1 seek={offset} oflag=seek_bytes conv=notrunc,fsync"
                        ),
                    };
                    let _ = writeln!(sh, "run \"{what} {mode:?}\" {cmd}");
                    if *mode != ZeroMode::Discard {
                        let _ = writeln!(sh, "head -c {len} /dev/zero >$T.zeroes");
                        let _ = writeln!(
                            sh,
                            "readback \"{what}\" {dev} {offset} {len} false $T.zeroes"
                        );
                    }
                }
            }
        }
        let _ = writeln!(sh, "sync");
        sh
    }

    /// A region workload for concurrent use beside another one: direct writes of 4 KiB … 1 MiB
    /// back to back over `[base, base + len)`, two buffered ones, a zeroed range.
    pub fn stripes(dev: &str, tag: &str, disk_size: u64, base: u64, len: u64, seed: u64) -> Self {
        let sizes = [4 * KIB, 64 * KIB, 128 * KIB, 256 * KIB, MIB, 12 * KIB];
        let mut ops = Vec::new();
        let mut off = base;
        let mut n = 0u64;
        while off + MIB <= base + len {
            let size = sizes[(n as usize) % sizes.len()];
            let mode = if n % 5 == 4 {
                WriteMode::Fsync
            } else {
                WriteMode::Direct
            };
            ops.push(DiskOp::Write {
                offset: off,
                len: size as usize,
                bs: size.min(256 * KIB) as usize,
                mode,
                seed: seed.wrapping_mul(1000).wrapping_add(n),
            });
            off += size + 4 * KIB;
            n += 1;
        }
        ops.push(DiskOp::Zero {
            offset: base + 64 * KIB,
            len: 64 * KIB,
            mode: ZeroMode::ZeroUnmap,
        });
        Self {
            dev: dev.to_string(),
            disk_size,
            ops,
            tag: tag.to_string(),
        }
    }
}

/// Shell line printing `RQEMU-VAL <key>=<SHA-256 of the whole device read with O_DIRECT>`.
pub fn sha256_script(dev: &str, key: &str) -> String {
    format!(
        "echo \"RQEMU-VAL {key}=$(dd if={dev} bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)\"\n"
    )
}

/// util-linux `blkdiscard` in the guest (busybox's lacks `-z`; busybox sh prefers its own
/// applets over `PATH`, so call it by path).
pub const UL_BLKDISCARD: &str = "/usr/bin/blkdiscard";
/// util-linux `fallocate` in the guest (busybox's lacks `-p`/`-z`).
pub const UL_FALLOCATE: &str = "/usr/bin/fallocate";

/// Shell helpers the generated workload scripts use (temp files are per shell process, so
/// workloads may run concurrently): `fail MSG`, `run WHAT CMD...` (runs CMD,
/// fails with its stderr), `readback WHAT DEV OFFSET LEN DIRECT FILE` (reads the range back — with
/// `O_DIRECT` when DIRECT is `true`, else buffered after dropping clean caches — and `cmp`s it
/// with FILE).
pub const GUEST_HELPERS: &str = r#"
T=/tmp/rq.$$
fail() { echo "RQEMU-FAIL: $*"; exit 1; }
run() {
    what="$1"; shift
    "$@" 2>$T.run.err || fail "$what: '$*' failed: $(cat $T.run.err)"
}
readback() {
    what="$1" dev="$2" off="$3" len="$4" direct="$5" file="$6"
    if [ "$direct" = true ]; then
        dd if="$dev" of=$T.rb bs=65536 skip="$off" count="$len" iflag=direct,skip_bytes,count_bytes 2>$T.run.err ||
            fail "$what: direct read-back failed: $(cat $T.run.err)"
    else
        echo 1 >/proc/sys/vm/drop_caches
        dd if="$dev" of=$T.rb bs=4096 skip="$off" count="$len" iflag=skip_bytes,count_bytes 2>$T.run.err ||
            fail "$what: read-back failed: $(cat $T.run.err)"
    fi
    cmp $T.rb "$file" >$T.cmp.out 2>&1 || fail "$what: read-back differs: $(cat $T.cmp.out)"
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_seed_dependent() {
        assert_eq!(pattern(1, 1000), pattern(1, 1000));
        assert_ne!(pattern(1, 64), pattern(2, 64));
        assert_eq!(pattern(7, 13).len(), 13);
        assert_eq!(&pattern(7, 100)[..13], &pattern(7, 13)[..]);
    }

    #[test]
    fn model_applies_writes_zeroes_and_discards() {
        let mut m = DiskModel::new(4096, &[0xaa; 1024]);
        m.apply(&DiskOp::Write {
            offset: 10,
            len: 5,
            bs: 1,
            mode: WriteMode::Buffered,
            seed: 3,
        });
        m.apply(&DiskOp::Zero {
            offset: 512,
            len: 512,
            mode: ZeroMode::ZeroUnmap,
        });
        m.apply(&DiskOp::Zero {
            offset: 2048,
            len: 512,
            mode: ZeroMode::Discard,
        });
        let mut img = vec![0u8; 4096];
        img[..1024].fill(0xaa);
        img[10..15].copy_from_slice(&pattern(3, 5));
        img[512..1024].fill(0);
        img[2100] = 0x55; // discarded: unspecified, ignored
        assert_eq!(m.check(&img, &[]), Ok(()));
        img[3000] = 1;
        let err = m.check(&img, &[]).unwrap_err();
        assert!(err.contains("offset 3000"), "{err}");
        assert!(m.check(&img[..100], &[]).is_err());
    }

    #[test]
    fn standard_workload_fits_and_is_aligned_where_required() {
        let size = 32 * MIB;
        let w = Workload::standard("/dev/vda", "t", size, 1);
        let mut m = DiskModel::new(size, &[]);
        w.apply(&mut m);
        for op in &w.ops {
            let (s, e) = op.range();
            match op {
                DiskOp::Write {
                    mode: WriteMode::Direct,
                    bs,
                    ..
                } => {
                    assert!(s % 512 == 0 && e % 512 == 0 && *bs % 512 == 0, "{op:?}");
                }
                DiskOp::Zero { mode, .. } if *mode != ZeroMode::DdZeroes => {
                    assert!(s % 512 == 0 && e % 512 == 0, "{op:?}");
                }
                _ => {}
            }
        }
        assert_eq!(w.guest_files().len(), 12);
        let script = w.guest_script();
        assert!(script.contains("/usr/bin/blkdiscard -z"));
        assert!(script.contains("oflag=seek_bytes"));
    }
}
