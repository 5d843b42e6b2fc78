//! Guest misbehaviour: counted by kind, and logged so that no guest can flood the log.
//!
//! Every fault is counted (the API's `/metrics` shows the counts). The first
//! [`LOGGED_AT_ONCE`] of each kind are logged at warn level as they happen; after that at
//! most one line per [`SUMMARY_INTERVAL`] per kind, saying how many were left out since
//! the last line. A guest can make Ebb count, never make it write without bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Faults of one kind logged as they happen before the rate limit starts.
pub const LOGGED_AT_ONCE: u64 = 5;
/// Once limited, the shortest time between two lines of one kind.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// The kinds of guest misbehaviour Ebb counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestFault {
    /// A register access of the wrong width, at an unknown offset, or at the wrong time.
    RegisterAccess,
    /// An ACPI sleep state other than S5 (power off).
    SleepType,
    /// Feature bits the device did not offer, or without VIRTIO_F_VERSION_1.
    Features,
    /// A queue set up with a bad size, unaligned, or outside guest RAM.
    QueueSetup,
    /// An available ring whose index ran past the ring: the queue is unusable until reset.
    AvailRing,
    /// A descriptor chain with a bad head, direction, length, address or too many links.
    DescriptorChain,
    /// A page number outside guest RAM.
    PageNumber,
    /// A reported range that is unaligned, empty, overflowing or outside guest RAM.
    ReportRange,
    /// A config space write to a field the guest may not write, or with a bad value.
    ConfigWrite,
    /// A block request with a bad header, type, sector range, length or segment.
    BlockRequest,
}

impl GuestFault {
    /// Every kind, in a fixed order (for metrics).
    pub const ALL: [GuestFault; 10] = [
        GuestFault::RegisterAccess,
        GuestFault::SleepType,
        GuestFault::Features,
        GuestFault::QueueSetup,
        GuestFault::AvailRing,
        GuestFault::DescriptorChain,
        GuestFault::PageNumber,
        GuestFault::ReportRange,
        GuestFault::ConfigWrite,
        GuestFault::BlockRequest,
    ];

    /// A stable name (the `kind` label in /metrics).
    pub fn name(self) -> &'static str {
        match self {
            GuestFault::RegisterAccess => "register_access",
            GuestFault::SleepType => "sleep_type",
            GuestFault::Features => "features",
            GuestFault::QueueSetup => "queue_setup",
            GuestFault::AvailRing => "avail_ring",
            GuestFault::DescriptorChain => "descriptor_chain",
            GuestFault::PageNumber => "page_number",
            GuestFault::ReportRange => "report_range",
            GuestFault::ConfigWrite => "config_write",
            GuestFault::BlockRequest => "block_request",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What to do with one fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogDecision {
    /// Log it; `left_out` faults of this kind were not logged since the last line.
    Log {
        /// Faults counted but not logged since the previous line.
        left_out: u64,
    },
    /// Count it only.
    Quiet,
}

/// Per kind: how many, and the rate limit's state.
#[derive(Debug, Default)]
struct KindState {
    count: u64,
    left_out: u64,
    last_line: Option<Instant>,
}

/// Counts and rate-limits faults. One lives for the process ([`record`]); tests make
/// their own.
#[derive(Debug, Default)]
pub struct FaultLog {
    kinds: [Mutex<KindState>; GuestFault::ALL.len()],
    totals: [AtomicU64; GuestFault::ALL.len()],
}

impl FaultLog {
    /// Counts a fault of `kind` seen at `now` and says whether to log it.
    pub fn count(&self, kind: GuestFault, now: Instant) -> LogDecision {
        self.totals[kind.index()].fetch_add(1, Ordering::Relaxed);
        let mut state = match self.kinds[kind.index()].lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        state.count += 1;
        let due = state
            .last_line
            .is_none_or(|t| now.saturating_duration_since(t) >= SUMMARY_INTERVAL);
        if state.count <= LOGGED_AT_ONCE || due {
            let left_out = std::mem::take(&mut state.left_out);
            state.last_line = Some(now);
            LogDecision::Log { left_out }
        } else {
            state.left_out += 1;
            LogDecision::Quiet
        }
    }

    /// Faults of `kind` counted so far.
    pub fn total(&self, kind: GuestFault) -> u64 {
        self.totals[kind.index()].load(Ordering::Relaxed)
    }
}

fn process_log() -> &'static FaultLog {
    static LOG: OnceLock<FaultLog> = OnceLock::new();
    LOG.get_or_init(FaultLog::default)
}

/// Counts a fault of `kind` for this process and logs `what` unless the rate limit says
/// not to. `what` is only formatted when it is logged.
pub fn record(kind: GuestFault, what: impl FnOnce() -> String) {
    if let LogDecision::Log { left_out } = process_log().count(kind, Instant::now()) {
        if left_out == 0 {
            tracing::warn!("guest: {}", what());
        } else {
            tracing::warn!(
                "guest: {} ({left_out} more {} faults since the last line)",
                what(),
                kind.name()
            );
        }
    }
}

/// Faults of each kind counted in this process, for metrics.
pub fn totals() -> Vec<(GuestFault, u64)> {
    GuestFault::ALL
        .iter()
        .map(|&k| (k, process_log().total(k)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_the_first_few_then_one_summary_per_interval() {
        let log = FaultLog::default();
        let start = Instant::now();
        let mut lines = Vec::new();
        // 1,000 faults within one second: the first five are logged, the rest counted.
        for i in 0..1000u64 {
            let now = start + Duration::from_millis(i);
            if let LogDecision::Log { left_out } = log.count(GuestFault::SleepType, now) {
                lines.push(left_out);
            }
        }
        assert_eq!(lines, [0; LOGGED_AT_ONCE as usize]);
        assert_eq!(log.total(GuestFault::SleepType), 1000);
        // The next one after the interval is logged with what was left out.
        let later = start + Duration::from_millis(4) + SUMMARY_INTERVAL;
        assert_eq!(
            log.count(GuestFault::SleepType, later),
            LogDecision::Log { left_out: 995 }
        );
        assert_eq!(
            log.count(GuestFault::SleepType, later),
            LogDecision::Quiet,
            "then quiet again"
        );
        // Kinds are limited separately.
        assert_eq!(
            log.count(GuestFault::Features, later),
            LogDecision::Log { left_out: 0 }
        );
    }

    #[test]
    fn names_are_distinct_and_every_kind_is_listed() {
        let mut names: Vec<_> = GuestFault::ALL.iter().map(|k| k.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), GuestFault::ALL.len());
        for (i, k) in GuestFault::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }
}
