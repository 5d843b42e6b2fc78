//! The inflate and deflate queues: arrays of 4 KiB page numbers the guest gives to the
//! host or takes back.

use std::time::Duration;

use ebb_devices::ram::{GuestRam, RamRange};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{discard, drain, Budget, Chain, Pass};
use crate::counters::{BalloonCounters, DiscardReason};
use crate::pages::{check_pfns, page_runs, CheckedPfns, PageSet};
use crate::protocol::{BALLOON_PAGE_SIZE, PFN_SHIFT};

/// Descriptors Ebb reads from one inflate or deflate chain (Linux sends one).
pub const MAX_PFN_CHAIN_DESCRIPTORS: usize = 16;
/// Largest PFN array Ebb reads from one descriptor (Linux sends at most 256 PFNs).
pub const MAX_PFN_BYTES: u32 = 4096;

/// Page numbers one wake-up reads from the inflate or deflate queue before it yields:
/// 64 of Linux's 256-page buffers, or one of the largest chains Ebb accepts.
pub const PFN_BUDGET: u64 = (MAX_PFN_CHAIN_DESCRIPTORS as u64) * (MAX_PFN_BYTES as u64) / 4;

/// Takes inflate buffers: their valid pages join the balloon, and pages new to it are
/// discarded before the buffer goes back. A page already in the balloon is not discarded
/// again (a guest naming the same pages over and over costs one discard).
///
/// When guest RAM gives memory back in units larger than a balloon page (2 MiB huge
/// pages), a new page only completes what the balloon holds: a unit is discarded once
/// every balloon page of it is in the balloon, which the balloon's page set records
/// (deflating one of them undoes that, and the unit waits again).
pub fn inflate(
    ram: &GuestRam,
    queue: &mut Queue,
    balloon: &mut PageSet,
    counters: &mut BalloonCounters,
    time_limit: Duration,
) -> Pass {
    drain_pfn_buffers(ram, queue, counters, time_limit, |checked, counters| {
        counters.inflated_pages += checked.valid_entries;
        counters.repeated_inflates += checked.repeats;
        let unit = ram.discard_granule();
        for range in &checked.ranges {
            let new = new_runs(range, balloon, counters);
            if unit <= BALLOON_PAGE_SIZE {
                for run in new {
                    discard(ram, run, DiscardReason::Inflate, counters);
                }
            } else {
                for whole in completed_units(ram, &new, balloon, unit) {
                    discard(ram, whole, DiscardReason::Inflate, counters);
                }
            }
        }
    })
}

/// The units of `unit` bytes (huge pages) that `new` pages touch and the balloon now
/// holds entirely, in address order, each once.
fn completed_units(
    ram: &GuestRam,
    new: &[RamRange],
    balloon: &PageSet,
    unit: u64,
) -> Vec<RamRange> {
    let pages = (unit / BALLOON_PAGE_SIZE) as u32;
    let mut done: Vec<RamRange> = Vec::new();
    for run in new {
        let mut gpa = run.gpa() / unit * unit;
        while gpa < run.end() {
            let first = (gpa >> PFN_SHIFT) as u32;
            let seen = done.last().is_some_and(|d| d.gpa() == gpa);
            if !seen && balloon.contains_all(first, pages) {
                done.extend(ram.range(gpa, unit));
            }
            gpa += unit;
        }
    }
    done
}

/// The parts of `range` whose pages were not in the balloon, now added to it.
fn new_runs(
    range: &RamRange,
    balloon: &mut PageSet,
    counters: &mut BalloonCounters,
) -> Vec<RamRange> {
    let first = range.gpa() >> PFN_SHIFT;
    let pages = range.len() >> PFN_SHIFT;
    let mut runs = Vec::new();
    let mut run_start = None;
    for i in 0..=pages {
        // RAM ranges come from 32-bit page numbers.
        let added = i < pages && balloon.insert((first + i) as u32);
        if i < pages && !added {
            counters.repeated_inflates += 1;
        }
        match (added, run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(start)) => {
                runs.extend(range.slice(start << PFN_SHIFT, (i - start) << PFN_SHIFT));
                run_start = None;
            }
            _ => {}
        }
    }
    runs
}

/// Which deflated pages the host backs with memory before the guest has them back.
///
/// A guest that takes pages back because it is short of memory writes them at once; each
/// first write would be a host fault, a VM exit per 4 KiB page. Backing them in one call
/// per run of pages, before the buffer goes back (the guest frees the pages only after
/// that), spares the guest those exits. Pages given back for other reasons (a smaller
/// target set through the API, the end of a trim) are left to fault in when used: the
/// guest may never touch them, and backing them would cost the host for nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prefault {
    /// Back deflated pages at all.
    pub enabled: bool,
    /// Pages the guest was asked to give back because it was short (the policy's
    /// deflates for need), not yet backed.
    pub asked_pages: u64,
    /// The balloon's target in pages. Pages the guest takes back below it were not asked
    /// for: its deflate-on-OOM notifier took them to satisfy an allocation, so they are
    /// backed too.
    pub target_pages: u64,
}

impl Prefault {
    /// How many of the `removed` pages that left a balloon of `held_before` pages to
    /// back; the asked-for ones come out of [`Prefault::asked_pages`].
    pub fn take(&mut self, held_before: u64, removed: u64) -> u64 {
        if !self.enabled {
            return 0;
        }
        let asked = removed.min(held_before.saturating_sub(self.target_pages));
        let from_asked = asked.min(self.asked_pages);
        self.asked_pages -= from_asked;
        (removed - asked) + from_asked
    }
}

/// Takes deflate buffers: their valid pages leave the balloon (the guest may use them
/// again; they come back as zero pages on first touch). Those that `prefault` picks are
/// backed on the host first.
pub fn deflate(
    ram: &GuestRam,
    queue: &mut Queue,
    balloon: &mut PageSet,
    counters: &mut BalloonCounters,
    time_limit: Duration,
    prefault: &mut Prefault,
) -> Pass {
    drain_pfn_buffers(ram, queue, counters, time_limit, |checked, counters| {
        counters.deflated_pages += checked.valid_entries;
        counters.unknown_deflates += checked.repeats;
        let held_before = balloon.len();
        let mut left = Vec::new();
        for pfn in checked.pages() {
            if balloon.remove(pfn) {
                left.push(pfn);
            } else {
                counters.unknown_deflates += 1;
            }
        }
        let back = prefault.take(held_before, left.len() as u64) as usize;
        back_pages(ram, &left[..back], prefault, counters);
    })
}

/// Backs the pages `sorted` (page numbers in address order) with host memory, one call
/// per run of consecutive pages. The first failure turns backing off for good (a kernel
/// without `MADV_POPULATE_WRITE`, or a host out of memory): the guest faults its pages in
/// itself, as without it.
fn back_pages(
    ram: &GuestRam,
    sorted: &[u32],
    prefault: &mut Prefault,
    counters: &mut BalloonCounters,
) {
    for run in page_runs(sorted) {
        if !prefault.enabled {
            return;
        }
        let gpa = u64::from(run.first) << PFN_SHIFT;
        let Some(range) = ram.range(gpa, u64::from(run.count) << PFN_SHIFT) else {
            continue;
        };
        match ram.populate(range) {
            Ok(bytes) => counters.prefaulted_bytes += bytes,
            Err(e) => {
                counters.prefault_failures += 1;
                prefault.enabled = false;
                tracing::warn!(
                    "balloon: backing deflated pages {:#x}+{:#x}: {e}; deflated pages are \
                     no longer backed ahead of the guest",
                    range.gpa(),
                    range.len()
                );
            }
        }
    }
}

/// Drains PFN buffers within [`PFN_BUDGET`] and `time_limit`: each one read and checked against guest RAM
/// (rejects counted), then handed to `handle` before it goes back.
fn drain_pfn_buffers(
    ram: &GuestRam,
    queue: &mut Queue,
    counters: &mut BalloonCounters,
    time_limit: Duration,
    mut handle: impl FnMut(CheckedPfns, &mut BalloonCounters),
) -> Pass {
    let budget = Budget::new(PFN_BUDGET, time_limit);
    drain(
        queue,
        ram.memory(),
        counters,
        budget,
        |chain, counters, budget| {
            // An empty or malformed chain still costs a unit: a ring of them must yield too.
            budget.spend(1);
            if let Some(pfns) = read_pfns(chain, ram.memory(), counters) {
                budget.spend(pfns.len() as u64);
                let checked = check_pfns(ram, pfns);
                counters.rejected_pfns += checked.rejected;
                handle(checked, counters);
            }
        },
    )
}

/// Reads the PFN array of an inflate or deflate chain; `None` (counted) when the chain is
/// malformed: device-writable, empty, not a multiple of 4 bytes, too long, or outside RAM.
fn read_pfns(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    counters: &mut BalloonCounters,
) -> Option<Vec<u32>> {
    let mut pfns = Vec::new();
    for (i, desc) in chain.enumerate() {
        let len = desc.len();
        if i >= MAX_PFN_CHAIN_DESCRIPTORS
            || desc.is_write_only()
            || len == 0
            || len % 4 != 0
            || len > MAX_PFN_BYTES
        {
            counters.rejected_descriptors += 1;
            return None;
        }
        let mut raw = vec![0u8; len as usize];
        if mem.read_slice(&mut raw, desc.addr()).is_err() {
            counters.rejected_descriptors += 1;
            return None;
        }
        pfns.extend(
            raw.chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    if pfns.is_empty() {
        // A chain whose head index is out of range yields no descriptors.
        counters.rejected_descriptors += 1;
        return None;
    }
    Some(pfns)
}
