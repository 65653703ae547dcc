//! Per-vCPU CPUID: KVM's supported set, with topology made consistent (APIC ID and
//! logical count in leaf 1, leaf 4 core counts, leaves 0xb/0x1f x2APIC topology, AMD
//! 0x80000008 core count and 0x8000001e core IDs), the hypervisor bit, and the KVM
//! signature leaf.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use crate::accel::{AccelError, CpuTopology, Result};

const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const HYPERVISOR_BIT: u32 = 1 << 31;
const TSC_DEADLINE_BIT: u32 = 1 << 24;
const HTT_BIT: u32 = 1 << 28;
const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";

/// Number of APIC-ID bits needed to number `n` cores.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn topology_entries(leaf: u32, apic_id: u32, count: u32) -> [kvm_cpuid_entry2; 3] {
    let core_bits = bits_for(count);
    let mk = |index: u32, eax: u32, ebx: u32, ecx: u32| kvm_cpuid_entry2 {
        function: leaf,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: apic_id,
        ..Default::default()
    };
    [
        // SMT level: one thread per core.
        mk(0, 0, 1, 1 << 8),
        // Core level: `count` cores per package.
        mk(1, core_bits, count, (2 << 8) | 1),
        // Invalid level terminates the enumeration.
        mk(2, 0, 0, 2),
    ]
}

/// Builds the CPUID table for vCPU `index`.
pub(super) fn vcpu_cpuid(
    supported: &CpuId,
    index: u32,
    topo: &CpuTopology,
    tsc_deadline: bool,
) -> Result<CpuId> {
    let apic_id = topo.apic_id(index);
    let count = topo.count.max(1);
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2)
        .copied()
        .collect();
    let max_basic = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let amd = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| e.ebx == u32::from_le_bytes(*b"Auth"));

    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                e.ecx |= HYPERVISOR_BIT;
                if tsc_deadline {
                    e.ecx |= TSC_DEADLINE_BIT;
                }
                if count > 1 {
                    e.edx |= HTT_BIT;
                } else {
                    e.edx &= !HTT_BIT;
                }
            }
            4 if e.eax & 0x1f != 0 => {
                // Cache topology: cores per package; L1/L2 private, L3 shared by all.
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            0x4000_0000 => {
                e.eax = e.eax.max(0x4000_0001);
                let (b, c, d) = (
                    &KVM_SIGNATURE[0..4],
                    &KVM_SIGNATURE[4..8],
                    &KVM_SIGNATURE[8..],
                );
                e.ebx = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                e.ecx = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                e.edx = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
            }
            0x8000_0001 if amd => {
                // CmpLegacy: HTT counts cores, not threads.
                if count > 1 {
                    e.ecx |= 1 << 1;
                } else {
                    e.ecx &= !(1 << 1);
                }
            }
            0x8000_0008 if amd => {
                e.ecx = (e.ecx & !0xf0ff) | (bits_for(count) << 12) | (count - 1);
            }
            0x8000_001e if amd => {
                // Extended APIC ID; compute unit (core) ID with one thread per core; node 0.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
    if max_basic >= LEAF_TOPOLOGY {
        entries.extend(topology_entries(LEAF_TOPOLOGY, apic_id, count));
    }
    if max_basic >= LEAF_TOPOLOGY_V2 {
        entries.extend(topology_entries(LEAF_TOPOLOGY_V2, apic_id, count));
    }
    CpuId::from_entries(&entries).map_err(|e| AccelError::Guest {
        vcpu: index,
        msg: format!("building CPUID table: {e:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_supported() -> CpuId {
        let e = |function, index, eax, ebx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ..Default::default()
        };
        CpuId::from_entries(&[
            e(0, 0, 0x1f, u32::from_le_bytes(*b"Genu")),
            e(1, 0, 0x806f8, 0x0800),
            e(4, 0, (1 << 5) | 1, 0),
            e(4, 3, (3 << 5) | 3, 0),
            e(0xb, 0, 1, 2),
            e(0x4000_0000, 0, 0x4000_0001, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn topology_is_per_vcpu_and_consistent() {
        let topo = CpuTopology { count: 3 };
        let c = vcpu_cpuid(&fake_supported(), 2, &topo, true).unwrap();
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 3);
        assert_ne!(l1.ecx & HYPERVISOR_BIT, 0);
        assert_ne!(l1.ecx & TSC_DEADLINE_BIT, 0);
        assert_eq!(l1.ebx & 0xff00, 0x0800, "CLFLUSH size kept");
        for leaf in [0xb, 0x1f] {
            let smt = find(&c, leaf, 0);
            let core = find(&c, leaf, 1);
            assert_eq!(smt.edx, 2);
            assert_eq!(core.ebx, 3);
            assert_eq!(core.eax, 2, "3 cores need 2 APIC-ID bits");
            assert_eq!((core.ecx >> 8) & 0xff, 2);
            assert_eq!((find(&c, leaf, 2).ecx >> 8) & 0xff, 0);
        }
        assert_eq!(find(&c, 4, 0).eax >> 26, 2);
        assert_eq!((find(&c, 4, 3).eax >> 14) & 0xfff, 2);
        assert_eq!((find(&c, 4, 0).eax >> 14) & 0xfff, 0);
        let sig = find(&c, 0x4000_0000, 0);
        assert_eq!(&sig.ebx.to_le_bytes(), b"KVMK");
    }

    #[test]
    fn amd_core_count_and_ids() {
        let e = |function, eax, ebx| kvm_cpuid_entry2 {
            function,
            eax,
            ebx,
            ..Default::default()
        };
        let sup = CpuId::from_entries(&[
            e(0, 0x10, u32::from_le_bytes(*b"Auth")),
            e(1, 0, 0),
            e(0x8000_0001, 0, 0),
            e(0x8000_0008, 0x3030, 0),
            e(0x8000_001e, 7, 7),
        ])
        .unwrap();
        let c = vcpu_cpuid(&sup, 3, &CpuTopology { count: 4 }, false).unwrap();
        assert_eq!(find(&c, 0x8000_0008, 0).ecx & 0xff, 3);
        assert_eq!((find(&c, 0x8000_0008, 0).ecx >> 12) & 0xf, 2);
        assert_eq!(find(&c, 0x8000_001e, 0).eax, 3);
        assert_eq!(find(&c, 0x8000_001e, 0).ebx, 3);
        assert_ne!(
            find(&c, 0x8000_0001, 0).ecx & 2,
            0,
            "CmpLegacy with >1 core"
        );
        assert_eq!(find(&c, 0xb, 1).ebx, 4);
        assert!(
            c.as_slice().iter().all(|x| x.function != 0x1f),
            "max leaf 0x10"
        );
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
    }
}
