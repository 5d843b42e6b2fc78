//! The one validation pass: what the guest sends (page numbers, reported ranges) becomes
//! [`RamRange`]s inside guest RAM, or is counted as rejected.
//!
//! Everything here treats guest input as hostile: arithmetic is checked, and a range only
//! exists once [`GuestRam`] has placed it inside one region (guest RAM has no pages in the
//! MMIO hole).

use ebb_devices::ram::{GuestRam, RamRange};
use virtio_queue::desc::split::Descriptor;

use crate::protocol::{BALLOON_PAGE_SIZE, PFN_SHIFT};

/// A run of consecutive page numbers: `first`, `first + 1`, ..., `first + count - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// First page number.
    pub first: u32,
    /// Pages in the run (at least 1).
    pub count: u32,
}

/// Merges sorted, distinct page numbers into maximal runs of consecutive pages.
pub fn page_runs(sorted_unique: &[u32]) -> Vec<PageRun> {
    let mut runs: Vec<PageRun> = Vec::new();
    for &pfn in sorted_unique {
        match runs.last_mut() {
            Some(run) if u64::from(run.first) + u64::from(run.count) == u64::from(pfn) => {
                run.count += 1;
            }
            _ => runs.push(PageRun {
                first: pfn,
                count: 1,
            }),
        }
    }
    runs
}

/// An inflate or deflate buffer's page numbers after validation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckedPfns {
    /// The valid pages, merged into ranges (split at region boundaries), each page once,
    /// in address order.
    pub ranges: Vec<RamRange>,
    /// Entries naming a page of guest RAM (repeats included).
    pub valid_entries: u64,
    /// Valid entries naming a page an earlier entry of the buffer already named.
    pub repeats: u64,
    /// Entries naming a page outside guest RAM (in the MMIO hole or past its end).
    pub rejected: u64,
}

impl CheckedPfns {
    /// The valid page numbers, each once, in order.
    pub fn pages(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges.iter().flat_map(|r| {
            let first = r.gpa() >> PFN_SHIFT;
            let end = r.end() >> PFN_SHIFT;
            // RAM ranges come from 32-bit page numbers, so they end at or below 2^44.
            (first..end).map(|p| p as u32)
        })
    }
}

/// Checks the page numbers of one inflate or deflate buffer against guest RAM: one
/// region lookup per run of consecutive pages, not per page.
pub fn check_pfns(ram: &GuestRam, mut pfns: Vec<u32>) -> CheckedPfns {
    pfns.sort_unstable();
    let entries = pfns.clone();
    pfns.dedup();
    let mut checked = CheckedPfns::default();
    for run in page_runs(&pfns) {
        let gpa = u64::from(run.first) << PFN_SHIFT;
        let len = u64::from(run.count) << PFN_SHIFT;
        checked.ranges.extend(ram.split(gpa, len).inside);
    }
    // Count entries (repeats included) against the ranges: both are sorted.
    let mut ranges = checked.ranges.iter().peekable();
    let mut previous = None;
    for pfn in entries {
        let gpa = u64::from(pfn) << PFN_SHIFT;
        while ranges.next_if(|r| r.end() <= gpa).is_some() {}
        let valid = ranges.peek().is_some_and(|r| r.gpa() <= gpa);
        if !valid {
            checked.rejected += 1;
        } else {
            checked.valid_entries += 1;
            if previous == Some(pfn) {
                checked.repeats += 1;
            }
        }
        previous = Some(pfn);
    }
    checked
}

/// The RAM range one free page report entry names, if Ebb may discard it: device-writable
/// (the guest hands the pages over), non-empty, page aligned and sized, inside one region.
pub fn check_report(ram: &GuestRam, desc: &Descriptor) -> Option<RamRange> {
    let (addr, len) = (desc.addr().0, u64::from(desc.len()));
    if !desc.is_write_only() || len % BALLOON_PAGE_SIZE != 0 {
        return None;
    }
    ram.range(addr, len)
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

    /// Whether `pfn` is in the set.
    pub fn contains(&self, pfn: u32) -> bool {
        self.bits
            .get(pfn as usize / 64)
            .is_some_and(|w| w & (1 << (pfn % 64)) != 0)
    }

    /// Whether every page `first..first + count` is in the set (whole words at a time
    /// where the run covers them).
    pub fn contains_all(&self, first: u32, count: u32) -> bool {
        let (mut pfn, end) = (u64::from(first), u64::from(first) + u64::from(count));
        while pfn < end {
            let (w, b) = ((pfn / 64) as usize, pfn % 64);
            if b == 0 && end - pfn >= 64 {
                if self.bits.get(w) != Some(&u64::MAX) {
                    return false;
                }
                pfn += 64;
            } else {
                if !self.contains(pfn as u32) {
                    return false;
                }
                pfn += 1;
            }
        }
        true
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
    use ebb_devices::ram::RamOptions;
    use proptest::prelude::*;
    use vm_memory::GuestAddress;

    const MIB: u64 = 1 << 20;

    /// Two regions with a hole between them, like guest RAM around the MMIO hole.
    fn ram() -> GuestRam {
        GuestRam::new(
            &[
                (GuestAddress(0), 8 * MIB),
                (GuestAddress(16 * MIB), 8 * MIB),
            ],
            RamOptions::default(),
        )
        .unwrap()
    }

    fn pfn(gpa: u64) -> u32 {
        (gpa >> PFN_SHIFT) as u32
    }

    proptest! {
        /// Runs expand back to exactly the input, and are maximal: two runs never touch.
        #[test]
        fn page_runs_round_trip(mut pfns in proptest::collection::vec(any::<u32>(), 0..300),
                                dense in proptest::collection::vec(0u32..600, 0..300)) {
            pfns.extend(dense);
            pfns.sort_unstable();
            pfns.dedup();
            let runs = page_runs(&pfns);
            let expanded: Vec<u32> = runs
                .iter()
                .flat_map(|r| (0..r.count).map(move |i| r.first + i))
                .collect();
            prop_assert_eq!(&expanded, &pfns);
            for pair in runs.windows(2) {
                prop_assert!(u64::from(pair[0].first) + u64::from(pair[0].count) < u64::from(pair[1].first));
            }
        }

        /// Every entry is counted once as valid or rejected; ranges hold each valid page
        /// once, inside RAM, in order, not touching within a region.
        #[test]
        fn checked_pfns_account_for_every_entry(pfns in proptest::collection::vec(
            prop_oneof![0u32..6200, any::<u32>()], 0..400)) {
            let ram = ram();
            let checked = check_pfns(&ram, pfns.clone());
            prop_assert_eq!(checked.valid_entries + checked.rejected, pfns.len() as u64);
            let in_ram = |p: u32| ram.range(u64::from(p) << PFN_SHIFT, 4096).is_some();
            let mut unique_valid: Vec<u32> = pfns.iter().copied().filter(|&p| in_ram(p)).collect();
            let valid_entries = unique_valid.len() as u64;
            unique_valid.sort_unstable();
            unique_valid.dedup();
            prop_assert_eq!(checked.valid_entries, valid_entries);
            prop_assert_eq!(checked.repeats, valid_entries - unique_valid.len() as u64);
            prop_assert_eq!(checked.pages().collect::<Vec<_>>(), unique_valid);
            for r in &checked.ranges {
                prop_assert_eq!(Some(*r), ram.range(r.gpa(), r.len()));
            }
        }
    }

    #[test]
    fn pfns_outside_ram_are_rejected_and_the_rest_merged() {
        let m = ram();
        let hole = pfn(8 * MIB);
        let pfns = vec![
            5,
            3,
            4,
            4,
            10,
            hole - 1,
            hole,
            hole + 7,
            pfn(16 * MIB),
            pfn(24 * MIB) - 1,
            pfn(24 * MIB),
            u32::MAX,
        ];
        let c = check_pfns(&m, pfns);
        assert_eq!(c.rejected, 4, "hole, hole, past the end, u32::MAX");
        assert_eq!((c.valid_entries, c.repeats), (8, 1));
        let ranges: Vec<(u64, u64)> = c.ranges.iter().map(|r| (r.gpa(), r.len())).collect();
        assert_eq!(
            ranges,
            [
                (3 * 4096, 3 * 4096),
                (10 * 4096, 4096),
                (8 * MIB - 4096, 4096),
                (16 * MIB, 4096),
                (24 * MIB - 4096, 4096)
            ]
        );
    }

    #[test]
    fn a_run_across_the_hole_is_split_at_the_regions() {
        // Regions that touch in guest physical space are separate slices too.
        let m = GuestRam::new(
            &[(GuestAddress(0), MIB), (GuestAddress(MIB), MIB)],
            RamOptions::default(),
        )
        .unwrap();
        let last_of_first = pfn(MIB) - 1;
        let c = check_pfns(&m, vec![last_of_first, last_of_first + 1]);
        assert_eq!(c.ranges.len(), 2);
        assert!(c.ranges.iter().all(|r| r.len() == 4096));
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

    #[test]
    fn contains_all_sees_every_page_of_a_run() {
        let mut s = PageSet::new(24 * MIB);
        for pfn in 512..1024 {
            s.insert(pfn);
        }
        assert!(s.contains_all(512, 512));
        assert!(s.contains_all(600, 30));
        assert!(!s.contains_all(511, 512));
        assert!(!s.contains_all(1000, 100));
        s.remove(700);
        assert!(!s.contains_all(512, 512));
        assert!(s.contains_all(701, 323));
        assert!(!s.contains_all(6100, 100), "beyond the set");
        assert!(s.contains_all(5, 0));
    }
}
