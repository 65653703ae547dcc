//! Differential-test harness: runs instruction bytes natively on the host CPU (through a
//! trampoline in an RWX page) and in the TCG with the same register/flag/XMM/memory state.

use rqemu_tcg::flags;
use rqemu_tcg::state::{cr0, cr4, efer, DescTable, SegReg, Segment};
use rqemu_tcg::{Cpu, Exit, GuestRam, Platform, RamRegion};

/// Address of the data buffer, identical in the host process and in guest-physical memory.
pub const DATA: u64 = 0x5000_0000;
/// Size of the data buffer.
pub const DATA_LEN: usize = 0x1_0000;
const LOW_LEN: usize = 0x20_0000;
const CODE: u64 = 0x1_0000;
const HANDLERS: u64 = 0x2_0000;

/// Register file exchanged with the trampoline (layout used by its machine code).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct State {
    pub gpr: [u64; 16],
    pub rflags: u64,
    pub _pad: u64,
    pub xmm: [u128; 16],
}

impl Default for State {
    fn default() -> Self {
        State {
            gpr: [0; 16],
            rflags: 2,
            _pad: 0,
            xmm: [0; 16],
        }
    }
}

// Trampoline: saves callee-saved registers, loads RFLAGS, XMM0-15 and all GPRs but RSP from
// the State at RDI, runs the test bytes, stores everything back, restores and returns.
// (Assembled from intel-syntax source with GNU as; see tests/diff/README in the report.)
const PRE: &[u8] = &[
    0x53, 0x55, 0x41, 0x54, 0x41, 0x55, 0x41, 0x56, 0x41, 0x57, 0x57, 0xff, 0xb7, 0x80, 0x00, 0x00,
    0x00, 0x9d, 0xf3, 0x0f, 0x6f, 0x87, 0x90, 0x00, 0x00, 0x00, 0xf3, 0x0f, 0x6f, 0x8f, 0xa0, 0x00,
    0x00, 0x00, 0xf3, 0x0f, 0x6f, 0x97, 0xb0, 0x00, 0x00, 0x00, 0xf3, 0x0f, 0x6f, 0x9f, 0xc0, 0x00,
    0x00, 0x00, 0xf3, 0x0f, 0x6f, 0xa7, 0xd0, 0x00, 0x00, 0x00, 0xf3, 0x0f, 0x6f, 0xaf, 0xe0, 0x00,
    0x00, 0x00, 0xf3, 0x0f, 0x6f, 0xb7, 0xf0, 0x00, 0x00, 0x00, 0xf3, 0x0f, 0x6f, 0xbf, 0x00, 0x01,
    0x00, 0x00, 0xf3, 0x44, 0x0f, 0x6f, 0x87, 0x10, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f, 0x6f, 0x8f,
    0x20, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f, 0x6f, 0x97, 0x30, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f,
    0x6f, 0x9f, 0x40, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f, 0x6f, 0xa7, 0x50, 0x01, 0x00, 0x00, 0xf3,
    0x44, 0x0f, 0x6f, 0xaf, 0x60, 0x01, 0x00, 0x00, 0xf3, 0x44, 0x0f, 0x6f, 0xb7, 0x70, 0x01, 0x00,
    0x00, 0xf3, 0x44, 0x0f, 0x6f, 0xbf, 0x80, 0x01, 0x00, 0x00, 0x48, 0x8b, 0x07, 0x48, 0x8b, 0x4f,
    0x08, 0x48, 0x8b, 0x57, 0x10, 0x48, 0x8b, 0x5f, 0x18, 0x48, 0x8b, 0x6f, 0x28, 0x48, 0x8b, 0x77,
    0x30, 0x4c, 0x8b, 0x47, 0x40, 0x4c, 0x8b, 0x4f, 0x48, 0x4c, 0x8b, 0x57, 0x50, 0x4c, 0x8b, 0x5f,
    0x58, 0x4c, 0x8b, 0x67, 0x60, 0x4c, 0x8b, 0x6f, 0x68, 0x4c, 0x8b, 0x77, 0x70, 0x4c, 0x8b, 0x7f,
    0x78, 0x48, 0x8b, 0x7f, 0x38,
];
const POST: &[u8] = &[
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
    0x89, 0x7f, 0x78, 0x9c, 0x8f, 0x87, 0x80, 0x00, 0x00, 0x00, 0x8f, 0x47, 0x38, 0x41, 0x5f, 0x41,
    0x5e, 0x41, 0x5d, 0x41, 0x5c, 0x5d, 0x5b, 0xfc, 0xc3,
];

/// Outcome of running a case in the TCG.
#[derive(Debug, PartialEq, Eq)]
pub enum TcgOutcome {
    /// Ran to the end of the test bytes.
    Done(Box<State>),
    /// Raised exception `vector`.
    Exception(u8),
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

/// Host + TCG execution environment.
pub struct Harness {
    _lock: std::sync::MutexGuard<'static, ()>,
    exec_page: *mut u8,
    data: *mut u8,
    low: Vec<u8>,
    ram: GuestRam,
    cpu: Cpu,
    /// GS base used in the TCG (the host's is set with `set_host_gs_base`).
    pub gs_base: u64,
}

impl Harness {
    /// Maps the RWX trampoline page and the fixed-address data buffer; builds guest page
    /// tables (1 GiB identity pages), GDT, IDT with `hlt` stubs per vector.
    pub fn new() -> Harness {
        // The data buffer lives at a fixed address: one harness at a time.
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: plain anonymous mappings; results checked.
        let exec_page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                0x2000,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(
            exec_page,
            libc::MAP_FAILED,
            "cannot map an RWX page for the trampoline"
        );
        // SAFETY: fixed-address anonymous mapping that must not replace anything.
        let data = unsafe {
            libc::mmap(
                DATA as *mut libc::c_void,
                DATA_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        assert_eq!(data as u64, DATA, "cannot map the data buffer at {DATA:#x}");
        let mut low = vec![0u8; LOW_LEN];
        let regions = vec![
            RamRegion {
                gpa: 0,
                host: low.as_mut_ptr(),
                len: LOW_LEN as u64,
            },
            RamRegion {
                gpa: DATA,
                host: data as *mut u8,
                len: DATA_LEN as u64,
            },
        ];
        // SAFETY: `low` (heap, never reallocated) and `data` (unmapped in Drop) outlive
        // `ram`, which lives in the same struct and is only used by `cpu.run`.
        let ram = unsafe { GuestRam::new(regions) }.expect("ram");
        let mut h = Harness {
            _lock: lock,
            exec_page: exec_page as *mut u8,
            data: data as *mut u8,
            low,
            ram,
            cpu: Cpu::new(),
            gs_base: 0,
        };
        h.build_tables();
        h
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

    /// Runs `code` natively.
    pub fn run_host(&mut self, code: &[u8], st: &State) -> State {
        let mut img = Vec::with_capacity(PRE.len() + code.len() + POST.len());
        img.extend_from_slice(PRE);
        img.extend_from_slice(code);
        img.extend_from_slice(POST);
        assert!(img.len() < 0x2000);
        // SAFETY: the page is RWX, 0x2000 bytes, and not executing while we write it.
        unsafe { std::ptr::copy_nonoverlapping(img.as_ptr(), self.exec_page, img.len()) };
        let mut out = *st;
        // SAFETY: the page holds a complete trampoline following the C ABI
        // (callee-saved registers restored, RSP untouched by the test bytes).
        let f: extern "C" fn(*mut State) = unsafe { std::mem::transmute(self.exec_page) };
        f(&mut out);
        out
    }

    /// Runs `code` in the TCG.
    pub fn run_tcg(&mut self, code: &[u8], st: &State) -> TcgOutcome {
        let c = CODE as usize;
        self.low[c..c + code.len()].copy_from_slice(code);
        self.low[c + code.len()] = 0xF4;
        let cpu = &mut self.cpu;
        cpu.invalidate_code(CODE, 0x1000);
        let a = &mut cpu.arch;
        a.gpr = st.gpr;
        a.gpr[4] = 0x8_0000;
        // Host user code always runs with IF=1 (visible through PUSHF).
        a.set_rflags(st.rflags | flags::IF);
        a.xmm = st.xmm;
        a.rip = CODE;
        a.halted = false;
        a.seg[SegReg::Cs as usize] = Segment::code64(0x10, 0);
        for s in [SegReg::Ds, SegReg::Es, SegReg::Ss, SegReg::Fs, SegReg::Gs] {
            a.seg[s as usize] = Segment::data(0x18, 0);
        }
        a.seg[SegReg::Gs as usize].base = self.gs_base;
        a.cr0 = cr0::PE | cr0::ET | cr0::NE | cr0::WP | cr0::PG;
        a.cr4 = cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT | cr4::OSXSAVE;
        // x87 and SSE enabled in XCR0 (the host has more; tests request these two).
        a.xcr0 = 3;
        a.efer = efer::LME | efer::LMA | efer::NXE | efer::SCE;
        a.cr3 = 0x1000;
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
        match exit {
            Exit::Halted { .. } => {
                let at = a.rip.wrapping_sub(1);
                if at == CODE + code.len() as u64 {
                    let mut s = State {
                        gpr: a.gpr,
                        rflags: a.rflags(),
                        _pad: 0,
                        xmm: a.xmm,
                    };
                    s.gpr[4] = st.gpr[4];
                    TcgOutcome::Done(Box::new(s))
                } else if (HANDLERS..HANDLERS + 32 * 16).contains(&at) {
                    TcgOutcome::Exception(((at - HANDLERS) / 16) as u8)
                } else {
                    TcgOutcome::Other(format!("halted at unexpected rip {:#x}", a.rip))
                }
            }
            other => TcgOutcome::Other(format!("{other:?} at rip {:#x}", a.rip)),
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // SAFETY: unmapping the two mappings created in `new`; no references remain.
        unsafe {
            libc::munmap(self.exec_page as *mut libc::c_void, 0x2000);
            libc::munmap(self.data as *mut libc::c_void, DATA_LEN);
        }
    }
}

/// One differential case.
pub struct Case {
    pub code: Vec<u8>,
    pub st: State,
    /// Flags compared (undefined ones masked out).
    pub flag_mask: u64,
    /// Compare XMM registers.
    pub xmm: bool,
    /// Initial data buffer contents (None = leave a fixed pattern).
    pub data_seed: u64,
}

/// Runs a case on both and returns a description of the first mismatch.
pub fn check(h: &mut Harness, c: &Case) -> Result<(), String> {
    let pattern = pattern(c.data_seed);
    h.data().copy_from_slice(&pattern);
    let host = h.run_host(&c.code, &c.st);
    let host_data = h.data().to_vec();
    h.data().copy_from_slice(&pattern);
    let tcg = match h.run_tcg(&c.code, &c.st) {
        TcgOutcome::Done(s) => *s,
        other => {
            return Err(format!(
                "code {:02x?}: TCG {other:?}, host completed",
                c.code
            ))
        }
    };
    let mut err = String::new();
    for i in 0..16 {
        if i != 4 && host.gpr[i] != tcg.gpr[i] {
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
    if c.xmm && host.xmm != tcg.xmm {
        for i in 0..16 {
            if host.xmm[i] != tcg.xmm[i] {
                err += &format!(" xmm{i}: host {:#x} tcg {:#x};", host.xmm[i], tcg.xmm[i]);
            }
        }
    }
    if host_data[..] != h.data()[..] {
        let p = (0..DATA_LEN)
            .find(|&i| host_data[i] != h.data()[i])
            .unwrap_or(0);
        err += &format!(
            " memory differs at +{p:#x}: host {:#x} tcg {:#x};",
            host_data[p],
            h.data()[p]
        );
    }
    if err.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "code {:02x?} in {:x?} flags {:#x}:{err}",
            c.code, c.st.gpr, c.st.rflags
        ))
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

/// Random register file with interesting values; RSP is the host's (not loaded).
pub fn random_state(r: &mut Rng) -> State {
    let mut st = State::default();
    for i in 0..16 {
        st.gpr[i] = r.value();
    }
    st.rflags = r.flags();
    for x in st.xmm.iter_mut() {
        *x = (u128::from(r.value()) << 64) | u128::from(r.value());
    }
    st
}
