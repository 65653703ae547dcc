//! System-level tests with small guest programs: page walks and #PF error codes through the
//! IDT, privilege changes with TSS stacks, SYSCALL/SYSRET, IRETQ, triple fault, external
//! interrupts, self-modifying code, a checksum/recursion program, a MIPS measurement, and
//! (`modes`) the way from a STARTUP IPI through real and protected mode into long mode.

mod image;
mod modes;
mod modes_image;
#[path = "../common/seed.rs"]
mod seed;

use rqemu_tcg::flags::IF;
use rqemu_tcg::state::{cr0, cr4, efer, DescTable, SegReg, Segment};
use rqemu_tcg::{Cpu, Exit, GuestRam, Platform, RamRegion, ShutdownReason};

const RAM: usize = 0x20_0000;
const LOG: u64 = 0x9000;
const STUBS: u64 = 0x1_2000;

/// Platform with one optional pending interrupt vector and an access log.
#[derive(Default)]
struct TestPlatform {
    pending: Option<u8>,
    /// Polls answered "nothing pending" before `pending` shows.
    delay: u32,
    acked: Vec<u8>,
    log: Vec<String>,
}

impl Platform for TestPlatform {
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (gpa as u8).wrapping_add(i as u8);
        }
        self.log.push(format!("mmio_read {gpa:#x} {}", data.len()));
    }
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        self.log.push(format!("mmio_write {gpa:#x} {data:02x?}"));
    }
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0x5A);
        self.log.push(format!("pio_read {port:#x} {}", data.len()));
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.log.push(format!("pio_write {port:#x} {data:02x?}"));
    }
    fn interrupt_pending(&mut self) -> bool {
        if self.delay > 0 {
            self.delay -= 1;
            return false;
        }
        self.pending.is_some()
    }
    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        let v = self.pending.take();
        self.acked.extend(v);
        v
    }
}

struct Guest {
    mem: Vec<u8>,
    ram: GuestRam,
    cpu: Cpu,
}

fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10..=14 | 17)
}

impl Guest {
    fn new() -> Guest {
        let mut mem = vec![0u8; RAM];
        let r = RamRegion {
            gpa: 0,
            host: mem.as_mut_ptr(),
            len: RAM as u64,
        };
        // SAFETY: `mem` is never reallocated and lives as long as `ram` (same struct).
        let ram = unsafe { GuestRam::new(vec![r]) }.unwrap();
        let mut g = Guest {
            mem,
            ram,
            cpu: Cpu::new(),
        };
        g.build();
        g
    }

    fn w64(&mut self, at: u64, v: u64) {
        self.mem[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn r64(&self, at: u64) -> u64 {
        u64::from_le_bytes(self.mem[at as usize..at as usize + 8].try_into().unwrap())
    }

    fn build(&mut self) {
        // Page tables: 4 KiB identity pages over 2 MiB.
        self.w64(0x1000, 0x2000 | 7);
        self.w64(0x2000, 0x3000 | 7);
        self.w64(0x3000, 0x4000 | 7);
        for p in 0..512u64 {
            let pa = p << 12;
            let mut e = pa | 3; // present, writable, supervisor
            if (0x10..0x20).contains(&p) || p == 0x30 || p == 0x31 {
                e |= 4; // user code and user stack
            }
            if p == 0x50 {
                e = 0; // not present
            }
            if p == 0x51 {
                e = pa | 1; // read-only
            }
            if p == 0x54 {
                e = pa | 3 | 0x100; // global
            }
            if p == 0x1FF {
                e = 0xFEE0_0000 | 3; // MMIO (not RAM)
            }
            self.w64(0x4000 + 8 * p, e);
        }
        // GDT (Linux layout): 0x10 kernel CS, 0x18 kernel DS, 0x28 user DS, 0x30 user CS,
        // 0x40 TSS.
        self.w64(0x5010, 0x00af_9b00_0000_ffff);
        self.w64(0x5018, 0x00cf_9300_0000_ffff);
        self.w64(0x5028, 0x00cf_f300_0000_ffff);
        self.w64(0x5030, 0x00af_fb00_0000_ffff);
        let tss = 0x7000u64;
        self.w64(
            0x5040,
            0x67 | ((tss & 0xFF_FFFF) << 16) | (0x89 << 40) | ((tss >> 24) << 56),
        );
        self.w64(0x5048, tss >> 32);
        // TSS: RSP0 and IST1.
        self.w64(tss + 4, 0x6_F000);
        self.w64(tss + 36, 0x6_8000);
        // IDT: every vector → its stub; #PF uses IST1; 0x80 is callable from CPL 3.
        for v in 0..=255u8 {
            let stub = STUBS + 16 * u64::from(v);
            let mut c = Vec::new();
            if !has_error_code(v) {
                c.extend([0x6A, 0x00]);
            }
            c.push(0x68);
            c.extend(u32::from(v).to_le_bytes());
            let rel = image::COMMON as i64 - (stub as i64 + c.len() as i64 + 5);
            c.push(0xE9);
            c.extend((rel as i32).to_le_bytes());
            let s = stub as usize;
            self.mem[s..s + c.len()].copy_from_slice(&c);
            let dpl: u64 = if v == 0x80 { 3 } else { 0 };
            let ist: u64 = if v == 14 { 1 } else { 0 };
            let lo = (stub & 0xFFFF)
                | (0x10 << 16)
                | (ist << 32)
                | ((0x8E | (dpl << 5)) << 40)
                | (((stub >> 16) & 0xFFFF) << 48);
            self.w64(0x6000 + 16 * u64::from(v), lo);
            self.w64(0x6008 + 16 * u64::from(v), stub >> 32);
        }
        let c = 0x1_0000usize;
        self.mem[c..c + image::IMAGE.len()].copy_from_slice(image::IMAGE);
        // Kernel state.
        let tss_desc = self.r64(0x5040);
        let a = &mut self.cpu.arch;
        a.cr0 = cr0::PE | cr0::ET | cr0::NE | cr0::WP | cr0::PG;
        a.cr4 = cr4::PAE | cr4::PGE | cr4::OSFXSR;
        a.efer = efer::LME | efer::LMA | efer::NXE | efer::SCE;
        a.cr3 = 0x1000;
        a.gdtr = DescTable {
            base: 0x5000,
            limit: 0x4F,
        };
        a.idtr = DescTable {
            base: 0x6000,
            limit: 0xFFF,
        };
        a.tr = Segment::from_descriptor(0x40, tss_desc, 0);
        a.seg[SegReg::Cs as usize] = Segment::code64(0x10, 0);
        for s in [SegReg::Ds, SegReg::Es, SegReg::Ss, SegReg::Fs, SegReg::Gs] {
            a.seg[s as usize] = Segment::data(0x18, 0);
        }
        a.msr.lstar = image::SYS_ENTRY;
        a.msr.star = (0x23u64 << 48) | (0x10 << 32);
        a.msr.fmask = 0x700;
        a.gpr[4] = 0x6_0000;
        a.set_rflags(2);
        self.cpu.state_changed();
    }

    fn run_at(&mut self, rip: u64, plat: &mut TestPlatform) -> Exit {
        self.cpu.arch.rip = rip;
        self.cpu.arch.halted = false;
        self.cpu.run(&self.ram, plat, 50_000_000)
    }

    /// (vector, error code, frame RIP, frame CS, frame RSP, CR2, handler RSP)
    fn log(&self) -> (u64, u64, u64, u64, u64, u64, u64) {
        (
            self.r64(LOG),
            self.r64(LOG + 8),
            self.r64(LOG + 0x10),
            self.r64(LOG + 0x18),
            self.r64(LOG + 0x20),
            self.r64(LOG + 0x28),
            self.r64(LOG + 0x30),
        )
    }
}

fn halted(e: &Exit) -> bool {
    matches!(e, Exit::Halted { .. })
}

#[test]
fn page_fault_not_present_read() {
    let mut g = Guest::new();
    let e = g.run_at(image::PF_READ, &mut TestPlatform::default());
    assert!(halted(&e), "{e:?}");
    let (v, err, rip, cs, _, cr2, hrsp) = g.log();
    assert_eq!(
        (v, err, rip, cs, cr2),
        (14, 0, image::PF_READ, 0x10, 0x50008)
    );
    assert!(
        hrsp < 0x6_8000 && hrsp > 0x6_7000,
        "IST1 stack used: {hrsp:#x}"
    );
}

#[test]
fn page_fault_write_to_read_only_with_wp() {
    let mut g = Guest::new();
    let e = g.run_at(image::PF_WRITE_RO, &mut TestPlatform::default());
    assert!(halted(&e));
    let (v, err, rip, _, _, cr2, _) = g.log();
    assert_eq!((v, err, rip, cr2), (14, 3, image::PF_WRITE_RO, 0x51000));
    // With CR0.WP clear, the supervisor write succeeds and the code reaches its HLT.
    let mut g = Guest::new();
    g.cpu.arch.cr0 &= !cr0::WP;
    g.cpu.state_changed();
    let e = g.run_at(image::PF_WRITE_RO, &mut TestPlatform::default());
    assert!(halted(&e));
    assert_eq!(g.r64(LOG), 0, "no exception");
    assert_eq!(g.cpu.arch.rip, image::PF_WRITE_RO + 9);
}

#[test]
fn faulting_push_does_not_commit_rsp() {
    let mut g = Guest::new();
    let e = g.run_at(image::PF_PUSH, &mut TestPlatform::default());
    assert!(halted(&e));
    let (v, err, rip, _, rsp, cr2, _) = g.log();
    assert_eq!((v, err, cr2), (14, 2, 0x50008));
    assert_eq!(rip, image::PF_PUSH + 7, "RIP of the push");
    assert_eq!(rsp, 0x50010, "RSP unchanged by the faulting push");
}

#[test]
fn divide_error_and_invalid_opcode() {
    let mut g = Guest::new();
    g.run_at(image::DIV0, &mut TestPlatform::default());
    let (v, _, rip, ..) = g.log();
    assert_eq!((v, rip), (0, image::DIV0 + 2));
    let mut g = Guest::new();
    g.run_at(image::UNDEF, &mut TestPlatform::default());
    let (v, _, rip, ..) = g.log();
    assert_eq!((v, rip), (6, image::UNDEF));
}

#[test]
fn user_mode_syscall_sysret_and_int80() {
    let mut g = Guest::new();
    let e = g.run_at(image::TO_USER, &mut TestPlatform::default());
    assert!(halted(&e), "{e:?}");
    assert_eq!(g.r64(0x9100), 41, "syscall saw RAX");
    assert_eq!(g.r64(0x30800), 42, "sysret returned RAX+1 to user mode");
    let (v, err, _, cs, rsp, _, hrsp) = g.log();
    assert_eq!((v, err, cs, rsp), (0x80, 0, 0x33, 0x31000));
    assert!(
        hrsp < 0x6_F000 && hrsp > 0x6_E000,
        "RSP0 stack used: {hrsp:#x}"
    );
    assert_eq!(g.cpu.arch.cpl(), 0);
}

#[test]
fn user_access_to_supervisor_page_faults_with_user_bit() {
    let mut g = Guest::new();
    g.run_at(image::TO_USER_GP, &mut TestPlatform::default());
    let (v, err, rip, cs, _, cr2, _) = g.log();
    assert_eq!(
        (v, err, rip, cs, cr2),
        (14, 5, image::USER_CODE2, 0x33, 0x40000)
    );
}

#[test]
fn int_to_dpl0_gate_from_user_is_gp() {
    let mut g = Guest::new();
    g.run_at(image::TO_USER_INT81, &mut TestPlatform::default());
    let (v, err, rip, ..) = g.log();
    assert_eq!((v, err, rip), (13, 0x81 * 8 + 2, image::USER_CODE3));
}

#[test]
fn triple_fault_shuts_down() {
    let mut g = Guest::new();
    let e = g.run_at(image::TRIPLE, &mut TestPlatform::default());
    assert!(
        matches!(e, Exit::Shutdown(ShutdownReason::TripleFault { .. })),
        "expected a triple fault, got {e:?}"
    );
}

#[test]
fn external_interrupt_wakes_hlt() {
    let mut g = Guest::new();
    let mut p = TestPlatform::default();
    let e = g.run_at(image::WAIT_IRQ, &mut p);
    assert_eq!(
        e,
        Exit::Halted {
            interrupts_enabled: true
        }
    );
    assert_ne!(g.cpu.arch.rflags() & IF, 0);
    p.pending = Some(0x41);
    let e = g.cpu.run(&g.ram, &mut p, 1000);
    assert!(halted(&e));
    assert_eq!(p.acked, vec![0x41]);
    let (v, _, rip, ..) = g.log();
    assert_eq!(
        (v, rip),
        (0x41, image::WAIT_IRQ + 2),
        "return address after the HLT"
    );
}

#[test]
fn interrupt_is_taken_right_after_the_sti_shadow() {
    // cli; mov eax, 1; sti; nop (shadow); nop; nop; cli; hlt — the IF=1 window is two
    // instructions long and ends in the middle of a block, like Linux's `sti ... cli` paths.
    const AT: u64 = 0x2_0000;
    let code = [0xFA, 0xB8, 1, 0, 0, 0, 0xFB, 0x90, 0x90, 0x90, 0xFA, 0xF4];
    let mut g = Guest::new();
    g.mem[AT as usize..AT as usize + code.len()].copy_from_slice(&code);
    let mut p = TestPlatform {
        pending: Some(0x42),
        ..TestPlatform::default()
    };
    let e = g.run_at(AT, &mut p);
    assert!(halted(&e), "{e:?}");
    assert_eq!(
        p.acked,
        vec![0x42],
        "the interrupt was taken in the STI window"
    );
    let (v, _, rip, ..) = g.log();
    assert_eq!(
        (v, rip),
        (0x42, AT + 8),
        "taken after exactly the one instruction the STI shadow covers"
    );
}

/// With the JIT, a tight loop runs in translated code without the run loop (a block that
/// branches back to its own start loops inside its function, other blocks chain to each
/// other); an interrupt that becomes pending while it runs is still taken (the chain budget,
/// which every pass of such a loop takes from too, returns to the run loop, which polls).
#[cfg(feature = "jit")]
#[test]
fn jit_chained_loop_takes_interrupts() {
    // sti; top: inc rcx; jmp top
    const AT: u64 = 0x2_0000;
    let code = [0xFB, 0x48, 0xFF, 0xC1, 0xEB, 0xFB];
    let mut g = Guest::new();
    g.mem[AT as usize..AT as usize + code.len()].copy_from_slice(&code);
    let cfg = rqemu_tcg::JitConfig {
        threshold: 0,
        ..Default::default()
    };
    g.cpu.enable_jit(cfg).expect("JIT for this host");
    let mut p = TestPlatform {
        pending: Some(0x41),
        delay: 200,
        ..TestPlatform::default()
    };
    let e = g.run_at(AT, &mut p);
    assert!(halted(&e), "{e:?}");
    assert_eq!(p.acked, vec![0x41], "the interrupt was taken");
    let (v, _, rip, ..) = g.log();
    assert_eq!(v, 0x41);
    assert!(
        rip == AT + 1 || rip == AT + 4,
        "taken inside the loop: {rip:#x}"
    );
    let stats = g.cpu.jit_stats().expect("jit enabled");
    assert!(
        stats.chained + stats.loops > 0,
        "the loop never ran without the run loop: {stats:?}"
    );
}

#[test]
fn self_modifying_code_is_detected() {
    let mut g = Guest::new();
    let e = g.run_at(image::SMC, &mut TestPlatform::default());
    assert!(halted(&e));
    assert_eq!(
        g.cpu.arch.gpr[0] & 0xFFFF_FFFF,
        7,
        "the patched immediate executed"
    );
    assert!(g.cpu.cache_stats().1 >= 1, "an invalidation was recorded");
}

fn reference_checksum() -> (u64, u64) {
    let mut buf = vec![0u8; 4096];
    for c in (1..=4096u32).rev() {
        let al = (c.wrapping_mul(0x45)) as u8;
        buf[c as usize - 1] = (c as u8) ^ al;
    }
    let (mut a, mut b) = (0u64, 0u64);
    for &x in &buf {
        a = a.wrapping_add(u64::from(x));
        b = b.wrapping_add(a).rotate_left(3);
    }
    fn fib(n: u64) -> u64 {
        if n < 2 {
            n
        } else {
            fib(n - 1) + fib(n - 2)
        }
    }
    (a ^ b, fib(20))
}

#[test]
fn guest_program_checksum_and_recursion() {
    let mut g = Guest::new();
    let e = g.run_at(image::PROGRAM, &mut TestPlatform::default());
    assert!(halted(&e), "{e:?}");
    assert_eq!(g.r64(LOG), 0, "no exception");
    let (sum, fib) = reference_checksum();
    assert_eq!(g.r64(0x9200), sum);
    assert_eq!(g.r64(0x9208), fib);
}

/// Prints the interpreter's speed on a tight 4-instruction loop (not asserted).
#[test]
fn measure_mips_tight_loop() {
    let mut g = Guest::new();
    let iters = 5_000_000u64;
    g.cpu.arch.gpr[15] = iters;
    let start = std::time::Instant::now();
    let cpu0 = thread_cpu_time();
    let icount0 = g.cpu.icount;
    let e = g.run_at(image::BENCH, &mut TestPlatform::default());
    let dt = start.elapsed();
    let cpu_s = thread_cpu_time() - cpu0;
    assert!(halted(&e), "{e:?}");
    let n = g.cpu.icount - icount0;
    assert!(n >= 4 * iters, "executed {n}");
    let mips = n as f64 / dt.as_secs_f64() / 1e6;
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    eprintln!(
        "TCG interpreter: {n} guest instructions in {:.3} s wall = {mips:.1} MIPS; \
         {cpu_s:.3} s thread CPU time = {:.1} MIPS ({build} build)",
        dt.as_secs_f64(),
        n as f64 / cpu_s / 1e6,
    );
}

#[test]
fn mmio_and_port_io_reach_the_platform() {
    let mut g = Guest::new();
    let mut p = TestPlatform::default();
    let e = g.run_at(image::MMIO_IO, &mut p);
    assert!(halted(&e), "{e:?}");
    assert_eq!(
        p.log,
        vec![
            "mmio_read 0xfee00020 4".to_string(),
            "mmio_write 0xfee000b0 [20, 21, 22, 23]".into(),
            "pio_write 0x3f8 [41]".into(),
            "pio_read 0x71 1".into(),
            "mmio_read 0xfee00010 16".into(),
            "mmio_write 0xfee00100 [5a]".into(),
            "mmio_write 0xfee00101 [5a]".into(),
            "mmio_write 0xfee00102 [5a]".into(),
        ]
    );
    assert_eq!(g.mem[0x9300], 0x5A);
    let want: u128 = (0..16u128).map(|i| (0x10 + i) << (8 * i)).sum();
    assert_eq!(g.cpu.arch.xmm[0], want);
}

#[test]
fn instruction_crossing_a_page_boundary() {
    let mut g = Guest::new();
    // mov rax, imm64 (10 bytes) straddling 0x13000, then hlt.
    let at = 0x1_2FFAusize;
    let mut code = vec![0x48, 0xB8];
    code.extend(0x1122_3344_5566_7788u64.to_le_bytes());
    code.push(0xF4);
    g.mem[at..at + code.len()].copy_from_slice(&code);
    let e = g.run_at(at as u64, &mut TestPlatform::default());
    assert!(halted(&e), "{e:?}");
    assert_eq!(g.cpu.arch.gpr[0], 0x1122_3344_5566_7788);
    // The same straddling a not-present page: #PF on the fetch with CR2 = that page.
    let at = 0x4_FFFCusize;
    g.mem[at..at + 4].copy_from_slice(&code[..4]);
    g.run_at(at as u64, &mut TestPlatform::default());
    let (v, err, rip, _, _, cr2, _) = g.log();
    assert_eq!((v, err, rip, cr2), (14, 0x10, at as u64, 0x50000));
}

#[test]
fn external_code_writes_are_picked_up_after_note() {
    let mut g = Guest::new();
    let at = 0x1_3100usize;
    // mov eax, 1; hlt
    g.mem[at..at + 6].copy_from_slice(&[0xB8, 1, 0, 0, 0, 0xF4]);
    g.run_at(at as u64, &mut TestPlatform::default());
    assert_eq!(g.cpu.arch.gpr[0], 1);
    // A "device" rewrites the code behind the CPU's back (no CPU write, no SMC detection).
    g.mem[at + 1] = 2;
    g.cpu.note_external_writes();
    g.run_at(at as u64, &mut TestPlatform::default());
    assert_eq!(
        g.cpu.arch.gpr[0], 2,
        "re-validated block picked up the new bytes"
    );
    // Unchanged bytes in a new epoch keep the block (no re-decode).
    let decoded = g.cpu.cache_stats().0;
    g.cpu.note_external_writes();
    g.run_at(at as u64, &mut TestPlatform::default());
    assert_eq!(g.cpu.cache_stats().0, decoded);
    assert_eq!(g.cpu.arch.gpr[0], 2);
}

#[test]
fn tlb_invlpg_cr3_reload_and_global_pages() {
    let mut g = Guest::new();
    g.w64(0x52000, 0x5252);
    g.w64(0x53000, 0x5353);
    g.w64(0x54000, 0x5454);
    let e = g.run_at(image::TLB_TEST, &mut TestPlatform::default());
    assert!(halted(&e), "{e:?}");
    let r = &g.cpu.arch.gpr;
    assert_eq!((r[0], r[3], r[2]), (0x5252, 0x5353, 0x5252), "rax/rbx/rdx");
    assert_eq!(r[6], 0x5454);
    assert_eq!(r[7], 0x5454, "global translation survives a CR3 reload");
}

fn thread_cpu_time() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the provided timespec.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0);
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Random instruction bytes at CPL 0 and CPL 3 must never panic the emulator; every run ends
/// in an exception handler, HLT, a shutdown, or the budget.
#[test]
fn random_code_never_panics() {
    let mut g = Guest::new();
    let mut seed = seed::for_test("random_code_never_panics");
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let at = 0x1_4000usize;
    let mut exits = [0u32; 4];
    for i in 0..20_000 {
        for k in 0..64 {
            g.mem[at + k] = next() as u8;
        }
        g.cpu.invalidate_code(at as u64, 0x1000);
        let a = &mut g.cpu.arch;
        for r in 0..16 {
            a.gpr[r] = match next() % 4 {
                0 => 0x1_4000 + next() % 0x100,
                1 => next() % 0x20_0000,
                _ => next(),
            };
        }
        a.gpr[4] = 0x6_0000;
        a.set_rflags((next() & 0xCD5) | 2);
        if i % 2 == 1 {
            a.seg[SegReg::Cs as usize] = Segment::code64(0x33, 3);
            a.seg[SegReg::Ss as usize] = Segment::data(0x2B, 3);
            a.gpr[4] = 0x3_1800;
        } else {
            a.seg[SegReg::Cs as usize] = Segment::code64(0x10, 0);
            a.seg[SegReg::Ss as usize] = Segment::data(0x18, 0);
        }
        a.halted = false;
        a.rip = at as u64;
        let e = g.cpu.run(&g.ram, &mut TestPlatform::default(), 2_000);
        let slot = match e {
            Exit::Halted { .. } => 0,
            Exit::BudgetExhausted => 1,
            Exit::Shutdown(_) => 2,
            Exit::Stop(_) => 3,
        };
        exits[slot] += 1;
        // Random code may have rewritten the tables; rebuild the environment.
        if i % 64 == 63 || slot == 2 {
            g = Guest::new();
        }
    }
    eprintln!("random code exits (halted, budget, shutdown, stop): {exits:?}");
    assert!(exits[0] > 0);
}
