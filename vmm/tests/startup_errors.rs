//! `rqemu-vmm` start-up failures: corrupt or truncated kernels, an initrd or a kernel larger
//! than guest memory, memory below the minimum, a device socket path that is not a socket.
//! Each must exit 1 (not panic, not boot garbage) with a message naming the file and the
//! problem. The bad files are made in a temp dir from the test payloads. Runs on the
//! software CPU (`--accel tcg`): nothing here depends on KVM.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{payloads, run_vmm, Run};

const T: Duration = Duration::from_secs(60);

/// Runs the VMM with `--kernel kernel` and `extra`; it must fail with status 1 and a stderr
/// containing every one of `needles`.
#[track_caller]
fn fails_with(kernel: &Path, extra: &[&str], needles: &[&str]) -> Run {
    let k = kernel.to_str().unwrap();
    let mut args = vec!["--kernel", k, "--accel", "tcg", "--serial", "none"];
    args.extend_from_slice(extra);
    let r = run_vmm(&args, T);
    assert_eq!(r.code, Some(1), "{args:?} must fail with status 1:\n{r}");
    assert!(!r.stderr.contains("panicked"), "{args:?}: a panic:\n{r}");
    for n in needles {
        assert!(
            r.stderr.contains(n),
            "{args:?}: the message does not name {n:?}:\n{r}"
        );
    }
    r
}

fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The test bzImage with its header's `syssize` (16-byte units of kernel after the setup
/// sectors) filled in, as a real bzImage has it.
fn bzimage_with_syssize() -> Vec<u8> {
    let mut img = std::fs::read(&payloads().bzimage).unwrap();
    let setup = (usize::from(img[0x1f1]) + 1) * 512;
    let syssize = (img.len() - setup).div_ceil(16) as u32;
    img.resize(setup + syssize as usize * 16, 0);
    img[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
    img
}

#[test]
fn empty_and_tiny_kernels_are_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(dir.path(), "empty", b"");
    fails_with(&empty, &[], &[s(&empty), "truncated", "0 bytes"]);
    let tiny = write(dir.path(), "tiny", b"\x7fE");
    fails_with(&tiny, &[], &[s(&tiny), "truncated", "2 bytes"]);
    fails_with(dir.path(), &[], &[s(dir.path()), "Is a directory"]);
    let missing = dir.path().join("missing");
    fails_with(&missing, &[], &[s(&missing), "No such file"]);
}

#[test]
fn truncated_elf_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let elf = std::fs::read(&payloads().elf).unwrap();
    let k = write(dir.path(), "cut.elf", &elf[..300]);
    fails_with(&k, &[], &[s(&k), "ELF kernel", "300 bytes"]);
}

#[test]
fn corrupt_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Neither ELF nor a bzImage: a bzImage without its HdrS magic.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let k = write(dir.path(), "garbage", &garbage);
    fails_with(&k, &[], &[s(&k), "bzImage", "Invalid bzImage"]);
    // An ELF header whose program headers point past the end of the file.
    let mut elf = std::fs::read(&payloads().elf).unwrap();
    elf[0x20..0x28].copy_from_slice(&0x7fff_0000u64.to_le_bytes()); // e_phoff
    let k = write(dir.path(), "bad-phoff.elf", &elf);
    fails_with(&k, &[], &[s(&k), "ELF kernel"]);
}

#[test]
fn truncated_bzimage_is_refused_and_a_whole_one_boots() {
    let dir = tempfile::tempdir().unwrap();
    let img = bzimage_with_syssize();
    // Control: the same image, whole, boots and powers off (the check does not refuse
    // valid images).
    let whole = write(dir.path(), "whole.bz", &img);
    let args = [
        "--kernel",
        s(&whole),
        "--accel",
        "tcg",
        "--memory",
        "64M",
        "--cmdline",
        "mode=poweroff",
    ];
    let r = run_vmm(&args, T);
    assert_eq!(r.code, Some(0), "the whole bzImage boots:\n{r}");
    let cut = write(dir.path(), "cut.bz", &img[..img.len() / 2]);
    fails_with(
        &cut,
        &[],
        &[
            s(&cut),
            "truncated",
            "announces",
            &format!("the file has {} bytes", img.len() / 2),
        ],
    );
}

#[test]
fn kernel_larger_than_memory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // 8 MiB of kernel after the setup in 4 MiB of RAM.
    let mut img = bzimage_with_syssize();
    let setup = (usize::from(img[0x1f1]) + 1) * 512;
    img.resize(setup + (8 << 20), 0);
    img[0x1f4..0x1f8].copy_from_slice(&((8u32 << 20) / 16).to_le_bytes());
    let k = write(dir.path(), "big.bz", &img);
    fails_with(
        &k,
        &["--memory", "4M"],
        &[s(&k), &format!("needs {} bytes", 8 << 20), "--memory"],
    );
    // A small image whose header says it needs 64 MiB to decompress (init_size), in 32 MiB.
    let mut img = bzimage_with_syssize();
    img[0x260..0x264].copy_from_slice(&(64u32 << 20).to_le_bytes());
    let k = write(dir.path(), "init-size.bz", &img);
    fails_with(
        &k,
        &["--memory", "32M"],
        &[s(&k), &format!("needs {} bytes", 64 << 20), "--memory"],
    );
}

#[test]
fn initrd_larger_than_memory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rd = dir.path().join("big.cpio");
    let f = std::fs::File::create(&rd).unwrap();
    f.set_len(64 << 20).unwrap(); // sparse
    fails_with(
        &payloads().elf,
        &["--initrd", s(&rd), "--memory", "32M"],
        &[
            s(&rd),
            &format!("{} bytes does not fit", 64 << 20),
            "--memory",
        ],
    );
}

#[test]
fn memory_below_the_minimum_is_refused() {
    fails_with(
        &payloads().elf,
        &["--memory", "1M"],
        &["invalid guest memory size 0x100000", "at least 2 MiB"],
    );
}

#[test]
fn device_socket_that_is_a_regular_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "not-a-socket", b"");
    let msg = format!(
        "device socket {} is not a UNIX socket but a regular file",
        file.display()
    );
    // Probed (no type) and typed alike.
    fails_with(&payloads().elf, &["--device-socket", s(&file)], &[&msg]);
    let typed = format!("blk:{}", file.display());
    fails_with(&payloads().elf, &["--device-socket", &typed], &[&msg]);
    let msg = format!(
        "device socket {} is not a UNIX socket but a directory",
        dir.path().display()
    );
    fails_with(
        &payloads().elf,
        &["--device-socket", s(dir.path())],
        &[&msg],
    );
}
