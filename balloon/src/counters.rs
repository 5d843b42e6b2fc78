//! What the balloon did, counted for the API and metrics.

use std::time::Duration;

/// Report latency histogram: power-of-two microsecond buckets (bucket i holds latencies
/// in [2^i, 2^(i+1)) us; bucket 0 also holds 0 us).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Counts per bucket.
    pub buckets: [u64; 32],
    /// Samples recorded.
    pub count: u64,
    /// Sum of all samples, in microseconds.
    pub sum_us: u64,
}

impl LatencyHistogram {
    /// Records one sample.
    pub fn record(&mut self, latency: Duration) {
        let us = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket = if us == 0 {
            0
        } else {
            (63 - us.leading_zeros()) as usize
        };
        self.buckets[bucket.min(31)] += 1;
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// The latency below which `q` (0..=1) of samples fall, as the upper edge of the
    /// bucket holding that quantile; `None` without samples.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(1u64 << (i + 1));
            }
        }
        Some(1u64 << 32)
    }
}

/// Counters of one balloon device. All byte counts are guest memory bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Valid pages received on the inflate queue.
    pub inflated_pages: u64,
    /// Valid pages received on the deflate queue.
    pub deflated_pages: u64,
    /// Inflated pages already in the balloon (a repeat; discarded again, harmless).
    pub repeated_inflates: u64,
    /// Deflated pages that were not in the balloon.
    pub unknown_deflates: u64,
    /// Pages the guest took back below the host's target without being asked (its
    /// deflate-on-OOM notifier does that when an allocation would otherwise fail).
    pub oom_deflated_pages: u64,
    /// Bytes of deflated pages the host backed before giving them back to the guest
    /// (pages the guest took back because it was short: see `inflate::Prefault`).
    pub prefaulted_bytes: u64,
    /// Backing deflated pages that failed (the guest faults them in itself).
    pub prefault_failures: u64,
    /// Bytes discarded for inflated pages.
    pub inflate_discarded_bytes: u64,
    /// Discards asked of guest RAM (inflate, reporting and hinting; each one `madvise`
    /// call with anonymous memory, whose name the API keeps, or one hole punched in the
    /// file of a memfd or hugetlb backing).
    pub madvise_calls: u64,
    /// Discards that failed.
    pub madvise_failures: u64,
    /// Page numbers rejected (outside guest RAM or in the MMIO hole).
    pub rejected_pfns: u64,
    /// Descriptors or chains rejected (wrong direction, bad length or address, too long).
    pub rejected_descriptors: u64,
    /// Guest writes to config fields it may not write, or with bad values.
    pub rejected_config_writes: u64,
    /// Statistics reports received.
    pub stats_updates: u64,
    /// Free page reports (buffers) received.
    pub reports: u64,
    /// Valid ranges in those reports.
    pub reported_ranges: u64,
    /// Bytes in those ranges.
    pub reported_bytes: u64,
    /// Reported bytes discarded.
    pub reported_discarded_bytes: u64,
    /// Reported ranges not discarded because the guest poisons free pages.
    pub skipped_ranges: u64,
    /// Bytes in those ranges.
    pub skipped_bytes: u64,
    /// Reported ranges rejected (outside RAM, unaligned, overflowing, empty, too many).
    pub rejected_ranges: u64,
    /// Time from noticing a report to returning it to the guest.
    pub report_latency: LatencyHistogram,
    /// Free page hinting runs the guest finished (sent its STOP for).
    pub hint_runs: u64,
    /// Hinted blocks received during a run.
    pub hint_blocks: u64,
    /// Bytes in those blocks.
    pub hint_bytes: u64,
    /// Hinted bytes discarded.
    pub hint_discarded_bytes: u64,
    /// Hinted bytes kept because the guest had written them again (or a discard failed).
    pub hint_kept_bytes: u64,
    /// Blocks (and command ids) that arrived outside the run they belong to, not
    /// discarded.
    pub hint_stale: u64,
    /// Time the host spent checking and discarding hinted blocks, microseconds.
    pub hint_host_us: u64,
    /// Reported or hinted bytes kept because they do not cover a whole page of the
    /// backing (parts of a 2 MiB huge page with the hugetlb backing).
    pub unaligned_kept_bytes: u64,
}

/// Why a range is discarded (for the counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardReason {
    /// The guest put the pages in the balloon.
    Inflate,
    /// The guest reported the pages free.
    Report,
    /// The guest hinted the pages free when the host asked.
    Hint,
}

impl BalloonCounters {
    /// Counts one discard of `bytes` and its outcome.
    pub fn count_discard(&mut self, reason: DiscardReason, bytes: u64, succeeded: bool) {
        self.madvise_calls += 1;
        if !succeeded {
            self.madvise_failures += 1;
            return;
        }
        match reason {
            DiscardReason::Inflate => self.inflate_discarded_bytes += bytes,
            DiscardReason::Report => self.reported_discarded_bytes += bytes,
            DiscardReason::Hint => self.hint_discarded_bytes += bytes,
        }
    }

    /// All bytes handed back to the host.
    pub fn discarded_bytes(&self) -> u64 {
        self.inflate_discarded_bytes + self.reported_discarded_bytes + self.hint_discarded_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile_us(0.5), None);
        for us in [10u64, 12, 14, 15, 2000] {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count, 5);
        assert_eq!(h.quantile_us(0.5), Some(16));
        assert_eq!(h.quantile_us(0.99), Some(2048));
        h.record(Duration::ZERO);
        assert_eq!(h.buckets[0], 1);
        assert_eq!(h.sum_us, 2051);
    }
}
