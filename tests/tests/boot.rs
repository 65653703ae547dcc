//! The test guest itself: boots under QEMU TCG with no devices, runs commands given on the
//! kernel cmdline and in `/test.sh`, and reports their exit status.

use rqemu_e2e::{GuestAssets, QemuVm};

fn assets() -> GuestAssets {
    GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn guest_boots_to_init_and_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    let run = QemuVm::new(&assets(), dir.path())
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    run.expect_success().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        run.console.contains("rqemu guest: init reached"),
        "{}",
        run.transcript()
    );
    assert!(
        run.console.contains("rqemu guest: no test command"),
        "{}",
        run.transcript()
    );
    eprintln!(
        "boot: QEMU TCG microvm start -> init greeting {:?}, -> power-off {:?} (kernel {})",
        run.init_reached.unwrap_or_default(),
        run.elapsed,
        assets().kernel_version
    );
}

#[test]
fn cmdline_and_test_script_run_and_failures_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let run = QemuVm::new(&assets(), dir.path())
        .run_cmdline("echo \"RQEMU-VAL from_cmdline=$((6 * 7))\"")
        .file("/data/hello.txt", 0o644, b"hello from the host\n".to_vec())
        .script(
            "echo \"RQEMU-VAL file=$(cat /data/hello.txt)\"\n\
             echo \"RQEMU-VAL modules=$(cut -d' ' -f1 /proc/modules | sort | tr '\\n' ,)\"\n\
             exit 3",
        )
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    // The script's failure must surface: this proves a failing guest test fails.
    assert!(run.expect_success().is_err());
    assert_eq!(run.guest_exit(), Some(3), "{}", run.transcript());
    assert!(
        run.status.success(),
        "QEMU itself should exit 0: {}",
        run.transcript()
    );
    assert_eq!(
        run.value("from_cmdline"),
        Some("42"),
        "{}",
        run.transcript()
    );
    assert_eq!(
        run.value("file"),
        Some("hello from the host"),
        "{}",
        run.transcript()
    );
    let modules = run.value("modules").unwrap_or_default();
    for m in ["virtio_mmio", "virtio_blk", "virtio_net", "virtiofs"] {
        assert!(
            modules.contains(m),
            "module {m} not loaded: {}",
            run.transcript()
        );
    }
}

#[test]
fn extracted_vmlinux_boots_through_its_pvh_note() {
    let assets = assets();
    let dir = tempfile::tempdir().unwrap();
    let run = QemuVm::new(&assets, dir.path())
        .kernel(&assets.vmlinux)
        .run_cmdline("echo \"RQEMU-VAL kernel=$(uname -r)\"")
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    run.expect_success().unwrap_or_else(|e| panic!("{e}"));
    let release = run.value("kernel").unwrap_or_default();
    assert!(release.ends_with("-cloud-amd64"), "{}", run.transcript());
}
