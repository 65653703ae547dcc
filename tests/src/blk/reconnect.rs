//! The guest side and the daemon side of the "SIGKILL rqemu-blk under guest I/O" tests
//! (`vmm_tcg_blk_reconnect.rs` with rqemu-vmm as the frontend, `blk_qemu_reconnect.rs` with
//! QEMU): an O_DIRECT write+verify loop on `/dev/vda` whose progress shows on the console, and
//! the rqemu-blk the test kills and starts again on the same socket path.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{BlkBackend, BlkOptions};
use crate::daemon::{Daemon, DaemonError, DEFAULT_START_TIMEOUT};
use crate::qemu_img::Format;

/// 64 KiB blocks written and verified by the guest.
pub const BLOCKS: u32 = 40;

/// The guest loop: writes block i (O_DIRECT), reads it back and compares, prints
/// `BLK-ITER i`; then `BLK-SHA <digest of all blocks>`, `BLK-DONE`, a full read-back after
/// 5 s, the count of kernel I/O errors (`BLK-IOERR n`) and `BLK-END`. `BLK-FAIL` on any error.
pub fn script() -> String {
    format!(
        r#"N={BLOCKS}
dd if=/dev/urandom of=/tmp/all bs=64k count=$N 2>/dev/null || exit 30
i=0
while [ $i -lt $N ]; do
  dd if=/tmp/all of=/tmp/w bs=64k skip=$i count=1 2>/dev/null || exit 31
  dd if=/tmp/w of=/dev/vda bs=64k seek=$i count=1 oflag=direct conv=notrunc 2>/tmp/err || {{ echo "BLK-FAIL write $i: $(cat /tmp/err)"; exit 32; }}
  dd if=/dev/vda of=/tmp/r bs=64k skip=$i count=1 iflag=direct 2>/tmp/err || {{ echo "BLK-FAIL read $i: $(cat /tmp/err)"; exit 33; }}
  cmp /tmp/w /tmp/r || {{ echo "BLK-FAIL verify $i"; exit 34; }}
  echo "BLK-ITER $i"
  i=$((i+1))
done
echo "BLK-SHA $(sha256sum /tmp/all | cut -d' ' -f1)"
echo BLK-DONE
sleep 5
dd if=/dev/vda of=/tmp/back bs=64k count=$N iflag=direct 2>/tmp/err || {{ echo "BLK-FAIL readback: $(cat /tmp/err)"; exit 35; }}
cmp /tmp/all /tmp/back || {{ echo "BLK-FAIL readback differs"; exit 36; }}
echo "BLK-IOERR $(dmesg | grep -c 'I/O error')"
echo BLK-END
"#
    )
}

/// A file's contents (empty if unreadable).
pub fn read(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

/// The highest `BLK-ITER n` on the console.
pub fn last_iter(console: &str) -> Option<u32> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("BLK-ITER "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
}

/// Starts rqemu-blk on `sock` (again): a daemon just killed may hold the image lock (and its
/// listening socket) a moment longer — its sandboxed child is still exiting —, so an early
/// exit is retried (here, and by [`Blk::keep_up`] once it seemed to listen).
pub fn start_blk(dir: &Path, image: &Path, format: Format, readonly: bool) -> Daemon {
    let opts = BlkOptions {
        format,
        readonly,
        ..BlkOptions::default()
    };
    let sock = dir.join("blk0.sock");
    let log = dir.join(if readonly { "blk-ro.log" } else { "blk.log" });
    let start = Instant::now();
    loop {
        let cmd = BlkBackend::Rqemu
            .command(&sock, image, &opts)
            .unwrap_or_else(|e| panic!("{e}"));
        match Daemon::spawn("rqemu-blk", cmd, &sock, &log, DEFAULT_START_TIMEOUT) {
            Ok(d) => return d,
            Err(DaemonError::ExitedEarly { log, .. })
                if start.elapsed() < DEFAULT_START_TIMEOUT =>
            {
                eprintln!(
                    "rqemu-blk exited at start, starting it again: {}",
                    log.trim()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// The rqemu-blk the test keeps running.
pub struct Blk {
    dir: PathBuf,
    image: PathBuf,
    format: Format,
    readonly: bool,
    daemon: Option<Daemon>,
}

impl Blk {
    pub fn start(dir: &Path, image: &Path, format: Format, readonly: bool) -> Self {
        Blk {
            dir: dir.to_path_buf(),
            image: image.to_path_buf(),
            format,
            readonly,
            daemon: Some(start_blk(dir, image, format, readonly)),
        }
    }

    /// SIGKILLs the daemon and starts it again (`readonly` or not).
    pub fn restart(&mut self, readonly: bool) {
        if let Some(d) = self.daemon.take() {
            d.kill().expect("killing rqemu-blk");
        }
        self.readonly = readonly;
        self.daemon = Some(start_blk(&self.dir, &self.image, self.format, readonly));
    }

    /// The running daemon's log so far.
    pub fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// Starts the daemon again if it exited (see [`start_blk`]).
    pub fn keep_up(&mut self) {
        let Some(d) = self.daemon.as_mut() else {
            return;
        };
        if !d.is_running() {
            eprintln!("rqemu-blk exited: {}", d.log().trim());
            std::thread::sleep(Duration::from_millis(100));
            self.daemon = Some(start_blk(
                &self.dir,
                &self.image,
                self.format,
                self.readonly,
            ));
        }
    }
}
