//! Real, protected and compatibility mode: a STARTUP-IPI target (tests/asm/modes.S) run from
//! the INIT/SIPI state through real mode and 32-bit protected mode into 64-bit long mode, as
//! Linux's trampoline does for every application processor.

use crate::modes_image::*;
use crate::TestPlatform;
use rqemu_tcg::state::{cr0, efer, SegReg};
use rqemu_tcg::{Cpu, Exit, GuestRam, RamRegion};

const LOAD: u64 = 0x8000;
const MODES_RAM: usize = 0x40000;

struct Ap {
    mem: Vec<u8>,
    ram: GuestRam,
    cpu: Cpu,
}

impl Ap {
    /// The image at 0x8000, identity page tables (one 2 MiB page) at 0x20000, the CPU in the
    /// state a STARTUP IPI with vector 8 leaves.
    fn new() -> Ap {
        let mut mem = vec![0u8; MODES_RAM];
        mem[LOAD as usize..LOAD as usize + IMAGE.len()].copy_from_slice(IMAGE);
        let mut w64 = |at: usize, v: u64| mem[at..at + 8].copy_from_slice(&v.to_le_bytes());
        w64(0x20000, 0x21000 | 3);
        w64(0x21000, 0x22000 | 3);
        w64(0x22000, 0x83);
        let r = RamRegion {
            gpa: 0,
            host: mem.as_mut_ptr(),
            len: MODES_RAM as u64,
        };
        // SAFETY: `mem` is never reallocated and lives as long as `ram` (same struct).
        let ram = unsafe { GuestRam::new(vec![r]) }.unwrap();
        let mut cpu = Cpu::new();
        cpu.arch.set_sipi_state(8);
        cpu.state_changed();
        Ap { mem, ram, cpu }
    }

    fn r64(&self, sym: u64) -> u64 {
        let at = (LOAD + sym) as usize;
        u64::from_le_bytes(self.mem[at..at + 8].try_into().unwrap())
    }
}

#[test]
fn sipi_state_is_real_mode_at_the_vector_page() {
    let ap = Ap::new();
    let a = &ap.cpu.arch;
    let cs = a.seg[SegReg::Cs as usize];
    assert_eq!(
        (cs.selector, cs.base, cs.limit, a.rip),
        (0x0800, 0x8000, 0xFFFF, 0)
    );
    assert_eq!(a.cr0 & (cr0::PE | cr0::PG), 0);
    assert_eq!(a.efer, 0);
    assert_eq!(a.code_bits(), 16);
}

#[test]
fn trampoline_runs_real_then_protected_then_long_mode() {
    let mut ap = Ap::new();
    let mut plat = TestPlatform::default();
    let exit = ap.cpu.run(&ap.ram, &mut plat, 100_000);
    assert!(
        matches!(exit, Exit::Halted { .. }),
        "{exit:?} at {:#x}",
        ap.cpu.arch.rip
    );
    // Real mode.
    assert_eq!(
        ap.r64(RES_ADDR),
        0x0807,
        "movw 4(%bx,%si): bytes 7 and 8 of data16"
    );
    assert_eq!(ap.r64(RES_CALL), 0x1234, "near call/ret with pushf/popf");
    assert_eq!(ap.r64(RES_LOOP), 15, "loop with CX");
    let copy = (LOAD + COPY16) as usize;
    assert_eq!(
        &ap.mem[copy..copy + 8],
        &[1, 2, 3, 4, 5, 6, 7, 8],
        "rep movsb"
    );
    assert_eq!(
        ap.r64(RES_INT16),
        0xbeef,
        "INT through the vector table, IRET"
    );
    // Protected mode.
    assert_eq!(ap.r64(RES_PUSH32), 0x1122_3344, "32-bit push/pop");
    assert_eq!(
        ap.r64(RES_ESP32),
        LOAD + STACK32_TOP - 4,
        "32-bit near call"
    );
    assert_eq!(
        ap.r64(RES_INT32),
        0xcafe,
        "INT through a 32-bit interrupt gate"
    );
    assert_eq!(ap.r64(RES_INT32_CS), 0x08, "CS pushed by the gate");
    // Long mode.
    assert_eq!(
        ap.r64(RES_64),
        0x64_6464_6464,
        "64-bit code after the far jump"
    );
    let a = &ap.cpu.arch;
    assert!(a.long_mode_64());
    assert_eq!(a.efer & (efer::LME | efer::LMA), efer::LME | efer::LMA);
    assert_eq!(a.cr0 & (cr0::PE | cr0::PG), cr0::PE | cr0::PG);
    assert_eq!(a.seg[SegReg::Cs as usize].selector, 0x18);
    assert_eq!(a.seg[SegReg::Ss as usize].selector, 0x10);
}
