//! Guest RAM for a VM configuration: Ebb's guest physical layout (RAM below and above the
//! 32-bit MMIO hole, [`layout::ram_regions`]) over [`GuestRam`], which owns how the memory
//! is backed and given back.

use ebb_devices::ram::{RamError, RamOptions};

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
}

/// Reserves and maps guest RAM for `config`. Nothing is touched: pages appear on first
/// access by the guest (or by the loader). `write_fence` registers it for write
/// protection (checked free page hinting).
pub fn guest_ram(config: &MemoryConfig, write_fence: bool) -> Result<GuestRam, MemoryError> {
    let options = RamOptions {
        thp: config.thp,
        write_fence,
        merge: config.merge,
    };
    GuestRam::new(&layout::ram_regions(config.size), options).map_err(|e| match e {
        RamError::Reserve { source, .. } => MemoryError::Reserve {
            size: format_size(config.size),
            source,
        },
        RamError::Layout(what) => MemoryError::Layout(what),
        RamError::WriteFence(e) => MemoryError::WriteFence(e),
        RamError::Merge(e) => MemoryError::Merge(e),
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
            thp: None,
            merge: false,
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
                thp: None,
                merge: false,
            },
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("cannot reserve"), "{err}");
    }
}
