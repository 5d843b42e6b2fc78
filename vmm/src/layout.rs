//! The x86_64 guest physical address map.
//!
//! ```text
//! 0x0000_0000  real-mode area: GDT/IDT, PVH start info, zero page, boot stack, page tables
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  end of base RAM (EBDA and legacy holes above are not RAM)
//! 0x000e_0000  ACPI tables (E820 reserved)
//! 0x0010_0000  kernel (bzImage protected-mode code), then RAM up to the MMIO hole
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio windows, IOAPIC, LAPIC, KVM's TSS
//! 0x1_0000_0000 RAM above 4 GiB for guests larger than 3 GiB
//! ```

use vm_memory::GuestAddress;

use crate::config::MIB;

/// GDT location.
pub const GDT_START: u64 = 0x500;
/// IDT location (empty: the kernel installs its own).
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Maximum PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, PDPT and one PD identity-mapping the first GiB.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line Ebb will place (the kernel's own limit is usually lower).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// End of usable base memory (start of the EBDA).
pub const EBDA_START: u64 = 0x9fc00;
/// Reserved area holding the ACPI tables; also scanned by guests for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
/// End of the reserved area below 1 MiB (ACPI tables and the reset vector).
pub const ACPI_END: u64 = 0x10_0000;
/// Where the x86 reset vector (F000:FFF0) lands; Ebb puts a reset stub there, so ACPI
/// tables must end before it.
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// Start of high memory (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Most virtio-mmio devices (one IRQ each, GSI 5..=23).
pub const VIRTIO_MMIO_MAX_DEVICES: u32 = 19;
/// First GSI handed to virtio-mmio devices (COM1 uses 4).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// Most virtio-mmio devices with the ACPI power button: it takes the GSI after the last
/// of them, and GSIs end at [`MAX_GSI`].
pub const MAX_VIRTIO_DEVICES: u32 = MAX_GSI - VIRTIO_FIRST_IRQ;
/// The ACPI Generic Event Device's register window, just below the virtio-mmio windows.
pub const GED_MMIO_START: u64 = VIRTIO_MMIO_START - GED_MMIO_SIZE;
/// Size of the Generic Event Device's window (its event register is 4 bytes).
pub const GED_MMIO_SIZE: u64 = 0x1000;
/// Highest GSI the IOAPIC has (24 pins): the GED takes the first GSI after the
/// virtio-mmio devices and must not pass this.
pub const MAX_GSI: u32 = 23;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Three pages KVM needs for its real-mode TSS on Intel hosts.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page for Intel real mode, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// The RAM regions backing `memory_bytes` of guest memory: everything below the MMIO hole
/// first, the rest from 4 GiB. Sizes are page multiples because `memory_bytes` is.
pub fn ram_regions(memory_bytes: u64) -> Vec<(GuestAddress, u64)> {
    let low = memory_bytes.min(MMIO_HOLE_START);
    let mut regions = vec![(GuestAddress(0), low)];
    if memory_bytes > low {
        regions.push((GuestAddress(MMIO_HOLE_END), memory_bytes - low));
    }
    regions
}

/// One past the highest guest physical RAM address.
pub fn ram_end(memory_bytes: u64) -> u64 {
    ram_regions(memory_bytes)
        .last()
        .map(|(base, size)| base.0 + size)
        .unwrap_or(0)
}

/// E820 entry types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved.
    Reserved = 2,
}

/// One E820 map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type.
    pub kind: E820Type,
}

/// The memory map the guest sees: base RAM, the reserved ACPI area, RAM from 1 MiB to the
/// hole, and RAM above 4 GiB.
pub fn e820_map(memory_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: ACPI_START,
            size: ACPI_END - ACPI_START,
            kind: E820Type::Reserved,
        },
    ];
    for (base, size) in ram_regions(memory_bytes) {
        let start = base.0.max(HIMEM_START);
        let end = base.0 + size;
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820Type::Ram,
            });
        }
    }
    map
}

/// Smallest guest memory Ebb accepts whatever the kernel: room for the boot structures,
/// the kernel at 1 MiB and its early allocations.
pub const MIN_MEMORY: u64 = 32 * MIB;

/// True when `[addr, addr + len)` lies entirely in guest RAM (not in a hole).
pub fn is_ram_range(memory_bytes: u64, addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    ram_regions(memory_bytes)
        .iter()
        .any(|(base, size)| addr >= base.0 && end <= base.0 + size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GIB;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(512 * MIB), vec![(GuestAddress(0), 512 * MIB)]);
        assert_eq!(ram_end(512 * MIB), 512 * MIB);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let r = ram_regions(5 * GIB);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), 3 * GIB));
        assert_eq!(r[1], (GuestAddress(4 * GIB), 2 * GIB));
        assert_eq!(ram_end(5 * GIB), 6 * GIB);
        // Exactly 3 GiB still fits below the hole.
        assert_eq!(ram_regions(3 * GIB).len(), 1);
        // Devices are in the hole.
        for addr in [
            GED_MMIO_START,
            VIRTIO_MMIO_START,
            IOAPIC_START,
            LAPIC_START,
            KVM_TSS_ADDRESS,
        ] {
            assert!((MMIO_HOLE_START..MMIO_HOLE_END).contains(&addr));
        }
    }

    #[test]
    fn e820_describes_ram_and_reserved_areas() {
        let map = e820_map(5 * GIB);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820Type::Ram
            }
        );
        assert_eq!(map[1].kind, E820Type::Reserved);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 0x10_0000,
                size: 3 * GIB - 0x10_0000,
                kind: E820Type::Ram
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: 4 * GIB,
                size: 2 * GIB,
                kind: E820Type::Ram
            }
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        // All RAM except the legacy area between the EBDA and 1 MiB.
        assert_eq!(ram, 5 * GIB - (HIMEM_START - EBDA_START));
        // No entry overlaps another.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn ram_range_checks_know_the_hole() {
        let mem = 5 * GIB;
        assert!(is_ram_range(mem, 0, 4096));
        assert!(is_ram_range(mem, 3 * GIB - 4096, 4096));
        assert!(!is_ram_range(mem, 3 * GIB - 4096, 8192));
        assert!(!is_ram_range(mem, 3 * GIB, 4096));
        assert!(is_ram_range(mem, 4 * GIB, 4096));
        assert!(is_ram_range(mem, 6 * GIB - 4096, 4096));
        assert!(!is_ram_range(mem, 6 * GIB - 4096, 4097));
        assert!(!is_ram_range(mem, u64::MAX - 10, 4096));
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let areas = [
            (GDT_START, 0x20),
            (IDT_START, 8),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x20),
            (PVH_MEMMAP_START, (PVH_MEMMAP_MAX_ENTRIES * 24) as u64),
            (ZERO_PAGE_START, 0x1000),
            (BOOT_STACK_POINTER - 0xff0, 0xff0),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        for (i, a) in areas.iter().enumerate() {
            assert!(a.0 + a.1 <= EBDA_START);
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
    }
}
