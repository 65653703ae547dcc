//! Two `Cpu`s on two host threads over the same guest RAM: LOCKed read-modify-writes
//! (ADD, XADD, CMPXCHG, CMPXCHG16B, INC, BTS/BTR) and XCHG must be atomic against each other,
//! so every counter they update ends exact. A plain `inc` counter is printed to show the race
//! the test would see without host atomics (it is not asserted: it may or may not lose
//! updates on a given run).

use rqemu_tcg::{Cpu, Exit, GuestRam, Platform, RamRegion};

const RAM: usize = 0x20_0000;
const CODE: u64 = 0x1_0000;
const DATA: u32 = 0x10_0000;
const ITERS: u32 = 100_000;

/// No devices, no interrupts.
struct Quiet;

impl Platform for Quiet {
    fn mmio_read(&mut self, _: u64, d: &mut [u8]) {
        d.fill(0xFF)
    }
    fn mmio_write(&mut self, _: u64, _: &[u8]) {}
    fn pio_read(&mut self, _: u16, d: &mut [u8]) {
        d.fill(0xFF)
    }
    fn pio_write(&mut self, _: u16, _: &[u8]) {}
    fn interrupt_pending(&mut self) -> bool {
        false
    }
    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        None
    }
}

/// `[disp32]` absolute addressing: ModRM with `reg`, SIB without base or index.
fn abs(code: &mut Vec<u8>, reg: u8, addr: u32) {
    code.push((reg << 3) | 4);
    code.push(0x25);
    code.extend(addr.to_le_bytes());
}

/// `jne rel32` back to `target`.
fn jne(code: &mut Vec<u8>, target: usize) {
    let rel = target as i64 - (code.len() as i64 + 6);
    code.extend([0x0F, 0x85]);
    code.extend((rel as i32).to_le_bytes());
}

/// The loop every vCPU runs `ITERS` times, then HLT. Counters at DATA + 8 * k.
fn program() -> Vec<u8> {
    let d = |k: u32| DATA + 8 * k;
    let mut c = vec![0xBE];
    c.extend(ITERS.to_le_bytes()); // mov esi, ITERS
    let top = c.len();
    c.extend([0xF0, 0x48, 0x83]); // lock add qword [d0], 1
    abs(&mut c, 0, d(0));
    c.push(1);
    c.extend([0xB8, 1, 0, 0, 0, 0xF0, 0x48, 0x0F, 0xC1]); // mov eax, 1; lock xadd [d1], rax
    abs(&mut c, 0, d(1));
    let cas = c.len();
    c.extend([0x48, 0x8B]); // mov rax, [d2]
    abs(&mut c, 0, d(2));
    c.extend([0x48, 0x8D, 0x50, 0x01, 0xF0, 0x48, 0x0F, 0xB1]); // lea rdx,[rax+1]; lock cmpxchg [d2], rdx
    abs(&mut c, 2, d(2));
    jne(&mut c, cas);
    c.extend([0x48, 0xFF]); // inc qword [d3] (plain: may lose updates)
    abs(&mut c, 0, d(3));
    c.extend([0xF0, 0xFF]); // lock inc dword [d4]
    abs(&mut c, 0, d(4));
    // Spinlock with XCHG around a plain increment of d6, released by a plain store.
    let spin = c.len();
    c.extend([0xB8, 1, 0, 0, 0, 0x87]); // mov eax, 1; xchg [d5], eax
    abs(&mut c, 0, d(5));
    c.extend([0x85, 0xC0]); // test eax, eax
    jne(&mut c, spin);
    c.extend([0x48, 0xFF]); // inc qword [d6]
    abs(&mut c, 0, d(6));
    c.push(0xC7); // mov dword [d5], 0
    abs(&mut c, 0, d(5));
    c.extend(0u32.to_le_bytes());
    // CMPXCHG16B: both halves of the 16-byte pair at d8 count.
    c.extend([0x48, 0x8B]); // mov rax, [d8]
    abs(&mut c, 0, d(8));
    c.extend([0x48, 0x8B]); // mov rdx, [d9]
    abs(&mut c, 2, d(9));
    let wide = c.len();
    c.extend([0x48, 0x8D, 0x58, 0x01]); // lea rbx, [rax+1]
    c.extend([0x48, 0x8D, 0x4A, 0x02]); // lea rcx, [rdx+2]
    c.extend([0xF0, 0x48, 0x0F, 0xC7]); // lock cmpxchg16b [d8]
    abs(&mut c, 1, d(8));
    jne(&mut c, wide);
    // BTS/BTR: a bit lock on bit 3 of d10 around a plain increment of d11.
    let bit = c.len();
    c.extend([0xF0, 0x48, 0x0F, 0xBA]); // lock bts qword [d10], 3
    abs(&mut c, 5, d(10));
    c.push(3);
    c.extend([0x0F, 0x82]); // jb bit (CF = bit was set)
    let rel = bit as i64 - (c.len() as i64 + 4);
    c.extend((rel as i32).to_le_bytes());
    c.extend([0x48, 0xFF]); // inc qword [d11]
    abs(&mut c, 0, d(11));
    c.extend([0xF0, 0x48, 0x0F, 0xBA]); // lock btr qword [d10], 3
    abs(&mut c, 6, d(10));
    c.push(3);
    c.extend([0xFF, 0xCE]); // dec esi
    jne(&mut c, top);
    c.push(0xF4); // hlt
    c
}

fn run_two(jit: bool) -> Vec<u64> {
    let mut mem = vec![0u8; RAM];
    let w64 = |m: &mut Vec<u8>, at: usize, v: u64| m[at..at + 8].copy_from_slice(&v.to_le_bytes());
    // Identity map of the first 2 MiB with one large page.
    w64(&mut mem, 0x1000, 0x2000 | 3);
    w64(&mut mem, 0x2000, 0x3000 | 3);
    w64(&mut mem, 0x3000, 0x83);
    let p = program();
    mem[CODE as usize..CODE as usize + p.len()].copy_from_slice(&p);
    let r = RamRegion {
        gpa: 0,
        host: mem.as_mut_ptr(),
        len: RAM as u64,
    };
    // SAFETY: `mem` is not touched (nor moved) until both threads finished with `ram`.
    let ram = unsafe { GuestRam::new(vec![r]) }.unwrap();
    std::thread::scope(|s| {
        for _ in 0..threads() {
            let ram = &ram;
            s.spawn(move || {
                let mut cpu = Cpu::new();
                #[cfg(feature = "jit")]
                if jit {
                    let cfg = rqemu_tcg::JitConfig {
                        threshold: 2,
                        smp: true,
                        ..Default::default()
                    };
                    cpu.enable_jit(cfg).expect("JIT");
                }
                #[cfg(not(feature = "jit"))]
                let _ = jit;
                cpu.arch.set_linux_boot_state(CODE, 0, 0x1000, 0x5000);
                cpu.state_changed();
                loop {
                    match cpu.run(ram, &mut Quiet, 10_000_000) {
                        Exit::BudgetExhausted => {
                            if std::env::var("SMP_DEBUG").is_ok() {
                                eprintln!("rip {:#x} icount {}", cpu.arch.rip, cpu.icount);
                            }
                        }
                        Exit::Halted { .. } => break,
                        x => panic!("unexpected exit {x:?}"),
                    }
                }
            });
        }
    });
    drop(ram);
    (0..12)
        .map(|k| {
            let a = (DATA + 8 * k) as usize;
            u64::from_le_bytes(mem[a..a + 8].try_into().unwrap())
        })
        .collect()
}

fn check(v: &[u64]) {
    let n = 2 * u64::from(ITERS);
    println!(
        "lock add {} xadd {} cmpxchg {} plain inc {} (of {n}) lock inc {} xchg-lock {} \
         cmpxchg16b {}/{} bts-lock {}",
        v[0], v[1], v[2], v[3], v[4], v[6], v[8], v[9], v[11]
    );
    assert_eq!(v[0], n, "lock add");
    assert_eq!(v[1], n, "lock xadd");
    assert_eq!(v[2], n, "lock cmpxchg");
    assert_eq!(v[4], n, "lock inc");
    assert_eq!(v[5], 0, "xchg lock released");
    assert_eq!(v[6], n, "counter under the xchg lock");
    assert_eq!((v[8], v[9]), (n, 2 * n), "lock cmpxchg16b");
    assert_eq!(v[10], 0, "bit lock released");
    assert_eq!(v[11], n, "counter under the bts lock");
}

#[test]
fn locked_ops_are_atomic_across_two_interpreted_cpus() {
    check(&run_two(false));
}

#[cfg(feature = "jit")]
#[test]
fn locked_ops_are_atomic_across_two_jit_cpus() {
    check(&run_two(true));
}

fn threads() -> usize {
    std::env::var("SMP_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

/// CPU B spins on `mov rax, 0; test rax, rax; je` at page 0x20000 until CPU A (another `Cpu`
/// sharing the code-page masks) patches the immediate to 1. A wrote to B's page once before
/// B translated it (so A held a write-TLB entry for it), then patches it after: B must see the
/// new code, also when its loop is translated and chained to itself.
fn cross_cpu_smc(jit: bool) {
    use std::sync::Arc;
    let mut mem = vec![0u8; RAM];
    let put = |m: &mut Vec<u8>, at: usize, b: &[u8]| m[at..at + b.len()].copy_from_slice(b);
    put(&mut mem, 0x1000, &(0x2000u64 | 3).to_le_bytes());
    put(&mut mem, 0x2000, &(0x3000u64 | 3).to_le_bytes());
    put(&mut mem, 0x3000, &0x83u64.to_le_bytes());
    let mut b = vec![0x48, 0xB8];
    b.extend(0u64.to_le_bytes());
    b.extend([0x48, 0x85, 0xC0, 0x74, 0xF1, 0x48, 0x89, 0x04, 0x25]);
    b.extend(DATA.to_le_bytes());
    b.push(0xF4);
    put(&mut mem, 0x2_0000, &b);
    let mut a = vec![0xC6, 0x04, 0x25];
    a.extend(0x2_0800u32.to_le_bytes());
    a.extend([1, 0xF4, 0xC6, 0x04, 0x25]);
    a.extend(0x2_0002u32.to_le_bytes());
    a.extend([1, 0xF4]);
    put(&mut mem, 0x3_0000, &a);
    let r = RamRegion {
        gpa: 0,
        host: mem.as_mut_ptr(),
        len: RAM as u64,
    };
    // SAFETY: `mem` outlives `ram` and is not touched while the CPUs run.
    let ram = unsafe { GuestRam::new(vec![r]) }.unwrap();
    let shared = Arc::new(rqemu_tcg::memory::SharedCode::new(RAM as u64, 2));
    let mut cpus: Vec<Cpu> = (0..2).map(|_| Cpu::new()).collect();
    for (i, (cpu, entry)) in cpus.iter_mut().zip([0x3_0000, 0x2_0000]).enumerate() {
        cpu.share_code(shared.clone(), i as u8);
        #[cfg(feature = "jit")]
        if jit && i == 1 {
            let cfg = rqemu_tcg::JitConfig {
                threshold: 2,
                smp: true,
                ..Default::default()
            };
            cpu.enable_jit(cfg).expect("JIT");
        }
        cpu.arch.set_linux_boot_state(entry, 0, 0x1000, 0x5000);
        cpu.state_changed();
    }
    #[cfg(not(feature = "jit"))]
    let _ = jit;
    let (ca, cb) = cpus.split_at_mut(1);
    let (ca, cb) = (&mut ca[0], &mut cb[0]);
    assert!(matches!(
        ca.run(&ram, &mut Quiet, 1000),
        Exit::Halted { .. }
    ));
    assert!(matches!(
        cb.run(&ram, &mut Quiet, 100_000),
        Exit::BudgetExhausted
    ));
    ca.arch.halted = false;
    assert!(matches!(
        ca.run(&ram, &mut Quiet, 1000),
        Exit::Halted { .. }
    ));
    let out = cb.run(&ram, &mut Quiet, 100_000);
    drop(ram);
    assert!(
        matches!(out, Exit::Halted { .. }),
        "CPU B still runs the old code: {out:?}"
    );
    assert_eq!(mem[DATA as usize], 1, "CPU B stored the patched immediate");
}

#[test]
fn code_patched_by_one_cpu_is_seen_by_the_other() {
    cross_cpu_smc(false);
}

#[cfg(feature = "jit")]
#[test]
fn code_patched_by_one_cpu_is_seen_by_translated_code_of_the_other() {
    cross_cpu_smc(true);
}
