//! Guest RAM for a VM configuration: Ebb's guest physical layout (RAM below and above the
//! 32-bit MMIO hole, [`layout::ram_regions`]) over [`GuestRam`], which owns how the memory
//! is backed and given back.

use ebb_devices::ram::{Backing, HugePagePool, RamError, RamOptions, HUGE_PAGE_SIZE};

pub use ebb_devices::ram::GuestRam;

use crate::config::{format_size, MemoryConfig};
use crate::layout;

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused to reserve address space.
    #[error("cannot reserve {size} of host address space for guest RAM: {source}")]
    Reserve {
        /// Human-readable size.
        size: String,
        /// The mmap error.
        source: std::io::Error,
    },
    /// Building the vm-memory view failed.
    #[error("cannot describe guest RAM: {0}")]
    Layout(String),
    /// Free page hinting needs a write fence the host could not give.
    #[error("free page hinting: cannot write-protect guest RAM: {0}")]
    WriteFence(std::io::Error),
    /// `merge=on` asked for same-page merging the host does not have.
    #[error(
        "--memory ...,merge=on: the host refused same-page merging (MADV_MERGEABLE: {0}); \
         its kernel needs CONFIG_KSM"
    )]
    Merge(std::io::Error),
    /// The backing could not be made (memfd, huge pages).
    #[error("{0}")]
    Backing(String),
}

/// Checks, before anything is set up, that the host can give guest RAM its backing: for
/// hugetlb, enough free 2 MiB huge pages in the host's pool for all of guest RAM.
pub fn check_backing(config: &MemoryConfig) -> Result<(), MemoryError> {
    if config.backing != Backing::Hugetlb {
        return Ok(());
    }
    let needed = config.size.div_ceil(HUGE_PAGE_SIZE);
    let pool = HugePagePool::read().map_err(|e| {
        MemoryError::Backing(format!(
            "backing=hugetlb: cannot read the host's pool of 2 MiB huge pages ({e})"
        ))
    })?;
    if pool.available() < needed {
        return Err(MemoryError::Backing(format!(
            "backing=hugetlb: {} of guest memory needs {needed} free 2 MiB huge pages, the \
             host has {} (pool {}, free {}, reserved {}); reserve more with `echo N > \
             /proc/sys/vm/nr_hugepages`",
            format_size(config.size),
            pool.available(),
            pool.total,
            pool.free,
            pool.reserved
        )));
    }
    Ok(())
}

/// Reserves and maps guest RAM for `config`. Nothing is touched: pages appear on first
/// access by the guest (or by the loader). `write_fence` registers it for write
/// protection (checked free page hinting).
pub fn guest_ram(config: &MemoryConfig, write_fence: bool) -> Result<GuestRam, MemoryError> {
    let options = RamOptions {
        thp: config.thp,
        write_fence,
        merge: config.merge,
        backing: config.backing,
    };
    GuestRam::new(&layout::ram_regions(config.size), options).map_err(|e| match e {
        RamError::Reserve { source, .. } => MemoryError::Reserve {
            size: format_size(config.size),
            source,
        },
        RamError::Layout(what) => MemoryError::Layout(what),
        RamError::WriteFence(e) => MemoryError::WriteFence(e),
        RamError::Merge(e) => MemoryError::Merge(e),
        e @ RamError::Backing { .. } => MemoryError::Backing(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GIB;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    #[test]
    fn ram_above_3_gib_moves_above_the_mmio_hole() {
        let cfg = MemoryConfig {
            size: 5 * GIB,
            ..MemoryConfig::default()
        };
        let ram = guest_ram(&cfg, false).unwrap();
        assert_eq!(ram.size(), 5 * GIB);
        assert_eq!(ram.host_start() % (2 << 20), 0, "2 MiB aligned for THP");
        let slots = ram.slots();
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[1].0, GuestAddress(4 * GIB));
        assert_eq!(slots[1].2, ram.host_start() as u64 + 3 * GIB);
        // Both regions are usable and distinct.
        ram.memory()
            .write_obj(0xabu8, GuestAddress(3 * GIB - 1))
            .unwrap();
        ram.memory()
            .write_obj(0xcdu8, GuestAddress(4 * GIB))
            .unwrap();
        assert_eq!(
            ram.memory()
                .read_obj::<u8>(GuestAddress(3 * GIB - 1))
                .unwrap(),
            0xab
        );
        assert_eq!(
            ram.memory().read_obj::<u8>(GuestAddress(4 * GIB)).unwrap(),
            0xcd
        );
        assert!(ram.memory().read_obj::<u8>(GuestAddress(3 * GIB)).is_err());
        assert_eq!(ram.memory().last_addr(), GuestAddress(6 * GIB - 1));
    }

    #[test]
    fn impossible_sizes_fail_cleanly() {
        let err = guest_ram(
            &MemoryConfig {
                size: 1 << 62,
                ..MemoryConfig::default()
            },
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("cannot reserve"), "{err}");
    }

    #[test]
    fn a_memfd_backing_maps_shared_memory_and_reports_its_blocks() {
        let cfg = MemoryConfig {
            size: 64 << 20,
            backing: Backing::Memfd,
            ..MemoryConfig::default()
        };
        check_backing(&cfg).unwrap();
        let ram = guest_ram(&cfg, false).unwrap();
        assert_eq!(ram.allocated_bytes(), Some(0));
        ram.memory()
            .write_slice(&[1u8; 1 << 20], GuestAddress(0))
            .unwrap();
        assert_eq!(ram.allocated_bytes(), Some(1 << 20));
    }

    #[test]
    fn hugetlb_needs_enough_free_huge_pages() {
        let Ok(pool) = HugePagePool::read() else {
            return;
        };
        let cfg = MemoryConfig {
            size: (pool.available() + 1) * HUGE_PAGE_SIZE,
            backing: Backing::Hugetlb,
            ..MemoryConfig::default()
        };
        let e = check_backing(&cfg).unwrap_err().to_string();
        assert!(e.contains("free 2 MiB huge pages"), "{e}");
        assert!(e.contains("nr_hugepages"), "{e}");
    }
}
