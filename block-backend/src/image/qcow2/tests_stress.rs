//! Seeded randomized stress test: mixed write / read / discard / write-zeroes / flush against
//! a shadow model. A few flushes, and the end of the run, are followed by `qemu-img check`
//! of the still open image, which must be clean (no leaks either: a flushed image is left as
//! is when the daemon exits), then the usual close, check and `qemu-img convert` comparison.

use super::super::DiskImage;
use super::tests::{assert_same, create, open, qemu_img, verify, Rng};
use super::tests_crash::check_clean;

/// Number of mid-run flushes followed by a `qemu-img check` of the open image.
const MID_RUN_CHECKS: usize = 4;

fn stress(opts: &str, with_backing: bool, seed: u64, ops: usize) {
    stress_cache(opts, with_backing, seed, ops, None);
}

fn stress_cache(opts: &str, with_backing: bool, seed: u64, ops: usize, cache: Option<usize>) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size: u64 = 3 << 20;
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(seed);
    let path = if with_backing {
        let blen = size as usize - 300_000;
        let mut base = vec![0u8; blen];
        rng.fill(&mut base);
        std::fs::write(d.join("base.raw"), &base).unwrap();
        model[..blen].copy_from_slice(&base);
        let s = size.to_string();
        let o = if opts.is_empty() {
            "compat=1.1".to_string()
        } else {
            opts.to_string()
        };
        qemu_img(
            d,
            &[
                "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o", &o, "s.qcow2",
                &s,
            ],
        );
        d.join("s.qcow2")
    } else {
        create(d, "s.qcow2", opts, size)
    };
    let img = open(&path, false);
    if let Some(n) = cache {
        img.lock_meta().set_cache_capacity(n);
    }
    let cs = img.geom.cluster_size;
    let mut data = vec![0u8; 5 * cs as usize];
    let mut back = vec![0u8; 5 * cs as usize];
    let mut next_check = ops / (MID_RUN_CHECKS + 1);
    for i in 0..ops {
        let max = data.len() as u64;
        let len = match rng.below(3) {
            0 => 1 + rng.below(600),
            1 => cs * (1 + rng.below(4)),
            _ => 1 + rng.below(max),
        }
        .min(max);
        // Bias offsets to cluster boundaries half of the time.
        let mut off = rng.below(size - len + 1);
        if rng.below(2) == 0 {
            off = (off / cs * cs).min(size - len);
        }
        let (o, l) = (off as usize, len as usize);
        match rng.below(10) {
            0..=3 => {
                rng.fill(&mut data[..l]);
                img.write_at(&data[..l], off).unwrap();
                model[o..o + l].copy_from_slice(&data[..l]);
            }
            4..=6 => {
                img.read_at(&mut back[..l], off).unwrap();
                assert_same(
                    &back[..l],
                    &model[o..o + l],
                    &format!("op {i}: read {off}+{len}"),
                );
            }
            7 => {
                img.discard(off, len).unwrap();
                model[o..o + l].fill(0);
            }
            8 => {
                img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                model[o..o + l].fill(0);
            }
            _ => {
                img.flush().unwrap();
                if i >= next_check {
                    check_clean(&path, opts, &format!("after the flush at op {i}"));
                    next_check += ops / (MID_RUN_CHECKS + 1);
                }
            }
        }
    }
    img.flush().unwrap();
    check_clean(&path, opts, "after the final flush (image still open)");
    verify(img, &path, &model);
}

#[test]
fn stress_v3_no_backing() {
    stress("compat=1.1,cluster_size=4096", false, 0x5eed_0001, 1500);
}

#[test]
fn stress_v3_raw_backing() {
    stress("compat=1.1,cluster_size=8192", true, 0x5eed_0002, 1500);
}

#[test]
fn stress_v2_backing_and_not() {
    stress("compat=0.10,cluster_size=4096", false, 0x5eed_0003, 1000);
    stress("compat=0.10,cluster_size=2048", true, 0x5eed_0004, 1000);
}

#[test]
fn stress_tiny_caches_force_evictions() {
    // 512-byte clusters: an L2 table maps 32 KiB, a refcount block 128 KiB; with two cached
    // tables of each kind nearly every request evicts and reloads.
    stress_cache(
        "compat=1.1,cluster_size=512",
        true,
        0x5eed_0005,
        800,
        Some(2),
    );
}
