//! Architectural state of one x86-64 CPU.

use crate::flags::LazyFlags;

/// Index of a segment register in [`ArchState::seg`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum SegReg {
    /// ES.
    Es = 0,
    /// CS.
    Cs = 1,
    /// SS.
    Ss = 2,
    /// DS.
    Ds = 3,
    /// FS.
    Fs = 4,
    /// GS.
    Gs = 5,
}

/// A segment register with its hidden (descriptor cache) part.
///
/// `attr` uses the compressed VMX/KVM layout: bits 0-3 type, 4 S, 5-6 DPL, 7 P, 8 AVL, 9 L,
/// 10 D/B, 11 G.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Visible selector.
    pub selector: u16,
    /// Base address (only FS/GS bases are used for addressing in 64-bit mode).
    pub base: u64,
    /// Limit in bytes (already scaled by G).
    pub limit: u32,
    /// Attributes (see the type documentation).
    pub attr: u16,
}

impl Segment {
    /// Attribute bit L (64-bit code).
    pub const L: u16 = 1 << 9;
    /// Attribute bit P (present).
    pub const P: u16 = 1 << 7;
    /// Attribute bit S (code/data, not system).
    pub const S: u16 = 1 << 4;
    /// Attribute bit D/B.
    pub const DB: u16 = 1 << 10;
    /// Attribute bit G.
    pub const G: u16 = 1 << 11;

    /// A flat 64-bit code segment at DPL `dpl`.
    pub fn code64(selector: u16, dpl: u8) -> Self {
        Segment {
            selector,
            base: 0,
            limit: 0xFFFF_FFFF,
            attr: 0xB | Self::S | (u16::from(dpl & 3) << 5) | Self::P | Self::L | Self::G,
        }
    }

    /// A flat writable data segment at DPL `dpl`.
    pub fn data(selector: u16, dpl: u8) -> Self {
        Segment {
            selector,
            base: 0,
            limit: 0xFFFF_FFFF,
            attr: 0x3 | Self::S | (u16::from(dpl & 3) << 5) | Self::P | Self::DB | Self::G,
        }
    }

    /// Builds the hidden part from an 8-byte GDT/LDT descriptor (low quadword) and the
    /// upper 32 bits of the base for 16-byte system descriptors.
    pub fn from_descriptor(selector: u16, d: u64, base_hi: u32) -> Self {
        let base = ((d >> 16) & 0xFF_FFFF) | (((d >> 56) & 0xFF) << 24);
        let mut limit = ((d & 0xFFFF) | (((d >> 48) & 0xF) << 16)) as u32;
        let attr = (((d >> 40) & 0xFF) | (((d >> 52) & 0xF) << 8)) as u16;
        if attr & Self::G != 0 {
            limit = (limit << 12) | 0xFFF;
        }
        let base = if attr & Self::S == 0 {
            base | (u64::from(base_hi) << 32)
        } else {
            base
        };
        Segment {
            selector,
            base,
            limit,
            attr,
        }
    }

    /// Descriptor privilege level.
    pub fn dpl(&self) -> u8 {
        ((self.attr >> 5) & 3) as u8
    }
}

/// GDTR/IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescTable {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes (size - 1).
    pub limit: u16,
}

/// Model-specific registers kept by the CPU (FS/GS base live in the segment registers).
#[derive(Clone, Copy, Debug, Default)]
pub struct Msrs {
    /// IA32_STAR.
    pub star: u64,
    /// IA32_LSTAR.
    pub lstar: u64,
    /// IA32_CSTAR.
    pub cstar: u64,
    /// IA32_FMASK.
    pub fmask: u64,
    /// IA32_KERNEL_GS_BASE.
    pub kernel_gs_base: u64,
    /// IA32_TSC_AUX.
    pub tsc_aux: u64,
    /// IA32_TSC_ADJUST (added to the TSC; moved by TSC writes).
    pub tsc_adjust: u64,
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// IA32_PAT.
    pub pat: u64,
    /// IA32_SYSENTER_CS/ESP/EIP (stored only).
    pub sysenter: [u64; 3],
    /// IA32_MISC_ENABLE.
    pub misc_enable: u64,
    /// IA32_MTRR_DEF_TYPE (stored only; no MTRRs are advertised).
    pub mtrr_def_type: u64,
}

/// Minimal x87 state (control/status/tag words; register contents are only saved/restored
/// by FXSAVE/FXRSTOR, no arithmetic is implemented).
#[derive(Clone, Copy, Debug)]
pub struct Fpu {
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word (FXSAVE format).
    pub ftw: u8,
    /// Last opcode.
    pub fop: u16,
    /// Last instruction pointer.
    pub fip: u64,
    /// Last data pointer.
    pub fdp: u64,
    /// ST0-7 / MM0-7 in FXSAVE layout (80 bits used of each 16 bytes).
    pub st: [[u8; 16]; 8],
}

impl Default for Fpu {
    fn default() -> Self {
        Fpu {
            fcw: 0x37F,
            fsw: 0,
            ftw: 0,
            fop: 0,
            fip: 0,
            fdp: 0,
            st: [[0; 16]; 8],
        }
    }
}

/// CR0 bits.
pub mod cr0 {
    /// Protection enable.
    pub const PE: u64 = 1 << 0;
    /// Monitor coprocessor.
    pub const MP: u64 = 1 << 1;
    /// Emulation (x87 → #NM).
    pub const EM: u64 = 1 << 2;
    /// Task switched (→ #NM on FPU/SSE use).
    pub const TS: u64 = 1 << 3;
    /// Extension type (always 1).
    pub const ET: u64 = 1 << 4;
    /// Numeric error.
    pub const NE: u64 = 1 << 5;
    /// Write protect.
    pub const WP: u64 = 1 << 16;
    /// Alignment mask.
    pub const AM: u64 = 1 << 18;
    /// Not write-through.
    pub const NW: u64 = 1 << 29;
    /// Cache disable.
    pub const CD: u64 = 1 << 30;
    /// Paging.
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits.
pub mod cr4 {
    /// Page size extensions.
    pub const PSE: u64 = 1 << 4;
    /// Physical address extension.
    pub const PAE: u64 = 1 << 5;
    /// Page global enable.
    pub const PGE: u64 = 1 << 7;
    /// OS supports FXSAVE/FXRSTOR.
    pub const OSFXSR: u64 = 1 << 9;
    /// OS supports unmasked SIMD FP exceptions.
    pub const OSXMMEXCPT: u64 = 1 << 10;
    /// Time stamp disable (RDTSC at CPL>0 → #GP).
    pub const TSD: u64 = 1 << 2;
    /// XSAVE and XCR0 enabled.
    pub const OSXSAVE: u64 = 1 << 18;
    /// The CR4 bits this CPU accepts.
    pub const SUPPORTED: u64 =
        TSD | PSE | PAE | PGE | OSFXSR | OSXMMEXCPT | OSXSAVE | (1 << 3) | (1 << 8);
}

/// EFER bits.
pub mod efer {
    /// SYSCALL enable.
    pub const SCE: u64 = 1 << 0;
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Long mode active.
    pub const LMA: u64 = 1 << 10;
    /// No-execute enable.
    pub const NXE: u64 = 1 << 11;
}

/// All architectural registers. After changing CR0/CR3/CR4/EFER/CS directly, call
/// [`crate::Cpu::state_changed`].
#[derive(Clone, Debug)]
pub struct ArchState {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15 (hardware encoding order).
    pub gpr: [u64; 16],
    /// Instruction pointer.
    pub rip: u64,
    /// RFLAGS (lazy; use `get`/`set`).
    pub flags: LazyFlags,
    /// ES, CS, SS, DS, FS, GS (see [`SegReg`]).
    pub seg: [Segment; 6],
    /// LDTR.
    pub ldtr: Segment,
    /// Task register.
    pub tr: Segment,
    /// GDTR.
    pub gdtr: DescTable,
    /// IDTR.
    pub idtr: DescTable,
    /// CR0.
    pub cr0: u64,
    /// CR2 (page-fault linear address).
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8 (task priority, 0..=15).
    pub cr8: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// Other MSRs.
    pub msr: Msrs,
    /// XMM0-15 (bits 127:0 of YMM0-15).
    pub xmm: [u128; 16],
    /// Bits 255:128 of YMM0-15 (the AVX state component). Legacy SSE instructions leave
    /// them alone; VEX-encoded instructions writing an XMM register zero them.
    pub ymmh: [u128; 16],
    /// MXCSR.
    pub mxcsr: u32,
    /// x87 state.
    pub fpu: Fpu,
    /// XCR0 (XSAVE feature mask; bit 0 always set).
    pub xcr0: u64,
    /// The CPU executed HLT and waits for an interrupt.
    pub halted: bool,
    /// Offset added to the virtual TSC (set by writes to IA32_TSC).
    pub tsc_offset: u64,
    /// This CPU's initial APIC ID (CPUID leaf 1 EBX[31:24]); kept across boot-state resets.
    pub apic_id: u8,
    /// Logical CPUs of the machine, all cores of one package (CPUID leaves 1, 4 and 0xB);
    /// kept across boot-state resets. 0 counts as 1.
    pub package_cpus: u8,
}

impl Default for ArchState {
    fn default() -> Self {
        ArchState {
            gpr: [0; 16],
            rip: 0,
            flags: LazyFlags::default(),
            seg: [Segment::default(); 6],
            ldtr: Segment::default(),
            tr: Segment {
                attr: 0xB | Segment::P,
                limit: 0xFFFF,
                ..Segment::default()
            },
            gdtr: DescTable::default(),
            idtr: DescTable {
                base: 0,
                limit: 0xFFFF,
            },
            cr0: cr0::ET | cr0::NW | cr0::CD,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            msr: Msrs {
                apic_base: 0xFEE0_0900,
                pat: 0x0007_0406_0007_0406,
                // Fast strings enabled (bit 0), as firmware leaves it.
                misc_enable: 1,
                ..Msrs::default()
            },
            xmm: [0; 16],
            ymmh: [0; 16],
            mxcsr: 0x1F80,
            fpu: Fpu::default(),
            xcr0: 1,
            halted: false,
            tsc_offset: 0,
            apic_id: 0,
            package_cpus: 1,
        }
    }
}

impl ArchState {
    /// Current privilege level (CS.RPL; 0 in real mode).
    #[inline]
    pub fn cpl(&self) -> u8 {
        if self.cr0 & cr0::PE == 0 {
            return 0;
        }
        (self.seg[SegReg::Cs as usize].selector & 3) as u8
    }

    /// RFLAGS value.
    #[inline]
    pub fn rflags(&self) -> u64 {
        self.flags.get()
    }

    /// Sets RFLAGS.
    #[inline]
    pub fn set_rflags(&mut self, v: u64) {
        self.flags.set(v)
    }

    /// True in 64-bit mode (EFER.LMA and CS.L).
    #[inline]
    pub fn long_mode_64(&self) -> bool {
        self.efer & efer::LMA != 0 && self.seg[SegReg::Cs as usize].attr & Segment::L != 0
    }

    /// The reset state, keeping what identifies this CPU in the machine (APIC ID, package
    /// size).
    fn reset_keeping_identity(&mut self) {
        *self = ArchState {
            apic_id: self.apic_id,
            package_cpus: self.package_cpus,
            ..ArchState::default()
        };
    }

    /// Bitness of the code at CS:RIP: 64 in 64-bit mode, else 32 or 16 from CS.D.
    #[inline]
    pub fn code_bits(&self) -> u32 {
        if self.long_mode_64() {
            64
        } else if self.seg[SegReg::Cs as usize].attr & Segment::DB != 0 {
            32
        } else {
            16
        }
    }

    /// The state after INIT and a STARTUP IPI with `vector` (SDM 10.4.7.3 and 9.1.1): real
    /// mode at `vector << 12` (CS = `vector << 8`, IP = 0), paging and protection off, all
    /// segments 64 KiB, the IDT at 0. The APIC ID and APIC base are kept. Call
    /// `Cpu::state_changed` afterwards.
    pub fn set_sipi_state(&mut self, vector: u8) {
        let apic_base = self.msr.apic_base;
        self.reset_keeping_identity();
        self.msr.apic_base = apic_base;
        let real = |selector: u16, typ: u16| Segment {
            selector,
            base: u64::from(selector) << 4,
            limit: 0xFFFF,
            attr: typ | Segment::S | Segment::P,
        };
        for s in [SegReg::Ds, SegReg::Es, SegReg::Ss, SegReg::Fs, SegReg::Gs] {
            self.seg[s as usize] = real(0, 0x3);
        }
        self.seg[SegReg::Cs as usize] = real(u16::from(vector) << 8, 0xB);
        self.ldtr = Segment {
            attr: 0x2 | Segment::P,
            limit: 0xFFFF,
            ..Segment::default()
        };
        self.gdtr = DescTable {
            base: 0,
            limit: 0xFFFF,
        };
        // EDX holds the processor signature after RESET/INIT.
        self.gpr[2] = u64::from(crate::cpuid::SIGNATURE);
        self.set_rflags(0x2);
        self.rip = 0;
    }

    /// Sets up the Linux x86-64 boot protocol entry state: long mode with paging on
    /// (`cr3` points to identity page tables the VMM built), flat `__BOOT_CS` (0x10) and
    /// `__BOOT_DS` (0x18) segments matching a GDT the VMM placed at `gdt_base`, interrupts
    /// off, RSI = `boot_params`, RIP = `entry`.
    pub fn set_linux_boot_state(&mut self, entry: u64, boot_params: u64, cr3: u64, gdt_base: u64) {
        self.reset_keeping_identity();
        self.cr0 = cr0::PE | cr0::ET | cr0::NE | cr0::PG;
        self.cr3 = cr3;
        self.cr4 = cr4::PAE;
        self.efer = efer::LME | efer::LMA;
        self.seg[SegReg::Cs as usize] = Segment::code64(0x10, 0);
        for s in [SegReg::Ds, SegReg::Es, SegReg::Ss, SegReg::Fs, SegReg::Gs] {
            self.seg[s as usize] = Segment::data(0x18, 0);
        }
        self.gdtr = DescTable {
            base: gdt_base,
            limit: 4 * 8 - 1,
        };
        self.set_rflags(0x2);
        self.gpr[6] = boot_params;
        self.rip = entry;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_decoding() {
        // Linux __KERNEL_CS: 0x00af9b000000ffff
        let s = Segment::from_descriptor(0x10, 0x00af_9b00_0000_ffff, 0);
        assert_eq!(s.attr & Segment::L, Segment::L);
        assert_eq!(s.limit, 0xFFFF_FFFF);
        assert_eq!(s.dpl(), 0);
        assert_eq!(s.attr & 0xF, 0xB);
        let t = Segment::from_descriptor(0x40, 0x0000_8b12_3456_0067, 0xFFFF_FFFF);
        assert_eq!(t.base, 0xFFFF_FFFF_0012_3456);
        assert_eq!(t.limit, 0x67);
    }
}
