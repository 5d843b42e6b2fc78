//! The text `ebb-ctl` prints for people (without `--json`).

use std::fmt::Write as _;

use ebb_api_model::units::format_size;
use ebb_api_model::{BalloonInfo, BalloonStatistics, VmInfo};

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// `off`, or `every N s`.
fn stats_interval(secs: u32) -> String {
    if secs == 0 {
        "off".to_string()
    } else {
        format!("every {secs} s")
    }
}

fn bytes(v: Option<u64>) -> String {
    v.map(format_size).unwrap_or_else(|| "-".to_string())
}

/// Text for `balloon get`.
pub fn render_balloon(b: &BalloonInfo) -> String {
    let stats = stats_interval(b.config.stats_interval_s);
    format!(
        "target:              {} MiB\n\
         actual:              {} MiB\n\
         deflate on OOM:      {}\n\
         free page reporting: {}\n\
         statistics:          {stats}\n",
        b.target_mib(),
        b.actual_mib(),
        on_off(b.config.deflate_on_oom),
        on_off(b.config.free_page_reporting),
    )
}

/// Text for `balloon stats`.
pub fn render_stats(s: &BalloonStatistics) -> String {
    let e = &s.ebb;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "balloon:        target {} MiB ({} pages), actual {} MiB ({} pages)",
        s.target_mib, s.target_pages, s.actual_mib, s.actual_pages
    );
    let age = e
        .stats_age_ms
        .map(|ms| format!("{:.1} s ago", ms as f64 / 1000.0))
        .unwrap_or_else(|| "none yet".to_string());
    let _ = writeln!(t, "guest report:   {age} ({} so far)", e.stats_updates);
    let _ = writeln!(
        t,
        "guest memory:   total {}, free {}, available {}, caches {}",
        bytes(s.total_memory),
        bytes(s.free_memory),
        bytes(s.available_memory),
        bytes(s.disk_caches)
    );
    let n = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let _ = writeln!(
        t,
        "guest paging:   swap in {}, swap out {}, major faults {}, minor faults {}",
        bytes(s.swap_in),
        bytes(s.swap_out),
        n(s.major_faults),
        n(s.minor_faults)
    );
    let _ = writeln!(
        t,
        "inflate:        {} pages in, {} pages out, {} discarded",
        e.inflated_pages,
        e.deflated_pages,
        format_size(e.inflate_discarded_bytes)
    );
    let _ = writeln!(
        t,
        "free reporting: {} reports, {} ranges, {} reported, {} discarded, {} kept",
        e.reports,
        e.reported_ranges,
        format_size(e.reported_bytes),
        format_size(e.reported_discarded_bytes),
        format_size(e.reported_skipped_bytes)
    );
    let us = |v: Option<u64>| v.map(|v| format!("{v} us")).unwrap_or_else(|| "-".into());
    let _ = writeln!(
        t,
        "report latency: p50 <= {}, p99 <= {} ({} samples)",
        us(e.report_latency.p50_us),
        us(e.report_latency.p99_us),
        e.report_latency.count
    );
    let _ = writeln!(
        t,
        "given back:     {} total ({} madvise calls, {} failed)",
        format_size(e.discarded_bytes),
        e.madvise_calls,
        e.madvise_failures
    );
    let r = &e.rejects;
    let _ = writeln!(
        t,
        "rejected:       {} pfns, {} descriptors, {} config writes, {} report ranges",
        r.pfns, r.descriptors, r.config_writes, r.report_ranges
    );
    t
}

/// Text for `vm info`.
pub fn render_vm(v: &VmInfo) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "state:          {}", v.state);
    let _ = writeln!(t, "ebb:            {} (pid {})", v.version, v.pid);
    let _ = writeln!(t, "uptime:         {:.1} s", v.uptime_s);
    let _ = writeln!(t, "vcpus:          {}", v.vcpus);
    let _ = writeln!(
        t,
        "memory:         {} MiB ({})",
        v.memory_mib, v.memory_backing
    );
    let _ = writeln!(t, "kernel:         {}", v.kernel);
    if let Some(i) = &v.initramfs {
        let _ = writeln!(t, "initramfs:      {i}");
    }
    let _ = writeln!(t, "cmdline:        {}", v.cmdline);
    match &v.balloon {
        Some(b) => {
            let _ = writeln!(
                t,
                "balloon:        target {} MiB, actual {} MiB, deflate on OOM {}, \
                 free page reporting {}, statistics {}",
                b.target_mib(),
                b.actual_mib(),
                on_off(b.config.deflate_on_oom),
                on_off(b.config.free_page_reporting),
                stats_interval(b.config.stats_interval_s)
            );
        }
        None => {
            let _ = writeln!(t, "balloon:        none");
        }
    }
    if v.disks.is_empty() {
        let _ = writeln!(t, "disks:          none");
    }
    for d in &v.disks {
        let _ = writeln!(
            t,
            "disk {:<10} {}, {}, {}{}",
            format!("{}:", d.id),
            d.path,
            format_size(d.capacity_bytes),
            if d.readonly {
                "read-only"
            } else {
                "read-write"
            },
            if d.driver_ready {
                ""
            } else {
                ", driver not ready"
            }
        );
    }
    let _ = writeln!(t, "guest RAM RSS:  {}", bytes(v.rss.guest_ram_bytes));
    let _ = writeln!(t, "VMM RSS:        {}", bytes(v.rss.vmm_bytes));
    let _ = writeln!(t, "process RSS:    {}", bytes(v.rss.process_bytes));
    t
}

/// `ebb-ctl balloon policy`.
pub fn render_policy(p: &ebb_api_model::PolicyInfo) -> String {
    let last = p.last_decision.as_ref().map_or_else(
        || "none yet".to_string(),
        |d| {
            format!(
                "{} MiB ({}), {:.1} s ago",
                d.target_mib,
                d.reason,
                d.age_ms as f64 / 1000.0
            )
        },
    );
    let mut decisions: Vec<String> = p
        .decisions
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    if decisions.is_empty() {
        decisions.push("none".into());
    }
    format!(
        "policy:              {}\n\
         headroom:            {} MiB\n\
         balloon range:       {}-{} MiB, at most {} MiB more per decision\n\
         deflate when:        available < headroom, > {} major faults/s, OOM kill or stall\n\
         cooldown:            {} s after a deflate\n\
         host pressure:       inflate twice as fast above {} % (PSI some avg10)\n\
         trim:                {}\n\
         last decision:       {last}\n\
         decisions:           {}\n",
        if p.enabled { "auto (on)" } else { "off" },
        p.headroom_mib,
        p.min_mib,
        p.max_mib,
        p.step_mib,
        p.fault_rate_per_s,
        p.cooldown_s,
        p.host_pressure_pct,
        if p.trim {
            "a quiet guest's cache, after a cooldown of quiet"
        } else {
            "off"
        },
        decisions.join(", ")
    )
}

/// `ebb-ctl balloon hint-status`.
pub fn render_hint(s: &ebb_api_model::HintStatus) -> String {
    let guest = s
        .guest_cmd
        .map_or_else(|| "none".to_string(), |g| g.to_string());
    let duration = s
        .duration_ms
        .map_or_else(|| "-".to_string(), |d| format!("{d} ms"));
    format!(
        "run {} {}: host_cmd {}, guest_cmd {}, {} blocks, {:.1} MiB hinted, {:.1} MiB \
         given back, {:.1} MiB kept (written again), guest took {}, host {} ms\n",
        s.run_cmd,
        s.state,
        s.host_cmd,
        guest,
        s.blocks,
        s.hinted_bytes as f64 / 1048576.0,
        s.discarded_bytes as f64 / 1048576.0,
        s.kept_bytes as f64 / 1048576.0,
        duration,
        s.host_ms
    )
}
