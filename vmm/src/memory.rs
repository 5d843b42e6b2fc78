//! Guest RAM: one anonymous private mapping, populated lazily by the host kernel.
//!
//! All of guest RAM lives in a single mapping whose size equals the configured memory,
//! fenced by inaccessible guard pages so the host kernel never merges it with a neighbour.
//! That makes "the RSS of guest RAM" one entry in `/proc/PID/smaps`, which the tests and
//! the API read. The regions below and above the 32-bit MMIO hole are consecutive slices
//! of that mapping.

use std::io;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::config::{format_size, MemoryConfig, PAGE_SIZE};
use crate::layout;

/// Transparent huge page size on x86_64.
const HUGE_PAGE: usize = 2 << 20;

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused to reserve address space.
    #[error("cannot reserve {size} of host address space for guest RAM: {source}")]
    Reserve {
        /// Human-readable size.
        size: String,
        /// The mmap error.
        source: io::Error,
    },
    /// Building the vm-memory view failed.
    #[error("cannot describe guest RAM: {0}")]
    Layout(String),
}

/// Guest RAM and where it lives in the host.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    host_start: usize,
    size: u64,
}

impl GuestRam {
    /// Reserves and maps guest RAM for `config`. Nothing is touched: pages appear on first
    /// access by the guest (or by the loader).
    pub fn new(config: &MemoryConfig) -> Result<Self, MemoryError> {
        let size = config.size;
        let reserve_err = |source| MemoryError::Reserve {
            size: format_size(size),
            source,
        };
        let size_usize = usize::try_from(size)
            .map_err(|_| reserve_err(io::Error::from_raw_os_error(libc::ENOMEM)))?;
        let guard = PAGE_SIZE as usize;
        // Room to start RAM on a 2 MiB boundary, so guest huge pages line up with host
        // transparent huge pages and a 2 MiB report frees a whole host huge page.
        let total = size_usize
            .checked_add(2 * guard + HUGE_PAGE)
            .ok_or_else(|| reserve_err(io::Error::from_raw_os_error(libc::ENOMEM)))?;

        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; no
        // existing memory is affected. The result is checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(reserve_err(io::Error::last_os_error()));
        }
        let ram = (base as usize + guard).next_multiple_of(HUGE_PAGE) as *mut libc::c_void;
        // SAFETY: `ram..ram+size` lies inside the reservation just made, which nothing else
        // uses. MAP_NORESERVE keeps the host from committing swap for untouched memory.
        let ret = unsafe { libc::mprotect(ram, size_usize, libc::PROT_READ | libc::PROT_WRITE) };
        if ret != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: unmapping exactly the reservation made above.
            unsafe { libc::munmap(base, total) };
            return Err(reserve_err(e));
        }
        if let Some(huge) = config.thp {
            let advice = if huge {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            };
            // SAFETY: advising on our own RAM mapping; it changes no contents.
            if unsafe { libc::madvise(ram, size_usize, advice) } != 0 {
                tracing::warn!(
                    "transparent huge page advice on guest RAM failed: {}",
                    io::Error::last_os_error()
                );
            }
        }

        let mut regions = Vec::new();
        let mut offset = 0usize;
        for (gpa, len) in layout::ram_regions(size) {
            let len = len as usize;
            // SAFETY: the slice [ram+offset, ram+offset+len) is inside the RW mapping above,
            // which stays mapped for the life of the process (it is never unmapped: guest RAM
            // lives as long as the VMM).
            let region = unsafe {
                MmapRegion::build_raw(
                    (ram as usize + offset) as *mut u8,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                )
            }
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
            let region = GuestRegionMmap::new(region, gpa)
                .ok_or_else(|| MemoryError::Layout(format!("region at {:#x} overflows", gpa.0)))?;
            regions.push(region);
            offset += len;
        }
        let memory = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        Ok(Self {
            memory,
            host_start: ram as usize,
            size,
        })
    }

    /// The vm-memory view of guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Host virtual address of the first byte of guest RAM.
    pub fn host_start(&self) -> usize {
        self.host_start
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of guest physical `gpa`'s region start, for KVM memory slots:
    /// (slot guest address, size, host address).
    pub fn slots(&self) -> Vec<(GuestAddress, u64, u64)> {
        let mut offset = 0u64;
        layout::ram_regions(self.size)
            .into_iter()
            .map(|(gpa, len)| {
                let host = self.host_start as u64 + offset;
                offset += len;
                (gpa, len, host)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GIB, MIB};
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn smaps_entry_size_kib(start: usize) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut in_entry = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((s, _)) = range.split_once('-') {
                    if let Ok(s) = usize::from_str_radix(s, 16) {
                        in_entry = s == start;
                        continue;
                    }
                }
            }
            if in_entry {
                if let Some(v) = line.strip_prefix("Size:") {
                    return v.trim().trim_end_matches(" kB").parse().ok();
                }
            }
        }
        None
    }

    #[test]
    fn ram_is_one_mapping_of_exactly_the_configured_size() {
        let cfg = MemoryConfig {
            size: 5 * GIB,
            thp: None,
        };
        let ram = GuestRam::new(&cfg).unwrap();
        assert_eq!(smaps_entry_size_kib(ram.host_start()), Some(5 * GIB / 1024));
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
    fn thp_advice_is_applied() {
        let ram = GuestRam::new(&MemoryConfig {
            size: 64 * MIB,
            thp: Some(false),
        })
        .unwrap();
        assert_eq!(smaps_entry_size_kib(ram.host_start()), Some(64 * 1024));
    }

    #[test]
    fn impossible_sizes_fail_cleanly() {
        let err = GuestRam::new(&MemoryConfig {
            size: 1 << 62,
            thp: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("cannot reserve"), "{err}");
    }
}
