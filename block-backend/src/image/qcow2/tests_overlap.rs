//! Metadata overlap checks (QEMU's `overlap-check`): a crafted image whose L2 entries or
//! refcounts point guest data at its own metadata must not let guest writes overwrite it.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::super::{DiskImage, ImageError};
use super::tests::{check, create, open, try_open};
use super::{parse_header, INCOMPAT_CORRUPT};

const SIZE: u64 = 4 << 20;

/// Host offsets of an image's metadata (64 KiB clusters, one L2 table, one refcount block).
struct Layout {
    l1: u64,
    reftable: u64,
    refblock: u64,
    l2: u64,
}

fn be64(path: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u64::from_be_bytes(b)
}

fn put64(path: &Path, off: u64, v: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&v.to_be_bytes(), off).unwrap();
}

fn layout(path: &Path) -> Layout {
    let head = std::fs::read(path).unwrap();
    let h = parse_header(&head[..65536]).unwrap();
    let mask = 0x00ff_ffff_ffff_fe00;
    Layout {
        l1: h.l1_table_offset,
        reftable: h.refcount_table_offset,
        refblock: be64(path, h.refcount_table_offset) & mask,
        l2: be64(path, h.l1_table_offset) & mask,
    }
}

/// A v3 image with guest cluster 0 allocated (so it has an L2 table), closed cleanly.
fn image(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = create(dir, name, "compat=1.1,cluster_size=65536", SIZE);
    let img = open(&path, false);
    img.write_at(&[0x11; 65536], 0).unwrap();
    img.write_at(&[0x22; 512], 3 << 16).unwrap();
    drop(img);
    check(&path);
    path
}

fn is_overlap(r: &super::super::Result<()>) -> bool {
    matches!(r, Err(ImageError::MetadataOverlap(_)))
}

/// The image is marked corrupt on disk (and refused read-write from then on).
fn assert_marked_corrupt(path: &Path) {
    assert_ne!(be64(path, 72) & INCOMPAT_CORRUPT, 0, "corrupt bit not set");
    assert!(try_open(path, false).is_err());
    open(path, true);
}

#[test]
fn data_writes_through_l2_entries_pointing_at_metadata_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for target in ["L1", "refcount table", "refcount block", "L2"] {
        let path = image(dir.path(), "p.qcow2");
        let lay = layout(&path);
        let host = match target {
            "L1" => lay.l1,
            "refcount table" => lay.reftable,
            "refcount block" => lay.refblock,
            _ => lay.l2,
        };
        // Guest cluster 1's L2 entry now points at `target` (flag COPIED: a plain overwrite).
        put64(&path, lay.l2 + 8, host | 1 << 63);
        let before = std::fs::read(&path).unwrap();
        let img = open(&path, false);
        let r = img.write_at(&[0xee; 4096], 65536);
        assert!(is_overlap(&r), "{target}: write not refused as an overlap");
        // Refused once, refused always (the image is corrupt).
        assert!(img.write_at(&[0xee; 512], 0).is_err(), "{target}");
        drop(img);
        let after = std::fs::read(&path).unwrap();
        let (a, n) = (host as usize, 65536);
        assert!(
            after[a..a + n] == before[a..a + n],
            "{target} at {host:#x} was overwritten"
        );
        assert_marked_corrupt(&path);
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn discarding_a_cluster_mapped_onto_metadata_does_not_free_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "d.qcow2");
    let lay = layout(&path);
    let l1_before = be64(&path, lay.l1);
    put64(&path, lay.l2 + 8, lay.l1 | 1 << 63);
    let img = open(&path, false);
    let r = img.discard(65536, 65536).and_then(|()| img.flush());
    assert!(
        is_overlap(&r),
        "discard of a cluster mapped on the L1 table not refused"
    );
    drop(img);
    // The L1 table was neither punched out nor lost its refcount.
    assert_eq!(be64(&path, lay.l1), l1_before);
    assert_marked_corrupt(&path);
}

#[test]
fn allocations_never_land_on_metadata_with_a_zero_refcount() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "a.qcow2");
    let lay = layout(&path);
    // Refcount order 4 (16 bits): clear the refcounts of the header, the L1 table and the
    // refcount table, so the allocator believes them free.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for host in [0, lay.l1, lay.reftable] {
        f.write_all_at(&[0, 0], lay.refblock + (host >> 16) * 2)
            .unwrap();
    }
    drop(f);
    let before = std::fs::read(&path).unwrap();
    let img = open(&path, false);
    // Guest cluster 2 is unallocated: its data needs a new host cluster.
    let r = img.write_at(&[0xee; 65536], 2 << 16);
    assert!(is_overlap(&r), "allocation on metadata not refused: {r:?}");
    drop(img);
    let after = std::fs::read(&path).unwrap();
    for (what, host) in [
        ("header", 0),
        ("L1", lay.l1),
        ("refcount table", lay.reftable),
    ] {
        let a = host as usize;
        // The header keeps everything but the corrupt bit it gains.
        let skip = if host == 0 { 72..80 } else { 0..0 };
        let differs = (a..a + 65536).any(|i| !skip.contains(&(i - a)) && after[i] != before[i]);
        assert!(!differs, "{what} was overwritten");
    }
    assert_marked_corrupt(&path);
}

#[test]
fn metadata_overlapping_other_metadata_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    // An L1 entry naming the refcount table as an L2 table: the next L2 update would write
    // guest mappings into the refcount table.
    let path = image(dir.path(), "o.qcow2");
    let lay = layout(&path);
    put64(&path, lay.l1, lay.reftable | 1 << 63);
    let e = try_open(&path, false).expect_err("opened read-write");
    assert!(e.to_string().contains("overlap"), "{e}");
    open(&path, true);
    // A refcount table entry naming the L1 table as a refcount block.
    let path = image(dir.path(), "o2.qcow2");
    let lay = layout(&path);
    put64(&path, lay.reftable, lay.l1);
    let e = try_open(&path, false).expect_err("opened read-write");
    assert!(e.to_string().contains("overlap"), "{e}");
}

#[test]
fn clean_images_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "c.qcow2");
    let img = open(&path, false);
    for i in 0..(SIZE >> 16) {
        img.write_at(&[i as u8; 4096], (i << 16) + 512).unwrap();
    }
    img.discard(3 << 16, 65536).unwrap();
    img.flush().unwrap();
    drop(img);
    check(&path);
}
