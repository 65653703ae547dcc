//! Library-level tests of the VM lifecycle on KVM: pause/resume of all vCPU threads
//! (including an AP that never got SIPI) and a host-requested stop that joins every thread.

mod support;

use std::time::{Duration, Instant};

use rqemu_vmm::boot::BootConfig;
use rqemu_vmm::devices::serial::SerialOutput;
use rqemu_vmm::exit::GuestExit;
use rqemu_vmm::vm::{create_accelerator, AccelChoice, Vm, VmConfig};

fn wait_for(path: &std::path::Path, needle: &str) {
    let start = Instant::now();
    loop {
        let s = std::fs::read_to_string(path).unwrap_or_default();
        if s.contains(needle) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "guest never printed {needle:?}; console so far:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn pause_resume_and_stop_join_all_vcpus() {
    if !support::kvm_or_skip("pause_resume_and_stop_join_all_vcpus") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let cfg = VmConfig {
        boot: BootConfig {
            kernel: support::payloads().elf.clone(),
            initrd: None,
            cmdline: "mode=halt".into(),
        },
        memory: 64 << 20,
        vcpus: 2,
        serial: SerialOutput::File(console.clone()),
        devices: Vec::new(),
        forward_rings: true,
    };
    let vm = Vm::new(&cfg, create_accelerator(AccelChoice::Kvm).unwrap()).unwrap();
    let ctl = vm.controller();
    let runner = std::thread::spawn(move || vm.run());
    wait_for(&console, "action halt");
    let start = Instant::now();
    while ctl.running_vcpus() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "vCPU threads never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }

    ctl.pause(Duration::from_secs(10)).expect("pausing");
    assert_eq!(ctl.paused_vcpus(), 2);
    ctl.resume();
    let start = Instant::now();
    while ctl.paused_vcpus() != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "vCPUs did not resume"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Pause again and stop while paused: stop must still join everything.
    ctl.pause(Duration::from_secs(10)).expect("pausing again");
    ctl.stop();
    let result = runner.join().expect("run() panicked");
    assert_eq!(result.unwrap(), GuestExit::Stopped);
    assert_eq!(ctl.running_vcpus(), 0, "every vCPU thread unregistered");
}
