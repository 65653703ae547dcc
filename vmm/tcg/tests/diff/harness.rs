//! Differential-test harness: runs instruction bytes natively on the host CPU (through a
//! trampoline in an RWX page at a fixed address) and in the TCG with the same register, flag,
//! MXCSR, XMM, stack and memory state. Faults are compared too: on the host a signal handler
//! records the exception vector (`REG_TRAPNO`), error code, RIP and CR2 from the signal
//! context and resumes in the trampoline's epilogue; in the TCG every IDT vector leads to a
//! `hlt` stub and the exception frame is read back from the stack.

use rqemu_tcg::flags;
use rqemu_tcg::state::{cr0, cr4, efer, DescTable, SegReg, Segment};
use rqemu_tcg::{Cpu, Exit, GuestRam, Platform, RamRegion};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

/// Address of the data buffer, identical in the host process and in guest-physical memory.
pub const DATA: u64 = 0x5000_0000;
/// Size of the data buffer.
pub const DATA_LEN: usize = 0x1_0000;
/// Default RSP of a case: the stack lives in the data buffer, so pushes are compared.
pub const STACK: u64 = DATA + 0xF000;
/// Address of the code page (host mapping and guest-physical page alike), so RIP-relative
/// operands, return addresses and fault RIPs agree. Within ±2 GiB of [`DATA`].
pub const EXEC: u64 = 0x5100_0000;
const EXEC_LEN: usize = 0x2000;
/// An address unmapped on both sides: a PROT_NONE reservation on the host, beyond the 4 GiB
/// identity map in the TCG (page fault on access).
pub const UNMAPPED: u64 = 0x7_0000_0000;
const LOW_LEN: usize = 0x20_0000;
const HANDLERS: u64 = 0x2_0000;

/// Register file exchanged with the trampoline (layout used by its machine code).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct State {
    pub gpr: [u64; 16],
    pub rflags: u64,
    pub mxcsr: u32,
    pub _pad: u32,
    pub xmm: [u128; 16],
    /// Bits 255:128 of YMM0-15 (loaded and stored on the host only when it has AVX).
    pub ymmh: [u128; 16],
}

impl Default for State {
    fn default() -> Self {
        let mut gpr = [0; 16];
        gpr[4] = STACK;
        State {
            gpr,
            rflags: 2,
            mxcsr: 0x1F80,
            _pad: 0,
            xmm: [0; 16],
            ymmh: [0; 16],
        }
    }
}

// Trampoline (source: tests/diff/trampoline.s): saves the callee-saved registers and the
// host MXCSR, records the host RSP at EXEC+0x1ff0, loads MXCSR, RFLAGS, XMM0-15 and all GPRs
// (RSP included) from the State at RDI, runs the test bytes; POST records the test RSP,
// switches back to the host stack, stores everything into the State and returns.
const PRE: &[u8] = &[
    0x53, 0x55, 0x41, 0x54, 0x41, 0x55, 0x41, 0x56, 0x41, 0x57, 0x48, 0x83, 0xec, 0x08, 0x0f, 0xae,
    0x1c, 0x24, 0x57, 0x48, 0x89, 0x24, 0x25, 0xf0, 0x1f, 0x00, 0x51, 0x0f, 0xae, 0x97, 0x88, 0x00,
    0x00, 0x00, 0xff, 0xb7, 0x80, 0x00, 0x00, 0x00, 0x9d, 0xf3, 0x0f, 0x6f, 0x87, 0x90, 0x00, 0x00,
    0x00, 0xf3, 0x0f, 0x6f, 0x8f, 0xa0, 0x00, 0x00, 0x00, 0xf3, 0x0f, 0x6f, 0x97, 0xb0, 0x00, 0x00,
    0x00, 0xf3, 0x0f, 0x6f, 0x9f, 0xc0, 0x00, 0x00, 0x00, 0xf3, 0x0f, 0x6f, 0xa7, 0xd0, 0x00, 0x00,
    0x00, 0xf3, 0x0f, 0x6f, 0xaf, 0xe0, 0x00, 0x00, 0x00, 0xf3, 0x0f, 0x6f, 0xb7, 0xf0, 0x00, 0x00,
    0x00, 0xf3, 0x0f, 0x6f, 0xbf, 0x00, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f, 0x6f, 0x87, 0x10, 0x01,
    0x00, 0x00, 0xf3, 0x44, 0x0f, 0x6f, 0x8f, 0x20, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f, 0x6f, 0x97,
    0x30, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f, 0x6f, 0x9f, 0x40, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f,
    0x6f, 0xa7, 0x50, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f, 0x6f, 0xaf, 0x60, 0x01, 0x00, 0x00, 0xf3,
    0x44, 0x0f, 0x6f, 0xb7, 0x70, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f, 0x6f, 0xbf, 0x80, 0x01, 0x00,
    0x00, 0x48, 0x8b, 0x07, 0x48, 0x8b, 0x4f, 0x08, 0x48, 0x8b, 0x57, 0x10, 0x48, 0x8b, 0x5f, 0x18,
    0x48, 0x8b, 0x6f, 0x28, 0x48, 0x8b, 0x77, 0x30, 0x4c, 0x8b, 0x47, 0x40, 0x4c, 0x8b, 0x4f, 0x48,
    0x4c, 0x8b, 0x57, 0x50, 0x4c, 0x8b, 0x5f, 0x58, 0x4c, 0x8b, 0x67, 0x60, 0x4c, 0x8b, 0x6f, 0x68,
    0x4c, 0x8b, 0x77, 0x70, 0x4c, 0x8b, 0x7f, 0x78, 0x48, 0x8b, 0x67, 0x20, 0x48, 0x8b, 0x7f, 0x38,
];
const POST: &[u8] = &[
    0x48, 0x89, 0x24, 0x25, 0xf8, 0x1f, 0x00, 0x51, 0x48, 0x8b, 0x24, 0x25, 0xf0, 0x1f, 0x00, 0x51,
    0x48, 0x87, 0x3c, 0x24, 0xf3, 0x0f, 0x7f, 0x87, 0x90, 0x00, 0x00, 0x00, 0xf3, 0x0f, 0x7f, 0x8f,
    0xa0, 0x00, 0x00, 0x00, 0xf3, 0x0f, 0x7f, 0x97, 0xb0, 0x00, 0x00, 0x00, 0xf3, 0x0f, 0x7f, 0x9f,
    0xc0, 0x00, 0x00, 0x00, 0xf3, 0x0f, 0x7f, 0xa7, 0xd0, 0x00, 0x00, 0x00, 0xf3, 0x0f, 0x7f, 0xaf,
    0xe0, 0x00, 0x00, 0x00, 0xf3, 0x0f, 0x7f, 0xb7, 0xf0, 0x00, 0x00, 0x00, 0xf3, 0x0f, 0x7f, 0xbf,
    0x00, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f, 0x7f, 0x87, 0x10, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f,
    0x7f, 0x8f, 0x20, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f, 0x7f, 0x97, 0x30, 0x01, 0x00, 0x00, 0xf3,
    0x44, 0x0f, 0x7f, 0x9f, 0x40, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f, 0x7f, 0xa7, 0x50, 0x01, 0x00,
    0x00, 0xf3, 0x44, 0x0f, 0x7f, 0xaf, 0x60, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f, 0x7f, 0xb7, 0x70,
    0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f, 0x7f, 0xbf, 0x80, 0x01, 0x00, 0x00, 0x48, 0x89, 0x07, 0x48,
    0x89, 0x4f, 0x08, 0x48, 0x89, 0x57, 0x10, 0x48, 0x89, 0x5f, 0x18, 0x48, 0x89, 0x6f, 0x28, 0x48,
    0x89, 0x77, 0x30, 0x4c, 0x89, 0x47, 0x40, 0x4c, 0x89, 0x4f, 0x48, 0x4c, 0x89, 0x57, 0x50, 0x4c,
    0x89, 0x5f, 0x58, 0x4c, 0x89, 0x67, 0x60, 0x4c, 0x89, 0x6f, 0x68, 0x4c, 0x89, 0x77, 0x70, 0x4c,
    0x89, 0x7f, 0x78, 0x9c, 0x8f, 0x87, 0x80, 0x00, 0x00, 0x00, 0x8f, 0x47, 0x38, 0x48, 0x8b, 0x04,
    0x25, 0xf8, 0x1f, 0x00, 0x51, 0x48, 0x89, 0x47, 0x20, 0x0f, 0xae, 0x9f, 0x88, 0x00, 0x00, 0x00,
    0x0f, 0xae, 0x14, 0x24, 0x48, 0x83, 0xc4, 0x08, 0x41, 0x5f, 0x41, 0x5e, 0x41, 0x5d, 0x41, 0x5c,
    0x5d, 0x5b, 0xfc, 0xc3,
];

/// Whether the host has AVX: the trampoline then also loads and stores the YMM upper halves
/// (`State::ymmh`, at 0x190).
pub fn host_avx() -> bool {
    std::arch::is_x86_feature_detected!("avx")
}

/// `vinsertf128 ymmI, ymmI, [rdi+0x190+16*I], 1` (load) or `vextractf128
/// [rdi+0x190+16*I], ymmI, 1` (store) for I = 0..16.
fn ymmh_moves(store: bool) -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..16u8 {
        let r = if i < 8 { 0x80 } else { 0 };
        let vvvv = if store { 15 } else { !i & 15 };
        v.extend([
            0xC4,
            r | 0x63,
            (vvvv << 3) | 0x05,
            if store { 0x19 } else { 0x18 },
        ]);
        v.push(0x80 | ((i & 7) << 3) | 7);
        v.extend((0x190u32 + 16 * u32::from(i)).to_le_bytes());
        v.push(1);
    }
    v
}

/// The trampoline halves for this host: PRE and POST, plus the YMM upper-half moves when the
/// host has AVX (after the XMM loads, and right after POST's `xchg rdi, [rsp]`).
fn trampoline() -> &'static (Vec<u8>, Vec<u8>) {
    static T: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        if !host_avx() {
            return (PRE.to_vec(), POST.to_vec());
        }
        // `mov rax, [rdi]` follows the XMM loads.
        let k = PRE
            .windows(3)
            .position(|w| w == [0x48, 0x8b, 0x07])
            .expect("PRE layout");
        let mut pre = PRE[..k].to_vec();
        pre.extend(ymmh_moves(false));
        pre.extend_from_slice(&PRE[k..]);
        let mut post = POST[..20].to_vec();
        post.extend(ymmh_moves(true));
        post.extend_from_slice(&POST[20..]);
        (pre, post)
    })
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Ran to the end of the test bytes.
    Done,
    /// Raised exception `vector` at `rip` (the RIP the exception reports: the faulting
    /// instruction, or the next one for traps such as #BP).
    Fault {
        vector: u8,
        rip: u64,
        err: u64,
        cr2: u64,
    },
}

/// Outcome of running a case in the TCG.
#[derive(Debug, PartialEq, Eq)]
pub enum TcgOutcome {
    /// Ran to the end of the test bytes, or took an exception: state at that point (for a
    /// fault: RSP and RFLAGS from the exception frame) and the bytes of the stack the
    /// exception frame overwrote (`[frame_lo, frame_hi)`, not compared).
    Ran(Box<State>, End, (u64, u64)),
    /// Anything else (a bug).
    Other(String),
}

struct NullPlatform;

impl Platform for NullPlatform {
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

/// Host fault record written by the signal handler: [valid, trapno, err, rip, cr2].
static FAULT: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
/// Range of RIPs (test bytes, inclusive end) the handler may redirect, and where it resumes.
static CODE_LO: AtomicU64 = AtomicU64::new(0);
static CODE_HI: AtomicU64 = AtomicU64::new(0);
static RESUME: AtomicU64 = AtomicU64::new(0);

const SIGNALS: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
];

extern "C" fn on_fault(sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler; only this
    // thread's saved register context is read and modified.
    unsafe {
        let uc = &mut *(ctx as *mut libc::ucontext_t);
        let g = &mut uc.uc_mcontext.gregs;
        let rip = g[libc::REG_RIP as usize] as u64;
        let lo = CODE_LO.load(SeqCst);
        if lo != 0 && (lo..=CODE_HI.load(SeqCst)).contains(&rip) && FAULT[0].load(SeqCst) == 0 {
            FAULT[1].store(g[libc::REG_TRAPNO as usize] as u64, SeqCst);
            FAULT[2].store(g[libc::REG_ERR as usize] as u64, SeqCst);
            FAULT[3].store(rip, SeqCst);
            FAULT[4].store(g[libc::REG_CR2 as usize] as u64, SeqCst);
            FAULT[0].store(1, SeqCst);
            g[libc::REG_RIP as usize] = RESUME.load(SeqCst) as i64;
        } else {
            // Not ours: let the default action happen when the instruction re-executes.
            libc::signal(sig, libc::SIG_DFL);
        }
    }
}

/// Host + TCG execution environment.
pub struct Harness {
    _lock: std::sync::MutexGuard<'static, ()>,
    exec_page: *mut u8,
    data: *mut u8,
    guard: *mut libc::c_void,
    low: Vec<u8>,
    ram: GuestRam,
    cpu: Cpu,
    old_actions: Vec<(libc::c_int, libc::sigaction)>,
    old_altstack: libc::stack_t,
    _altstack: Vec<u8>,
    /// GS base used in the TCG (the host's is set with `set_gs_base`).
    pub gs_base: u64,
    /// The host thread's FS base (TLS), also used in the TCG.
    pub fs_base: u64,
}

fn map_fixed(at: u64, len: usize, prot: libc::c_int) -> *mut u8 {
    // SAFETY: fixed-address anonymous mapping that must not replace anything.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(p as u64, at, "cannot map {len:#x} bytes at {at:#x}");
    p as *mut u8
}

impl Harness {
    /// Maps the RWX code page, the data buffer and the unmapped-address guard at fixed
    /// addresses, installs the fault handlers (on an alternate stack: the test's RSP points
    /// into the compared data buffer); builds guest page tables (1 GiB identity pages), GDT,
    /// IDT with `hlt` stubs per vector.
    pub fn new() -> Harness {
        // The buffers live at fixed addresses: one harness at a time.
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        let exec_page = map_fixed(EXEC, EXEC_LEN, rwx);
        let data = map_fixed(DATA, DATA_LEN, libc::PROT_READ | libc::PROT_WRITE);
        let guard = map_fixed(UNMAPPED, 0x1000, libc::PROT_NONE) as *mut libc::c_void;
        let mut low = vec![0u8; LOW_LEN];
        let regions = vec![
            RamRegion {
                gpa: 0,
                host: low.as_mut_ptr(),
                len: LOW_LEN as u64,
            },
            RamRegion {
                gpa: DATA,
                host: data,
                len: DATA_LEN as u64,
            },
            RamRegion {
                gpa: EXEC,
                host: exec_page,
                len: EXEC_LEN as u64,
            },
        ];
        // SAFETY: `low` (heap, never reallocated), `data` and `exec_page` (unmapped in Drop)
        // outlive `ram`, which lives in the same struct and is only used by `cpu.run`.
        let ram = unsafe { GuestRam::new(regions) }.expect("ram");
        let mut altstack = vec![0u8; 0x10000];
        let new_stack = libc::stack_t {
            ss_sp: altstack.as_mut_ptr() as *mut libc::c_void,
            ss_flags: 0,
            ss_size: altstack.len(),
        };
        // SAFETY: zeroed stack_t is a valid out-parameter.
        let mut old_altstack: libc::stack_t = unsafe { std::mem::zeroed() };
        // SAFETY: the alternate stack is owned by the harness and outlives its use (restored
        // in Drop before it is freed).
        let r = unsafe { libc::sigaltstack(&new_stack, &mut old_altstack) };
        assert_eq!(r, 0, "sigaltstack failed");
        let mut old_actions = Vec::new();
        for sig in SIGNALS {
            // SAFETY: zeroed sigaction is a valid starting point; the handler is an
            // SA_SIGINFO handler with the matching signature.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_fault as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
                libc::sigemptyset(&mut sa.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                assert_eq!(libc::sigaction(sig, &sa, &mut old), 0, "sigaction {sig}");
                old_actions.push((sig, old));
            }
        }
        let mut fs_base = 0u64;
        const ARCH_GET_FS: libc::c_long = 0x1003;
        // SAFETY: arch_prctl(ARCH_GET_FS) writes this thread's FS base into `fs_base`.
        let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_FS, &mut fs_base) };
        assert_eq!(r, 0, "arch_prctl(ARCH_GET_FS) failed");
        let mut h = Harness {
            _lock: lock,
            exec_page,
            data,
            guard,
            low,
            ram,
            cpu: Cpu::new(),
            old_actions,
            old_altstack,
            _altstack: altstack,
            gs_base: 0,
            fs_base,
        };
        h.build_tables();
        // RQEMU_TCG_JIT=1 runs the whole suite with the JIT translating every block on its
        // first run (the host CPU is the reference for the JIT too).
        #[cfg(feature = "jit")]
        if std::env::var("RQEMU_TCG_JIT").is_ok_and(|v| v == "1") {
            h.set_jit(true);
        }
        h
    }

    /// Runs the TCG with the JIT (threshold 0: every block is translated on its first run)
    /// or with the interpreter only.
    #[cfg(feature = "jit")]
    pub fn set_jit(&mut self, on: bool) {
        if on {
            let cfg = rqemu_tcg::JitConfig {
                threshold: 0,
                ..Default::default()
            };
            self.cpu.enable_jit(cfg).expect("JIT for this host");
        } else {
            self.cpu.disable_jit();
        }
    }

    /// Runs the TCG with a JIT configured as `cfg`.
    #[cfg(feature = "jit")]
    pub fn set_jit_config(&mut self, cfg: rqemu_tcg::JitConfig) {
        self.cpu.enable_jit(cfg).expect("JIT for this host");
    }

    /// Installs the translations the JIT's compile thread has in flight (waiting for them).
    #[cfg(feature = "jit")]
    pub fn settle_jit(&mut self) {
        self.cpu.jit_settle();
    }

    /// The CPU (for JIT statistics).
    #[cfg(feature = "jit")]
    pub fn cpu(&self) -> &Cpu {
        &self.cpu
    }

    fn put64(&mut self, at: u64, v: u64) {
        self.low[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn build_tables(&mut self) {
        self.put64(0x1000, 0x2000 | 3);
        for i in 0..4u64 {
            self.put64(0x2000 + 8 * i, (i << 30) | 0x83);
        }
        self.put64(0x3010, 0x00af_9b00_0000_ffff);
        self.put64(0x3018, 0x00cf_9300_0000_ffff);
        for v in 0..32u64 {
            let h = HANDLERS + v * 16;
            self.low[h as usize] = 0xF4; // hlt
            let lo = (h & 0xFFFF) | (0x10 << 16) | (0x8E << 40) | ((h >> 16) & 0xFFFF) << 48;
            self.put64(0x4000 + 16 * v, lo);
            self.put64(0x4008 + 16 * v, h >> 32);
        }
    }

    /// Sets the GS base of this thread on the host (and in the TCG) to `base`.
    pub fn set_gs_base(&mut self, base: u64) {
        const ARCH_SET_GS: libc::c_long = 0x1001;
        // SAFETY: arch_prctl(ARCH_SET_GS) only changes this thread's GS base, which neither
        // Rust nor glibc use on x86-64 Linux (TLS is on FS).
        let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_SET_GS, base) };
        assert_eq!(r, 0, "arch_prctl(ARCH_SET_GS) failed");
        self.gs_base = base;
    }

    /// The data buffer (host view).
    pub fn data(&mut self) -> &mut [u8] {
        // SAFETY: the buffer is mapped for the harness' lifetime and only accessed by this
        // thread (host run and TCG run are sequential).
        unsafe { std::slice::from_raw_parts_mut(self.data, DATA_LEN) }
    }

    /// Address of the first test byte (same on host and TCG).
    pub fn code_addr() -> u64 {
        EXEC + trampoline().0.len() as u64
    }

    fn load_code(&mut self, img: &[u8]) {
        assert!(img.len() < EXEC_LEN - 0x100, "test code too long");
        // SAFETY: the page is RWX and EXEC_LEN bytes long, and is not executing.
        unsafe { std::ptr::copy_nonoverlapping(img.as_ptr(), self.exec_page, img.len()) };
    }

    /// Runs `code` natively: the final state and how it ended.
    pub fn run_host(&mut self, code: &[u8], st: &State) -> (State, End) {
        let (pre, post) = trampoline();
        let mut img = Vec::with_capacity(pre.len() + code.len() + post.len());
        img.extend_from_slice(pre);
        img.extend_from_slice(code);
        img.extend_from_slice(post);
        self.load_code(&img);
        let lo = Self::code_addr();
        CODE_LO.store(lo, SeqCst);
        CODE_HI.store(lo + code.len() as u64, SeqCst);
        RESUME.store(lo + code.len() as u64, SeqCst);
        FAULT[0].store(0, SeqCst);
        let mut out = *st;
        // SAFETY: the page holds a complete trampoline following the C ABI (callee-saved
        // registers, host RSP and MXCSR restored; a fault in the test bytes resumes in POST).
        let f: extern "C" fn(*mut State) = unsafe { std::mem::transmute(self.exec_page) };
        f(&mut out);
        CODE_LO.store(0, SeqCst);
        let end = if FAULT[0].load(SeqCst) != 0 {
            End::Fault {
                vector: FAULT[1].load(SeqCst) as u8,
                rip: FAULT[3].load(SeqCst),
                err: FAULT[2].load(SeqCst),
                cr2: FAULT[4].load(SeqCst),
            }
        } else {
            End::Done
        };
        (out, end)
    }

    fn guest_u64(&self, at: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        if (DATA..DATA + DATA_LEN as u64 - 7).contains(&at) {
            // SAFETY: in bounds of the data mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.data.add((at - DATA) as usize),
                    b.as_mut_ptr(),
                    8,
                )
            };
        } else if at < LOW_LEN as u64 - 7 {
            b.copy_from_slice(&self.low[at as usize..at as usize + 8]);
        } else {
            return None;
        }
        Some(u64::from_le_bytes(b))
    }

    /// Runs `code` in the TCG.
    pub fn run_tcg(&mut self, code: &[u8], st: &State) -> TcgOutcome {
        let mut img = vec![0x90; trampoline().0.len()];
        img.extend_from_slice(code);
        img.push(0xF4);
        self.load_code(&img);
        self.cpu.invalidate_code(EXEC, EXEC_LEN as u64);
        self.rerun_tcg(code, st)
    }

    /// [`Harness::run_tcg`] again on the code it loaded last (`code`), keeping the CPU's
    /// cached blocks and their translations.
    pub fn rerun_tcg(&mut self, code: &[u8], st: &State) -> TcgOutcome {
        let start = Self::code_addr();
        let cpu = &mut self.cpu;
        let a = &mut cpu.arch;
        a.gpr = st.gpr;
        // Host user code always runs with IF=1 (visible through PUSHF).
        a.set_rflags(st.rflags | flags::IF);
        a.xmm = st.xmm;
        a.ymmh = st.ymmh;
        a.mxcsr = st.mxcsr;
        a.rip = start;
        a.halted = false;
        a.seg[SegReg::Cs as usize] = Segment::code64(0x10, 0);
        for s in [SegReg::Ds, SegReg::Es, SegReg::Ss, SegReg::Fs, SegReg::Gs] {
            a.seg[s as usize] = Segment::data(0x18, 0);
        }
        a.seg[SegReg::Gs as usize].base = self.gs_base;
        a.seg[SegReg::Fs as usize].base = self.fs_base;
        a.cr0 = cr0::PE | cr0::ET | cr0::NE | cr0::WP | cr0::PG | cr0::MP;
        a.cr4 = cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT | cr4::OSXSAVE;
        // x87, SSE and AVX enabled in XCR0 (the host has more; tests request these).
        a.xcr0 = 7;
        a.efer = efer::LME | efer::LMA | efer::NXE | efer::SCE;
        a.cr3 = 0x1000;
        a.cr2 = 0;
        a.gdtr = DescTable {
            base: 0x3000,
            limit: 0x1F,
        };
        a.idtr = DescTable {
            base: 0x4000,
            limit: 32 * 16 - 1,
        };
        cpu.state_changed();
        let exit = cpu.run(&self.ram, &mut NullPlatform, 1_000_000);
        let a = &cpu.arch;
        let mut s = State {
            gpr: a.gpr,
            rflags: a.rflags(),
            mxcsr: a.mxcsr,
            _pad: 0,
            xmm: a.xmm,
            ymmh: a.ymmh,
        };
        let (rip, cr2) = (a.rip, a.cr2);
        match exit {
            Exit::Halted { .. } => {
                let at = rip.wrapping_sub(1);
                if at == start + code.len() as u64 {
                    TcgOutcome::Ran(Box::new(s), End::Done, (0, 0))
                } else if (HANDLERS..HANDLERS + 32 * 16).contains(&at) {
                    let vector = ((at - HANDLERS) / 16) as u8;
                    let has_err = matches!(vector, 8 | 10..=14 | 17 | 21);
                    let sp = s.gpr[4];
                    let f = |i: u64| self.guest_u64(sp + 8 * i);
                    let base = u64::from(has_err);
                    let (Some(err), Some(frip), Some(fl), Some(frsp)) =
                        (f(0), f(base), f(base + 2), f(base + 3))
                    else {
                        return TcgOutcome::Other(format!("exception frame at {sp:#x} unreadable"));
                    };
                    s.gpr[4] = frsp;
                    s.rflags = fl;
                    let end = End::Fault {
                        vector,
                        rip: frip,
                        err: if has_err { err } else { 0 },
                        cr2,
                    };
                    TcgOutcome::Ran(Box::new(s), end, (sp, frsp))
                } else {
                    TcgOutcome::Other(format!("halted at unexpected rip {rip:#x}"))
                }
            }
            other => TcgOutcome::Other(format!("{other:?} at rip {rip:#x}")),
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // SAFETY: restoring the previous signal actions and alternate stack, then unmapping
        // the mappings created in `new`; no references remain.
        unsafe {
            for (sig, old) in &self.old_actions {
                libc::sigaction(*sig, old, std::ptr::null_mut());
            }
            libc::sigaltstack(&self.old_altstack, std::ptr::null_mut());
            libc::munmap(self.exec_page as *mut libc::c_void, EXEC_LEN);
            libc::munmap(self.data as *mut libc::c_void, DATA_LEN);
            libc::munmap(self.guard, 0x1000);
        }
    }
}

/// [`Case::expect`] value accepting any outcome (the host's is compared with the TCG's).
pub const ANY: Option<u8> = Some(u8::MAX);

/// One differential case.
pub struct Case {
    pub code: Vec<u8>,
    pub st: State,
    /// Flags compared (undefined ones masked out).
    pub flag_mask: u64,
    /// Compare XMM registers.
    pub xmm: bool,
    /// Seed of the initial data buffer contents.
    pub data_seed: u64,
    /// The exception vector the case must raise on the host (None: it must complete; [`ANY`]:
    /// either). A case whose host run does not match is a generator bug and fails.
    pub expect: Option<u8>,
}

/// Runs a case on both and returns a description of the first mismatch, or how it ended.
pub fn check(h: &mut Harness, c: &Case) -> Result<End, String> {
    let pattern = pattern(c.data_seed);
    h.data().copy_from_slice(&pattern);
    let (host, mut host_end) = h.run_host(&c.code, &c.st);
    if let End::Fault { vector, rip, .. } = &mut host_end {
        *rip = super::host_quirks::icebp_rip(*vector, *rip, &c.code, Harness::code_addr());
    }
    let host_data = h.data().to_vec();
    h.data().copy_from_slice(&pattern);
    let what = || {
        format!(
            "code {:02x?} in {:x?} flags {:#x} mxcsr {:#x}:",
            c.code, c.st.gpr, c.st.rflags, c.st.mxcsr
        )
    };
    let host_vector = match host_end {
        End::Done => None,
        End::Fault { vector, .. } => Some(vector),
    };
    if c.expect != ANY && host_vector != c.expect {
        return Err(format!(
            "{} host ended {host_end:x?}, the case expects {:?}",
            what(),
            c.expect
        ));
    }
    let (tcg, tcg_end, (skip_lo, skip_hi)) = match h.run_tcg(&c.code, &c.st) {
        TcgOutcome::Ran(s, e, skip) => (*s, e, skip),
        other => return Err(format!("{} TCG {other:?}, host {host_end:x?}", what())),
    };
    let mut err = String::new();
    match (host_end, tcg_end) {
        (End::Done, End::Done) => {}
        (
            End::Fault {
                vector: hv,
                rip: hr,
                err: he,
                cr2: hc,
            },
            End::Fault {
                vector: tv,
                rip: tr,
                err: te,
                cr2: tc,
            },
        ) => {
            if hv != tv || hr != tr {
                err += &format!(" fault: host #{hv} at {hr:#x}, tcg #{tv} at {tr:#x};");
            }
            // Page faults: the host reports a user-mode access (U bit), the TCG runs at CPL 0.
            if hv == 14 && (hc != tc || (he & !4) != te) {
                err += &format!(" #PF: host cr2 {hc:#x} err {he:#x}, tcg cr2 {tc:#x} err {te:#x};");
            }
            if matches!(hv, 12 | 13) && he != te {
                err += &format!(" error code: host {he:#x} tcg {te:#x};");
            }
        }
        (h, t) => err += &format!(" host {h:x?}, tcg {t:x?};"),
    }
    for i in 0..16 {
        if host.gpr[i] != tcg.gpr[i] {
            err += &format!(" r{i}: host {:#x} tcg {:#x};", host.gpr[i], tcg.gpr[i]);
        }
    }
    let m = c.flag_mask;
    if host.rflags & m != tcg.rflags & m {
        err += &format!(
            " flags(mask {m:#x}): host {:#x} tcg {:#x};",
            host.rflags & m,
            tcg.rflags & m
        );
    }
    if host.mxcsr != tcg.mxcsr {
        err += &format!(" mxcsr: host {:#x} tcg {:#x};", host.mxcsr, tcg.mxcsr);
    }
    if c.xmm && host.xmm != tcg.xmm {
        for i in 0..16 {
            if host.xmm[i] != tcg.xmm[i] {
                err += &format!(" xmm{i}: host {:#x} tcg {:#x};", host.xmm[i], tcg.xmm[i]);
            }
        }
    }
    if c.xmm && host.ymmh != tcg.ymmh {
        for i in 0..16 {
            if host.ymmh[i] != tcg.ymmh[i] {
                err += &format!(
                    " ymm{i}[255:128]: host {:#x} tcg {:#x};",
                    host.ymmh[i], tcg.ymmh[i]
                );
            }
        }
    }
    // The TCG's exception frame (and alignment gap) is not part of the host's state.
    let skip = |i: usize| (skip_lo..skip_hi).contains(&(DATA + i as u64));
    let tcg_data = h.data();
    let differs = host_data[..] != tcg_data[..];
    if let Some(p) = (0..DATA_LEN)
        .filter(|_| differs)
        .find(|&i| host_data[i] != tcg_data[i] && !skip(i))
    {
        err += &format!(
            " memory differs at +{p:#x}: host {:#x} tcg {:#x};",
            host_data[p], tcg_data[p]
        );
    }
    if err.is_empty() {
        Ok(host_end)
    } else {
        Err(format!("{} host {host_end:x?}:{err}", what()))
    }
}

/// The deterministic initial contents of the data buffer for `seed` (cached).
fn pattern(seed: u64) -> std::sync::Arc<Vec<u8>> {
    use std::sync::{Arc, Mutex};
    static CACHE: Mutex<Vec<(u64, Arc<Vec<u8>>)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = cache.iter().find(|(s, _)| *s == seed) {
        return p.clone();
    }
    let mut buf = vec![0u8; DATA_LEN];
    let mut r = Rng(seed | 1);
    for chunk in buf.chunks_mut(8) {
        let v = r.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let p = Arc::new(buf);
    cache.push((seed, p.clone()));
    p
}

/// Small seeded PRNG (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// An "interesting" operand value.
    pub fn value(&mut self) -> u64 {
        const SPECIAL: [u64; 16] = [
            0,
            1,
            2,
            u64::MAX,
            0x7F,
            0x80,
            0xFF,
            0x7FFF,
            0x8000,
            0xFFFF,
            0x7FFF_FFFF,
            0x8000_0000,
            0xFFFF_FFFF,
            i64::MAX as u64,
            i64::MIN as u64,
            0x1_0000_0000,
        ];
        match self.below(4) {
            0 => SPECIAL[self.below(16) as usize],
            1 => self.below(256),
            2 => self.next() | if self.below(2) == 0 { 1 << 63 } else { 0 },
            _ => self.next(),
        }
    }
    /// Random arithmetic flags (plus bit 1).
    pub fn flags(&mut self) -> u64 {
        (self.next() & flags::ARITH) | 2
    }
}

/// Random register file with interesting values; RSP is [`STACK`], MXCSR the default.
pub fn random_state(r: &mut Rng) -> State {
    let mut st = State::default();
    for i in 0..16 {
        st.gpr[i] = r.value();
    }
    st.gpr[4] = STACK;
    st.rflags = r.flags();
    for x in st.xmm.iter_mut() {
        *x = (u128::from(r.value()) << 64) | u128::from(r.value());
    }
    st
}
