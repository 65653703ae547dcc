//! Fuzzes opening and using a whole qcow2 image: the input is the image file. Past the header
//! this reaches the L1/refcount table checks, header extensions, backing-file resolution and,
//! for images that open, the L2 lookups, cluster allocation, refcount updates, zero and
//! compressed cluster reads of the block device's I/O paths. Any bytes in: an error or a
//! working image out, never a panic.
#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rqemu_block_backend::image::qcow2::Qcow2Image;
use rqemu_block_backend::image::DiskImage;

/// An empty directory as the base of relative backing-file names.
fn base_dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"))
        .path()
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 4 << 20 {
        return;
    }
    // In memory when /dev/shm is there (each input is a whole image file).
    let Ok(mut file) = tempfile::tempfile_in("/dev/shm").or_else(|_| tempfile::tempfile()) else {
        return;
    };
    if file.write_all(data).is_err() {
        return;
    }
    let Ok(img) = Qcow2Image::open(file, base_dir().to_path_buf(), false) else {
        return;
    };
    let size = img.size();
    if size == 0 {
        return;
    }
    // A few reads and writes spread over the disk, then zeroes, a discard and a flush.
    let mut buf = vec![0u8; 4096];
    let spots = [0, size / 3, size / 2, size.saturating_sub(4096)];
    for &off in &spots {
        let len = 4096.min(size - off) as usize;
        let _ = img.read_at(&mut buf[..len], off);
    }
    buf.fill(0x5a);
    for &off in &spots[..2] {
        let len = 3000.min(size - off) as usize;
        let _ = img.write_at(&buf[..len], off);
        let _ = img.read_at(&mut buf[..len], off);
    }
    let _ = img.write_zeroes(size / 2, 1024.min(size - size / 2), true);
    let _ = img.discard(0, 65536.min(size));
    let _ = img.flush();
});
