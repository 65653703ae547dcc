//! Smoke tool (not a VMM): boots a bzImage with the TCG on a bare platform (16550 serial with
//! THRE interrupts, 8259 PIC, PIT channel 0 as a periodic timer; no ACPI, no APIC, no disks)
//! to see how far the kernel gets.
//!
//! `cargo run --release -p rqemu-tcg --example boot_linux -- KERNEL [CMDLINE] [MAX_MINSTR]`
//! (set `INITRD=path` to load an initramfs).

use rqemu_tcg::{Cpu, Exit, GuestRam, Platform, RamRegion};
use std::io::Write;

const RAM_SIZE: usize = 256 << 20;
const BOOT_PARAMS: u64 = 0x7000;
const CMDLINE: u64 = 0x2_0000;
const GDT: u64 = 0x500;
const PML4: u64 = 0x9000;
const KERNEL: u64 = 0x100_0000;

/// A minimal 8259A PIC (enough for Linux's `init_8259A` and IRQ0/IRQ4 delivery).
#[derive(Default)]
struct Pic {
    imr: u8,
    irr: u8,
    isr: u8,
    base: u8,
    icw_step: u8,
    icw4: bool,
    read_isr: bool,
}

impl Pic {
    fn write(&mut self, port_lo: bool, v: u8) {
        if !port_lo {
            match self.icw_step {
                1 => {
                    self.base = v & 0xF8;
                    self.icw_step = 2;
                }
                2 => self.icw_step = if self.icw4 { 3 } else { 0 },
                3 => self.icw_step = 0,
                _ => self.imr = v,
            }
        } else if v & 0x10 != 0 {
            *self = Pic {
                icw_step: 1,
                icw4: v & 1 != 0,
                ..Pic::default()
            };
        } else if v & 0x08 != 0 {
            if v & 2 != 0 {
                self.read_isr = v & 1 != 0;
            }
        } else if v & 0x20 != 0 {
            // EOI: specific (0x60 | n) or the highest in service.
            let n = if v & 0x40 != 0 {
                v & 7
            } else {
                self.isr.trailing_zeros() as u8
            };
            if n < 8 {
                self.isr &= !(1 << n);
            }
        }
    }

    fn read(&self, port_lo: bool) -> u8 {
        match (port_lo, self.read_isr) {
            (false, _) => self.imr,
            (true, true) => self.isr,
            (true, false) => self.irr,
        }
    }

    /// Highest-priority requested, unmasked IRQ above everything in service.
    fn pending(&self) -> Option<u8> {
        let req = self.irr & !self.imr;
        let n = req.trailing_zeros() as u8;
        let in_service = self.isr.trailing_zeros() as u8;
        (n < 8 && n < in_service).then_some(n)
    }
}

/// Serial (16550 subset with THRE interrupts), PIC, PIT channel 0 as a periodic IRQ0.
struct SmokePlatform {
    line: Vec<u8>,
    ios: u64,
    pic: Pic,
    slave: Pic,
    pit_reload: u32,
    pit_next: Option<std::time::Instant>,
    pit_lsb: Option<u8>,
    ier: u8,
    lcr: u8,
    thre: bool,
    scratch: u8,
    start: std::time::Instant,
}

impl SmokePlatform {
    fn new() -> Self {
        SmokePlatform {
            line: Vec::new(),
            ios: 0,
            pic: Pic {
                imr: 0xFF,
                ..Pic::default()
            },
            slave: Pic {
                imr: 0xFF,
                ..Pic::default()
            },
            pit_reload: 0,
            pit_next: None,
            pit_lsb: None,
            ier: 0,
            lcr: 0,
            thre: false,
            scratch: 0,
            start: std::time::Instant::now(),
        }
    }

    fn update_irqs(&mut self) {
        if let Some(next) = self.pit_next {
            let now = std::time::Instant::now();
            if now >= next {
                self.pic.irr |= 1;
                let period = std::time::Duration::from_nanos(
                    u64::from(self.pit_reload.max(1)) * 1_000_000_000 / 1_193_182,
                );
                let mut n = next + period;
                if n < now {
                    n = now + period;
                }
                self.pit_next = Some(n);
            }
        }
        if self.ier & 2 != 0 && self.thre {
            self.pic.irr |= 1 << 4;
        }
    }

    fn pit_count(&self) -> u16 {
        let ticks = (self.start.elapsed().as_nanos() * 1_193_182 / 1_000_000_000) as u64;
        let reload = u64::from(if self.pit_reload == 0 {
            0x1_0000
        } else {
            self.pit_reload
        });
        (reload - ticks % reload) as u16
    }
}

impl Platform for SmokePlatform {
    fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }
    fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {}
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.ios += 1;
        let v = match port {
            0x20 | 0x21 => self.pic.read(port == 0x20),
            0xA0 | 0xA1 => self.slave.read(port == 0xA0),
            0x40 => {
                let c = self.pit_count();
                match self.pit_lsb.take() {
                    Some(hi) => hi,
                    None => {
                        self.pit_lsb = Some((c >> 8) as u8);
                        c as u8
                    }
                }
            }
            0x3F9 if self.lcr & 0x80 == 0 => self.ier,
            0x3FA => {
                if self.ier & 2 != 0 && self.thre {
                    self.thre = false;
                    0xC2
                } else {
                    0xC1
                }
            }
            0x3FB => self.lcr,
            0x3FD => 0x60,
            0x3FE => 0xB0,
            0x3FF => self.scratch,
            0x3F8..=0x3FE => 0,
            _ => 0xFF,
        };
        data.fill(0);
        data[0] = v;
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.ios += 1;
        let v = data[0];
        match port {
            0x20 | 0x21 => self.pic.write(port == 0x20, v),
            0xA0 | 0xA1 => self.slave.write(port == 0xA0, v),
            0x43 if v >> 6 == 0 && v & 0x30 != 0 => {
                self.pit_reload = 0;
                self.pit_lsb = None;
            }
            0x40 => match self.pit_lsb.take() {
                None => self.pit_lsb = Some(v),
                Some(lo) => {
                    self.pit_reload = u32::from(lo) | (u32::from(v) << 8);
                    if self.pit_reload == 0 {
                        self.pit_reload = 0x1_0000;
                    }
                    self.pit_next = Some(std::time::Instant::now());
                }
            },
            0x3F8 if self.lcr & 0x80 == 0 => {
                let out = std::io::stdout();
                let mut o = out.lock();
                let _ = o.write_all(&[v]);
                let _ = o.flush();
                self.line.push(v);
                self.thre = true;
            }
            0x3F9 if self.lcr & 0x80 == 0 => {
                if v & 2 != 0 && self.ier & 2 == 0 {
                    self.thre = true;
                }
                self.ier = v & 0x0F;
            }
            0x3FB => self.lcr = v,
            0x3FF => self.scratch = v,
            _ => {}
        }
    }
    fn interrupt_pending(&mut self) -> bool {
        self.update_irqs();
        self.pic.pending().is_some()
    }
    fn acknowledge_interrupt(&mut self) -> Option<u8> {
        let n = self.pic.pending()?;
        self.pic.irr &= !(1 << n);
        self.pic.isr |= 1 << n;
        // IRQ4 (serial) behaves level-triggered: `update_irqs` re-raises it while pending.
        Some(self.pic.base + n)
    }
}

fn put(mem: &mut [u8], at: u64, b: &[u8]) {
    mem[at as usize..at as usize + b.len()].copy_from_slice(b);
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: boot_linux KERNEL [CMDLINE] [MAX_MINSTR]")?;
    let cmdline = args.get(2).cloned().unwrap_or_else(|| {
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 lpj=1000000 \
         noapic nolapic panic=-1"
            .into()
    });
    let max: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2000) * 1_000_000;
    let img = std::fs::read(path)?;
    if img.len() < 0x300 || &img[0x202..0x206] != b"HdrS" {
        return Err("not a bzImage".into());
    }
    let setup_sects = match img[0x1F1] {
        0 => 4,
        n => usize::from(n),
    };
    let pm = &img[(setup_sects + 1) * 512..];
    let mut mem = vec![0u8; RAM_SIZE];
    // boot_params: setup header copied, loader type, cmdline, e820.
    let hdr_end = 0x202 + usize::from(img[0x201]);
    let bp = BOOT_PARAMS as usize;
    mem[bp + 0x1F1..bp + hdr_end].copy_from_slice(&img[0x1F1..hdr_end]);
    mem[bp + 0x210] = 0xFF;
    mem[bp + 0x211] |= 0x01;
    put(
        &mut mem,
        BOOT_PARAMS + 0x228,
        &(CMDLINE as u32).to_le_bytes(),
    );
    put(&mut mem, CMDLINE, cmdline.as_bytes());
    let e820: [(u64, u64, u32); 2] = [
        (0, 0x9_FC00, 1),
        (0x10_0000, RAM_SIZE as u64 - 0x10_0000, 1),
    ];
    for (i, (a, l, t)) in e820.iter().enumerate() {
        let o = BOOT_PARAMS + 0x2D0 + 20 * i as u64;
        put(&mut mem, o, &a.to_le_bytes());
        put(&mut mem, o + 8, &l.to_le_bytes());
        put(&mut mem, o + 16, &t.to_le_bytes());
    }
    mem[bp + 0x1E8] = e820.len() as u8;
    put(&mut mem, KERNEL, pm);
    if let Ok(initrd) = std::env::var("INITRD") {
        let rd = std::fs::read(initrd)?;
        let at = (RAM_SIZE as u64 - rd.len() as u64 - 0x10_0000) & !0xFFF;
        put(&mut mem, at, &rd);
        put(&mut mem, BOOT_PARAMS + 0x218, &(at as u32).to_le_bytes());
        put(
            &mut mem,
            BOOT_PARAMS + 0x21C,
            &(rd.len() as u32).to_le_bytes(),
        );
    }
    // GDT and 4 GiB identity map with 2 MiB pages.
    put(
        &mut mem,
        GDT + 0x10,
        &0x00af_9a00_0000_ffffu64.to_le_bytes(),
    );
    put(
        &mut mem,
        GDT + 0x18,
        &0x00cf_9200_0000_ffffu64.to_le_bytes(),
    );
    put(&mut mem, PML4, &((PML4 + 0x1000) | 3).to_le_bytes());
    for i in 0..4u64 {
        let pd = PML4 + 0x2000 + 0x1000 * i;
        put(&mut mem, PML4 + 0x1000 + 8 * i, &(pd | 3).to_le_bytes());
        for j in 0..512u64 {
            let pa = (i << 30) | (j << 21);
            put(&mut mem, pd + 8 * j, &(pa | 0x83).to_le_bytes());
        }
    }
    let region = RamRegion {
        gpa: 0,
        host: mem.as_mut_ptr(),
        len: RAM_SIZE as u64,
    };
    // SAFETY: `mem` outlives `ram` and is never reallocated.
    let ram = unsafe { GuestRam::new(vec![region]) }?;
    let mut cpu = Cpu::new();
    cpu.arch
        .set_linux_boot_state(KERNEL + 0x200, BOOT_PARAMS, PML4, GDT);
    cpu.state_changed();
    let mut plat = SmokePlatform::new();
    let start = std::time::Instant::now();
    let mut init_at: Option<(f64, f64, u64)> = None;
    let exit = loop {
        if init_at.is_none() && plat.line.windows(4).any(|w| w == b"Run ") {
            init_at = Some((start.elapsed().as_secs_f64(), cpu_time(), cpu.icount));
        }
        match cpu.run(&ram, &mut plat, 10_000_000) {
            Exit::BudgetExhausted if cpu.icount < max => continue,
            Exit::Halted {
                interrupts_enabled: true,
            } if cpu.icount < max => {
                // Idle: wait for the next timer tick.
                std::thread::sleep(std::time::Duration::from_micros(200));
                continue;
            }
            other => break other,
        }
    };
    let dt = start.elapsed().as_secs_f64();
    if let Some((w, c, n)) = init_at {
        eprintln!("\n--- 'Run /init' printed after {w:.2} s wall, {c:.2} s CPU, {n} instructions");
    }
    eprintln!(
        "\n--- exit {exit:?} at RIP {:#x} after {} instructions in {dt:.2} s wall, {:.2} s CPU \
         ({:.1} MIPS per CPU second), {} port accesses, blocks decoded/invalidated {:?}",
        cpu.arch.rip,
        cpu.icount,
        cpu_time(),
        cpu.icount as f64 / cpu_time() / 1e6,
        plat.ios,
        cpu.cache_stats()
    );
    Ok(())
}

/// Process CPU time in seconds.
fn cpu_time() -> f64 {
    let t = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // utime and stime are fields 14 and 15 (clock ticks, 100 Hz on Linux).
    let f: Vec<&str> = t
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = f.get(11..13).map_or(0.0, |v| {
        v.iter().filter_map(|x| x.parse::<f64>().ok()).sum()
    });
    ticks / 100.0
}
