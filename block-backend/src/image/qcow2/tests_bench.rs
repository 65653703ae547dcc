//! Throughput figures (not a test: `cargo test --release -p rqemu-block-backend
//! image::qcow2::tests_bench -- --ignored --nocapture`).

use std::time::Instant;

use super::super::raw::RawImage;
use super::super::DiskImage;
use super::tests::{create, open, Rng};

fn run(name: &str, img: &dyn DiskImage) {
    let size = img.size();
    let mut buf = vec![0x5au8; 65536];
    let t = Instant::now();
    for off in (0..size).step_by(65536) {
        img.write_at(&buf, off).unwrap();
    }
    img.flush().unwrap();
    let seq_w = size as f64 / t.elapsed().as_secs_f64() / 1e6;
    let t = Instant::now();
    for off in (0..size).step_by(65536) {
        img.read_at(&mut buf, off).unwrap();
    }
    let seq_r = size as f64 / t.elapsed().as_secs_f64() / 1e6;
    let mut rng = Rng(1);
    let n = 50_000;
    let t = Instant::now();
    for _ in 0..n {
        let off = rng.below(size / 4096) * 4096;
        img.read_at(&mut buf[..4096], off).unwrap();
    }
    let rr = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..n {
        let off = rng.below(size / 4096) * 4096;
        img.write_at(&buf[..4096], off).unwrap();
    }
    let rw = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "{name}: seq write (allocating) {seq_w:.0} MB/s, seq read {seq_r:.0} MB/s, \
         4k rand read {rr:.0} IOPS, 4k rand write {rw:.0} IOPS (page cache, 1 thread)"
    );
}

#[test]
#[ignore = "benchmark"]
fn bench_qcow2_vs_raw() {
    let dir = tempfile::tempdir().unwrap();
    let size = 256u64 << 20;
    let path = create(dir.path(), "b.qcow2", "", size);
    run("qcow2 64k", &open(&path, false));
    let raw = dir.path().join("b.raw");
    std::fs::File::create(&raw).unwrap().set_len(size).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&raw)
        .unwrap();
    run("raw", &RawImage::new(f, false).unwrap());
}
