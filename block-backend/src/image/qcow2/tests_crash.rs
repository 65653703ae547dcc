//! Crash consistency: an image abandoned without close (process crash), or whose writer is
//! killed with SIGKILL at an arbitrary point, may leak clusters but is never corrupt.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::super::DiskImage;
use super::tests::{assert_same, convert_raw, create, open, qemu_img, run_tool, Rng};

const CHILD_ENV: &str = "RQEMU_QCOW2_CRASH_CHILD_IMAGE";

/// `qemu-img check` exit code: 0 clean, 3 leaks only; anything else is a failure.
fn check_leaks_only(path: &Path) -> i32 {
    let out = run_tool(
        path.parent().unwrap(),
        "qemu-img",
        &["check", path.to_str().unwrap()],
    );
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "qemu-img check after crash exited {code}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    code
}

/// Random writes, discards and zeroes (no final flush).
fn churn(img: &dyn DiskImage, model: Option<&mut Vec<u8>>, seed: u64, ops: usize) {
    let mut model = model;
    let size = img.size();
    let mut rng = Rng(seed);
    let mut data = vec![0u8; 40_000];
    for i in 0..ops {
        let len = 1 + rng.below(data.len() as u64);
        let off = rng.below(size - len);
        let (o, l) = (off as usize, len as usize);
        match rng.below(8) {
            0 => {
                img.write_zeroes(off, len, true).unwrap();
                if let Some(m) = model.as_deref_mut() {
                    m[o..o + l].fill(0);
                }
            }
            1 => {
                // Discard of whole clusters only keeps the model simple: cs divides 64 KiB.
                let off = off & !0xffff;
                img.discard(off, 65536.min(size - off)).unwrap();
                if let Some(m) = model.as_deref_mut() {
                    m[off as usize..(off + 65536).min(size) as usize].fill(0);
                }
            }
            _ => {
                rng.fill(&mut data[..l]);
                img.write_at(&data[..l], off).unwrap();
                if let Some(m) = model.as_deref_mut() {
                    m[o..o + l].copy_from_slice(&data[..l]);
                }
            }
        }
        if i % 37 == 0 {
            img.flush().unwrap();
        }
    }
}

#[test]
fn abandoned_image_only_leaks_and_keeps_all_data() {
    for opts in [
        "compat=1.1,cluster_size=4096",
        "compat=0.10,cluster_size=8192",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let size = 4u64 << 20;
        let path = create(dir.path(), "a.qcow2", opts, size);
        let img = open(&path, false);
        let mut model = vec![0u8; size as usize];
        churn(&img, Some(&mut model), 77, 300);
        // Simulated process crash: no Drop, no flush (pending frees, reserve stay as is).
        std::mem::forget(img);
        check_leaks_only(&path);
        // Everything written is visible (metadata is written through).
        assert_same(&convert_raw(&path), &model, "data after crash");
        qemu_img(dir.path(), &["check", "-q", "-r", "leaks", "a.qcow2"]);
        super::tests::check(&path);
    }
}

/// The daemon's clean shutdown (SIGTERM) is a guest-visible flush followed by
/// `process::exit`: no `Drop`. After a flush the image on disk must be fully clean — no
/// leaks either — including the pre-counted allocation reserve, which after a discard sits
/// in the middle of the file (freed clusters are reused first) rather than past its end.
#[test]
fn flushed_then_abandoned_image_has_no_leaks() {
    for opts in [
        "compat=1.1,cluster_size=65536",
        "compat=0.10,cluster_size=65536",
        "compat=1.1,cluster_size=4096,refcount_bits=1",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let size = 32u64 << 20;
        let path = create(dir.path(), "f.qcow2", opts, size);
        let img = open(&path, false);
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(0x1eaf);
        let mut write = |img: &dyn DiskImage, model: &mut Vec<u8>, off: u64, len: usize| {
            let mut data = vec![0u8; len];
            rng.fill(&mut data);
            img.write_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        };
        // Sequential and scattered writes: several allocation batches.
        write(&img, &mut model, 0, 1 << 20);
        write(&img, &mut model, 0xc0_0000, 4 << 20);
        write(&img, &mut model, 0x3_1000, 5000);
        img.flush().unwrap();
        check_clean(&path, opts, "after the first flush");
        // Discard eight whole 64 KiB clusters, flush (the frees are applied).
        img.discard(0xc4_0000, 0x8_0000).unwrap();
        model[0xc4_0000..0xcc_0000].fill(0);
        img.flush().unwrap();
        check_clean(&path, opts, "after the discard and flush");
        // Write into the discarded range (reuses its clusters) and elsewhere, flush.
        write(&img, &mut model, 0xc4_0000, 64 << 10);
        write(&img, &mut model, 0x1f0_0000, 3000);
        img.flush().unwrap();
        check_clean(&path, opts, "after reusing discarded clusters");
        write(&img, &mut model, 0xc5_0000, 3 << 16);
        write(&img, &mut model, 0x10_0000, 100);
        img.flush().unwrap();
        // The daemon exits here without closing the image.
        std::mem::forget(img);
        check_clean(&path, opts, "flushed, then abandoned");
        assert_same(&convert_raw(&path), &model, "data after flush and exit");
    }
}

/// `qemu-img check -U` (the image may still be open) must exit 0: no errors, no leaks.
pub(super) fn check_clean(path: &Path, opts: &str, when: &str) {
    let out = run_tool(
        path.parent().unwrap(),
        "qemu-img",
        &["check", "-U", path.to_str().unwrap()],
    );
    assert!(
        out.status.code() == Some(0),
        "{opts}: qemu-img check {when} exited {:?}:\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Child side of `killed_writer_never_corrupts` (does nothing unless started by it): churns
/// the image forever, reporting on stdout (a pipe to the parent) the number of operations
/// done after every batch.
#[test]
#[ignore = "helper process for killed_writer_never_corrupts"]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let img = open(Path::new(&path), false);
    let mut out = std::io::stdout().lock();
    let mut seed = 1;
    loop {
        churn(&img, None, seed, 50);
        writeln!(out, "{CHILD_REPORT}{}", seed * 50).unwrap();
        out.flush().unwrap();
        seed += 1;
    }
}

/// Prefix of the child's progress lines (libtest prints its own lines on the same stdout).
const CHILD_REPORT: &str = "crash-child ops done: ";

#[test]
fn killed_writer_never_corrupts() {
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Small clusters: frequent L2 table, refcount block and reftable allocations.
    let path = create(
        dir.path(),
        "k.qcow2",
        "compat=1.1,cluster_size=512,refcount_bits=64",
        8 << 20,
    );
    let mut codes = Vec::new();
    let mut done = Vec::new();
    for delay_ms in [0, 40, 120, 250] {
        let mut child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "image::qcow2::tests_crash::crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning the crash child");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix(CHILD_REPORT) {
                    let _ = tx.send(n.parse::<u64>().expect("child report"));
                }
            }
        });
        // The kill must land in the middle of the writes: wait for the first batch, then
        // let it run on for a while.
        let first = rx.recv_timeout(Duration::from_secs(60));
        if first.is_err() {
            let _ = child.kill();
            let st = child.wait().unwrap();
            panic!("the crash child reported no write within 60 s (status {st})");
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        if let Ok(Some(st)) = child.try_wait() {
            panic!("crash child exited early: {st}");
        }
        child.kill().unwrap(); // SIGKILL
        let st = child.wait().unwrap();
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "the crash child must die of our SIGKILL, not otherwise: {st}"
        );
        reader.join().unwrap();
        let ops = rx.try_iter().last().unwrap_or(0).max(first.unwrap());
        assert!(
            ops >= 50,
            "the child wrote before it was killed ({ops} ops)"
        );
        done.push(ops);
        codes.push(check_leaks_only(&path));
        // The image still opens and reads everywhere.
        let img = open(&path, true);
        let mut buf = vec![0u8; 8 << 20];
        img.read_at(&mut buf, 0).unwrap();
    }
    eprintln!(
        "operations done before each SIGKILL: {done:?}; qemu-img check exit codes: {codes:?} \
         (3 = leaks only)"
    );
}
