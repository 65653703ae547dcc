//! Fuzzes opening a qcow2 image read-write and doing guest I/O on it: header, L1/L2 and
//! refcount tables all come from the input. Nothing may panic, and no write may land on the
//! image's metadata (the overlap checks turn those into errors). The first 8 input bytes pick
//! the guest offset; the rest is the image file. Images with a backing file are skipped (the
//! fuzzer must not open host files).
#![no_main]

use std::io::Write;
use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use rqemu_block_backend::image::qcow2::{parse_header, Qcow2Image};
use rqemu_block_backend::image::DiskImage;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 + 72 {
        return;
    }
    let (pick, image) = data.split_at(8);
    match parse_header(image) {
        Ok(h) if h.backing_file.is_none() => {}
        _ => return,
    }
    let mut file = tempfile::tempfile().expect("temp file");
    file.write_all(image).expect("writing the temp file");
    let Ok(img) = Qcow2Image::open(file, PathBuf::from("/nonexistent"), false) else {
        return;
    };
    let size = img.size();
    if size == 0 {
        return;
    }
    let off = u64::from_le_bytes(pick.try_into().unwrap_or_default()) % size;
    let n = (size - off).min(1536) as usize;
    let mut buf = vec![0u8; n];
    let _ = img.read_at(&mut buf, off);
    let _ = img.write_at(&vec![0xa5; n], off);
    let _ = img.read_at(&mut buf, off);
    let _ = img.write_zeroes(off, n as u64, false);
    let _ = img.discard(off, n as u64);
    let _ = img.flush();
});
