//! The free page reporting queue: each buffer lists free ranges (2 MiB by default), which
//! Ebb discards before the buffer goes back, since the guest reuses them at once.
//!
//! A report is validated as a whole when it is taken off the ring, then discarded within
//! a budget of bytes per wake-up: a report naming gigabytes is finished over several
//! wake-ups (the guest waits for it anyway), so no guest can hold the event loop.

use std::time::Duration;

use ebb_devices::ram::{GuestRam, RamRange, HOST_PAGE_SIZE};
use ebb_devices::virtio::QueueWork;
use virtio_queue::Queue;

use super::{discard, give_back, next_chain, Budget, Pass};
use crate::counters::{BalloonCounters, DiscardReason};
use crate::pages::check_report;
use crate::protocol::REPORT_CAPACITY;

/// Bytes of reported memory one wake-up discards before it yields (Linux sends at most
/// 32 x 4 MiB per report, so a well-behaved report fits with room to spare).
pub const REPORT_BUDGET_BYTES: u64 = 256 << 20;

/// What to do with reported pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportedPages {
    /// Give them back to the host.
    Discard,
    /// Keep them: the guest expects free pages to hold a non-zero poison pattern, and a
    /// discarded page would come back as zeros.
    Keep,
}

/// A report taken off the ring whose ranges are not all discarded yet.
#[derive(Debug)]
struct Pending {
    head: u16,
    /// Ranges left, last first (popped from the end); the first may be partly done.
    ranges: Vec<RamRange>,
}

/// The reporting queue and the report being worked on.
#[derive(Debug)]
pub struct ReportingQueue {
    queue: Queue,
    pending: Option<Pending>,
}

impl ReportingQueue {
    /// The queue as the driver set it up.
    pub fn new(queue: Queue) -> Self {
        Self {
            queue,
            pending: None,
        }
    }

    /// The queue, to notify on.
    pub fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// Works through reports within [`REPORT_BUDGET_BYTES`] and `time_limit`.
    pub fn process(
        &mut self,
        ram: &GuestRam,
        reported: ReportedPages,
        counters: &mut BalloonCounters,
        time_limit: Duration,
    ) -> Pass {
        let mem = ram.memory();
        let mut budget = Budget::new(REPORT_BUDGET_BYTES, time_limit);
        let mut gave_back = false;
        loop {
            let pending = match self.pending.as_mut() {
                Some(p) => p,
                None => {
                    let Some(chain) = next_chain(&mut self.queue, mem, counters) else {
                        return Pass {
                            gave_back,
                            work: QueueWork::Done,
                        };
                    };
                    let head = chain.head_index();
                    let mut ranges = check_chain(ram, chain, reported, counters);
                    ranges.reverse();
                    // Even an empty report costs something: a ring of them must yield.
                    budget.spend(1);
                    self.pending.insert(Pending { head, ranges })
                }
            };
            while let Some(range) = pending.ranges.pop() {
                if budget.is_spent() {
                    pending.ranges.push(range);
                    return Pass {
                        gave_back,
                        work: QueueWork::Yielded,
                    };
                }
                let piece_len = piece_len(&range, budget.left(), ram.discard_granule());
                let Some(piece) = range.slice(0, piece_len) else {
                    continue;
                };
                if let Some(rest) = range.slice(piece.len(), range.len() - piece.len()) {
                    pending.ranges.push(rest);
                }
                discard(ram, piece, DiscardReason::Report, counters);
                budget.spend(piece.len());
            }
            let head = pending.head;
            self.pending = None;
            gave_back |= give_back(&mut self.queue, mem, head, counters);
            if budget.is_spent() {
                return Pass {
                    gave_back,
                    work: QueueWork::Yielded,
                };
            }
        }
    }
}

/// How much of `range` to discard now with `left` bytes of budget: at least one unit of
/// the backing (`unit`: a page, or a huge page) and the budget's worth otherwise, cut on a
/// unit boundary so that no unit is split between two discards (each piece alone would
/// not cover it, and it would be kept).
fn piece_len(range: &RamRange, left: u64, unit: u64) -> u64 {
    let (start, end) = (range.gpa(), range.end());
    let want = start.saturating_add(left.max(unit)) / unit * unit;
    let cut = if want > start {
        want
    } else {
        (start / unit + 1) * unit
    };
    (cut.min(end) - start).max(HOST_PAGE_SIZE.min(range.len()))
}

/// The ranges of one report Ebb will discard, with every entry counted: valid or
/// rejected, kept when the guest poisons free pages.
fn check_chain(
    ram: &GuestRam,
    chain: super::Chain<'_>,
    reported: ReportedPages,
    counters: &mut BalloonCounters,
) -> Vec<RamRange> {
    counters.reports += 1;
    let mut ranges = Vec::new();
    for (i, desc) in chain.enumerate() {
        if i >= REPORT_CAPACITY {
            // Linux never reports more; stop reading a hostile chain here.
            counters.rejected_ranges += 1;
            break;
        }
        let Some(range) = check_report(ram, &desc) else {
            counters.rejected_ranges += 1;
            continue;
        };
        counters.reported_ranges += 1;
        counters.reported_bytes += range.len();
        match reported {
            ReportedPages::Keep => {
                counters.skipped_ranges += 1;
                counters.skipped_bytes += range.len();
            }
            ReportedPages::Discard => ranges.push(range),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;
    use ebb_devices::ram::RamOptions;
    use vm_memory::GuestAddress;

    const MIB: u64 = 1 << 20;

    #[test]
    fn pieces_end_on_unit_boundaries() {
        let ram = GuestRam::new(&[(GuestAddress(0), 64 * MIB)], RamOptions::default()).unwrap();
        let r = ram.range(4 * MIB, 8 * MIB).unwrap();
        // Pages: whatever the budget says, page aligned.
        assert_eq!(piece_len(&r, 3 * MIB + 5, 4096), 3 * MIB);
        assert_eq!(piece_len(&r, 1, 4096), 4096);
        assert_eq!(piece_len(&r, 100 * MIB, 4096), 8 * MIB);
        // Huge pages: never a split one.
        assert_eq!(piece_len(&r, 3 * MIB + 5, 2 * MIB), 2 * MIB);
        assert_eq!(piece_len(&r, 1, 2 * MIB), 2 * MIB);
        let odd = ram.range(MIB, 4 * MIB).unwrap();
        assert_eq!(piece_len(&odd, 1, 2 * MIB), MIB, "up to the first boundary");
        assert_eq!(piece_len(&odd, 4 * MIB, 2 * MIB), 3 * MIB);
        let small = ram.range(0, 8192).unwrap();
        assert_eq!(piece_len(&small, 1, 2 * MIB), 8192);
    }
}
