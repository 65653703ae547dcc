//! Cross-checks the generated ACPI tables with the reference ACPICA disassembler (`iasl -d`,
//! Debian package acpica-tools): every table must disassemble without errors and show the
//! devices the guest needs.

use std::path::Path;
use std::process::Command;

use rqemu_vmm::acpi::{self, AcpiConfig};
use rqemu_vmm::vm::virtio_windows;

fn iasl_available() -> bool {
    match Command::new("iasl").arg("-v").output() {
        Ok(_) => true,
        Err(e) => {
            let msg = format!("\n*** ACPI iasl CROSS-CHECK NOT RUN: iasl not found ({e}); install acpica-tools ***\n");
            if std::env::var("RQEMU_ALLOW_NO_IASL").as_deref() == Ok("1") {
                eprintln!("{msg}");
                false
            } else {
                panic!("{msg}set RQEMU_ALLOW_NO_IASL=1 to accept running without it");
            }
        }
    }
}

fn disassemble(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let dat = dir.join(format!("{name}.dat"));
    std::fs::write(&dat, bytes).unwrap();
    let out = Command::new("iasl")
        .arg("-d")
        .arg(&dat)
        .current_dir(dir)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl -d {name} failed:\n{log}");
    assert!(
        !log.contains("Error"),
        "iasl -d {name} reported errors:\n{log}"
    );
    std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap()
}

#[test]
fn tables_disassemble_with_iasl() {
    if !iasl_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tables = acpi::build(&AcpiConfig {
        vcpus: 4,
        virtio: virtio_windows(),
    })
    .unwrap();
    for (_, bytes) in tables.blobs.iter().skip(1) {
        let sig = String::from_utf8_lossy(&bytes[0..4]).to_string();
        let dsl = disassemble(dir.path(), &sig, bytes);
        match sig.as_str() {
            "DSDT" => {
                assert_eq!(dsl.matches("\"LNRO0005\"").count(), 8, "{dsl}");
                assert!(dsl.contains("EisaId (\"PNP0501\")"), "{dsl}");
                assert!(dsl.contains("EisaId (\"PNP0B00\")"), "{dsl}");
                assert!(dsl.contains("Name (_S5, Package"), "{dsl}");
                assert!(dsl.contains("0xD0000000"), "{dsl}");
                // The GED, its event register and _EVT, and the power button it notifies.
                assert!(dsl.contains("Name (_HID, \"ACPI0013\""), "{dsl}");
                assert!(dsl.contains("EisaId (\"PNP0C0C\")"), "{dsl}");
                assert!(dsl.contains("SystemMemory, 0xC0001000"), "{dsl}");
                assert!(dsl.contains("Method (_EVT, 1, Serialized)"), "{dsl}");
                assert!(dsl.contains("Notify (\\_SB.PWRB, 0x80)"), "{dsl}");
            }
            "APIC" => {
                assert_eq!(dsl.matches("Processor Local APIC").count(), 4, "{dsl}");
                assert!(dsl.contains("FEC00000"), "{dsl}");
                assert_eq!(dsl.matches("Interrupt Source Override").count(), 2, "{dsl}");
            }
            "FACP" => {
                assert!(dsl.contains("Hardware Reduced (V5) : 1"), "{dsl}");
                assert!(dsl.contains("Reset Register Supported (V2) : 1"), "{dsl}");
            }
            _ => {}
        }
    }
}

#[test]
#[ignore = "manual: prints the disassembled DSDT"]
fn print_dsdt() {
    let dir = tempfile::tempdir().unwrap();
    let tables = acpi::build(&AcpiConfig {
        vcpus: 1,
        virtio: virtio_windows()[..1].to_vec(),
    })
    .unwrap();
    let dsdt = &tables.blobs.last().unwrap().1;
    println!("{}", disassemble(dir.path(), "DSDT", dsdt));
}
