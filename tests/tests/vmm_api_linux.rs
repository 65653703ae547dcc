//! `rqemu-vmm --accel tcg --api-socket` running the reference Linux guest: the management
//! API's power button goes through the machine's ACPI Generic Event Device to Linux: Linux
//! enumerates the DSDT's GED (`ACPI0013`) and power button (`PNP0C0C`), its `evged` driver
//! takes the GED interrupt (the `/proc/interrupts` count goes up by one). The busybox guest
//! has no `acpid`, so nothing powers off on the button (that is userspace's job, and the
//! Debian cloud kernel builds `acpi_button` as a module the initramfs does not load): the
//! guest script ends once it has seen the interrupt and init powers off.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rqemu_e2e::{project_binary, GuestAssets, RqemuVm};

const TIMEOUT: Duration = Duration::from_secs(600);

const SCRIPT: &str = r#"ged() { grep 'Ged' /proc/interrupts | tr -s ' '; }
for d in /sys/bus/acpi/devices/ACPI0013:* /sys/bus/acpi/devices/PNP0C0C:*; do
  echo "ACPIDEV $d driver=$(readlink $d/driver)"
done
before="$(ged)"
echo "GED-BEFORE $before"
n=0
while [ $n -lt 300 ]; do
  now="$(ged)"
  if [ "$now" != "$before" ]; then echo "GED-AFTER $now"; break; fi
  sleep 1
  n=$((n+1))
done
"#;

fn wait_for(console: &Path, needle: &str, start: Instant) -> String {
    loop {
        let s = std::fs::read_to_string(console).unwrap_or_default();
        if s.contains(needle) {
            return s;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "the guest never printed {needle:?}; console:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The CPU0 count of a `/proc/interrupts` line (` 12: 0 IO-APIC 12-edge ACPI:Ged`).
fn count(line: &str) -> u64 {
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line:?}"))
}

#[test]
fn tcg_linux_gets_the_power_button_through_the_ged() {
    let assets = GuestAssets::locate().expect("guest assets (run scripts/guest-assets.sh)");
    let ctl = project_binary("rqemu-ctl").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let api = dir.path().join("api.sock");
    let start = Instant::now();
    let mut child = RqemuVm::new(&assets)
        .serial(&format!("file:{}", console.display()))
        .run_cmdline(SCRIPT)
        .command()
        .unwrap_or_else(|e| panic!("{e}"))
        .arg("--api-socket")
        .arg(&api)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning rqemu-vmm");
    let s = wait_for(&console, "GED-BEFORE", start);
    let line = |s: &str, tag: &str| -> String {
        s.lines()
            .find_map(|l| l.strip_prefix(tag))
            .unwrap_or_else(|| panic!("no {tag:?} line in:\n{s}"))
            .to_string()
    };
    let before = line(&s, "GED-BEFORE ");
    assert!(before.contains("ACPI:Ged"), "evged has no interrupt:\n{s}");
    // Linux enumerated both DSDT devices (whether `acpi_button` binds the button depends on
    // the guest kernel's modules: printed, not asserted).
    for hid in ["ACPI0013:", "PNP0C0C:"] {
        assert!(
            s.lines()
                .any(|l| l.starts_with("ACPIDEV") && l.contains(hid)),
            "Linux did not enumerate {hid}:\n{s}"
        );
    }
    for l in s.lines().filter(|l| l.starts_with("ACPIDEV")) {
        eprintln!("guest: {l}");
    }
    let out = Command::new(&ctl)
        .arg("--api-socket")
        .arg(&api)
        .arg("power-button")
        .output()
        .expect("running rqemu-ctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = wait_for(&console, "GED-AFTER", start);
    let after = line(&s, "GED-AFTER ");
    assert_eq!(count(&after), count(&before) + 1, "{s}");
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert_eq!(st.code(), Some(0), "{s}");
            break;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the guest did not power off after its script");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
