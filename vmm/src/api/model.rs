//! The JSON shapes of the API. Balloon shapes follow Firecracker's API (same field names
//! and meanings); Ebb's own additions are extra fields a Firecracker client ignores.
//!
//! Every type derives both `Serialize` and `Deserialize`: the server writes them, and
//! `ebb-ctl` and the tests read them back.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::backend::{BalloonSnapshot, MemoryUsage, VmState, VmSummary};
use crate::config::{MIB, PAGE_SIZE};

/// Pages per MiB.
const PAGES_PER_MIB: u64 = MIB / PAGE_SIZE;

fn pages_to_mib(pages: u32) -> u32 {
    (u64::from(pages) / PAGES_PER_MIB) as u32
}

/// Body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// What went wrong.
    pub fault_message: String,
}

/// `PATCH /balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// New target in MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// New statistics interval in seconds (1..=65535).
    pub stats_polling_interval_s: u16,
}

/// A body that must be empty or `{}` (`PUT /vm/shutdown`, `PUT /vm/stop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyBody {}

/// `GET /balloon`: Firecracker's `Balloon` plus reporting and the current sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfig {
    /// Target balloon size in MiB (what `PATCH /balloon` last set, or the boot size).
    pub amount_mib: u32,
    /// The guest may take pages back from the balloon under memory pressure.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates; 0 when statistics were disabled at boot.
    pub stats_polling_interval_s: u32,
    /// Free page reporting was offered to the guest.
    pub free_page_reporting: bool,
    /// Target balloon size in MiB (same as `amount_mib`).
    pub target_mib: u32,
    /// Balloon size the guest reports, in MiB.
    pub actual_mib: u32,
}

impl From<&BalloonSnapshot> for BalloonConfig {
    fn from(b: &BalloonSnapshot) -> Self {
        Self {
            amount_mib: pages_to_mib(b.target_pages),
            deflate_on_oom: b.options.deflate_on_oom,
            stats_polling_interval_s: b.stats_interval_s,
            free_page_reporting: b.options.free_page_reporting,
            target_mib: pages_to_mib(b.target_pages),
            actual_mib: pages_to_mib(b.actual_pages),
        }
    }
}

/// Report latency figures from the balloon's histogram (power-of-two buckets: a
/// quantile is the upper edge of the bucket holding it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Sum of all samples in microseconds.
    pub sum_us: u64,
    /// Median, microseconds (`null` without samples).
    pub p50_us: Option<u64>,
    /// 99th percentile, microseconds (`null` without samples).
    pub p99_us: Option<u64>,
}

/// Rejected guest input, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejects {
    /// Page numbers outside guest RAM.
    pub pfns: u64,
    /// Malformed descriptors or chains.
    pub descriptors: u64,
    /// Bad writes to the configuration space.
    pub config_writes: u64,
    /// Invalid free page report ranges.
    pub report_ranges: u64,
}

/// Ebb's own balloon counters (the `ebb` object of `GET /balloon/statistics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EbbBalloonStats {
    /// The guest driver is running (DRIVER_OK).
    pub driver_ready: bool,
    /// Statistics reports received from the guest.
    pub stats_updates: u64,
    /// Milliseconds since the latest statistics report (`null` before the first).
    pub stats_age_ms: Option<u64>,
    /// Pages received on the inflate queue.
    pub inflated_pages: u64,
    /// Pages received on the deflate queue.
    pub deflated_pages: u64,
    /// Bytes discarded for inflated pages.
    pub inflate_discarded_bytes: u64,
    /// Free page reports received.
    pub reports: u64,
    /// Ranges in those reports.
    pub reported_ranges: u64,
    /// Bytes the guest reported free.
    pub reported_bytes: u64,
    /// Reported bytes given back to the host.
    pub reported_discarded_bytes: u64,
    /// Reported bytes kept because the guest poisons free pages.
    pub reported_skipped_bytes: u64,
    /// All bytes given back to the host (inflate + reporting).
    pub discarded_bytes: u64,
    /// `madvise` calls made.
    pub madvise_calls: u64,
    /// `madvise` calls that failed.
    pub madvise_failures: u64,
    /// Rejected guest input.
    pub rejects: Rejects,
    /// Time from noticing a free page report to returning it to the guest.
    pub report_latency: LatencySummary,
}

/// `GET /balloon/statistics`: Firecracker's `BalloonStats` plus Ebb's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatistics {
    /// Target in 4 KiB pages.
    pub target_pages: u32,
    /// Pages the guest holds in the balloon.
    pub actual_pages: u32,
    /// Target in MiB.
    pub target_mib: u32,
    /// Balloon size in MiB.
    pub actual_mib: u32,
    /// Memory swapped in, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    /// Memory swapped out, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    /// Major page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Free memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// Total memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// Available memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    /// Disk caches, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    /// Successful hugetlb allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    /// OOM kills (Linux 6.12+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    /// Allocation stalls (Linux 6.12+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_stall: Option<u64>,
    /// Asynchronous scans (Linux 6.12+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_scan: Option<u64>,
    /// Direct scans (Linux 6.12+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_scan: Option<u64>,
    /// Asynchronous reclaims (Linux 6.12+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_reclaim: Option<u64>,
    /// Direct reclaims (Linux 6.12+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_reclaim: Option<u64>,
    /// Ebb's own counters.
    pub ebb: EbbBalloonStats,
}

impl BalloonStatistics {
    /// The statistics for `b`, with report ages measured at `now`.
    pub fn new(b: &BalloonSnapshot, now: SystemTime) -> Self {
        let c = &b.counters;
        let s = b.stats.clone().unwrap_or_default();
        let stats_age_ms = s
            .received_at
            .map(|t| now.duration_since(t).unwrap_or_default().as_millis() as u64);
        Self {
            target_pages: b.target_pages,
            actual_pages: b.actual_pages,
            target_mib: pages_to_mib(b.target_pages),
            actual_mib: pages_to_mib(b.actual_pages),
            swap_in: s.swap_in,
            swap_out: s.swap_out,
            major_faults: s.major_faults,
            minor_faults: s.minor_faults,
            free_memory: s.free_memory,
            total_memory: s.total_memory,
            available_memory: s.available_memory,
            disk_caches: s.disk_caches,
            hugetlb_allocations: s.hugetlb_allocations,
            hugetlb_failures: s.hugetlb_failures,
            oom_kill: s.oom_kills,
            alloc_stall: s.alloc_stalls,
            async_scan: s.async_scans,
            direct_scan: s.direct_scans,
            async_reclaim: s.async_reclaims,
            direct_reclaim: s.direct_reclaims,
            ebb: EbbBalloonStats {
                driver_ready: b.driver_ready,
                stats_updates: c.stats_updates,
                stats_age_ms,
                inflated_pages: c.inflated_pages,
                deflated_pages: c.deflated_pages,
                inflate_discarded_bytes: c.inflate_discarded_bytes,
                reports: c.reports,
                reported_ranges: c.reported_ranges,
                reported_bytes: c.reported_bytes,
                reported_discarded_bytes: c.reported_discarded_bytes,
                reported_skipped_bytes: c.skipped_bytes,
                discarded_bytes: c.discarded_bytes(),
                madvise_calls: c.madvise_calls,
                madvise_failures: c.madvise_failures,
                rejects: Rejects {
                    pfns: c.rejected_pfns,
                    descriptors: c.rejected_descriptors,
                    config_writes: c.rejected_config_writes,
                    report_ranges: c.rejected_ranges,
                },
                report_latency: LatencySummary {
                    count: c.report_latency.count,
                    sum_us: c.report_latency.sum_us,
                    p50_us: c.report_latency.quantile_us(0.5),
                    p99_us: c.report_latency.quantile_us(0.99),
                },
            },
        }
    }
}

/// Host memory figures of `GET /vm`, bytes (`null` when procfs could not be read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RssInfo {
    /// Resident guest RAM: the guest RAM mapping's `Rss` in `/proc/PID/smaps`.
    pub guest_ram_bytes: Option<u64>,
    /// Resident memory of the VMM itself: process RSS minus guest RAM RSS.
    pub vmm_bytes: Option<u64>,
    /// Resident memory of the whole process (`VmRSS`).
    pub process_bytes: Option<u64>,
}

impl From<MemoryUsage> for RssInfo {
    fn from(m: MemoryUsage) -> Self {
        Self {
            guest_ram_bytes: m.guest_ram_rss,
            vmm_bytes: m.vmm_rss(),
            process_bytes: m.process_rss,
        }
    }
}

/// `GET /vm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// `running`, `shutting_down` (power button pressed) or `stopping`.
    pub state: VmState,
    /// Ebb's version.
    pub version: String,
    /// The VMM's process id.
    pub pid: u32,
    /// Seconds since the VM was built.
    pub uptime_s: f64,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Kernel image path.
    pub kernel: String,
    /// Initramfs path.
    pub initramfs: Option<String>,
    /// Kernel command line as given (without the devices Ebb appends).
    pub cmdline: String,
    /// The balloon's configuration, `null` without a balloon.
    pub balloon: Option<BalloonConfig>,
    /// Host memory use.
    pub rss: RssInfo,
}

impl VmInfo {
    /// Assembles `GET /vm` from the backend's answers.
    pub fn new(s: &VmSummary, balloon: Option<&BalloonSnapshot>, usage: MemoryUsage) -> Self {
        Self {
            state: s.state,
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: s.pid,
            uptime_s: (s.uptime.as_secs_f64() * 1000.0).round() / 1000.0,
            vcpus: s.vcpus,
            memory_mib: s.memory_bytes / MIB,
            kernel: s.kernel.clone(),
            initramfs: s.initramfs.clone(),
            cmdline: s.cmdline.clone(),
            balloon: balloon.map(BalloonConfig::from),
            rss: usage.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ebb_balloon::stats::GuestStats;
    use ebb_balloon::BalloonOptions;
    use std::time::Duration;

    fn snapshot() -> BalloonSnapshot {
        BalloonSnapshot {
            options: BalloonOptions {
                target_pages: 0,
                deflate_on_oom: true,
                free_page_reporting: true,
                stats_interval_s: 1,
            },
            guest_memory_bytes: 512 * MIB,
            target_pages: 256 * 100 + 3,
            actual_pages: 256 * 50,
            stats_interval_s: 2,
            driver_ready: true,
            counters: Default::default(),
            stats: None,
        }
    }

    #[test]
    fn sizes_round_down_to_whole_mib() {
        let c = BalloonConfig::from(&snapshot());
        assert_eq!((c.amount_mib, c.target_mib, c.actual_mib), (100, 100, 50));
        assert_eq!(c.stats_polling_interval_s, 2);
    }

    #[test]
    fn missing_guest_stats_are_omitted_and_present_ones_kept() {
        let now = SystemTime::now();
        let mut b = snapshot();
        let v = serde_json::to_value(BalloonStatistics::new(&b, now)).unwrap();
        assert!(v.get("free_memory").is_none());
        assert!(v["ebb"]["stats_age_ms"].is_null());
        assert!(v["ebb"]["report_latency"]["p50_us"].is_null());
        b.stats = Some(GuestStats {
            received_at: Some(now - Duration::from_millis(1500)),
            free_memory: Some(42),
            oom_kills: Some(1),
            ..Default::default()
        });
        b.counters.report_latency.record(Duration::from_micros(100));
        let v = serde_json::to_value(BalloonStatistics::new(&b, now)).unwrap();
        assert_eq!(v["free_memory"], 42);
        assert_eq!(v["oom_kill"], 1);
        assert!(v.get("swap_in").is_none());
        assert_eq!(v["ebb"]["stats_age_ms"], 1500);
        assert_eq!(v["ebb"]["report_latency"]["p50_us"], 128);
    }

    #[test]
    fn updates_reject_unknown_fields_and_bad_values() {
        assert!(serde_json::from_str::<BalloonUpdate>(r#"{"amount_mib":1}"#).is_ok());
        for bad in [
            r#"{"amount_mib":1,"x":2}"#,
            r#"{"amount_mib":-1}"#,
            r#"{"amount_mib":"1"}"#,
            r#"{"amount_mib":1.5}"#,
            r#"{"amount_mib":4294967296}"#,
            r#"{}"#,
        ] {
            assert!(serde_json::from_str::<BalloonUpdate>(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<BalloonStatsUpdate>(
            r#"{"stats_polling_interval_s":70000}"#
        )
        .is_err());
        assert!(serde_json::from_str::<EmptyBody>("{}").is_ok());
        assert!(serde_json::from_str::<EmptyBody>(r#"{"a":1}"#).is_err());
    }
}
