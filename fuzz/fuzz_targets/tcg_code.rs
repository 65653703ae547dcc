//! Fuzzes the software CPU (`rqemu-tcg`, interpreter) with arbitrary guest code: decoding and
//! execution in 64-bit mode, or from the state a STARTUP IPI leaves (real mode) through
//! whatever mode switches the code makes (protected, compatibility, long mode). Whatever the
//! bytes, the CPU must stop with an exit (budget spent, halt, triple fault, unsupported state),
//! never panic or overflow.
//!
//! Input: a selector byte (bit 0: start in real mode at 0x8000, as after STARTUP vector 8;
//! else the 64-bit Linux boot state with RIP 0x8000), then the code, loaded at 0x8000.
//! Memory: 256 KiB of RAM identity-mapped by one 2 MiB page (tables at 0x20000), a GDT at
//! 0x30000 (0x08 32-bit code, 0x10 64-bit code, 0x18 data), stack below 0x3F000; everything
//! above RAM is MMIO answering 0xFF.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rqemu_tcg::{Cpu, Exit, GuestRam, Platform, RamRegion};

const RAM: usize = 0x40000;
const CODE: usize = 0x8000;

/// No devices: reads see 0xFF, writes vanish, no interrupt ever arrives.
struct Quiet;

impl Platform for Quiet {
    fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }
    fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {}
    fn pio_read(&mut self, _port: u16, data: &mut [u8]) {
        data.fill(0xFF);
    }
    fn pio_write(&mut self, _port: u16, _data: &[u8]) {}
    fn interrupt_pending(&mut self) -> bool {
        false
    }
    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        None
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, code)) = data.split_first() else {
        return;
    };
    let mut mem = vec![0u8; RAM];
    let n = code.len().min(RAM - 0x10000 - CODE);
    mem[CODE..CODE + n].copy_from_slice(&code[..n]);
    let mut w64 = |at: usize, v: u64| mem[at..at + 8].copy_from_slice(&v.to_le_bytes());
    w64(0x20000, 0x21000 | 3);
    w64(0x21000, 0x22000 | 3);
    w64(0x22000, 0x83);
    w64(0x30008, 0x00cf_9a00_0000_ffff);
    w64(0x30010, 0x00af_9a00_0000_ffff);
    w64(0x30018, 0x00cf_9200_0000_ffff);
    let region = RamRegion {
        gpa: 0,
        host: mem.as_mut_ptr(),
        len: RAM as u64,
    };
    // SAFETY: `mem` is neither moved nor reallocated while `ram` and the CPU use it (both
    // are dropped at the end of this closure, before `mem`).
    let ram = unsafe { GuestRam::new(vec![region]) }.expect("one RAM region");
    let mut cpu = Cpu::new();
    if sel & 1 != 0 {
        cpu.arch.set_sipi_state((CODE >> 12) as u8);
    } else {
        cpu.arch.set_linux_boot_state(CODE as u64, 0, 0x20000, 0x30000);
        cpu.arch.gdtr.limit = 0x1F;
        cpu.arch.gpr[4] = 0x3F000;
    }
    cpu.state_changed();
    for _ in 0..4 {
        match cpu.run(&ram, &mut Quiet, 10_000) {
            Exit::BudgetExhausted => {}
            _ => break,
        }
    }
    drop(cpu);
    drop(ram);
});
