//! From what the guest sends to host ranges Ebb may discard.
//!
//! Everything here treats guest input as hostile: page numbers and ranges are checked
//! against guest RAM (which has no pages in the MMIO hole), arithmetic is checked, and a
//! range is only ever turned into a host address inside one guest RAM region.

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::protocol::{BALLOON_PAGE_SIZE, PFN_SHIFT};

/// A host virtual address range inside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRange {
    /// Guest physical start (for logs and accounting).
    pub gpa: u64,
    /// Host virtual start.
    pub host: usize,
    /// Length in bytes.
    pub len: usize,
}

/// The host range behind `[gpa, gpa + len)`, if it lies entirely in one guest RAM region.
pub fn host_range(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Option<HostRange> {
    if len == 0 {
        return None;
    }
    let end = gpa.checked_add(len)?;
    let region = mem.find_region(GuestAddress(gpa))?;
    let region_start = region.start_addr().0;
    let region_end = region_start.checked_add(region.len())?;
    if end > region_end {
        return None;
    }
    let host = region
        .get_host_address(MemoryRegionAddress(gpa - region_start))
        .ok()? as usize;
    Some(HostRange {
        gpa,
        host,
        len: usize::try_from(len).ok()?,
    })
}

/// True when 4 KiB page `pfn` is guest RAM.
pub fn pfn_is_ram(mem: &GuestMemoryMmap, pfn: u32) -> bool {
    let gpa = u64::from(pfn) << PFN_SHIFT;
    mem.find_region(GuestAddress(gpa))
        .map(|r| gpa + BALLOON_PAGE_SIZE <= r.start_addr().0 + r.len())
        .unwrap_or(false)
}

/// Sorts and de-duplicates valid page numbers and merges runs of consecutive pages into
/// ranges, split at region boundaries so each maps to one host range.
pub fn pfns_to_host_ranges(mem: &GuestMemoryMmap, pfns: &mut Vec<u32>) -> Vec<HostRange> {
    pfns.sort_unstable();
    pfns.dedup();
    let mut ranges = Vec::new();
    let mut run: Option<(u32, u32)> = None; // first pfn, count
    let flush = |run: (u32, u32), ranges: &mut Vec<HostRange>| {
        let gpa = u64::from(run.0) << PFN_SHIFT;
        let len = u64::from(run.1) << PFN_SHIFT;
        // Split at region boundaries (regions adjacent in guest physical space map to
        // different host ranges).
        let mut start = gpa;
        let end = gpa + len;
        while start < end {
            let Some(region) = mem.find_region(GuestAddress(start)) else {
                break;
            };
            let piece_end = end.min(region.start_addr().0 + region.len());
            if let Some(r) = host_range(mem, start, piece_end - start) {
                ranges.push(r);
            }
            start = piece_end;
        }
    };
    for &pfn in pfns.iter() {
        run = match run {
            Some((first, count)) if u64::from(first) + u64::from(count) == u64::from(pfn) => {
                Some((first, count + 1))
            }
            Some(done) => {
                flush(done, &mut ranges);
                Some((pfn, 1))
            }
            None => Some((pfn, 1)),
        };
    }
    if let Some(done) = run {
        flush(done, &mut ranges);
    }
    ranges
}

/// Which guest pages are in the balloon: one bit per 4 KiB page of guest physical space.
#[derive(Debug, Clone, Default)]
pub struct PageSet {
    bits: Vec<u64>,
    count: u64,
}

impl PageSet {
    /// A set able to hold every page below `end` (guest physical).
    pub fn new(end: u64) -> Self {
        let pages = end.div_ceil(BALLOON_PAGE_SIZE);
        Self {
            bits: vec![0; pages.div_ceil(64) as usize],
            count: 0,
        }
    }

    /// Adds `pfn`; false if it was already present or out of range.
    pub fn insert(&mut self, pfn: u32) -> bool {
        let (w, b) = (pfn as usize / 64, pfn % 64);
        match self.bits.get_mut(w) {
            Some(word) if *word & (1 << b) == 0 => {
                *word |= 1 << b;
                self.count += 1;
                true
            }
            _ => false,
        }
    }

    /// Removes `pfn`; false if it was not present.
    pub fn remove(&mut self, pfn: u32) -> bool {
        let (w, b) = (pfn as usize / 64, pfn % 64);
        match self.bits.get_mut(w) {
            Some(word) if *word & (1 << b) != 0 => {
                *word &= !(1 << b);
                self.count -= 1;
                true
            }
            _ => false,
        }
    }

    /// Pages in the set.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Empties the set.
    pub fn clear(&mut self) {
        self.bits.fill(0);
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Two regions with a hole between them, like guest RAM around the MMIO hole.
    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), (8 * MIB) as usize),
            (GuestAddress(16 * MIB), (8 * MIB) as usize),
        ])
        .unwrap()
    }

    #[test]
    fn pfn_validation_knows_the_hole_and_the_end() {
        let m = mem();
        assert!(pfn_is_ram(&m, 0));
        assert!(pfn_is_ram(&m, (8 * MIB / 4096 - 1) as u32));
        assert!(
            !pfn_is_ram(&m, (8 * MIB / 4096) as u32),
            "first page of the hole"
        );
        assert!(!pfn_is_ram(&m, (12 * MIB / 4096) as u32));
        assert!(pfn_is_ram(&m, (16 * MIB / 4096) as u32));
        assert!(pfn_is_ram(&m, (24 * MIB / 4096 - 1) as u32), "last page");
        assert!(!pfn_is_ram(&m, (24 * MIB / 4096) as u32), "beyond RAM");
        assert!(!pfn_is_ram(&m, u32::MAX));
    }

    #[test]
    fn pfns_merge_into_sorted_unique_ranges() {
        let m = mem();
        let mut pfns = vec![5, 3, 4, 4, 10, 3, 11, 2];
        let r = pfns_to_host_ranges(&m, &mut pfns);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].gpa, r[0].len), (2 * 4096, 4 * 4096));
        assert_eq!((r[1].gpa, r[1].len), (10 * 4096, 2 * 4096));
        assert_eq!(
            r[1].host - r[0].host,
            8 * 4096,
            "same region, same host layout"
        );
    }

    #[test]
    fn ranges_never_cross_regions() {
        // Regions that touch in guest physical space but are separate host mappings.
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), (MIB) as usize),
            (GuestAddress(MIB), (MIB) as usize),
        ])
        .unwrap();
        let last_of_first = (MIB / 4096 - 1) as u32;
        let mut pfns = vec![last_of_first, last_of_first + 1];
        let r = pfns_to_host_ranges(&m, &mut pfns);
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|x| x.len == 4096));
    }

    #[test]
    fn host_range_checks_bounds_and_overflow() {
        let m = mem();
        assert!(host_range(&m, 0, 8 * MIB).is_some());
        assert!(host_range(&m, 0, 8 * MIB + 4096).is_none(), "into the hole");
        assert!(host_range(&m, 7 * MIB, 2 * MIB).is_none());
        assert!(host_range(&m, 12 * MIB, 4096).is_none(), "in the hole");
        assert!(host_range(&m, 24 * MIB - 4096, 4096).is_some());
        assert!(host_range(&m, 24 * MIB, 4096).is_none(), "past the end");
        assert!(host_range(&m, u64::MAX - 100, 4096).is_none(), "overflow");
        assert!(host_range(&m, 0, 0).is_none(), "empty");
    }

    #[test]
    fn page_set_counts_membership() {
        let mut s = PageSet::new(24 * MIB);
        assert!(s.insert(7));
        assert!(!s.insert(7));
        assert!(s.insert(6143));
        assert!(!s.insert(6144), "beyond the set");
        assert_eq!(s.len(), 2);
        assert!(s.remove(7));
        assert!(!s.remove(7));
        assert!(!s.remove(u32::MAX));
        assert_eq!(s.len(), 1);
        s.clear();
        assert!(s.is_empty());
    }
}
