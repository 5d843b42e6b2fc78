//! `GET /metrics`: the VM, balloon and disk figures in the Prometheus text exposition
//! format (version 0.0.4).

use std::fmt::Write;

use ebb_balloon::counters::LatencyHistogram;
use ebb_block::counters::{Op, Reject};
use ebb_devices::faults::GuestFault;

use super::backend::{BalloonSnapshot, DiskSnapshot, MemoryUsage, VmState, VmSummary};
use crate::config::PAGE_SIZE;

/// The `Content-Type` of the metrics document.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Doc(String);

impl Doc {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn metric(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.header(name, kind, help);
        let _ = writeln!(self.0, "{name} {value}");
    }

    fn optional(&mut self, name: &str, kind: &str, help: &str, value: Option<u64>) {
        if let Some(v) = value {
            self.metric(name, kind, help, v);
        }
    }

    /// The power-of-two microsecond histogram as a Prometheus histogram in seconds.
    /// Bucket i holds [2^i, 2^(i+1)) us, so the cumulative count up to bucket i is the
    /// count of samples <= 2^(i+1) us; the last bucket is open-ended (+Inf).
    fn histogram(&mut self, name: &str, help: &str, h: &LatencyHistogram) {
        self.header(name, "histogram", help);
        let mut cumulative = 0;
        let last = h.buckets.len() - 1;
        for (i, n) in h.buckets.iter().enumerate().take(last) {
            cumulative += n;
            let le = (1u64 << (i + 1)) as f64 / 1e6;
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(self.0, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(self.0, "{name}_sum {}", h.sum_us as f64 / 1e6);
        let _ = writeln!(self.0, "{name}_count {}", h.count);
    }
}

/// One metric over every disk (label `disk`, plus the labels `extra` gives per value).
fn per_disk(
    d: &mut Doc,
    disks: &[DiskSnapshot],
    (name, kind, help): (&str, &str, &str),
    values: impl Fn(&DiskSnapshot) -> Vec<(String, u64)>,
) {
    d.header(name, kind, help);
    for disk in disks {
        // Disk IDs are A-Z a-z 0-9 . _ - (checked when parsed): no escaping needed.
        for (extra, value) in values(disk) {
            let _ = writeln!(d.0, "{name}{{disk=\"{}\"{extra}}} {value}", disk.id);
        }
    }
}

/// The `ebb_disk_*` metrics.
fn disk_metrics(d: &mut Doc, disks: &[DiskSnapshot]) {
    if disks.is_empty() {
        return;
    }
    let one = |v: u64| vec![(String::new(), v)];
    per_disk(
        d,
        disks,
        ("ebb_disk_capacity_bytes", "gauge", "Disk size."),
        |s| one(s.capacity_bytes),
    );
    per_disk(
        d,
        disks,
        ("ebb_disk_readonly", "gauge", "1 for a read-only disk."),
        |s| one(u64::from(s.readonly)),
    );
    per_disk(
        d,
        disks,
        (
            "ebb_disk_driver_ready",
            "gauge",
            "1 when the guest's virtio-blk driver has set the disk up.",
        ),
        |s| one(u64::from(s.driver_ready)),
    );
    per_disk(
        d,
        disks,
        (
            "ebb_disk_requests_total",
            "counter",
            "Requests completed successfully, by operation.",
        ),
        |s| {
            Op::ALL
                .iter()
                .map(|op| (format!(",op=\"{}\"", op.name()), s.counters.completed(*op)))
                .collect()
        },
    );
    type Counter = fn(&DiskSnapshot) -> u64;
    let bytes: [(&str, &str, Counter); 4] = [
        (
            "ebb_disk_read_bytes_total",
            "Bytes read from the image into guest memory.",
            |s| s.counters.read_bytes,
        ),
        (
            "ebb_disk_written_bytes_total",
            "Bytes written from guest memory to the image.",
            |s| s.counters.written_bytes,
        ),
        (
            "ebb_disk_discarded_bytes_total",
            "Bytes discarded (holes punched in the image).",
            |s| s.counters.discarded_bytes,
        ),
        (
            "ebb_disk_zeroed_bytes_total",
            "Bytes zeroed by write-zeroes requests.",
            |s| s.counters.zeroed_bytes,
        ),
    ];
    for (name, help, value) in bytes {
        per_disk(d, disks, (name, "counter", help), |s| one(value(s)));
    }
    per_disk(
        d,
        disks,
        (
            "ebb_disk_io_errors_total",
            "counter",
            "Requests that failed on the host (read, write, sync or fallocate errors).",
        ),
        |s| one(s.counters.io_errors),
    );
    per_disk(
        d,
        disks,
        (
            "ebb_disk_cached_reads_total",
            "counter",
            "Reads the event loop answered from the host's page cache, without an I/O thread.",
        ),
        |s| one(s.counters.cached_reads),
    );
    per_disk(
        d,
        disks,
        (
            "ebb_disk_rejected_requests_total",
            "counter",
            "Guest requests refused (answered IOERR or UNSUPP, or unanswerable), by reason.",
        ),
        |s| {
            Reject::ALL
                .iter()
                .map(|r| (format!(",reason=\"{}\"", r.name()), s.counters.rejected(*r)))
                .collect()
        },
    );
}

/// Renders the metrics document.
pub fn render(
    summary: &VmSummary,
    usage: MemoryUsage,
    faults: &[(GuestFault, u64)],
    balloon: Option<&BalloonSnapshot>,
    disks: &[DiskSnapshot],
) -> String {
    let mut d = Doc(String::with_capacity(8192));
    d.header(
        "ebb_vm_state",
        "gauge",
        "VM life-cycle state: 1 for the current state.",
    );
    for state in [VmState::Running, VmState::ShuttingDown, VmState::Stopping] {
        let label = serde_json::to_value(state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(
            d.0,
            "ebb_vm_state{{state=\"{label}\"}} {}",
            u8::from(summary.state == state)
        );
    }
    d.metric(
        "ebb_vm_uptime_seconds",
        "gauge",
        "Seconds since the VM was built.",
        summary.uptime.as_secs_f64(),
    );
    d.metric("ebb_vm_vcpus", "gauge", "vCPUs.", summary.vcpus);
    d.metric(
        "ebb_vm_memory_bytes",
        "gauge",
        "Guest RAM size.",
        summary.memory_bytes,
    );
    d.optional(
        "ebb_guest_ram_rss_bytes",
        "gauge",
        "Host resident memory of the guest RAM mapping.",
        usage.guest_ram_rss,
    );
    d.optional(
        "ebb_vmm_rss_bytes",
        "gauge",
        "Host resident memory of the VMM itself (process RSS minus guest RAM RSS).",
        usage.vmm_rss(),
    );
    d.optional(
        "ebb_process_rss_bytes",
        "gauge",
        "Host resident memory of the whole process.",
        usage.process_rss,
    );
    d.header(
        "ebb_guest_faults_total",
        "counter",
        "Guest misbehaviour (bad register accesses, queue setups, descriptor chains, ...), \
         counted by kind; the log shows only the first few of each.",
    );
    for (kind, count) in faults {
        let _ = writeln!(
            d.0,
            "ebb_guest_faults_total{{kind=\"{}\"}} {count}",
            kind.name()
        );
    }
    disk_metrics(&mut d, disks);
    let Some(b) = balloon else {
        return d.0;
    };
    let c = &b.counters;
    d.metric(
        "ebb_balloon_target_bytes",
        "gauge",
        "Balloon target set by the host.",
        u64::from(b.target_pages) * PAGE_SIZE,
    );
    d.metric(
        "ebb_balloon_actual_bytes",
        "gauge",
        "Balloon size the guest reports.",
        u64::from(b.actual_pages) * PAGE_SIZE,
    );
    d.metric(
        "ebb_balloon_driver_ready",
        "gauge",
        "1 when the guest's balloon driver is running.",
        u8::from(b.driver_ready),
    );
    d.metric(
        "ebb_balloon_stats_interval_seconds",
        "gauge",
        "Seconds between guest statistics updates (0: disabled).",
        b.stats_interval_s,
    );
    let counters: [(&str, &str, u64); 27] = [
        (
            "ebb_balloon_inflated_pages_total",
            "Pages received on the inflate queue.",
            c.inflated_pages,
        ),
        (
            "ebb_balloon_deflated_pages_total",
            "Pages received on the deflate queue.",
            c.deflated_pages,
        ),
        (
            "ebb_balloon_repeated_inflates_total",
            "Inflated pages that were already in the balloon.",
            c.repeated_inflates,
        ),
        (
            "ebb_balloon_oom_deflated_pages_total",
            "Pages the guest took back below the target without being asked (deflate-on-OOM).",
            c.oom_deflated_pages,
        ),
        (
            "ebb_balloon_prefaulted_bytes_total",
            "Bytes of deflated pages backed on the host before the guest got them back.",
            c.prefaulted_bytes,
        ),
        (
            "ebb_balloon_prefault_failures_total",
            "Backing deflated pages that failed.",
            c.prefault_failures,
        ),
        (
            "ebb_balloon_unknown_deflates_total",
            "Deflated pages that were not in the balloon.",
            c.unknown_deflates,
        ),
        (
            "ebb_balloon_inflate_discarded_bytes_total",
            "Bytes given back to the host for inflated pages.",
            c.inflate_discarded_bytes,
        ),
        (
            "ebb_balloon_reports_total",
            "Free page reports received.",
            c.reports,
        ),
        (
            "ebb_balloon_reported_ranges_total",
            "Ranges in free page reports.",
            c.reported_ranges,
        ),
        (
            "ebb_balloon_reported_bytes_total",
            "Bytes the guest reported free.",
            c.reported_bytes,
        ),
        (
            "ebb_balloon_reported_discarded_bytes_total",
            "Reported bytes given back to the host.",
            c.reported_discarded_bytes,
        ),
        (
            "ebb_balloon_reported_skipped_bytes_total",
            "Reported bytes kept because the guest poisons free pages.",
            c.skipped_bytes,
        ),
        (
            "ebb_balloon_unaligned_kept_bytes_total",
            "Reported or hinted bytes kept because they do not cover a whole page of the memory backing.",
            c.unaligned_kept_bytes,
        ),
        (
            "ebb_balloon_discarded_bytes_total",
            "All bytes given back to the host (inflate, reporting and hinting).",
            c.discarded_bytes(),
        ),
        (
            "ebb_balloon_madvise_calls_total",
            "madvise calls made.",
            c.madvise_calls,
        ),
        (
            "ebb_balloon_madvise_failures_total",
            "madvise calls that failed.",
            c.madvise_failures,
        ),
        (
            "ebb_balloon_stats_updates_total",
            "Statistics reports received from the guest.",
            c.stats_updates,
        ),
        (
            "ebb_balloon_rejected_pfns_total",
            "Page numbers rejected (outside guest RAM).",
            c.rejected_pfns,
        ),
        (
            "ebb_balloon_rejected_descriptors_total",
            "Malformed descriptors or chains rejected.",
            c.rejected_descriptors,
        ),
        (
            "ebb_balloon_rejected_report_ranges_total",
            "Invalid free page report and hint ranges rejected.",
            c.rejected_ranges,
        ),
        (
            "ebb_balloon_hint_runs_total",
            "Free page hinting runs the guest finished.",
            c.hint_runs,
        ),
        (
            "ebb_balloon_hint_blocks_total",
            "Free page blocks hinted during runs.",
            c.hint_blocks,
        ),
        (
            "ebb_balloon_hint_bytes_total",
            "Bytes in hinted blocks.",
            c.hint_bytes,
        ),
        (
            "ebb_balloon_hint_discarded_bytes_total",
            "Hinted bytes given back to the host.",
            c.hint_discarded_bytes,
        ),
        (
            "ebb_balloon_hint_kept_bytes_total",
            "Hinted bytes kept because the guest wrote them again.",
            c.hint_kept_bytes,
        ),
        (
            "ebb_balloon_hint_stale_total",
            "Hinted blocks and command ids outside their run.",
            c.hint_stale,
        ),
    ];
    for (name, help, value) in counters {
        d.metric(name, "counter", help, value);
    }
    d.metric(
        "ebb_balloon_rejected_config_writes_total",
        "counter",
        "Invalid guest writes to the balloon configuration space.",
        c.rejected_config_writes,
    );
    d.histogram(
        "ebb_balloon_report_latency_seconds",
        "Time from noticing a free page report to returning it to the guest.",
        &c.report_latency,
    );
    if let Some(p) = &b.policy {
        d.metric(
            "ebb_balloon_policy_enabled",
            "gauge",
            "1 while the automatic policy sets the balloon target.",
            u8::from(p.enabled),
        );
        d.header(
            "ebb_balloon_policy_decisions_total",
            "counter",
            "Decisions of the automatic policy, by reason.",
        );
        for (reason, n) in &p.decisions {
            let _ = writeln!(
                d.0,
                "ebb_balloon_policy_decisions_total{{reason=\"{}\"}} {n}",
                reason.name()
            );
        }
    }
    if let Some(s) = &b.stats {
        let gauges: [(&str, &str, Option<u64>); 8] = [
            (
                "ebb_guest_free_memory_bytes",
                "Guest free memory (balloon statistics).",
                s.free_memory,
            ),
            (
                "ebb_guest_total_memory_bytes",
                "Guest total memory (balloon statistics).",
                s.total_memory,
            ),
            (
                "ebb_guest_available_memory_bytes",
                "Guest available memory (balloon statistics).",
                s.available_memory,
            ),
            (
                "ebb_guest_disk_caches_bytes",
                "Guest disk caches (balloon statistics).",
                s.disk_caches,
            ),
            (
                "ebb_guest_swap_in_bytes",
                "Guest memory swapped in (balloon statistics).",
                s.swap_in,
            ),
            (
                "ebb_guest_swap_out_bytes",
                "Guest memory swapped out (balloon statistics).",
                s.swap_out,
            ),
            (
                "ebb_guest_major_faults",
                "Guest major page faults (balloon statistics).",
                s.major_faults,
            ),
            (
                "ebb_guest_minor_faults",
                "Guest minor page faults (balloon statistics).",
                s.minor_faults,
            ),
        ];
        for (name, help, value) in gauges {
            d.optional(name, "gauge", help, value);
        }
    }
    d.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use ebb_balloon::BalloonOptions;
    use ebb_block::counters::BlockCounters;
    use std::time::Duration;

    fn summary() -> VmSummary {
        VmSummary {
            state: VmState::Running,
            uptime: Duration::from_millis(1500),
            vcpus: 2,
            memory_bytes: 512 << 20,
            memory_backing: "anon",
            kernel: "k".into(),
            initramfs: None,
            cmdline: "c".into(),
            pid: 1,
        }
    }

    fn value(doc: &str, line_start: &str) -> Option<f64> {
        doc.lines()
            .find(|l| l.starts_with(line_start) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn every_sample_has_help_and_type_and_parses() {
        let mut b = BalloonSnapshot {
            options: BalloonOptions {
                target_pages: 0,
                deflate_on_oom: false,
                free_page_reporting: true,
                stats_interval_s: 0,
                free_page_hinting: false,
                hint_discard: Default::default(),
                deflate_prefault: true,
            },
            guest_memory_bytes: 512 << 20,
            target_pages: 512,
            actual_pages: 256,
            stats_interval_s: 0,
            driver_ready: true,
            counters: Default::default(),
            stats: None,
            hint: Default::default(),
            policy: None,
        };
        b.counters.reported_discarded_bytes = 4096;
        b.counters.inflate_discarded_bytes = 8192;
        for us in [3, 100, 100, 5000] {
            b.counters.report_latency.record(Duration::from_micros(us));
        }
        let usage = MemoryUsage {
            guest_ram_rss: Some(100),
            process_rss: Some(150),
        };
        let faults = [(GuestFault::QueueSetup, 3), (GuestFault::SleepType, 0)];
        let mut counters = BlockCounters {
            read_bytes: 4096,
            io_errors: 2,
            cached_reads: 1,
            ..Default::default()
        };
        counters.count_completed(Op::Read);
        counters.count_rejected(Reject::Range);
        let disks = [
            DiskSnapshot {
                path: "/img/root.raw".into(),
                id: "root".into(),
                readonly: false,
                capacity_bytes: 1 << 30,
                driver_ready: true,
                counters,
            },
            DiskSnapshot {
                path: "/img/data.img".into(),
                id: "data.img".into(),
                readonly: true,
                capacity_bytes: 1 << 20,
                driver_ready: false,
                counters: BlockCounters::default(),
            },
        ];
        let doc = render(&summary(), usage, &faults, Some(&b), &disks);
        let mut typed = std::collections::HashSet::new();
        for line in doc.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(typed.insert(name.to_string()), "duplicate TYPE {name}");
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, v) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            let base = name
                .strip_suffix("_bucket")
                .or_else(|| name.strip_suffix("_sum"))
                .or_else(|| name.strip_suffix("_count"))
                .filter(|b| typed.contains(*b))
                .unwrap_or(name);
            assert!(typed.contains(base), "{name} has no TYPE line");
            assert!(name.starts_with("ebb_"), "{name}");
            v.parse::<f64>().unwrap();
        }
        assert_eq!(value(&doc, "ebb_balloon_target_bytes "), Some(2097152.0));
        assert_eq!(value(&doc, "ebb_vmm_rss_bytes "), Some(50.0));
        assert_eq!(
            value(&doc, "ebb_balloon_discarded_bytes_total "),
            Some(12288.0)
        );
        assert_eq!(value(&doc, "ebb_vm_state{state=\"running\"}"), Some(1.0));
        assert_eq!(
            value(&doc, "ebb_guest_faults_total{kind=\"queue_setup\"}"),
            Some(3.0)
        );
        // Histogram: 3 us in the [2,4) bucket, le=4e-6 -> 1; 100 us twice in [64,128).
        assert_eq!(
            value(
                &doc,
                "ebb_balloon_report_latency_seconds_bucket{le=\"0.000004\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &doc,
                "ebb_balloon_report_latency_seconds_bucket{le=\"0.000128\"}"
            ),
            Some(3.0)
        );
        assert_eq!(
            value(
                &doc,
                "ebb_balloon_report_latency_seconds_bucket{le=\"+Inf\"}"
            ),
            Some(4.0)
        );
        assert_eq!(
            value(&doc, "ebb_balloon_report_latency_seconds_count "),
            Some(4.0)
        );
        for (series, v) in [
            ("ebb_disk_capacity_bytes{disk=\"root\"}", 1073741824.0),
            ("ebb_disk_readonly{disk=\"data.img\"}", 1.0),
            ("ebb_disk_driver_ready{disk=\"data.img\"}", 0.0),
            ("ebb_disk_requests_total{disk=\"root\",op=\"read\"}", 1.0),
            (
                "ebb_disk_requests_total{disk=\"root\",op=\"write_zeroes\"}",
                0.0,
            ),
            ("ebb_disk_read_bytes_total{disk=\"root\"}", 4096.0),
            ("ebb_disk_io_errors_total{disk=\"root\"}", 2.0),
            ("ebb_disk_cached_reads_total{disk=\"root\"}", 1.0),
            (
                "ebb_disk_rejected_requests_total{disk=\"root\",reason=\"range\"}",
                1.0,
            ),
            (
                "ebb_disk_rejected_requests_total{disk=\"data.img\",reason=\"no_status\"}",
                0.0,
            ),
        ] {
            assert_eq!(value(&doc, series), Some(v), "{series}");
        }
        let per_op = doc
            .lines()
            .filter(|l| l.starts_with("ebb_disk_requests_total{"))
            .count();
        assert_eq!(per_op, 2 * Op::ALL.len());
    }

    #[test]
    fn without_a_balloon_only_vm_metrics() {
        let doc = render(&summary(), MemoryUsage::default(), &[], None, &[]);
        assert!(!doc.contains("ebb_balloon_"));
        assert!(!doc.contains("ebb_disk_"));
        assert!(!doc.contains("ebb_guest_ram_rss_bytes"));
        assert!(doc.contains("ebb_vm_memory_bytes 536870912"));
    }
}
