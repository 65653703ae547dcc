//! vhost-user frontend tests without a guest CPU: a test driver programs the virtio-mmio
//! registers of a [`MmioTransport`] and writes split virtqueues into memfd guest RAM, the
//! transport hands the rings to a real vhost-user-blk daemon (qemu-storage-daemon, and
//! rqemu-blk when its binary is found), and the test checks the data on the host.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;

use rqemu_vmm::bus::BusDevice;
use rqemu_vmm::exit::ExitRequester;
use rqemu_vmm::memory::GuestRam;
use rqemu_vmm::virtio::mmio::{reg, status, MmioTransport};
use rqemu_vmm::virtio::vhost_user::{ControlStatus, VhostUserDevice, VhostUserKind};
use rqemu_vmm::virtio::{device_id, VIRTIO_F_VERSION_1};
use vm_memory::{Address, Bytes, GuestAddress};

const QSIZE: u16 = 16;
const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
const HDR: u64 = 0x20000;
const DATA: u64 = 0x30000;
const STATUS_BYTE: u64 = 0x40000;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const IMAGE_SIZE: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(20);

struct Daemon(Child, PathBuf);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(p: &Path, child: &mut Child) {
    let start = Instant::now();
    while !p.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("daemon exited early: {st}");
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "daemon never created {}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qsd(dir: &Path, image: &Path) -> Daemon {
    let sock = dir.join("qsd.sock");
    let mut child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning qemu-storage-daemon (installed from bookworm-backports)");
    wait_socket(&sock, &mut child);
    Daemon(child, sock)
}

fn rqemu_blk(bin: &Path, dir: &Path, image: &Path) -> Daemon {
    rqemu_blk_with(bin, dir, image, &[])
}

fn rqemu_blk_with(bin: &Path, dir: &Path, image: &Path, extra: &[&str]) -> Daemon {
    let sock = dir.join("rqemu-blk.sock");
    let mut child = Command::new(bin)
        .arg("--socket")
        .arg(&sock)
        .arg("--image")
        .arg(image)
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning rqemu-blk");
    wait_socket(&sock, &mut child);
    Daemon(child, sock)
}

fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Minimal virtio-blk driver on one split queue.
struct Driver {
    ram: GuestRam,
    t: MmioTransport,
    status: Arc<ControlStatus>,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    fn probe(socket: &Path) -> Driver {
        Self::probe_with(socket, 0)
    }

    /// Probes, acking `extra` device features (low word) besides VERSION_1.
    fn probe_with(socket: &Path, extra: u32) -> Driver {
        Self::probe_hook(socket, extra, || {})
    }

    /// [`Driver::probe_with`], running `before_driver_ok` just before DRIVER_OK is written.
    fn probe_hook(socket: &Path, extra: u32, before_driver_ok: impl FnOnce()) -> Driver {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mut dev = VhostUserDevice::connect(VhostUserKind::Blk, socket, ram.memory().clone())
            .expect("connecting to the vhost-user-blk daemon");
        let control = dev.take_control().expect("control");
        let status = control.status();
        let mut t = MmioTransport::new(Box::new(dev)).unwrap();
        // Ends when the transport (and so the device) is dropped.
        control.spawn(ExitRequester::new()).unwrap();
        assert_eq!(r(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), device_id::BLOCK);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        let hi = r(&mut t, reg::DEVICE_FEATURES);
        assert_ne!(u64::from(hi) << 32 & VIRTIO_F_VERSION_1, 0);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1); // VERSION_1 only
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        let lo = r(&mut t, reg::DEVICE_FEATURES);
        assert_eq!(lo & extra, extra, "the daemon offers {extra:#x}");
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, extra);
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // Config: capacity in 512-byte sectors.
        let mut cap = [0u8; 8];
        t.read(reg::CONFIG, &mut cap);
        assert_eq!(
            u64::from_le_bytes(cap),
            IMAGE_SIZE / 512,
            "capacity from GET_CONFIG"
        );
        w(&mut t, reg::QUEUE_SEL, 0);
        assert!(r(&mut t, reg::QUEUE_NUM_MAX) >= u32::from(QSIZE));
        w(&mut t, reg::QUEUE_NUM, u32::from(QSIZE));
        w(&mut t, reg::QUEUE_DESC_LOW, DESC as u32);
        w(&mut t, reg::QUEUE_DESC_HIGH, 0);
        w(&mut t, reg::QUEUE_DRIVER_LOW, AVAIL as u32);
        w(&mut t, reg::QUEUE_DRIVER_HIGH, 0);
        w(&mut t, reg::QUEUE_DEVICE_LOW, USED as u32);
        w(&mut t, reg::QUEUE_DEVICE_HIGH, 0);
        w(&mut t, reg::QUEUE_READY, 1);
        before_driver_ok();
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        let st = r(&mut t, reg::STATUS);
        assert_eq!(st & status::DEVICE_NEEDS_RESET, 0, "activation failed");
        Driver {
            ram,
            t,
            status,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let m = self.ram.memory();
        let base = GuestAddress(DESC + u64::from(i) * 16);
        m.write_obj(addr, base).unwrap();
        m.write_obj(len, base.unchecked_add(8)).unwrap();
        m.write_obj(flags, base.unchecked_add(12)).unwrap();
        m.write_obj(next, base.unchecked_add(14)).unwrap();
    }

    /// Submits one request and waits for its completion via the call eventfd.
    fn request(&mut self, ty: u32, sector: u64, data: &mut [u8]) -> u8 {
        let m = self.ram.memory();
        m.write_obj(ty, GuestAddress(HDR)).unwrap();
        m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        m.write_obj(0xffu8, GuestAddress(STATUS_BYTE)).unwrap();
        if ty == T_OUT {
            m.write_slice(data, GuestAddress(DATA)).unwrap();
        }
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        self.desc(0, HDR, 16, NEXT, 1);
        let dflags = if ty == T_IN { NEXT | WRITE } else { NEXT };
        self.desc(1, DATA, data.len() as u32, dflags, 2);
        self.desc(2, STATUS_BYTE, 1, WRITE, 0);
        let slot = u64::from(self.avail_idx % QSIZE);
        m.write_obj(0u16, GuestAddress(AVAIL + 4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        m.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        w(&mut self.t, reg::QUEUE_NOTIFY, 0);
        let call = &self.t.call_fds()[0];
        let start = Instant::now();
        loop {
            let used: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
            if used != self.used_seen {
                self.used_seen = used;
                break;
            }
            let mut pfd = libc::pollfd {
                fd: call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let _ = call.read();
            assert!(start.elapsed() < TIMEOUT, "request never completed");
        }
        if ty == T_IN {
            m.read_slice(data, GuestAddress(DATA)).unwrap();
        }
        m.read_obj(GuestAddress(STATUS_BYTE)).unwrap()
    }

    fn reset(&mut self) {
        w(&mut self.t, reg::STATUS, 0);
        assert_eq!(r(&mut self.t, reg::STATUS), 0);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn write_read_roundtrip(socket: &Path, image: &Path) {
    let mut d = Driver::probe(socket);
    let mut data = pattern(4096, 7);
    assert_eq!(d.request(T_OUT, 8, &mut data), 0, "write status");
    let mut back = vec![0u8; 4096];
    assert_eq!(d.request(T_IN, 8, &mut back), 0, "read status");
    assert_eq!(back, data);
    // The host sees the bytes at sector 8.
    let img = std::fs::read(image).unwrap();
    assert_eq!(&img[4096..8192], &data[..]);
    // Data written on the host is read by the driver.
    let mut img = img;
    img[512..1024].copy_from_slice(&pattern(512, 99));
    std::fs::write(image, &img).unwrap();
    let mut s1 = vec![0u8; 512];
    assert_eq!(d.request(T_IN, 1, &mut s1), 0);
    assert_eq!(s1, pattern(512, 99));
    d.reset();
}

fn image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.raw");
    std::fs::write(&p, vec![0u8; IMAGE_SIZE as usize]).unwrap();
    p
}

#[test]
fn qemu_storage_daemon_vhost_user_blk() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let d = qsd(dir.path(), &img);
    write_read_roundtrip(&d.1, &img);
    // A second frontend session after reset+reconnect works too.
    drop(d);
    let d = qsd(dir.path(), &img);
    write_read_roundtrip(&d.1, &img);
}

#[test]
fn rqemu_blk_vhost_user_blk() {
    let bin = support::rqemu_blk_binary();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let d = rqemu_blk(&bin, dir.path(), &img);
    write_read_roundtrip(&d.1, &img);
}

#[test]
fn missing_or_dead_daemon_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ram = GuestRam::new(4 << 20).unwrap();
    let start = Instant::now();
    let err = VhostUserDevice::connect(
        VhostUserKind::Blk,
        &dir.path().join("nobody.sock"),
        ram.memory().clone(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("nobody.sock") && err.contains("connect"),
        "{err}"
    );
    assert!(start.elapsed() < TIMEOUT);
    // A listener that accepts and then never answers: the reply timeout fires.
    let sock = dir.path().join("mute.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let c = listener.accept();
        std::thread::sleep(Duration::from_secs(12));
        drop(c);
    });
    let err = VhostUserDevice::connect(VhostUserKind::Blk, &sock, ram.memory().clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("mute.sock"), "{err}");
    t.join().unwrap();
}

#[test]
fn device_type_is_discovered_from_rqemu_daemons_only() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let ram = GuestRam::new(4 << 20).unwrap();
    // rqemu-blk identifies itself: no type needed.
    let d = rqemu_blk(&support::rqemu_blk_binary(), dir.path(), &img);
    let dev = VhostUserDevice::open(None, &d.1, ram.memory().clone()).expect("discovery");
    let mut t = MmioTransport::new(Box::new(dev)).unwrap();
    assert_eq!(r(&mut t, reg::DEVICE_ID), device_id::BLOCK);
    drop(t);
    drop(d);
    // qemu-storage-daemon has no rqemu identity: a clear error asking for the type.
    let qdir = tempfile::tempdir().unwrap();
    let q = qsd(qdir.path(), &image(qdir.path()));
    let err = VhostUserDevice::open(None, &q.1, ram.memory().clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("give the type explicitly"), "{err}");
    // ... and works with an explicit type.
    VhostUserDevice::open(Some(VhostUserKind::Blk), &q.1, ram.memory().clone())
        .expect("explicit type");
}

/// rqemu-vsock is discovered as virtio-vsock (type 19) or taken with an explicit type; its
/// config space (`le64 guest_cid`) is the daemon's, and it has three queues (rx, tx, event).
#[test]
fn rqemu_vsock_is_fronted_with_the_daemons_guest_cid() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vsock.sock");
    let mut child = Command::new(support::project_binary("rqemu-vsock"))
        .arg("--socket")
        .arg(&sock)
        .args(["--guest-cid", "3735928559", "--sandbox", "none"])
        .arg("--uds-path")
        .arg(dir.path().join("v.sock"))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning rqemu-vsock");
    wait_socket(&sock, &mut child);
    let d = Daemon(child, sock);
    let ram = GuestRam::new(4 << 20).unwrap();
    for kind in [None, Some(VhostUserKind::Vsock)] {
        let dev = VhostUserDevice::open(kind, &d.1, ram.memory().clone()).expect("open");
        let mut t = MmioTransport::new(Box::new(dev)).unwrap();
        assert_eq!(r(&mut t, reg::DEVICE_ID), device_id::VSOCK);
        let cid = u64::from(r(&mut t, reg::CONFIG)) | u64::from(r(&mut t, reg::CONFIG + 4)) << 32;
        assert_eq!(cid, 0xdead_beef, "{kind:?}");
        // Beyond the 8-byte config space: zeros, not the identity block or garbage.
        assert_eq!(r(&mut t, reg::CONFIG + 8), 0);
        let max: Vec<u32> = (0..4)
            .map(|q| {
                w(&mut t, reg::QUEUE_SEL, q);
                r(&mut t, reg::QUEUE_NUM_MAX)
            })
            .collect();
        assert!(max[..3].iter().all(|&m| m > 0) && max[3] == 0, "{max:?}");
    }
}

/// Waits until `cond` holds (panics with `what` after [`TIMEOUT`]).
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const VIRTIO_BLK_F_DISCARD: u32 = 1 << 13;

/// Starts rqemu-blk until `done` holds, starting it again when it exits first: a daemon just
/// killed may hold the image lock a moment longer (its sandboxed child is still exiting).
fn restart_until(
    bin: &Path,
    dir: &Path,
    img: &Path,
    extra: &[&str],
    done: impl Fn() -> bool,
) -> Daemon {
    let start = Instant::now();
    loop {
        let mut d = rqemu_blk_with(bin, dir, img, extra);
        loop {
            if done() {
                return d;
            }
            if d.0.try_wait().ok().flatten().is_some() {
                break; // exited: start it again
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "rqemu-blk {extra:?} never did it"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// rqemu-blk SIGKILLed under a live device: the device reconnects to the daemon restarted on
/// the same socket path, the rings resume where the guest's used index says, and I/O goes on;
/// a restarted daemon lacking a negotiated feature (`--readonly` drops DISCARD) is refused
/// until a proper one is back.
#[test]
fn rqemu_blk_killed_and_restarted_is_reconnected() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("rqemu_vmm=debug")
        .try_init();
    let bin = support::rqemu_blk_binary();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    // Synchronous I/O: requests complete in order (see the control module's docs).
    let sync = ["--aio", "sync"];
    let mut daemon = rqemu_blk_with(&bin, dir.path(), &img, &sync);
    let sock = daemon.1.clone();
    let mut d = Driver::probe_with(&sock, VIRTIO_BLK_F_DISCARD);
    for round in 0..3u8 {
        let mut data = pattern(4096, round);
        let sector = 8 * u64::from(round);
        assert_eq!(d.request(T_OUT, sector, &mut data), 0, "write {round}");
        drop(daemon); // SIGKILL
        wait_until("the hang-up to be seen", || !d.status.connected());
        // The driver submits while the daemon is down: the request waits for the next one.
        let mut back = vec![0u8; 4096];
        let m = d.ram.memory().clone();
        let status = d.status.clone();
        let want = u64::from(round) + 1;
        let (pending, restarted) = std::thread::scope(|s| {
            let h = s.spawn(|| d.request(T_IN, sector, &mut back));
            std::thread::sleep(Duration::from_millis(200));
            let restarted = restart_until(&bin, dir.path(), &img, &sync, || {
                status.reconnects() == want
            });
            (h.join().unwrap(), restarted)
        });
        daemon = restarted;
        assert_eq!(pending, 0, "read {round} across the restart");
        assert_eq!(back, data, "read {round}");
        assert_eq!(d.status.reconnects(), u64::from(round) + 1);
        let used: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, d.avail_idx, "every request completed exactly once");
    }
    // A read-only daemon does not offer DISCARD, which the driver acked: refused.
    drop(daemon);
    wait_until("the hang-up to be seen", || !d.status.connected());
    let ro = restart_until(&bin, dir.path(), &img, &["--readonly"], || {
        d.status.refusals() > 0
    });
    assert!(!d.status.connected());
    drop(ro);
    let _daemon = restart_until(&bin, dir.path(), &img, &sync, || d.status.connected());
    let mut back = vec![0u8; 4096];
    assert_eq!(d.request(T_IN, 16, &mut back), 0);
    assert_eq!(back, pattern(4096, 2));
    let host = std::fs::read(&img).unwrap();
    for round in 0..3u8 {
        let at = 8 * 512 * usize::from(round);
        assert_eq!(
            &host[at..at + 4096],
            &pattern(4096, round)[..],
            "image {round}"
        );
    }
}

/// The MMIO writes that activate the device return while the daemon cannot answer (stopped
/// with SIGSTOP): the vhost-user messages go out on the device's control thread, never in the
/// (v)CPU's register write. Blocking there would end in the 10 s reply timeout and
/// DEVICE_NEEDS_RESET. Once the daemon runs again the device works.
#[test]
fn a_stopped_daemon_does_not_block_register_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let d = qsd(dir.path(), &img);
    let pid = d.0.id() as i32;
    // SAFETY: plain kill(2) to our child.
    let mut drv = Driver::probe_hook(&d.1, 0, || unsafe {
        libc::kill(pid, libc::SIGSTOP);
    });
    // Probing asserted no DEVICE_NEEDS_RESET while the daemon was stopped.
    assert!(drv.status.connected());
    // SAFETY: plain kill(2) to our child.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let mut data = pattern(4096, 42);
    assert_eq!(drv.request(T_OUT, 3, &mut data), 0, "write status");
    let mut back = vec![0u8; 4096];
    assert_eq!(drv.request(T_IN, 3, &mut back), 0, "read status");
    assert_eq!(back, data);
}

/// Requests of one burst: 3 descriptors each (header, data, status), heads 0, 3, 6, 9, 12.
const BURST: u16 = 5;
/// Bytes written by each request of a burst.
const BURST_LEN: usize = 128 << 10;

/// Guest address of request `i`'s header (its status byte at +0x100, data at +0x1000).
fn burst_area(i: u16) -> u64 {
    0x100000 + u64::from(i) * 0x40000
}

/// The host image offset request `i` of a burst writes.
fn burst_offset(i: u16) -> usize {
    usize::from(i) * BURST_LEN
}

/// Puts a burst of [`BURST`] writes (data `pattern(BURST_LEN, seed + i)`) on the avail ring
/// and notifies.
fn submit_burst(d: &mut Driver, seed: u8) {
    let m = d.ram.memory().clone();
    for i in 0..BURST {
        let a = burst_area(i);
        m.write_obj(T_OUT, GuestAddress(a)).unwrap();
        m.write_obj(0u32, GuestAddress(a + 4)).unwrap();
        let sector = (burst_offset(i) / 512) as u64;
        m.write_obj(sector, GuestAddress(a + 8)).unwrap();
        m.write_obj(0xffu8, GuestAddress(a + 0x100)).unwrap();
        let data = pattern(BURST_LEN, seed.wrapping_add(i as u8));
        m.write_slice(&data, GuestAddress(a + 0x1000)).unwrap();
        let h = 3 * i;
        d.desc(h, a, 16, 1, h + 1);
        d.desc(h + 1, a + 0x1000, BURST_LEN as u32, 1, h + 2);
        d.desc(h + 2, a + 0x100, 1, 2, 0);
        let slot = u64::from(d.avail_idx % QSIZE);
        m.write_obj(h, GuestAddress(AVAIL + 4 + slot * 2)).unwrap();
        d.avail_idx = d.avail_idx.wrapping_add(1);
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    m.write_obj(d.avail_idx, GuestAddress(AVAIL + 2)).unwrap();
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    w(&mut d.t, reg::QUEUE_NOTIFY, 0);
}

/// The heads of queue 0 marked in flight in the inflight region (`DescStateSplit.inflight`
/// of the split-ring layout: 16-byte header, 16 bytes per descriptor).
fn inflight_heads(region: &std::fs::File) -> Vec<u16> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 16 + 16 * usize::from(QSIZE)];
    region.read_exact_at(&mut buf, 0).unwrap();
    (0..QSIZE)
        .filter(|h| buf[16 + 16 * usize::from(*h)] != 0)
        .collect()
}

fn used_idx(d: &Driver) -> u16 {
    d.ram.memory().read_obj(GuestAddress(USED + 2)).unwrap()
}

/// rqemu-blk (io_uring: completions out of order) SIGKILLed while writes are in flight: the
/// VMM hands the restarted daemon the inflight region (SET_INFLIGHT_FD), which resubmits the
/// requests the dead one left in flight. Each request's head comes back on the used ring
/// exactly once, every status is OK and every byte is on the image.
///
/// The moment: the test polls the inflight region (the VMM's memfd) after notifying; once a
/// request of the burst is used and another still marked (later: any marked) it SIGSTOPs the
/// daemon (its userspace, the only writer of the
/// region, is frozen), reads the marks again and, if some are still there, SIGKILLs it. A
/// burst that completed before the stop is simply let finish, and another is tried.
#[test]
fn rqemu_blk_killed_with_requests_in_flight_completes_each_exactly_once() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("rqemu_vmm=info")
        .try_init();
    let bin = support::rqemu_blk_binary();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    // O_DIRECT: the writes really run in the background and may complete out of order.
    let args = [
        "--aio",
        "io-uring",
        "--cache",
        "none",
        "--format",
        "raw",
        "--sandbox",
        "none",
    ];
    let mut daemon = rqemu_blk_with(&bin, dir.path(), &img, &args);
    let sock = daemon.1.clone();
    let mut d = Driver::probe(&sock);
    // The activation runs on the control thread: the region comes with it.
    wait_until(
        "the VMM to hold the inflight region (rqemu-blk offers INFLIGHT_SHMFD)",
        || d.status.inflight_region().is_some(),
    );
    let region = d.status.inflight_region().unwrap();
    let mut killed = 0u32;
    let mut resubmitted = 0usize;
    let mut out_of_order = 0u32;
    let mut last_seed = None;
    // Up to round MIXED the daemon is stopped only with some requests of the burst used and
    // others in flight (an out-of-order completion is then possible); after it, with any
    // request in flight (caught in nearly every round).
    const MIXED: u32 = 300;
    for round in 0..400u32 {
        if killed >= 10 || killed >= 3 && (out_of_order > 0 || round >= MIXED) {
            break;
        }
        let seed = (round as u8).wrapping_mul(16);
        let start_used = used_idx(&d);
        submit_burst(&mut d, seed);
        last_seed = Some(seed);
        let pid = daemon.0.id() as i32;
        // Wait until the daemon completed a request of this burst and still has another in
        // flight (or finished the burst).
        let t0 = Instant::now();
        let mut stopped = false;
        while used_idx(&d) != d.avail_idx && t0.elapsed() < TIMEOUT {
            let mixed = used_idx(&d) != start_used || round >= MIXED;
            if mixed && !inflight_heads(&region).is_empty() {
                // SAFETY: plain kill(2) to our child.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                stopped = true;
                break;
            }
        }
        let marked = if stopped {
            // The stop is asynchronous: wait until the daemon is stopped for sure.
            wait_until("the daemon to stop", || {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| {
                        s.rsplit(')')
                            .next()
                            .unwrap_or("")
                            .trim_start()
                            .starts_with('T')
                    })
                    .unwrap_or(true)
            });
            inflight_heads(&region)
        } else {
            Vec::new()
        };
        if marked.is_empty() {
            // Nothing in flight any more: let it finish this burst.
            // SAFETY: plain kill(2) to our child.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            wait_until("the burst to complete", || used_idx(&d) == d.avail_idx);
        } else {
            killed += 1;
            resubmitted += marked.len();
            // Heads were submitted in order 0, 3, 6, ...: a used head after a marked one is
            // a completion out of order (resuming at the used index alone would redo it and
            // lose the marked one).
            let m = d.ram.memory();
            let used_now = used_idx(&d).wrapping_sub(start_used);
            let used_heads: Vec<u16> = (0..used_now)
                .map(|k| {
                    let slot = u64::from(start_used.wrapping_add(k) % QSIZE);
                    m.read_obj::<u32>(GuestAddress(USED + 4 + slot * 8))
                        .unwrap() as u16
                })
                .collect();
            let ooo = used_heads.iter().any(|u| marked.iter().any(|h| u > h));
            out_of_order += u32::from(ooo);
            eprintln!(
                "round {round}: SIGKILL with heads {marked:?} in flight, {used_heads:?} used{}",
                if ooo { " (out of order)" } else { "" }
            );
            drop(daemon); // SIGKILL (the stopped process dies too)
            wait_until("the hang-up to be seen", || !d.status.connected());
            let want = u64::from(killed);
            let status = d.status.clone();
            daemon = restart_until(&bin, dir.path(), &img, &args, || {
                status.reconnects() == want
            });
            // (A request done twice would show below as a head used twice.)
            wait_until("the burst to complete after the restart", || {
                used_idx(&d).wrapping_sub(start_used) >= BURST
            });
            assert!(
                inflight_heads(&region).is_empty(),
                "the new daemon cleared every mark"
            );
        }
        // Exactly once: each head of the burst once among the used entries of this round.
        let m = d.ram.memory();
        let mut heads: Vec<u16> = (0..BURST)
            .map(|k| {
                let slot = u64::from(start_used.wrapping_add(k) % QSIZE);
                let id: u32 = m.read_obj(GuestAddress(USED + 4 + slot * 8)).unwrap();
                id as u16
            })
            .collect();
        heads.sort_unstable();
        assert_eq!(
            heads,
            (0..BURST).map(|i| 3 * i).collect::<Vec<_>>(),
            "round {round}: every request's head on the used ring exactly once"
        );
        for i in 0..BURST {
            let st: u8 = m.read_obj(GuestAddress(burst_area(i) + 0x100)).unwrap();
            assert_eq!(st, 0, "round {round}: status of request {i}");
        }
        // A short pause: no used entry appears beyond the burst (no request done twice).
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            used_idx(&d),
            d.avail_idx,
            "round {round}: no extra completion"
        );
    }
    assert!(
        killed > 0,
        "the daemon was never caught with a request in flight in 400 bursts"
    );
    eprintln!(
        "{killed} kill(s) with {resubmitted} request(s) in flight ({out_of_order} after an \
         out-of-order completion), each completed once"
    );
    // The data of the last burst is on the image.
    drop(daemon);
    let host = std::fs::read(&img).unwrap();
    let seed = last_seed.unwrap();
    for i in 0..BURST {
        let at = burst_offset(i);
        assert!(
            host[at..at + BURST_LEN] == pattern(BURST_LEN, seed.wrapping_add(i as u8))[..],
            "image data of request {i}"
        );
    }
}
