//! `rqemu-fs` with QEMU TCG (`vhost-user-fs-device`, memfd memory) as the frontend and the
//! Linux virtiofs driver in the guest: POSIX operations made by the guest must show up on the
//! host exactly, host-side changes must reach the guest, escape attempts must stay inside the
//! shared directory, `--readonly` must refuse writes with EROFS, one daemon must serve
//! guests in sequence (reconnect), POSIX record locks and flock must work between guest
//! processes and against host processes (a blocked `F_SETLKW`/`flock` waits while the queue
//! goes on), and `copy_file_range` must be served by the daemon (`FUSE_COPY_FILE_RANGE`).
//!
//! Needs root (the daemon confines itself with a mount namespace + pivot_root),
//! `scripts/guest-assets.sh` and `cargo build -p rqemu-fs`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rqemu_e2e::fs::{
    build_guest_tool, guest_manifest, host_manifest, manifest_script, sha256_file, spawn_rqemu_fs,
    FsDaemonOptions,
};
use rqemu_e2e::net::pattern;
use rqemu_e2e::{Daemon, GuestAssets, GuestRun, QemuVm, VhostUserDevice};

fn assets() -> GuestAssets {
    GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"))
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "rqemu-fs e2e tests need root: the daemon uses a mount namespace and pivot_root"
    );
}

struct Setup {
    work: tempfile::TempDir,
    outside: tempfile::TempDir,
    shared: PathBuf,
}

fn setup() -> Setup {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let shared = outside.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    Setup {
        work,
        outside,
        shared,
    }
}

fn start(s: &Setup, opts: &FsDaemonOptions) -> (Daemon, VhostUserDevice) {
    spawn_rqemu_fs(s.work.path(), &s.shared, opts).unwrap_or_else(|e| panic!("{e}"))
}

fn boot(s: &Setup, dev: &VhostUserDevice, script: &str, files: Vec<(&str, Vec<u8>)>) -> GuestRun {
    boot_with(s, dev, script, files, |vm| vm)
}

fn boot_with(
    s: &Setup,
    dev: &VhostUserDevice,
    script: &str,
    files: Vec<(&str, Vec<u8>)>,
    tweak: impl FnOnce(QemuVm) -> QemuVm,
) -> GuestRun {
    let vm_dir = tempfile::tempdir_in(s.work.path()).unwrap();
    let mut vm = tweak(QemuVm::new(&assets(), vm_dir.path()))
        .device(dev.clone())
        .script(script);
    for (path, data) in files {
        vm = vm.file(path, 0o644, data);
    }
    let run = vm.run().unwrap_or_else(|e| panic!("{e}"));
    run.expect_success().unwrap_or_else(|e| panic!("{e}"));
    run
}

fn finish(mut d: Daemon) {
    assert!(d.is_running(), "rqemu-fs died; log:\n{}", d.log());
    let st = d
        .terminate(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "rqemu-fs exited with {st}");
}

fn val<'a>(run: &'a GuestRun, key: &str) -> &'a str {
    run.value(key)
        .unwrap_or_else(|| panic!("guest printed no {key}; console:\n{}", run.transcript()))
}

const MOUNT: &str = "set -e\nmount -t virtiofs rqemu /mnt\n";

#[test]
fn fs_posix_workload_host_sees_same_tree() {
    let s = setup();
    let host_txt = pattern(10_000, 1);
    std::fs::write(s.shared.join("host.txt"), &host_txt).unwrap();
    let blob = pattern(300_000, 2);
    let (d, dev) = start(&s, &FsDaemonOptions::default());
    let script = format!(
        r#"{MOUNT}cd /mnt
echo "RQEMU-VAL host_txt=$(sha256sum host.txt | cut -d' ' -f1)"
mkdir -p d1/d2 gone
cp /data/blob d1/d2/blob
cmp /data/blob d1/d2/blob
printf 'hello virtiofs\n' > d1/a.txt
mv d1/a.txt d1/b.txt
ln d1/b.txt hard
ln -s d1/b.txt soft
[ "$(cat soft)" = "hello virtiofs" ]
truncate -s 123457 d1/d2/blob
printf 'appended' >> d1/b.txt
echo tmp > del
rm del
rmdir gone
mkdir d3
mv d3 d1/d2/moved
dd if=/data/blob of=d1/sparse bs=4096 seek=10 count=3 conv=notrunc 2>/dev/null
echo "RQEMU-VAL blob=$(sha256sum d1/d2/blob | cut -d' ' -f1)"
echo "RQEMU-VAL links=$(stat -c %h d1/b.txt)"
echo "RQEMU-VAL same_ino=$( [ "$(stat -c %i hard)" = "$(stat -c %i d1/b.txt)" ] && echo yes || echo no)"
sync
cd /
{}umount /mnt
"#,
        manifest_script("/mnt", "ent:")
    );
    let run = boot(&s, &dev, &script, vec![("data/blob", blob.clone())]);

    // The guest read the host's bytes.
    assert_eq!(
        val(&run, "host_txt"),
        sha256_file(&s.shared.join("host.txt")).unwrap()
    );
    assert_eq!(val(&run, "links"), "2");
    assert_eq!(val(&run, "same_ino"), "yes");
    // The host sees exactly the guest's tree...
    let guest = guest_manifest(&run, "ent:");
    let host = host_manifest(&s.shared).unwrap();
    assert_eq!(guest, host, "guest and host trees differ");
    let names: Vec<&str> = host.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "./d1",
            "./d1/b.txt",
            "./d1/d2",
            "./d1/d2/blob",
            "./d1/d2/moved",
            "./d1/sparse",
            "./hard",
            "./host.txt",
            "./soft"
        ]
    );
    // ... and the bytes, checked against independently computed expectations.
    let sh = &s.shared;
    assert_eq!(
        std::fs::read(sh.join("d1/d2/blob")).unwrap(),
        &blob[..123_457]
    );
    assert_eq!(
        val(&run, "blob"),
        sha256_file(&sh.join("d1/d2/blob")).unwrap()
    );
    assert_eq!(
        std::fs::read(sh.join("d1/b.txt")).unwrap(),
        b"hello virtiofs\nappended"
    );
    let mut sparse = vec![0u8; 40_960];
    sparse.extend_from_slice(&blob[..12_288]);
    assert_eq!(std::fs::read(sh.join("d1/sparse")).unwrap(), sparse);
    let (a, b) = (
        sh.join("hard").metadata().unwrap(),
        sh.join("d1/b.txt").metadata().unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert_eq!(
        std::fs::read_link(sh.join("soft")).unwrap(),
        Path::new("d1/b.txt")
    );
    finish(d);
}

/// Host-side changes while the guest has the directory mounted.
fn host_changes_seen(cache: &str) {
    let s = setup();
    std::fs::write(s.shared.join("f"), b"version-1").unwrap();
    std::fs::write(s.shared.join("removed"), b"x").unwrap();
    let opts = FsDaemonOptions {
        cache: cache.into(),
        ..FsDaemonOptions::default()
    };
    let (d, dev) = start(&s, &opts);
    // With cache=auto, attributes may be cached for 1 s: wait that out before re-reading.
    let settle = if cache == "never" { "" } else { "sleep 2\n" };
    let script = format!(
        r#"{MOUNT}echo "RQEMU-VAL before=$(cat /mnt/f)"
ls /mnt >/dev/null
[ -e /mnt/removed ]
[ ! -e /mnt/hostnew ]
touch /mnt/ready
i=0
while [ ! -e /mnt/done ]; do sleep 0.2; i=$((i+1)); [ $i -lt 500 ] || exit 7; done
{settle}echo "RQEMU-VAL after=$(cat /mnt/f)"
echo "RQEMU-VAL newfile=$(cat /mnt/hostnew)"
echo "RQEMU-VAL removed=$( [ -e /mnt/removed ] && echo present || echo absent)"
"#
    );
    let shared = s.shared.clone();
    let host = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(110);
        while !shared.join("ready").exists() {
            assert!(Instant::now() < deadline, "the guest never created `ready`");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::write(shared.join("f"), b"version-2, changed on the host").unwrap();
        std::fs::write(shared.join("hostnew"), b"made on the host").unwrap();
        std::fs::remove_file(shared.join("removed")).unwrap();
        std::fs::write(shared.join("done"), b"").unwrap();
    });
    let run = boot(&s, &dev, &script, vec![]);
    host.join().unwrap();
    assert_eq!(val(&run, "before"), "version-1");
    assert_eq!(val(&run, "after"), "version-2, changed on the host");
    assert_eq!(val(&run, "newfile"), "made on the host");
    assert_eq!(val(&run, "removed"), "absent");
    finish(d);
}

#[test]
fn fs_host_changes_seen_with_cache_never() {
    host_changes_seen("never");
}

#[test]
fn fs_host_changes_seen_with_cache_auto() {
    host_changes_seen("auto");
}

/// The guest's view of escape attempts. The guest kernel resolves `..` and symlinks itself,
/// so most of these never reach the daemon as such: `fs_escape_raw.rs` sends the raw FUSE
/// requests (`LOOKUP ..`, names with `/`, `RENAME`/`LINK` across the root) to the daemon.
#[test]
fn fs_escape_attempts_stay_inside() {
    let s = setup();
    let marker = format!("RQEMU-SECRET-{}-{:x}", std::process::id(), pattern(8, 9)[0]);
    let out = s.outside.path();
    std::fs::write(out.join("secret"), &marker).unwrap();
    std::fs::write(out.join("linked"), b"linked-content").unwrap();
    let sh = &s.shared;
    let sym =
        |target: &Path, name: &str| std::os::unix::fs::symlink(target, sh.join(name)).unwrap();
    sym(Path::new("/"), "abs");
    sym(Path::new("../.."), "up");
    sym(Path::new("../secret"), "rel_secret");
    sym(&out.join("secret"), "abs_secret");
    sym(Path::new("/nonexistent/x"), "dangling");
    sym(Path::new("/proc/self/root/etc/passwd"), "procroot");
    std::fs::hard_link(out.join("linked"), sh.join("hl")).unwrap();
    let (d, dev) = start(&s, &FsDaemonOptions::default());
    let script = format!(
        r#"{MOUNT}[ "$(stat -c %i /mnt/..)" = "$(stat -c %i /)" ]
for p in abs_secret rel_secret up/secret abs/secret ../secret abs{out}/secret up{out}/secret; do
  if cat "/mnt/$p" >/tmp/leak 2>/dev/null && grep -q RQEMU-SECRET /tmp/leak; then echo "RQEMU-VAL leaked=$p"; fi
done
echo "RQEMU-VAL abs_target=$(readlink /mnt/abs)"
echo "RQEMU-VAL hl=$(cat /mnt/hl)"
echo guest-wrote > /mnt/hl
echo pwned > /mnt/up/rqemu-pwned 2>/dev/null || true
echo pwned > /mnt/dangling 2>/dev/null || true
ln -s / /mnt/guestlink
ln -s /proc/self/fd/0 /mnt/guestfd
ls /mnt/guestlink/ >/dev/null
echo "RQEMU-VAL rootlist=$(ls -a /mnt | tr '\n' ' ')"
sync
"#,
        out = out.display()
    );
    let run = boot(&s, &dev, &script, vec![]);
    assert!(
        !run.console.contains(&marker),
        "the guest read a file outside the shared directory"
    );
    assert_eq!(run.value("leaked"), None);
    assert_eq!(val(&run, "abs_target"), "/");
    assert_eq!(val(&run, "hl"), "linked-content");
    assert_eq!(
        val(&run, "rootlist"),
        // (the passthrough does not list `.` and `..`)
        "abs abs_secret dangling guestfd guestlink hl procroot rel_secret up"
    );
    // The hard link the host made is the same inode (that one file is shared, by design);
    // nothing else outside changed.
    assert_eq!(std::fs::read(out.join("linked")).unwrap(), b"guest-wrote\n");
    assert_eq!(
        std::fs::read(out.join("secret")).unwrap(),
        marker.as_bytes()
    );
    let mut outside: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    outside.sort();
    assert_eq!(outside, ["linked", "secret", "shared"]);
    assert!(!Path::new("/rqemu-pwned").exists());
    assert!(!Path::new("/nonexistent").exists());
    finish(d);
}

#[test]
fn fs_readonly_refuses_writes_with_erofs() {
    let s = setup();
    std::fs::write(s.shared.join("ro.txt"), b"read-only content").unwrap();
    std::fs::create_dir(s.shared.join("dir")).unwrap();
    let before = host_manifest(&s.shared).unwrap();
    let opts = FsDaemonOptions {
        readonly: true,
        ..FsDaemonOptions::default()
    };
    let (d, dev) = start(&s, &opts);
    let ops = [
        "echo x > /mnt/new",
        "echo x >> /mnt/ro.txt",
        "mkdir /mnt/newdir",
        "rm /mnt/ro.txt",
        "rmdir /mnt/dir",
        "mv /mnt/ro.txt /mnt/moved",
        "ln -s x /mnt/link",
        "ln /mnt/ro.txt /mnt/hard",
        "truncate -s 0 /mnt/ro.txt",
        "chmod 600 /mnt/ro.txt",
    ];
    let mut script = format!("{MOUNT}echo \"RQEMU-VAL read=$(cat /mnt/ro.txt)\"\n");
    for (n, op) in ops.iter().enumerate() {
        script.push_str(&format!(
            "if sh -c '{op}' 2>/tmp/err; then echo \"RQEMU-VAL op{n}=succeeded\"; \
             else echo \"RQEMU-VAL op{n}=$(cat /tmp/err)\"; fi\n"
        ));
    }
    let run = boot(&s, &dev, &script, vec![]);
    assert_eq!(val(&run, "read"), "read-only content");
    for (n, op) in ops.iter().enumerate() {
        let v = val(&run, &format!("op{n}"));
        assert!(
            v.contains("Read-only file system"),
            "`{op}` in the guest: {v}"
        );
    }
    assert_eq!(host_manifest(&s.shared).unwrap(), before);
    finish(d);
}

#[test]
fn fs_reconnect_two_guests_same_daemon() {
    let s = setup();
    let (mut d, dev) = start(&s, &FsDaemonOptions::default());
    // The first guest powers off with the directory still mounted and files open.
    let first = format!(
        "{MOUNT}mkdir /mnt/gen\necho one > /mnt/gen/1\ncp /data/blob /mnt/gen/blob\n\
         exec 3</mnt/gen/1\nsync\n"
    );
    let blob = pattern(1 << 20, 3);
    boot(&s, &dev, &first, vec![("data/blob", blob.clone())]);
    assert!(
        d.is_running(),
        "rqemu-fs exited after the first guest; log:\n{}",
        d.log()
    );
    let second = format!(
        "{MOUNT}echo \"RQEMU-VAL one=$(cat /mnt/gen/1)\"\n\
         echo \"RQEMU-VAL blob=$(sha256sum /mnt/gen/blob | cut -d' ' -f1)\"\n\
         echo two > /mnt/gen/2\nrm /mnt/gen/1\nsync\numount /mnt\n"
    );
    let run = boot(&s, &dev, &second, vec![]);
    assert_eq!(val(&run, "one"), "one");
    assert_eq!(
        val(&run, "blob"),
        sha256_file(&s.shared.join("gen/blob")).unwrap()
    );
    assert_eq!(std::fs::read(s.shared.join("gen/blob")).unwrap(), blob);
    assert_eq!(std::fs::read(s.shared.join("gen/2")).unwrap(), b"two\n");
    assert!(!s.shared.join("gen/1").exists());
    finish(d);
}

#[test]
fn fs_two_request_queues_parallel_writers() {
    let s = setup();
    let opts = FsDaemonOptions {
        queues: 2,
        ..FsDaemonOptions::default()
    };
    let (d, dev) = start(&s, &opts);
    let blob = pattern(512 * 1024, 4);
    let script = format!(
        "{MOUNT}for i in 1 2 3 4; do (mkdir /mnt/w$i && cp /data/blob /mnt/w$i/blob && cmp /data/blob /mnt/w$i/blob && echo done > /mnt/w$i/ok) & done\n\
         wait\nsync\n{}",
        manifest_script("/mnt", "ent:")
    );
    let run = boot_with(&s, &dev, &script, vec![("data/blob", blob.clone())], |vm| {
        vm.cpus(2)
            .arg("-global")
            .arg("vhost-user-fs-device.num-request-queues=2")
    });
    assert_eq!(
        guest_manifest(&run, "ent:"),
        host_manifest(&s.shared).unwrap()
    );
    for i in 1..=4 {
        assert_eq!(
            std::fs::read(s.shared.join(format!("w{i}/blob"))).unwrap(),
            blob
        );
        assert_eq!(
            std::fs::read(s.shared.join(format!("w{i}/ok"))).unwrap(),
            b"done\n"
        );
    }
    finish(d);
}

/// Where the guest finds the lock/copy tool (`tests/guest-tools/lktool.c`).
const LKTOOL: &str = "/opt/rqemu/lktool";

fn with_lktool(s: &Setup) -> impl FnOnce(QemuVm) -> QemuVm {
    let tool = build_guest_tool("lktool", s.work.path()).unwrap_or_else(|e| panic!("{e}"));
    move |vm| vm.file(LKTOOL.trim_start_matches('/'), 0o755, tool)
}

fn debug_opts() -> FsDaemonOptions {
    FsDaemonOptions {
        log_filter: Some("info,rqemu_fs_backend=debug".into()),
        ..FsDaemonOptions::default()
    }
}

/// Waits (host side) until `cond` holds; the guest script has its own time limit.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(240);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `fcntl(cmd)` with a `struct flock`; returns the errno (0 on success) and the struct.
fn host_lock(f: &std::fs::File, cmd: i32, typ: i32, start: i64, len: i64) -> (i32, libc::flock) {
    use std::os::fd::AsRawFd;
    let mut fl = libc::flock {
        l_type: typ as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        l_pid: 0,
    };
    // SAFETY: a valid struct flock on an open fd.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    let e = if r < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    } else {
        0
    };
    (e, fl)
}

#[test]
fn fs_locks_between_guest_processes_and_host() {
    let s = setup();
    let (flock_f, posix_f) = (s.shared.join("flock.f"), s.shared.join("posix.f"));
    std::fs::write(&flock_f, b"f").unwrap();
    std::fs::write(&posix_f, vec![0u8; 4096]).unwrap();
    // The host holds an exclusive flock and a POSIX write lock on bytes 0..50 before the
    // guest starts.
    let host_flock = std::fs::File::open(&flock_f).unwrap();
    {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an open fd.
        let r = unsafe { libc::flock(host_flock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(r, 0, "host flock");
    }
    let host_posix = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&posix_f)
        .unwrap();
    assert_eq!(
        host_lock(&host_posix, libc::F_SETLK, libc::F_WRLCK, 0, 50).0,
        0
    );
    let (d, dev) = start(&s, &debug_opts());
    let log = s.work.path().join("rqemu-fs.log");
    let shared = s.shared.clone();
    let host = std::thread::spawn(move || {
        let waits = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("waiting off the queue")
                .count()
        };
        // 1. The guest found the flock taken; the host lets go.
        wait_until("m1", || shared.join("m1").exists());
        drop(host_flock);
        std::fs::write(shared.join("m1r"), b"").unwrap();
        // 2. The guest holds a POSIX write lock on 200..210: the host sees it and conflicts.
        wait_until("m2", || shared.join("m2").exists());
        let (e, fl) = host_lock(&host_posix, libc::F_OFD_GETLK, libc::F_WRLCK, 100, 0);
        let seen = (e, i32::from(fl.l_type), fl.l_start, fl.l_len);
        let conflict = host_lock(&host_posix, libc::F_SETLK, libc::F_RDLCK, 205, 1).0;
        drop(host_posix); // releases the host's POSIX lock on 0..50
        std::fs::write(shared.join("m2r"), b"").unwrap();
        // 3./4. Release the guest holder only once the daemon has parked the blocked guest
        // request (its SETLKW waits off the queue worker).
        wait_until("the blocked flock", || waits() >= 1);
        std::fs::write(shared.join("m3"), b"").unwrap();
        wait_until("the blocked F_SETLKW", || waits() >= 2);
        std::fs::write(shared.join("m4"), b"").unwrap();
        (seen, conflict)
    });
    let script = format!(
        r#"{MOUNT}cd /mnt
T={LKTOOL}
$T flock.f fh1=flock:ex:nb -=touch:/mnt/m1 -=waitfor:/mnt/m1r fh2=flock:ex:nb
$T posix.f h1=setlk:r:10:5 h2=getlk:w:0:0 h3=setlk:w:200:10 -=touch:/mnt/m2 -=waitfor:/mnt/m2r h4=setlk:w:0:50
$T flock.f fa0=flock:ex -=touch:/tmp/a_held -=waitfor:/mnt/m3 -=touch:/tmp/a_rel fa1=flock:un &
while [ ! -e /tmp/a_held ]; do sleep 0.1; done
$T flock.f fb1=flock:ex:nb
$T flock.f fb2=flock:sh fb3=check:/tmp/a_rel
wait
$T posix.f pa0=setlk:w:0:100 -=touch:/tmp/p_held -=waitfor:/mnt/m4 -=touch:/tmp/p_rel &
while [ ! -e /tmp/p_held ]; do sleep 0.1; done
$T posix.f pb1=getlk:w:50:10 pb2=setlk:w:50:10 pb3=setlkw:w:50:10 pb4=check:/tmp/p_rel
wait
"#
    );
    let run = boot_with(&s, &dev, &script, vec![], with_lktool(&s));
    let (seen, conflict) = host.join().unwrap();
    // flock: host vs guest.
    assert_eq!(val(&run, "fh1"), "EAGAIN");
    assert_eq!(val(&run, "fh2"), "OK");
    // POSIX: host vs guest, both ways.
    assert_eq!(val(&run, "h1"), "EAGAIN");
    assert_eq!(val(&run, "h2"), "W:0:50:0");
    assert_eq!(val(&run, "h3"), "OK");
    assert_eq!(
        seen,
        (0, libc::F_WRLCK, 200, 10),
        "the host's view of the guest lock"
    );
    assert!(
        conflict == libc::EAGAIN || conflict == libc::EACCES,
        "host F_SETLK over the guest's lock: errno {conflict}"
    );
    assert_eq!(val(&run, "h4"), "OK");
    // flock between guest processes; the blocked one got it after the holder let go.
    assert_eq!(val(&run, "fa0"), "OK");
    assert_eq!(val(&run, "fb1"), "EAGAIN");
    assert_eq!(val(&run, "fa1"), "OK");
    assert_eq!((val(&run, "fb2"), val(&run, "fb3")), ("OK", "yes"));
    // POSIX between guest processes; the holder's exit (close → FLUSH) released it.
    assert_eq!(val(&run, "pa0"), "OK");
    assert_eq!(val(&run, "pb1"), "W:0:100:0");
    assert_eq!(val(&run, "pb2"), "EAGAIN");
    assert_eq!((val(&run, "pb3"), val(&run, "pb4")), ("OK", "yes"));
    finish(d);
}

#[test]
fn fs_copy_file_range_served_by_the_daemon() {
    let s = setup();
    let src = pattern(200_000, 5);
    std::fs::write(s.shared.join("src"), &src).unwrap();
    let (d, dev) = start(&s, &debug_opts());
    let script = format!(
        "{MOUNT}{LKTOOL} /mnt/src c1=cfr:/mnt/dst:1000:4096:150000 c2=cfr:/mnt/dst:199000:0:5000\n\
         echo \"RQEMU-VAL dst=$(sha256sum /mnt/dst | cut -d' ' -f1)\"\n"
    );
    let run = boot_with(&s, &dev, &script, vec![], with_lktool(&s));
    assert_eq!(val(&run, "c1"), "150000");
    assert_eq!(val(&run, "c2"), "1000");
    let mut want = src[199_000..].to_vec();
    want.resize(4096, 0);
    want.extend_from_slice(&src[1000..151_000]);
    assert_eq!(std::fs::read(s.shared.join("dst")).unwrap(), want);
    assert_eq!(
        val(&run, "dst"),
        sha256_file(&s.shared.join("dst")).unwrap()
    );
    // Served by rqemu-fs, not by the guest kernel's read/write fallback.
    let log = d.log();
    assert!(
        log.contains("COPY_FILE_RANGE from inode") && log.contains("Ok(150000)"),
        "the daemon served no COPY_FILE_RANGE; log:\n{log}"
    );
    finish(d);
}
