//! x86_64 vCPU state at boot: CPUID, MSRs, FPU, LAPIC, registers, segments and the boot
//! page tables.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::BootEntry;
use crate::layout;

/// Failures configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {vcpu}: {what} failed: {source}")]
    Kvm {
        /// vCPU index.
        vcpu: u32,
        /// What was being set.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than asked.
    #[error("vCPU {vcpu}: KVM accepted only {set} of {wanted} boot MSRs")]
    Msrs {
        /// vCPU index.
        vcpu: u32,
        /// Accepted.
        set: usize,
        /// Requested.
        wanted: usize,
    },
    /// Writing boot structures to guest memory failed.
    #[error("writing boot structures: {0}")]
    Memory(String),
}

const CPUID_HYPERVISOR: u32 = 1 << 31;
const CPUID_HTT: u32 = 1 << 28;
const CPUID_AMD_CMP_LEGACY: u32 = 1 << 1;
const VENDOR_AMD_EBX: u32 = 0x6874_7541; // "Auth"

fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Adapts KVM's supported CPUID for vCPU `id` of `cpus`: APIC IDs, topology (one socket,
/// one thread per core) and the hypervisor bit.
pub fn vcpu_cpuid(supported: &CpuId, id: u32, cpus: u32) -> CpuId {
    let mut cpuid = supported.clone();
    let is_amd = supported
        .as_slice()
        .iter()
        .any(|e| e.function == 0 && e.ebx == VENDOR_AMD_EBX);
    let core_bits = bits_for(cpus);
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((cpus.min(255)) << 16);
                e.ecx |= CPUID_HYPERVISOR;
                if cpus > 1 {
                    e.edx |= CPUID_HTT;
                } else {
                    e.edx &= !CPUID_HTT;
                }
            }
            4 => {
                // Cores per package - 1, for Intel's deterministic cache leaf.
                e.eax = (e.eax & 0x03ff_ffff) | ((cpus - 1).min(63) << 26);
            }
            0xb | 0x1f => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = cpus;
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            0x8000_0001 if is_amd => {
                if cpus > 1 {
                    e.ecx |= CPUID_AMD_CMP_LEGACY;
                } else {
                    e.ecx &= !CPUID_AMD_CMP_LEGACY;
                }
            }
            0x8000_0008 if is_amd => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (cpus - 1);
            }
            _ => {}
        }
    }
    cpuid
}

/// Guest physical address width KVM supports (CPUID 0x80000008 EAX[7:0]).
pub fn phys_address_bits(supported: &CpuId) -> u32 {
    supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| e.eax & 0xff)
        .filter(|&b| b >= 32)
        .unwrap_or(36)
}

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

/// The MSRs a booting kernel expects to find initialised. Only these: PVM-style hosts
/// reject others, and the kernel sets the rest itself.
pub fn boot_msrs() -> Vec<(u32, u64)> {
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

fn kvm_err(vcpu: u32, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { vcpu, what, source }
}

/// Sets the state every vCPU needs: CPUID, MSRs, FPU and LAPIC local interrupts.
pub fn configure_vcpu(fd: &VcpuFd, id: u32, cpus: u32, supported: &CpuId) -> Result<(), CpuError> {
    fd.set_cpuid2(&vcpu_cpuid(supported, id, cpus))
        .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;

    let entries: Vec<kvm_msr_entry> = boot_msrs()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Msrs {
        vcpu: id,
        set: 0,
        wanted: entries.len(),
    })?;
    let set = fd.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(CpuError::Msrs {
            vcpu: id,
            set,
            wanted: entries.len(),
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(kvm_err(id, "KVM_SET_FPU"))?;

    let mut lapic = fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
    set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    fd.set_lapic(&lapic).map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_lvt_delivery_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

/// GDT descriptor flags (access byte in bits 0-7, G/DB/L/AVL in bits 12-15).
const GDT_CODE64: u16 = 0xa09b;
const GDT_CODE32: u16 = 0xc09b;
const GDT_DATA: u16 = 0xc093;
const GDT_TSS: u16 = 0x808b;

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = u64::from(flags);
    let base = u64::from(base);
    let limit = u64::from(limit);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let limit_raw = ((entry >> 32) & 0x000f_0000) | (entry & 0xffff);
    let limit = if g == 1 {
        ((limit_raw << 12) | 0xfff) as u32
    } else {
        limit_raw as u32
    };
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Sets the boot vCPU's registers and segments for `entry`, writing the GDT (and for
/// 64-bit entry the identity-mapped page tables) into guest memory.
pub fn configure_boot_vcpu(
    fd: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: BootEntry,
) -> Result<(), CpuError> {
    let code_flags = match entry {
        BootEntry::Long64 { .. } => GDT_CODE64,
        BootEntry::Pvh { .. } => GDT_CODE32,
    };
    let gdt = [
        0,
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(GDT_DATA, 0, 0xfffff),
        gdt_entry(GDT_TSS, 0, 0xfffff),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_START + 8 * i as u64))
            .map_err(|e| CpuError::Memory(e.to_string()))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_START))
        .map_err(|e| CpuError::Memory(e.to_string()))?;

    let mut sregs: kvm_sregs = fd.get_sregs().map_err(kvm_err(0, "KVM_GET_SREGS"))?;
    sregs.gdt.base = layout::GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_START;
    sregs.idt.limit = 7;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Long64 { rip, zero_page } => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = rip;
            regs.rsi = zero_page;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
        }
        BootEntry::Pvh { rip, start_info } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = rip;
            regs.rbx = start_info;
        }
    }
    fd.set_sregs(&sregs).map_err(kvm_err(0, "KVM_SET_SREGS"))?;
    fd.set_regs(&regs).map_err(kvm_err(0, "KVM_SET_REGS"))?;
    Ok(())
}

/// Identity-maps the first GiB with 2 MiB pages: enough for the kernel's 64-bit entry,
/// which builds its own tables right away.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| CpuError::Memory(e.to_string()))
    };
    w(layout::PDPTE_START | 0x03, layout::PML4_START)?;
    w(layout::PDE_START | 0x03, layout::PDPTE_START)?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        w((i << 21) | 0x83, layout::PDE_START + i * 8)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment_from_gdt(gdt_entry(GDT_CODE64, 0, 0xfffff), 1);
        assert_eq!(
            (code.selector, code.type_, code.l, code.db, code.g),
            (8, 0xb, 1, 0, 1)
        );
        assert_eq!(
            (code.base, code.limit, code.present, code.s),
            (0, 0xffff_ffff, 1, 1)
        );
        let data = segment_from_gdt(gdt_entry(GDT_DATA, 0, 0xfffff), 2);
        assert_eq!((data.selector, data.type_, data.db, data.l), (16, 3, 1, 0));
        let code32 = segment_from_gdt(gdt_entry(GDT_CODE32, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let tss = segment_from_gdt(gdt_entry(GDT_TSS, 0, 0xfffff), 3);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
        // Known encoding of a 64-bit flat code descriptor.
        assert_eq!(gdt_entry(GDT_CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_carries_apic_ids_and_topology() {
        let mut leaf0 = entry(0, 0);
        leaf0.ebx = VENDOR_AMD_EBX;
        let supported = CpuId::from_entries(&[
            leaf0,
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0008, 0),
        ])
        .unwrap();
        let c = vcpu_cpuid(&supported, 2, 4);
        let get = |f: u32, i: u32| {
            *c.as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .unwrap()
        };
        assert_eq!(get(1, 0).ebx >> 24, 2);
        assert_eq!((get(1, 0).ebx >> 16) & 0xff, 4);
        assert_ne!(get(1, 0).ecx & CPUID_HYPERVISOR, 0);
        assert_ne!(get(1, 0).edx & CPUID_HTT, 0);
        assert_eq!(get(0xb, 0).edx, 2);
        assert_eq!(get(0xb, 1).ebx, 4);
        assert_eq!(get(0xb, 1).eax, 2);
        assert_eq!(get(0x8000_0008, 0).ecx & 0xff, 3);
        let single = vcpu_cpuid(&supported, 0, 1);
        assert_eq!(single.as_slice()[1].edx & CPUID_HTT, 0);
    }

    #[test]
    fn phys_bits_default_and_read() {
        let mut e = entry(0x8000_0008, 0);
        e.eax = 0x3030;
        assert_eq!(phys_address_bits(&CpuId::from_entries(&[e]).unwrap()), 48);
        assert_eq!(
            phys_address_bits(&CpuId::from_entries(&[entry(1, 0)]).unwrap()),
            36
        );
    }

    #[test]
    fn lvt_mode_update_keeps_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x30;
        regs[APIC_LVT0 + 2] = 0x01; // mask bit (bit 16)
        set_lvt_delivery_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x30);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
