//! Starting an application processor from Linux's SIPI trampoline without real mode.
//!
//! This CPU only executes 64-bit code, while a STARTUP IPI starts a real CPU in real mode at
//! `vector << 12`. Linux's x86-64 trampoline (`arch/x86/realmode/rm/trampoline_64.S`) goes
//! real mode → protected mode (`startup_32`) → long mode (`startup_64`) → the kernel's
//! `secondary_startup_64`, loading on the way only values the kernel stored for it: the
//! stack, the GDT, CR4, the trampoline page table, EFER, CR0 and the 64-bit entry point.
//! [`linux_ap_entry`] reads those values out of the trampoline's instructions (decoding them,
//! not running them) and [`ArchState::set_linux_ap_state`] puts the CPU in the state the
//! trampoline would reach at its final `jmp *tr_start(%rip)`. Anything not matching the
//! expected instruction shapes is an error (the AP then stays down; the kernel reports it).

use crate::memory::GuestRam;
use crate::state::{efer, ArchState, DescTable};
use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use thiserror::Error;

/// Why the trampoline could not be followed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SipiError {
    /// The code is not readable guest RAM.
    #[error("SIPI trampoline at {0:#x}: not RAM")]
    NotRam(u64),
    /// An expected step was not found.
    #[error("SIPI trampoline at {at:#x}: {what} not found (not Linux's x86-64 trampoline)")]
    Unrecognized {
        /// Trampoline address.
        at: u64,
        /// The missing piece.
        what: &'static str,
    },
}

/// The state Linux's trampoline hands to `secondary_startup_64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApEntry {
    /// 64-bit entry point (`tr_start`).
    pub rip: u64,
    /// The trampoline's stack (physical, identity-mapped by the trampoline page table).
    pub rsp: u64,
    /// GDTR loaded by `lgdtl tr_gdt`.
    pub gdt: DescTable,
    /// CR0, CR3, CR4 and EFER (LMA set).
    pub cr0: u64,
    /// Trampoline page table.
    pub cr3: u64,
    /// CR4 (`tr_cr4`).
    pub cr4: u64,
    /// EFER (`tr_efer` with LMA).
    pub efer: u64,
}

fn read_code(ram: &GuestRam, at: u64) -> Result<[u8; 256], SipiError> {
    let mut b = [0u8; 256];
    if ram.read(at, &mut b) {
        Ok(b)
    } else {
        Err(SipiError::NotRam(at))
    }
}

fn read_u32(ram: &GuestRam, at: u64) -> Result<u32, SipiError> {
    let mut b = [0u8; 4];
    ram.read(at, &mut b)
        .then(|| u32::from_le_bytes(b))
        .ok_or(SipiError::NotRam(at))
}

/// Decodes up to 64 instructions from `at` in `bitness`, stopping after a 32-bit far jump.
fn decode(ram: &GuestRam, at: u64, bitness: u32) -> Result<Vec<Instruction>, SipiError> {
    let code = read_code(ram, at)?;
    let mut d = Decoder::with_ip(bitness, &code, at, DecoderOptions::NONE);
    let mut out = Vec::new();
    while d.can_decode() && out.len() < 64 {
        let i = d.decode();
        if i.is_invalid() {
            break;
        }
        out.push(i);
        if i.mnemonic() == Mnemonic::Jmp && i.op0_kind() == OpKind::FarBranch32 {
            break;
        }
    }
    Ok(out)
}

/// Follows the trampoline a STARTUP IPI with `vector` would run (see the module doc).
pub fn linux_ap_entry(ram: &GuestRam, vector: u8) -> Result<ApEntry, SipiError> {
    let at = u64::from(vector) << 12;
    let missing = |what| SipiError::Unrecognized { at, what };
    // Real mode: `ljmpw $real_mode_seg, $1f`, `movl $rm_stack_end, %esp`, `lgdtl tr_gdt`,
    // `ljmpl $__KERNEL32_CS, $pa_startup_32`.
    let (mut base, mut esp, mut gdt_at, mut startup_32) = (None, None, None, None);
    for i in decode(ram, at, 16)? {
        match (i.mnemonic(), i.op0_kind()) {
            (Mnemonic::Jmp, OpKind::FarBranch16) => {
                base = Some(u64::from(i.far_branch_selector()) << 4)
            }
            (Mnemonic::Jmp, OpKind::FarBranch32) => startup_32 = Some(i.far_branch32()),
            (Mnemonic::Mov, OpKind::Register)
                if i.op0_register() == Register::ESP && i.op1_kind() == OpKind::Immediate32 =>
            {
                esp = Some(u64::from(i.immediate32()))
            }
            (Mnemonic::Lgdt, _) => gdt_at = Some(i.memory_displacement64() & 0xFFFF),
            _ => {}
        }
    }
    let base = base.ok_or(missing("the real-mode segment jump"))?;
    let esp = esp.ok_or(missing("the stack setup"))?;
    let gdt_at = base + gdt_at.ok_or(missing("lgdtl"))?;
    let startup_32 = u64::from(startup_32.ok_or(missing("the jump to startup_32"))?);
    let mut gdt_b = [0u8; 6];
    if !ram.read(gdt_at, &mut gdt_b) {
        return Err(SipiError::NotRam(gdt_at));
    }
    let gdt = DescTable {
        limit: u16::from_le_bytes([gdt_b[0], gdt_b[1]]),
        base: u64::from(u32::from_le_bytes([gdt_b[2], gdt_b[3], gdt_b[4], gdt_b[5]])),
    };
    // startup_32: `addl $pa_real_mode_base, %esp`, `movl pa_tr_cr4, %eax; movl %eax, %cr4`,
    // `movl $pa_trampoline_pgd, %eax; movl %eax, %cr3`, `movl pa_tr_efer(+4), %eax/%edx;
    // movl $MSR_EFER, %ecx; wrmsr`, `movl $CR0_STATE, %eax; movl %eax, %cr0`,
    // `ljmpl $__KERNEL_CS, $pa_startup_64`.
    let mut rsp = esp;
    let (mut eax_mem, mut eax_imm, mut edx_mem, mut ecx_imm) = (None, None, None, None);
    let (mut cr0, mut cr3, mut cr4, mut efer_v, mut startup_64) = (None, None, None, None, None);
    for i in decode(ram, startup_32, 32)? {
        let op1_mem = (i.op_count() == 2 && i.op1_kind() == OpKind::Memory)
            .then(|| i.memory_displacement64() & 0xFFFF_FFFF);
        match i.code() {
            Code::Add_rm32_imm32 | Code::Add_rm32_imm8
                if i.op0_kind() == OpKind::Register && i.op0_register() == Register::ESP =>
            {
                rsp = rsp.wrapping_add(i.immediate(1)) & 0xFFFF_FFFF;
            }
            Code::Mov_r32_rm32 | Code::Mov_EAX_moffs32 if i.op0_register() == Register::EAX => {
                eax_mem = op1_mem;
            }
            Code::Mov_r32_rm32 if i.op0_register() == Register::EDX => edx_mem = op1_mem,
            Code::Mov_r32_imm32 if i.op0_register() == Register::EAX => {
                eax_imm = Some(u64::from(i.immediate32()))
            }
            Code::Mov_r32_imm32 if i.op0_register() == Register::ECX => {
                ecx_imm = Some(i.immediate32())
            }
            Code::Mov_cr_r32 if i.op1_register() == Register::EAX => match i.op0_register() {
                Register::CR0 => cr0 = eax_imm,
                Register::CR3 => cr3 = eax_imm,
                Register::CR4 => {
                    if let Some(a) = eax_mem {
                        cr4 = Some(u64::from(read_u32(ram, a)?));
                    }
                }
                _ => {}
            },
            Code::Wrmsr if ecx_imm == Some(0xC000_0080) => {
                if let (Some(lo), Some(hi)) = (eax_mem, edx_mem) {
                    let v = u64::from(read_u32(ram, lo)?) | u64::from(read_u32(ram, hi)?) << 32;
                    efer_v = Some(v);
                }
            }
            _ => {}
        }
        if i.mnemonic() == Mnemonic::Jmp && i.op0_kind() == OpKind::FarBranch32 {
            startup_64 = Some(u64::from(i.far_branch32()));
        }
    }
    let startup_64 = startup_64.ok_or(missing("the jump to startup_64"))?;
    // startup_64: `jmpq *tr_start(%rip)`.
    let jmp = decode(ram, startup_64, 64)?;
    let target = jmp
        .first()
        .filter(|i| i.code() == Code::Jmp_rm64 && i.memory_base() == Register::RIP)
        .map(|i| i.memory_displacement64())
        .ok_or(missing("jmpq *tr_start(%rip)"))?;
    let mut rip = [0u8; 8];
    if !ram.read(target, &mut rip) {
        return Err(SipiError::NotRam(target));
    }
    let efer_v = efer_v.ok_or(missing("the EFER write"))?;
    Ok(ApEntry {
        rip: u64::from_le_bytes(rip),
        rsp,
        gdt,
        cr0: cr0.ok_or(missing("the CR0 write"))?,
        cr3: cr3.ok_or(missing("the CR3 write"))?,
        cr4: cr4.ok_or(missing("the CR4 write"))?,
        efer: if efer_v & efer::LME != 0 {
            efer_v | efer::LMA
        } else {
            efer_v
        },
    })
}

impl ArchState {
    /// Puts the CPU where Linux's trampoline would be at its jump to `secondary_startup_64`:
    /// long mode, `__KERNEL_CS`/`__KERNEL_DS`, interrupts off, the zero IDT. The APIC ID
    /// is kept. Call `Cpu::state_changed` afterwards.
    pub fn set_linux_ap_state(&mut self, e: &ApEntry) {
        self.set_linux_boot_state(e.rip, 0, e.cr3, e.gdt.base);
        self.gdtr = e.gdt;
        self.idtr = DescTable { base: 0, limit: 0 };
        self.cr0 = e.cr0;
        self.cr4 = e.cr4;
        self.efer = e.efer;
        self.gpr[4] = e.rsp;
    }
}
