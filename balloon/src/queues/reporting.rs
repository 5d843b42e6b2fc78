//! The free page reporting queue: each buffer lists free ranges (2 MiB by default), which
//! Ebb discards before the buffer goes back, since the guest reuses them at once.

use ebb_devices::ram::GuestRam;
use virtio_queue::Queue;

use super::{discard, drain};
use crate::counters::{BalloonCounters, DiscardReason};
use crate::pages::check_report;
use crate::protocol::REPORT_CAPACITY;

/// What to do with reported pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportedPages {
    /// Give them back to the host.
    Discard,
    /// Keep them: the guest expects free pages to hold a non-zero poison pattern, and a
    /// discarded page would come back as zeros.
    Keep,
}

/// Takes every report on the queue. True when a buffer went back.
pub fn process(
    ram: &GuestRam,
    queue: &mut Queue,
    reported: ReportedPages,
    counters: &mut BalloonCounters,
) -> bool {
    drain(queue, ram.memory(), counters, |chain, counters| {
        counters.reports += 1;
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
            if reported == ReportedPages::Keep {
                counters.skipped_ranges += 1;
                counters.skipped_bytes += range.len();
                continue;
            }
            discard(ram, range, DiscardReason::Report, counters);
        }
    })
}
