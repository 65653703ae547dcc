//! rqemu-fs SIGKILLed under a running Linux guest (`rqemu-vmm --accel tcg`) that keeps a file
//! open on its virtiofs mount: each daemon the test starts again with the same
//! `--state-file` resumes the guest's FUSE state (node ids, handles, INIT), so the guest's
//! loop — write a block through the open fd, read it back through it, create a file, rename
//! it, list the directory (its cwd, a held directory node) — runs across 4 SIGKILLs without one error; the host checks the
//! data. While the daemon is down the second time, the host removes a file the guest holds
//! open: that fd gets a clean error at the end (no hang) and the rest of the mount works.
//!
//! The guest writes block after block through one fd (`exec 3>`) and reads each back through
//! another (`exec 5<`), both open from the start: busybox `dd` seeks relative to the current
//! offset, so each fd simply advances 4 KiB per iteration.
//!
//! The first daemon also exits on its own (`RQEMU_FS_TEST_EXIT_AFTER_REPLY`) right after it
//! did the guest's `mkdir /mnt/dir` and saved the reply, before publishing it: the next
//! daemon pops the MKDIR again and answers it with the saved reply (exactly once: no
//! `EEXIST`; `rqemu_fs_backend::replay`).
//!
//! `RQEMU_TEST_FS_NO_STATE=1` runs the daemons without `--state-file`: the test must then
//! fail (the guest's first request after a restart names unknown handles: `EBADF`).
//!
//! With `--cache never` every read and write of the guest is a FUSE request (none is answered
//! from the guest's page cache); with the default `--cache auto` the guest keeps dentries and
//! data a while (more nodes held across the kills), and the removed file's fd may still read
//! its cached bytes — an answer either way, never a hang.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rqemu_e2e::blk::reconnect::read;
use rqemu_e2e::daemon::{Daemon, DaemonError, DEFAULT_START_TIMEOUT};
use rqemu_e2e::{project_binary, GuestAssets, RqemuVm};

const TIMEOUT: Duration = Duration::from_secs(600);
/// 4 KiB blocks the guest writes and verifies through its open fd.
const BLOCKS: u32 = 24;
/// The daemon is killed once the guest reports these iterations done.
const KILL_AFTER: [u32; 4] = [2, 7, 12, 17];
/// At this kill (index into `KILL_AFTER`) the host removes `doomed` while the daemon is down.
const REMOVE_AT: usize = 1;
/// The first daemon exits right after doing the guest's `mkdir /mnt/dir` and saving its reply,
/// before publishing it: the next daemon pops it again and must answer from the saved reply
/// (`EEXIST` otherwise: `FS-FAIL mkdir`).
const FUSE_MKDIR: u32 = 9;

/// The guest's command line script: mounts the share and runs [`loop_script`] from it (the
/// loop is too long for the kernel command line).
const BOOT: &str = r#"mount -t virtiofs rqemu /mnt 2>/tmp/err || { echo "FS-FAIL mount: $(cat /tmp/err)"; exit 20; }
cp /mnt/run.sh /tmp/run.sh && rm /mnt/run.sh && exec sh /tmp/run.sh
echo "FS-FAIL no script"
"#;

/// The guest loop (`FS-FAIL` on any error), then `FS-SHA`, the stale fd's result, `FS-END`.
fn loop_script() -> String {
    format!(
        r#"N={BLOCKS}
dd if=/dev/urandom of=/tmp/all bs=4096 count=$N 2>/dev/null || exit 21
echo doomed > /mnt/doomed || {{ echo "FS-FAIL doomed"; exit 22; }}
exec 4</mnt/doomed || {{ echo "FS-FAIL open doomed"; exit 22; }}
: > /mnt/data || {{ echo "FS-FAIL create data"; exit 23; }}
exec 3>/mnt/data 5</mnt/data || {{ echo "FS-FAIL open data"; exit 23; }}
mkdir /mnt/dir || {{ echo "FS-FAIL mkdir"; exit 23; }}
cd /mnt/dir || {{ echo "FS-FAIL cd"; exit 23; }}
echo FS-READY
i=0
while [ $i -lt $N ]; do
  dd if=/tmp/all of=/tmp/w bs=4096 skip=$i count=1 2>/dev/null || exit 24
  dd if=/tmp/w bs=4096 count=1 >&3 2>/tmp/err || {{ echo "FS-FAIL write $i: $(cat /tmp/err)"; exit 25; }}
  dd of=/tmp/r bs=4096 count=1 <&5 2>/tmp/err || {{ echo "FS-FAIL read $i: $(cat /tmp/err)"; exit 26; }}
  cmp /tmp/w /tmp/r || {{ echo "FS-FAIL verify $i"; exit 27; }}
  echo "n$i" > new.tmp 2>/tmp/err || {{ echo "FS-FAIL create $i: $(cat /tmp/err)"; exit 28; }}
  mv new.tmp f$i 2>/tmp/err || {{ echo "FS-FAIL rename $i: $(cat /tmp/err)"; exit 29; }}
  [ "$(cat f$i)" = "n$i" ] || {{ echo "FS-FAIL readback f$i"; exit 30; }}
  n=$(ls | wc -l)
  [ "$n" = "$((i+1))" ] || {{ echo "FS-FAIL list $i: $(ls)"; exit 31; }}
  echo "FS-ITER $i"
  i=$((i+1))
done
cat /mnt/data > /tmp/back 2>/tmp/err || {{ echo "FS-FAIL readback: $(cat /tmp/err)"; exit 32; }}
cmp /tmp/all /tmp/back || {{ echo "FS-FAIL readback differs"; exit 33; }}
echo "FS-SHA $(sha256sum /tmp/all | cut -d' ' -f1)"
if cat <&4 >/tmp/out 2>/tmp/err; then echo "FS-STALE-READ $(cat /tmp/out)"; else echo "FS-STALE-ERR $(cat /tmp/err)"; fi
[ "$(cat /mnt/dir/f0)" = "n0" ] && echo FS-AFTER-STALE-OK
exec 3>&- 4<&- 5<&-
cd /
umount /mnt || echo "FS-FAIL umount"
echo FS-END
"#
    )
}

/// The highest `FS-ITER n` on the console.
fn last_iter(console: &str) -> Option<u32> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("FS-ITER "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
}

/// The rqemu-fs the test kills and starts again (same arguments, same state file).
struct Fs {
    dir: PathBuf,
    shared: PathBuf,
    state: Option<PathBuf>,
    cache: &'static str,
    daemon: Option<Daemon>,
    starts: u32,
    /// Given to the first daemon only: `RQEMU_FS_TEST_EXIT_AFTER_REPLY`.
    exit_after: Option<u32>,
}

impl Fs {
    fn start(dir: &Path, shared: &Path, state: Option<PathBuf>, cache: &'static str) -> Self {
        let mut fs = Fs {
            dir: dir.to_path_buf(),
            shared: shared.to_path_buf(),
            state,
            cache,
            daemon: None,
            starts: 0,
            exit_after: Some(FUSE_MKDIR),
        };
        fs.spawn();
        fs
    }

    /// Starts the daemon; a killed one's sandboxed child may hold the state file's lock (and
    /// the socket) a moment longer, so an early exit is retried.
    fn spawn(&mut self) {
        let sock = self.dir.join("fs0.sock");
        let start = Instant::now();
        loop {
            self.starts += 1;
            let log = self.dir.join(format!("fs-{}.log", self.starts));
            let mut cmd =
                Command::new(project_binary("rqemu-fs").unwrap_or_else(|e| panic!("{e}")));
            cmd.arg("--socket")
                .arg(&sock)
                .arg("--shared-dir")
                .arg(&self.shared)
                .args(["--cache", self.cache])
                .env("RQEMU_LOG", "info");
            if let Some(s) = &self.state {
                cmd.arg("--state-file").arg(s);
            }
            if let Some(op) = self.exit_after.take() {
                cmd.env("RQEMU_FS_TEST_EXIT_AFTER_REPLY", op.to_string());
            }
            match Daemon::spawn("rqemu-fs", cmd, &sock, &log, DEFAULT_START_TIMEOUT) {
                Ok(d) => {
                    self.daemon = Some(d);
                    return;
                }
                Err(DaemonError::ExitedEarly { log, .. })
                    if start.elapsed() < DEFAULT_START_TIMEOUT =>
                {
                    eprintln!(
                        "rqemu-fs exited at start, starting it again: {}",
                        log.trim()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn kill(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.kill().expect("killing rqemu-fs");
        }
    }

    fn keep_up(&mut self) {
        let Some(d) = self.daemon.as_mut() else {
            return;
        };
        if !d.is_running() {
            eprintln!("rqemu-fs exited: {}", d.log().trim());
            std::thread::sleep(Duration::from_millis(100));
            self.spawn();
        }
    }

    /// Every daemon's log, in start order.
    fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| format!("[{n}] {}", read(&self.dir.join(format!("fs-{n}.log")))))
            .collect()
    }
}

struct Run {
    console: PathBuf,
    vmm_log: PathBuf,
    vmm: Child,
    start: Instant,
}

impl Run {
    fn report(&self, fs: &Fs) -> String {
        format!(
            "--- console ---\n{}\n--- rqemu-vmm ---\n{}\n--- rqemu-fs ---\n{}",
            read(&self.console),
            read(&self.vmm_log),
            fs.logs()
        )
    }

    fn wait(&mut self, what: &str, fs: &mut Fs, cond: impl Fn(&str, &str) -> bool) {
        loop {
            let console = read(&self.console);
            if cond(&console, &read(&self.vmm_log)) {
                return;
            }
            if console.contains("FS-FAIL") {
                let _ = self.vmm.kill();
                let _ = self.vmm.wait();
                panic!("the guest saw an error before {what}\n{}", self.report(fs));
            }
            fs.keep_up();
            if let Some(st) = self.vmm.try_wait().unwrap() {
                panic!("rqemu-vmm exited ({st}) before {what}\n{}", self.report(fs));
            }
            if self.start.elapsed() > TIMEOUT {
                let _ = self.vmm.kill();
                let _ = self.vmm.wait();
                panic!("no {what} within {TIMEOUT:?}\n{}", self.report(fs));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn tcg_linux_open_files_survive_rqemu_fs_sigkills() {
    survives_sigkills("never");
}

#[test]
fn tcg_linux_open_files_survive_rqemu_fs_sigkills_cache_auto() {
    survives_sigkills("auto");
}

fn survives_sigkills(cache: &'static str) {
    let assets = GuestAssets::locate().expect("guest assets (run scripts/guest-assets.sh)");
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("run.sh"), loop_script()).unwrap();
    let state = std::env::var_os("RQEMU_TEST_FS_NO_STATE")
        .is_none()
        .then(|| dir.path().join("fs.state"));
    if state.is_none() {
        eprintln!(
            "RQEMU_TEST_FS_NO_STATE set: rqemu-fs runs without --state-file (expected to fail)"
        );
    }
    let mut fs = Fs::start(dir.path(), &shared, state, cache);
    let console = dir.path().join("console.log");
    let vmm_log = dir.path().join("vmm.log");
    let start = Instant::now();
    let vmm = RqemuVm::new(&assets)
        .device_socket(&format!("fs:{}", dir.path().join("fs0.sock").display()))
        .serial(&format!("file:{}", console.display()))
        .run_cmdline(BOOT)
        .command()
        .unwrap_or_else(|e| panic!("{e}"))
        .stdin(Stdio::null())
        .env("RQEMU_LOG", "info")
        .stderr(std::fs::File::create(&vmm_log).expect("creating the VMM log"))
        .spawn()
        .expect("spawning rqemu-vmm");
    let mut run = Run {
        console,
        vmm_log,
        vmm,
        start,
    };

    for (n, after) in KILL_AFTER.into_iter().enumerate() {
        run.wait(&format!("iteration {after}"), &mut fs, |c, _| {
            last_iter(c).is_some_and(|i| i >= after)
        });
        fs.kill();
        if n == REMOVE_AT {
            std::fs::remove_file(shared.join("doomed")).expect("removing doomed on the host");
        }
        fs.spawn();
        run.wait("the reconnection", &mut fs, |_, l| {
            l.matches("fs0.sock reconnected").count() > n
        });
    }
    run.wait("the guest's power-off", &mut fs, |c, _| {
        c.contains("RQEMU-EXIT=")
    });
    let status = run.vmm.wait().unwrap();
    let report = run.report(&fs);
    fs.kill();

    let text = read(&run.console);
    assert!(!text.contains("FS-FAIL"), "{report}");
    assert!(text.contains("FS-END"), "{report}");
    assert!(text.contains("RQEMU-EXIT=0"), "{report}");
    assert!(status.success(), "{status}\n{report}");
    // The fd on the file removed while the daemon was down: an error, not data, not a hang.
    let stale = text
        .lines()
        .find(|l| l.contains("FS-STALE-"))
        .unwrap_or_default();
    if cache == "never" {
        assert!(stale.contains("FS-STALE-ERR"), "{stale}\n{report}");
    } else {
        // The guest may answer from its page cache (the bytes it wrote), or ask: ESTALE.
        assert!(
            stale.contains("FS-STALE-ERR") || stale.contains("FS-STALE-READ doomed"),
            "{stale}\n{report}"
        );
    }
    assert!(text.contains("FS-AFTER-STALE-OK"), "{report}");
    assert!(
        fs.logs().contains("resumed the guest session"),
        "no daemon resumed\n{report}"
    );

    // The host sees exactly the guest's bytes and files.
    let want = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("FS-SHA "))
        .unwrap_or_else(|| panic!("no FS-SHA\n{report}"))
        .trim()
        .to_string();
    assert_eq!(sha256(&shared.join("data")), want, "host file digest");
    for i in 0..BLOCKS {
        let f = std::fs::read_to_string(shared.join(format!("dir/f{i}"))).unwrap_or_default();
        assert_eq!(f, format!("n{i}\n"), "dir/f{i} on the host");
    }
    let names = std::fs::read_dir(shared.join("dir")).unwrap().count();
    assert_eq!(names, BLOCKS as usize, "files in dir/");
    for l in fs
        .logs()
        .lines()
        .filter(|l| l.contains("resumed the guest session"))
    {
        eprintln!("{}", l.split("INFO").last().unwrap_or(l).trim());
    }
    let replayed = fs
        .logs()
        .lines()
        .filter(|l| l.contains("popped again after a restart"))
        .count();
    eprintln!("{stale}");
    eprintln!("requests popped again and answered from a saved reply: {replayed}");
    assert!(
        replayed >= 1,
        "the replayed MKDIR was not answered from its record\n{report}"
    );
    eprintln!(
        "rqemu-vmm TCG, --cache {cache}: {} rqemu-fs SIGKILLs under an open file, {BLOCKS} x 4 KiB written and \
         verified through it, {BLOCKS} files created+renamed, power-off after {:.1} s",
        KILL_AFTER.len(),
        run.start.elapsed().as_secs_f64()
    );
}
