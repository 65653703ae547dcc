//! The real `rqemu-blk` process driven by an in-process vhost-user frontend (the `vhost`
//! crate's `Frontend` inside `rqemu-vhost-driver`), on temp sockets and images.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rqemu_protocol::identity;
use rqemu_vhost_driver::blk::{self, Slots};
use rqemu_vhost_driver::{Device, DriverError, DriverOptions};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const TIMEOUT: Duration = Duration::from_secs(20);

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, image: &Path, extra: &[&str]) -> Daemon {
        let socket = dir.join(format!("blk-{}.sock", rand_id()));
        let child = Command::new(env!("CARGO_BIN_EXE_rqemu-blk"))
            .arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(image)
            .args(extra)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn rqemu-blk");
        let d = Daemon { child, socket };
        let start = Instant::now();
        while !d.socket.exists() {
            assert!(
                start.elapsed() < TIMEOUT,
                "rqemu-blk did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    fn connect(&self, queues: u16) -> Device {
        let opts = DriverOptions {
            num_queues: queues,
            event_idx: true,
            ..Default::default()
        };
        // The socket file exists from bind(2) on, a moment before listen(2): refused until then.
        let start = Instant::now();
        loop {
            match Device::connect(&self.socket, &opts) {
                Ok(d) => return d,
                Err(DriverError::Connect { source, .. })
                    if source.kind() == std::io::ErrorKind::ConnectionRefused
                        && start.elapsed() < TIMEOUT =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("vhost-user negotiation: {e:?}"),
            }
        }
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Confined (the default), the pid-namespace parent removes it.
                assert!(
                    !self.socket.exists(),
                    "rqemu-blk left its socket behind after SIGTERM"
                );
                return st;
            }
            assert!(start.elapsed() < TIMEOUT, "rqemu-blk ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    u64::from(std::process::id()) << 16 | N.fetch_add(1, Ordering::Relaxed)
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn raw_image(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("disk.raw");
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    let out = Command::new("qemu-img").args(args).output().expect(
        "qemu-img is required for these tests (install qemu-utils: scripts/install-deps.sh)",
    );
    out
}

#[test]
fn raw_write_read_flush_config_and_id() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), 8 << 20);
    let d = Daemon::start(dir.path(), &img, &["--serial", "rqemu-serial-1"]);
    let mut dev = d.connect(1);

    let cfg = dev.config(0, 60).unwrap();
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        (8 << 20) / 512
    );
    let id = dev
        .config(identity::IDENTITY_OFFSET, identity::IDENTITY_LEN)
        .unwrap();
    let id = identity::Identity::decode(&id).unwrap();
    assert_eq!(
        (id.kind, id.name.as_str()),
        (identity::DeviceKind::Blk, "rqemu-blk")
    );

    let slots = Slots::new(&mut dev, 4, 1 << 20).unwrap();
    let data = pattern(256 * 1024, 1);
    let mut buf = data.clone();
    let (st, _) = blk::request(&mut dev, 0, slots.get(0), T_OUT, 24, &mut buf, TIMEOUT).unwrap();
    assert_eq!(st, S_OK);
    let (st, _) = blk::request(&mut dev, 0, slots.get(1), T_FLUSH, 0, &mut [], TIMEOUT).unwrap();
    assert_eq!(st, S_OK);
    let mut back = vec![0u8; data.len()];
    let (st, used) = blk::request(&mut dev, 0, slots.get(2), T_IN, 24, &mut back, TIMEOUT).unwrap();
    assert_eq!((st, used as usize), (S_OK, data.len() + 1));
    assert_eq!(back, data);
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(&on_disk[24 * 512..24 * 512 + data.len()], &data[..]);

    let mut id = vec![0u8; 20];
    let (st, _) = blk::request(&mut dev, 0, slots.get(3), T_GET_ID, 0, &mut id, TIMEOUT).unwrap();
    assert_eq!(st, S_OK);
    assert_eq!(&id[..14], b"rqemu-serial-1");

    // Out of range: IOERR, the daemon keeps serving.
    let mut b = vec![0u8; 512];
    let (st, _) = blk::request(
        &mut dev,
        0,
        slots.get(0),
        T_IN,
        (8 << 20) / 512,
        &mut b,
        TIMEOUT,
    )
    .unwrap();
    assert_eq!(st, S_IOERR);
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn many_requests_in_flight_on_two_queues() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), 16 << 20);
    let d = Daemon::start(dir.path(), &img, &["--queues", "2"]);
    let mut dev = d.connect(2);
    let slots = Slots::new(&mut dev, 128, 4096).unwrap();
    // 64 writes per queue, one kick each, then collect every completion.
    for q in 0..2 {
        for i in 0..64 {
            let s = slots.get(q * 64 + i);
            dev.mem
                .write(s.data, &pattern(4096, (q * 64 + i) as u64))
                .unwrap();
            blk::post(&mut dev, q, s, T_OUT, ((q * 64 + i) * 8) as u64, 4096).unwrap();
        }
        dev.queues[q].kick().unwrap();
    }
    for q in 0..2 {
        let mut done = 0;
        let start = Instant::now();
        while done < 64 {
            while let Some((_, _)) = dev.queues[q].pop_used(&dev.mem).unwrap() {
                done += 1;
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "queue {q}: only {done}/64 completed"
            );
            dev.queues[q].wait_call(Duration::from_millis(50)).unwrap();
        }
        for i in 0..64 {
            assert_eq!(blk::status(&dev, slots.get(q * 64 + i)).unwrap(), S_OK);
        }
    }
    let on_disk = std::fs::read(&img).unwrap();
    for n in 0..128 {
        assert_eq!(
            &on_disk[n * 4096..(n + 1) * 4096],
            &pattern(4096, n as u64)[..],
            "block {n}"
        );
    }
}

#[test]
fn survives_frontend_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), 4 << 20);
    let d = Daemon::start(dir.path(), &img, &[]);
    for round in 0..3u64 {
        let mut dev = d.connect(1);
        let slots = Slots::new(&mut dev, 2, 4096).unwrap();
        if round > 0 {
            let mut back = vec![0u8; 4096];
            let (st, _) = blk::request(
                &mut dev,
                0,
                slots.get(0),
                T_IN,
                round - 1,
                &mut back,
                TIMEOUT,
            )
            .unwrap();
            assert_eq!(st, S_OK);
            assert_eq!(&back[..512], &pattern(512, round - 1)[..], "round {round}");
        }
        let mut data = pattern(512, round);
        let (st, _) =
            blk::request(&mut dev, 0, slots.get(1), T_OUT, round, &mut data, TIMEOUT).unwrap();
        assert_eq!(st, S_OK);
        drop(dev); // disconnect
    }
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn read_only_rejects_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), 1 << 20);
    std::fs::write(&img, pattern(1 << 20, 9)).unwrap();
    let d = Daemon::start(dir.path(), &img, &["--readonly"]);
    let mut dev = d.connect(1);
    assert_ne!(
        dev.offered_features & (1 << 5),
        0,
        "VIRTIO_BLK_F_RO not offered"
    );
    let slots = Slots::new(&mut dev, 2, 4096).unwrap();
    let mut data = vec![0u8; 4096];
    let (st, _) = blk::request(&mut dev, 0, slots.get(0), T_OUT, 0, &mut data, TIMEOUT).unwrap();
    assert_eq!(st, S_IOERR);
    let mut seg = vec![0u8; 16];
    seg[8..12].copy_from_slice(&1u32.to_le_bytes());
    let (st, _) = blk::request(&mut dev, 0, slots.get(1), T_DISCARD, 0, &mut seg, TIMEOUT).unwrap();
    assert_ne!(st, S_OK);
    let (st, _) = blk::request(&mut dev, 0, slots.get(0), T_IN, 0, &mut data, TIMEOUT).unwrap();
    assert_eq!(st, S_OK);
    assert_eq!(data, pattern(1 << 20, 9)[..4096]);
    assert_eq!(std::fs::read(&img).unwrap(), pattern(1 << 20, 9));
}

#[test]
fn qcow2_written_through_the_daemon_passes_qemu_img_check() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let out = qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "32M"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = Daemon::start(dir.path(), &img, &[]);
    let mut dev = d.connect(1);
    let slots = Slots::new(&mut dev, 1, 1 << 20).unwrap();
    let mut expect = vec![0u8; 32 << 20];
    for (i, (sector, len)) in [(0u64, 4096usize), (7, 512), (2047, 1 << 20), (60000, 65536)]
        .into_iter()
        .enumerate()
    {
        let mut data = pattern(len, i as u64 + 100);
        let off = sector as usize * 512;
        expect[off..off + len].copy_from_slice(&data);
        let (st, _) =
            blk::request(&mut dev, 0, slots.get(0), T_OUT, sector, &mut data, TIMEOUT).unwrap();
        assert_eq!(st, S_OK);
    }
    drop(dev);
    // SIGTERM flushes everything before exit.
    assert_eq!(d.terminate().code(), Some(0));
    let check = qemu_img(&["check", img.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "qemu-img check failed: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let raw = dir.path().join("out.raw");
    let conv = qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(conv.status.success());
    assert!(
        std::fs::read(&raw).unwrap() == expect,
        "qemu-img convert differs from what was written"
    );
}

#[test]
fn bad_images_fail_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let run = |image: &Path, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rqemu-blk"))
            .arg("--socket")
            .arg(dir.path().join("x.sock"))
            .arg("--image")
            .arg(image)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&dir.path().join("missing.img"), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.img"), "{err}");

    // A qcow2 header with an unknown incompatible feature bit.
    let img = dir.path().join("bad.qcow2");
    let out = qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
    assert!(out.status.success());
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[72 + 7] |= 0x80; // incompatible_features, bit 7 (big-endian u64 at offset 72)
    std::fs::write(&img, &bytes).unwrap();
    let out = run(&img, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("incompatible"), "{err}");

    // Forcing qcow2 on a raw file.
    let raw = raw_image(dir.path(), 4096);
    let out = run(&raw, &["--format", "qcow2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let name = raw.file_name().unwrap().to_string_lossy();
    assert!(err.contains(&*name) && err.contains("qcow2"), "{err}");

    // A regular file in the socket's place is never clobbered.
    std::fs::write(dir.path().join("x.sock"), b"keep").unwrap();
    let out = run(&raw, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("x.sock exists and is not a socket"), "{err}");
    // The one error-exit style: the message once, with the binary's name.
    assert_eq!(err.matches("rqemu-blk: error: ").count(), 1, "{err}");
    assert_eq!(std::fs::read(dir.path().join("x.sock")).unwrap(), b"keep");
}

/// A raw image on a file system with O_DIRECT (the temp dir; tmpfs has none and the daemon
/// then fails with a message naming O_DIRECT, which fails the test loudly).
fn direct_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

#[test]
fn engines_and_cache_modes_keep_every_write() {
    for extra in [
        &["--cache", "none", "--aio", "io-uring"][..],
        &["--cache", "none", "--aio", "sync"],
        &["--cache", "directsync", "--aio", "io-uring"],
        &["--cache", "unsafe", "--aio", "threads"],
        &["--cache", "writeback", "--aio", "io-uring"],
    ] {
        let dir = direct_dir();
        let img = raw_image(dir.path(), 16 << 20);
        let mut args = vec!["--format", "raw"];
        args.extend_from_slice(extra);
        let d = Daemon::start(dir.path(), &img, &args);
        let mut dev = d.connect(1);
        let slots = Slots::new(&mut dev, 128, 4096).unwrap();
        // 64 writes in flight at once (one kick), then the same blocks read back in flight.
        for i in 0..64 {
            let s = slots.get(i);
            dev.mem.write(s.data, &pattern(4096, i as u64 + 7)).unwrap();
            blk::post(&mut dev, 0, s, T_OUT, (i * 8 * 3) as u64, 4096).unwrap();
        }
        dev.queues[0].kick().unwrap();
        let collect = |dev: &mut Device, n: usize| {
            let (mut done, start) = (0, Instant::now());
            while done < n {
                while let Some((_, _)) = dev.queues[0].pop_used(&dev.mem).unwrap() {
                    done += 1;
                }
                assert!(start.elapsed() < TIMEOUT, "{extra:?}: {done}/{n} completed");
                dev.queues[0].wait_call(Duration::from_millis(50)).unwrap();
            }
        };
        collect(&mut dev, 64);
        for i in 0..64 {
            assert_eq!(blk::status(&dev, slots.get(i)).unwrap(), S_OK, "{extra:?}");
            dev.mem.write(slots.get(i).data, &[0u8; 4096]).unwrap();
            blk::post(&mut dev, 0, slots.get(i), T_IN, (i * 8 * 3) as u64, 4096).unwrap();
        }
        dev.queues[0].kick().unwrap();
        collect(&mut dev, 64);
        for i in 0..64 {
            let mut back = vec![0u8; 4096];
            dev.mem.read(slots.get(i).data, &mut back).unwrap();
            assert_eq!(blk::status(&dev, slots.get(i)).unwrap(), S_OK, "{extra:?}");
            assert!(back == pattern(4096, i as u64 + 7), "{extra:?}: block {i}");
        }
        let (st, _) =
            blk::request(&mut dev, 0, slots.get(0), T_FLUSH, 0, &mut [], TIMEOUT).unwrap();
        assert_eq!(st, S_OK);
        let on_disk = std::fs::read(&img).unwrap();
        for i in 0..64 {
            let at = i * 4096 * 3;
            assert!(
                on_disk[at..at + 4096] == pattern(4096, i as u64 + 7)[..],
                "{extra:?}: block {i} on disk"
            );
        }
        assert_eq!(d.terminate().code(), Some(0), "{extra:?}");
    }
}

#[test]
fn image_locks_keep_qemu_and_a_second_writer_out() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), 1 << 20);
    let path = img.to_str().unwrap();
    let d = Daemon::start(dir.path(), &img, &["--format", "raw"]);
    // On raw, QEMU 10's `qemu-img info` takes no lock (it cannot be refused); a consistent
    // reader can. (On qcow2 it can: below.)
    let out = qemu_img(&["convert", "-O", "raw", path, "/dev/null"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("shared \"write\" lock"),
        "qemu-img convert of an image served writable: {err}"
    );
    // A second daemon is refused, naming the first.
    let second = Command::new(env!("CARGO_BIN_EXE_rqemu-blk"))
        .arg("--socket")
        .arg(dir.path().join("second.sock"))
        .args(["--format", "raw", "--readonly", "--image", path])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    // The holder named is the first daemon: its pid, or (confined, the default) the child it
    // serves from in its pid namespace.
    let holder: u32 = err
        .split("in use by pid ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no holder pid named: {err}"));
    let parent_of = |pid: u32| -> Option<u32> {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        st.lines()
            .find_map(|l| l.strip_prefix("PPid:"))?
            .trim()
            .parse()
            .ok()
    };
    assert!(
        err.contains("locked")
            && (holder == d.child.id() || parent_of(holder) == Some(d.child.id())),
        "{err}"
    );
    assert_eq!(d.terminate().code(), Some(0));
    assert!(
        qemu_img(&["convert", "-O", "raw", path, &format!("{path}.copy")])
            .status
            .success(),
        "locks released"
    );

    // Read-only: readers share, writers are refused (qemu-io opens writable).
    let d = Daemon::start(dir.path(), &img, &["--format", "raw", "--readonly"]);
    assert!(qemu_img(&["info", path]).status.success());
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", path])
        .output()
        .expect("qemu-io is required for this test");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("lock"), "qemu-io write under a reader: {all}");
    // And --force-share lets a writer in anyway.
    let d2 = Daemon::start(dir.path(), &img, &["--format", "raw", "--force-share"]);
    assert_eq!(d2.terminate().code(), Some(0));
    assert_eq!(d.terminate().code(), Some(0));

    // qcow2 served writable: `qemu-img info` (which on qcow2 wants the image unchanged while
    // it reads the header) is refused by the lock, as with qemu-storage-daemon; `-U` reads.
    let q = dir.path().join("d.qcow2");
    let qp = q.to_str().unwrap();
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", qp, "1M"])
        .status
        .success());
    let d = Daemon::start(dir.path(), &q, &["--format", "qcow2"]);
    let out = qemu_img(&["info", qp]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("lock"),
        "qemu-img info of a qcow2 served writable: {err}"
    );
    assert!(qemu_img(&["info", "-U", qp]).status.success());
    assert_eq!(d.terminate().code(), Some(0));
    assert!(qemu_img(&["info", qp]).status.success(), "lock released");
}

/// qcow2 with O_DIRECT guest data (metadata through the page cache, flushed): writes in
/// flight, including sub-cluster ones that need copy-on-write, read back, and the image passes
/// `qemu-img check` and holds exactly what was written.
#[test]
fn qcow2_with_cache_none_keeps_every_write() {
    for cache in ["none", "directsync"] {
        let dir = direct_dir();
        let img = dir.path().join("d.qcow2");
        let path = img.to_str().unwrap();
        assert!(qemu_img(&["create", "-q", "-f", "qcow2", path, "16M"])
            .status
            .success());
        let d = Daemon::start(dir.path(), &img, &["--cache", cache]);
        let mut dev = d.connect(1);
        let slots = Slots::new(&mut dev, 64, 4096).unwrap();
        // 4 KiB writes every 12 KiB: partial 64 KiB clusters (copy-on-write of zeroes).
        let len = |i: usize| if i % 3 == 0 { 512 } else { 4096 };
        for i in 0..64 {
            let s = slots.get(i);
            dev.mem
                .write(s.data, &pattern(len(i), i as u64 + 3))
                .unwrap();
            blk::post(&mut dev, 0, s, T_OUT, (i * 24) as u64, len(i) as u32).unwrap();
        }
        dev.queues[0].kick().unwrap();
        let (mut done, start) = (0, Instant::now());
        while done < 64 {
            while let Some((_, _)) = dev.queues[0].pop_used(&dev.mem).unwrap() {
                done += 1;
            }
            assert!(start.elapsed() < TIMEOUT, "{cache}: {done}/64 completed");
            dev.queues[0].wait_call(Duration::from_millis(50)).unwrap();
        }
        for i in 0..64 {
            assert_eq!(blk::status(&dev, slots.get(i)).unwrap(), S_OK, "{cache}");
            let mut back = vec![0u8; len(i)];
            let (st, _) = blk::request(
                &mut dev,
                0,
                slots.get(i),
                T_IN,
                (i * 24) as u64,
                &mut back,
                TIMEOUT,
            )
            .unwrap();
            assert_eq!(st, S_OK);
            assert!(back == pattern(len(i), i as u64 + 3), "{cache}: write {i}");
        }
        assert_eq!(d.terminate().code(), Some(0), "{cache}");
        let out = qemu_img(&["check", "-f", "qcow2", path]);
        assert!(
            out.status.success(),
            "{cache}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let flat = dir.path().join("flat.raw");
        let out = qemu_img(&["convert", "-O", "raw", path, flat.to_str().unwrap()]);
        assert!(out.status.success());
        let flat = std::fs::read(&flat).unwrap();
        for i in 0..64 {
            let at = i * 24 * 512;
            assert!(
                flat[at..at + len(i)] == pattern(len(i), i as u64 + 3)[..],
                "{cache}: write {i} in the image"
            );
        }
    }
}

#[test]
fn backing_files_are_locked_against_writers() {
    let dir = tempfile::tempdir().unwrap();
    let base = raw_image(dir.path(), 1 << 20);
    let top = dir.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "raw", t])
            .status
            .success()
    );
    let write_base = || {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 512", b])
            .output()
            .expect("qemu-io is required for this test");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let d = Daemon::start(dir.path(), &top, &[]);
    let out = write_base();
    assert!(
        out.contains("lock"),
        "qemu-io write to the backing file: {out}"
    );
    // Readers of the backing file are welcome.
    assert!(qemu_img(&["convert", "-O", "raw", b, &format!("{b}.copy")])
        .status
        .success());
    assert_eq!(d.terminate().code(), Some(0));
    let out = write_base();
    assert!(!out.contains("lock"), "locks released: {out}");
}
