//! The model's answers (`ebb_api_model`), built from the backend's snapshots.

use std::time::SystemTime;

use ebb_api_model::units::{MIB, PAGES_PER_MIB, PAGE_SIZE};
use ebb_api_model::{
    BalloonConfig, BalloonInfo, BalloonStatistics, DiskInfo, EbbBalloonStats, HintCounters,
    HintStatus, LatencySummary, PolicyDecision, PolicyInfo, Rejects, RssInfo, VmInfo,
};
use ebb_balloon::policy::PolicyView;
use ebb_balloon::HintControl;

use super::backend::{BalloonSnapshot, DiskSnapshot, MemoryUsage, VmSummary};

fn pages_to_mib(pages: u32) -> u32 {
    (u64::from(pages) / PAGES_PER_MIB) as u32
}

/// `GET /balloon` for `b`: its configuration with the current target and statistics
/// interval, and the size the guest reports.
pub fn balloon_info(b: &BalloonSnapshot) -> BalloonInfo {
    BalloonInfo {
        config: BalloonConfig {
            size: u64::from(b.target_pages) * PAGE_SIZE,
            deflate_on_oom: b.options.deflate_on_oom,
            free_page_reporting: b.options.free_page_reporting,
            stats_interval_s: b.stats_interval_s,
            free_page_hinting: b.options.free_page_hinting,
            deflate_prefault: b.options.deflate_prefault,
            policy: Default::default(),
        },
        actual_bytes: u64::from(b.actual_pages) * PAGE_SIZE,
    }
}

/// `GET /balloon/policy` for the policy `p`.
pub fn policy_info(p: &PolicyView) -> PolicyInfo {
    let s = &p.settings;
    PolicyInfo {
        enabled: p.enabled,
        headroom_mib: s.headroom / MIB,
        min_mib: s.min / MIB,
        max_mib: s.max / MIB,
        step_mib: s.step / MIB,
        fault_rate_per_s: s.fault_rate,
        cooldown_s: s.cooldown.as_secs(),
        host_pressure_pct: s.host_pressure,
        trim: s.trim,
        last_decision: p.last_decision.map(|d| PolicyDecision {
            target_mib: d.target / MIB,
            reason: d.reason.name().to_string(),
            age_ms: p.now.saturating_sub(d.at).as_millis() as u64,
        }),
        decisions: p
            .decisions
            .iter()
            .map(|(r, n)| (r.name().to_string(), *n))
            .collect(),
    }
}

/// `GET /balloon/statistics` for `b`, with report ages measured at `now`.
pub fn balloon_statistics(b: &BalloonSnapshot, now: SystemTime) -> BalloonStatistics {
    let c = &b.counters;
    let s = b.stats.clone().unwrap_or_default();
    let stats_age_ms = s
        .received_at
        .map(|t| now.duration_since(t).unwrap_or_default().as_millis() as u64);
    BalloonStatistics {
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
            oom_deflated_pages: c.oom_deflated_pages,
            prefaulted_bytes: c.prefaulted_bytes,
            prefault_failures: c.prefault_failures,
            inflate_discarded_bytes: c.inflate_discarded_bytes,
            reports: c.reports,
            reported_ranges: c.reported_ranges,
            reported_bytes: c.reported_bytes,
            reported_discarded_bytes: c.reported_discarded_bytes,
            reported_skipped_bytes: c.skipped_bytes,
            unaligned_kept_bytes: c.unaligned_kept_bytes,
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
            hinting: HintCounters {
                runs: c.hint_runs,
                blocks: c.hint_blocks,
                hinted_bytes: c.hint_bytes,
                discarded_bytes: c.hint_discarded_bytes,
                kept_bytes: c.hint_kept_bytes,
                stale: c.hint_stale,
                host_ms: c.hint_host_us / 1000,
            },
        },
    }
}

/// `GET /balloon/hinting/status` for the device's hinting state.
pub fn hint_status(h: &HintControl) -> HintStatus {
    HintStatus {
        host_cmd: h.host_cmd,
        guest_cmd: h.guest_cmd,
        state: h.run.state.as_str().to_string(),
        run_cmd: h.run.cmd_id,
        blocks: h.run.blocks,
        hinted_bytes: h.run.bytes,
        discarded_bytes: h.run.discarded_bytes,
        kept_bytes: h.run.kept_bytes,
        duration_ms: h.run.duration.map(|d| d.as_millis() as u64),
        host_ms: h.run.host_time.as_millis() as u64,
    }
}

/// The host memory figures of `GET /vm`.
pub fn rss_info(m: MemoryUsage) -> RssInfo {
    RssInfo {
        guest_ram_bytes: m.guest_ram_rss,
        vmm_bytes: m.vmm_rss(),
        process_bytes: m.process_rss,
    }
}

/// A disk in `GET /vm`.
pub fn disk_info(d: &DiskSnapshot) -> DiskInfo {
    DiskInfo {
        path: d.path.clone(),
        id: d.id.clone(),
        readonly: d.readonly,
        capacity_bytes: d.capacity_bytes,
        driver_ready: d.driver_ready,
    }
}

/// `GET /vm`, assembled from the backend's answers.
pub fn vm_info(
    s: &VmSummary,
    balloon: Option<&BalloonSnapshot>,
    disks: &[DiskSnapshot],
    usage: MemoryUsage,
) -> VmInfo {
    VmInfo {
        state: s.state,
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: s.pid,
        uptime_s: (s.uptime.as_secs_f64() * 1000.0).round() / 1000.0,
        vcpus: s.vcpus,
        memory_mib: s.memory_bytes / MIB,
        memory_backing: s.memory_backing.to_string(),
        kernel: s.kernel.clone(),
        initramfs: s.initramfs.clone(),
        cmdline: s.cmdline.clone(),
        balloon: balloon.map(balloon_info),
        disks: disks.iter().map(disk_info).collect(),
        rss: rss_info(usage),
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
                free_page_hinting: false,
                hint_discard: Default::default(),
                deflate_prefault: true,
            },
            guest_memory_bytes: 512 * MIB,
            target_pages: 256 * 100 + 3,
            actual_pages: 256 * 50,
            stats_interval_s: 2,
            driver_ready: true,
            counters: Default::default(),
            stats: None,
            hint: Default::default(),
            policy: None,
        }
    }

    #[test]
    fn sizes_round_down_to_whole_mib() {
        let v = serde_json::to_value(balloon_info(&snapshot())).unwrap();
        assert_eq!(
            (&v["amount_mib"], &v["target_mib"], &v["actual_mib"]),
            (&100.into(), &100.into(), &50.into())
        );
        assert_eq!(v["stats_polling_interval_s"], 2);
    }

    #[test]
    fn missing_guest_stats_are_omitted_and_present_ones_kept() {
        let now = SystemTime::now();
        let mut b = snapshot();
        let v = serde_json::to_value(balloon_statistics(&b, now)).unwrap();
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
        let v = serde_json::to_value(balloon_statistics(&b, now)).unwrap();
        assert_eq!(v["free_memory"], 42);
        assert_eq!(v["oom_kill"], 1);
        assert!(v.get("swap_in").is_none());
        assert_eq!(v["ebb"]["stats_age_ms"], 1500);
        assert_eq!(v["ebb"]["report_latency"]["p50_us"], 128);
    }
}
