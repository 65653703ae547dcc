//! vCPU register setup for KVM: boot MSRs, FPU, LAPIC LINT0/LINT1, and loading a
//! [`BootState`].

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;

use super::hv;
use crate::accel::{AccelError, BootState, Result, Segment};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// The MSR values a freshly reset CPU has after firmware, as Linux expects them.
pub(super) fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

pub(super) fn setup_msrs(fd: &VcpuFd) -> Result<()> {
    let list = boot_msrs();
    let entries: Vec<kvm_msr_entry> = list
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| AccelError::Guest {
        vcpu: 0,
        msg: format!("building MSR list: {e:?}"),
    })?;
    let set = fd.set_msrs(&msrs).map_err(hv("KVM_SET_MSRS"))?;
    if set != entries.len() {
        let failed = list.get(set).map_or(0, |m| m.0);
        return Err(AccelError::Unavailable(format!(
            "KVM refused boot MSR {failed:#x} ({set} of {} set)",
            entries.len()
        )));
    }
    Ok(())
}

pub(super) fn setup_fpu(fd: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(hv("KVM_SET_FPU"))
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}

pub(super) fn setup_lapic(fd: &VcpuFd) -> Result<()> {
    let mut lapic = fd.get_lapic().map_err(hv("KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    fd.set_lapic(&lapic).map_err(hv("KVM_SET_LAPIC"))
}

fn kvm_seg(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: 0,
        unusable: u8::from(!s.present),
        padding: 0,
    }
}

pub(super) fn load_boot_state(fd: &VcpuFd, st: &BootState) -> Result<()> {
    let mut sregs = fd.get_sregs().map_err(hv("KVM_GET_SREGS"))?;
    sregs.cs = kvm_seg(&st.cs);
    let data = kvm_seg(&st.data);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_seg(&st.tr);
    sregs.gdt.base = st.gdt.base;
    sregs.gdt.limit = st.gdt.limit;
    sregs.idt.base = st.idt.base;
    sregs.idt.limit = st.idt.limit;
    sregs.cr0 = st.cr0;
    sregs.cr3 = st.cr3;
    sregs.cr4 = st.cr4;
    sregs.efer = st.efer;
    fd.set_sregs(&sregs).map_err(hv("KVM_SET_SREGS"))?;

    let mut regs = fd.get_regs().map_err(hv("KVM_GET_REGS"))?;
    regs.rip = st.rip;
    regs.rsp = st.rsp;
    regs.rbp = st.rsp;
    regs.rsi = st.rsi;
    regs.rbx = st.rbx;
    regs.rflags = st.rflags | 2;
    fd.set_regs(&regs).map_err(hv("KVM_SET_REGS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_bits_are_replaced() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0 + 1] = 0x07; // old mode ExtINT
        regs[APIC_LVT0] = 0x30u8 as std::os::raw::c_char; // vector bits kept
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x04);
        assert_eq!(regs[APIC_LVT0] as u8, 0x30);
    }
}
