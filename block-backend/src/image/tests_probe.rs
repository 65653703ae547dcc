//! Probed raw images (CVE-2008-2004 class): a guest must not be able to turn its raw disk,
//! served with `--format auto`, into something that probes as qcow2 on the next start.

use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::{open, qcow2, DiskImage, Format, FormatHint, ImageError, OpenOptions};

const SIZE: usize = 1 << 20;

/// A raw image of `SIZE` bytes whose first bytes are `head`.
fn raw_file(head: &[u8]) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    let mut data = vec![0x5au8; SIZE];
    data[..head.len()].copy_from_slice(head);
    std::fs::write(f.path(), &data).unwrap();
    f
}

fn open_with(path: &Path, format: FormatHint) -> Box<dyn DiskImage> {
    let opts = OpenOptions {
        format,
        read_only: false,
        ..OpenOptions::default()
    };
    open(path, &opts).unwrap()
}

/// A qcow2 header naming a host file as its backing file (what the attack writes).
fn evil_header() -> Vec<u8> {
    let mut h = qcow2::test_header(3, 16);
    let name = b"/etc/shadow";
    h[8..16].copy_from_slice(&512u64.to_be_bytes());
    h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    h[512..512 + name.len()].copy_from_slice(name);
    h
}

fn refused(r: super::Result<()>) -> bool {
    matches!(r, Err(ImageError::Refused(_)))
}

fn probe_after(path: &Path) -> Format {
    super::detect(&std::fs::File::open(path).unwrap()).unwrap()
}

#[test]
fn writing_a_qcow2_header_into_a_probed_raw_image_is_refused() {
    let f = raw_file(&[]);
    let img = open_with(f.path(), FormatHint::Auto);
    assert_eq!(img.format(), Format::Raw);
    let evil = evil_header();
    // The header alone (one sector), the whole first cluster (spans sector 0 and more), and
    // a larger write starting at 0.
    assert!(refused(img.write_at(&evil[..512], 0)));
    assert!(refused(img.write_at(&evil, 0)));
    let mut big = evil.clone();
    big.resize(200_000, 7);
    assert!(refused(img.write_at(&big, 0)));
    // Nothing of the refused writes reached the file.
    let data = std::fs::read(f.path()).unwrap();
    assert!(data[..200_000].iter().all(|&b| b == 0x5a));
    assert_eq!(probe_after(f.path()), Format::Raw);
}

#[test]
fn partial_first_sector_writes_cannot_assemble_the_magic() {
    let f = raw_file(&[]);
    let img = open_with(f.path(), FormatHint::Auto);
    // Two bytes are harmless on their own...
    img.write_at(b"QF", 0).unwrap();
    // ...but completing the magic is refused, at its exact offset or from inside the sector.
    assert!(refused(img.write_at(b"I\xfb", 2)));
    assert!(refused(img.write_at(b"FI\xfbxxxx", 1)));
    let mut tail = vec![0u8; 600];
    tail[..2].copy_from_slice(b"I\xfb");
    assert!(refused(img.write_at(&tail, 2)));
    assert_eq!(probe_after(f.path()), Format::Raw);
    // A write breaking the partial magic, and ordinary boot-sector contents, are fine.
    img.write_at(b"\xeb\x63\x90", 0).unwrap();
    img.write_at(&[0x55, 0xaa], 510).unwrap();
    img.write_zeroes(0, 4096, true).unwrap();
    img.discard(0, 65536).unwrap();
    // Writes past the first sector are never checked.
    img.write_at(&evil_header(), 4096).unwrap();
    assert_eq!(probe_after(f.path()), Format::Raw);
}

#[test]
fn guest_memory_writes_are_checked_too() {
    let f = raw_file(&[]);
    let img = open_with(f.path(), FormatHint::Auto);
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let evil = evil_header();
    mem.write_slice(&evil, GuestAddress(0x1000)).unwrap();
    // The magic split over two descriptors.
    let bufs = [
        mem.get_slice(GuestAddress(0x1000), 2).unwrap(),
        mem.get_slice(GuestAddress(0x1002), 4094).unwrap(),
    ];
    let mut bounce = Vec::new();
    assert!(refused(img.write_from_guest(&bufs, 0, &mut bounce)));
    assert_eq!(probe_after(f.path()), Format::Raw);
    // The same bytes elsewhere are written straight from guest memory.
    img.write_from_guest(&bufs, 8192, &mut bounce).unwrap();
    let mut back = vec![0u8; 4096];
    img.read_at(&mut back, 8192).unwrap();
    assert_eq!(back, evil[..4096]);
}

#[test]
fn stated_raw_and_read_only_are_not_restricted() {
    let f = raw_file(&[]);
    // `--format raw`: the user said what the image is; the guest may write anything.
    let img = open_with(f.path(), FormatHint::Exact(Format::Raw));
    img.write_at(&evil_header(), 0).unwrap();
    drop(img);
    assert_eq!(probe_after(f.path()), Format::Qcow2);
}
