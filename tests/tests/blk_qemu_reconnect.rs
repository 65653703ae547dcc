//! QEMU as the frontend of an rqemu-blk that is SIGKILLed under guest I/O: QEMU's
//! vhost-user-blk with `reconnect-ms` reconnects to each daemon started again on the socket
//! path, and the guest's O_DIRECT write+verify loop finishes without an I/O error; the data is
//! checked on the host. rqemu-blk offers INFLIGHT_SHMFD, which QEMU's vhost-user-blk uses for
//! resubmission, so this also checks the inflight region against the reference frontend.
//!
//! QEMU does not kick the rings of a daemon it reconnects to, and a guest notification that
//! arrived while no daemon was connected is consumed by QEMU: without the relay's own kick
//! after a ring is enabled (`device-daemons/common/src/relay/mod.rs`, `Kicks`) the guest waits
//! forever on its request (4 runs out of 4 stalled at the first kill).
//!
//! A second race stalled about half the runs after the first fix: the relay kicked right after
//! forwarding SET_VRING_ENABLE, but the `vhost` handler applies messages on its own thread, and
//! `vhost-user-backend` drops a kick that finds its ring still disabled. The relay now kicks
//! only once the handler has answered a barrier message sent after the enable (4 of 4 runs pass
//! since; qemu-storage-daemon in rqemu-blk's place passed every run before too).

use std::time::Duration;

use rqemu_e2e::blk::reconnect::{last_iter, script, Blk, BLOCKS};
use rqemu_e2e::qemu::{QemuVm, VhostUserDevice};
use rqemu_e2e::qemu_img::Format;
use rqemu_e2e::GuestAssets;

/// The daemon is killed once the guest reports these iterations done.
const KILL_AFTER: [u32; 3] = [3, 13, 25];

#[test]
fn qemu_guest_io_survives_rqemu_blk_sigkills() {
    let assets = GuestAssets::locate().expect("guest assets (run scripts/guest-assets.sh)");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .expect("creating the image");
    let mut blk = Blk::start(dir.path(), &image, Format::Raw, false);
    let mut kills = 0usize;
    let run = QemuVm::new(&assets, dir.path())
        .device(VhostUserDevice::blk(dir.path().join("blk0.sock"), 1))
        .reconnect_ms(200)
        .run_cmdline(&script())
        .timeout(Duration::from_secs(300))
        .run_watching(|console| {
            if kills < KILL_AFTER.len()
                && last_iter(console).is_some_and(|i| i >= KILL_AFTER[kills])
            {
                blk.restart(false);
                kills += 1;
            }
            blk.keep_up();
        })
        .unwrap_or_else(|e| panic!("{e}\n--- rqemu-blk ---\n{}", blk.log()));
    drop(blk);
    let text = run.transcript();
    assert_eq!(kills, KILL_AFTER.len(), "the guest stopped early\n{text}");
    assert!(!text.contains("BLK-FAIL"), "{text}");
    assert!(text.contains("BLK-END"), "{text}");
    assert!(
        text.contains("BLK-IOERR 0"),
        "the guest logged I/O errors\n{text}"
    );
    run.expect_success().unwrap_or_else(|e| panic!("{e}"));
    let want = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("BLK-SHA "))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no BLK-SHA\n{text}"));
    let bytes = std::fs::read(&image).unwrap();
    let host = rqemu_e2e::qemu_img::sha256(&bytes[..(BLOCKS as usize) << 16]).unwrap();
    assert_eq!(host, want, "host image digest");
    eprintln!(
        "QEMU TCG + rqemu-blk: {} SIGKILLs under the guest's O_DIRECT loop, {BLOCKS} x 64 KiB \
         written and verified, power-off after {:.1} s",
        KILL_AFTER.len(),
        run.elapsed.as_secs_f64()
    );
}
