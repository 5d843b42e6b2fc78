//! The automatic balloon policy against page cache, which free page reporting never sees:
//! `policy-cache` boots the Debian root file system guest with a data disk, reads the disk
//! (its cache grows), shows that reporting leaves that memory on the host, turns the
//! policy on through the API and measures what comes back; then the guest allocates more
//! than it has available, and the policy must give memory back without an OOM kill.

use std::time::{Duration, Instant};

use ebb_ctl::client::Client;
use serde_json::{json, Value};

use super::disk::{copy_image, rootfs_dir};
use super::support::{
    boot, cmd_within, config, ebb, ensure, guest_meminfo_kib, guest_vmstat, poweroff_ebb, ram_rss,
    scratch_dir, settled_rss, sh, OrStr,
};
use super::{progress, Args, Ctx, ScenarioDef};
use crate::guest::{BalloonConfig, DiskSpec, GuestVm};
use crate::util::{median, mib};

/// The scenarios of this family.
pub const SCENARIOS: &[ScenarioDef] = &[
    ScenarioDef {
        name: "policy-cache",
        help: "the Debian disk guest reads `cache_mib` of its data disk; with reporting \
               alone the cache stays on the host; `PATCH /balloon/policy {\"enabled\":true}` \
               must give back at least half of it within `settle_s`, trimming the quiet guest's \
               cache at least once; then the guest touches \
               `touch_mib` and gets it without an OOM kill (args: memory_mib=1024 \
               cache_mib=512 touch_mib=512 settle_s=120)",
        run: policy_cache,
    },
    ScenarioDef {
        name: "bench-policy",
        help: "what the policy costs the guest (a benchmark): the Debian disk guest keeps a \
               hot set of `hot_mib` of its data disk (re-read every `period_s` in the \
               background) beside `cold_mib` read once; with the policy off, then on and \
               settled: the median time of `rereads` re-reads of the hot set, the MiB they \
               had to read from the disk again, and a `touch_mib` allocation's time, guest \
               memory stall (PSI) and allocation stalls (args: memory_mib=1024 hot_mib=128 \
               cold_mib=512 rereads=5 period_s=10 touch_mib=512 settle_s=180 \
               deflate_prefault=true: false leaves pages the guest takes back to fault in)",
        run: bench_policy,
    },
    ScenarioDef {
        name: "bench-policy-no-prefault",
        help: "bench-policy with deflate_prefault=false by default: `ebb-bench policy` runs \
               both in one test host (a batch holds each scenario name once)",
        run: |ctx, args| bench_policy_with(ctx, args, false),
    },
];

/// The guest command that reads `mib` MiB of the data disk into the page cache. Linux
/// drops a block device's cache when its last opener closes it, so a sleeper keeps
/// /dev/vdb open for the guest's lifetime.
pub fn read_disk_command(mib: u64) -> String {
    format!(
        "sh (sleep 1000000 </dev/vdb >/dev/null 2>&1 &) ; \
         dd if=/dev/vdb of=/dev/null bs=1M count={mib} 2>&1"
    )
}

/// Boots the Debian root file system guest (1 vCPU, balloon with reporting, statistics
/// every second and deflate-on-OOM, policy off) with a sparse read-only data disk of
/// `data_mib` as /dev/vdb and an API socket in `dir`.
fn boot_disk_guest(
    dir: &std::path::Path,
    memory_mib: u64,
    data_mib: u64,
    debug_log: bool,
    deflate_prefault: bool,
) -> Result<(GuestVm, std::path::PathBuf), String> {
    let socket = dir.join("api.sock");
    let root = dir.join("root.ext4");
    let data = dir.join("data.img");
    copy_image(&root)?;
    // Sparse: the host reads holes as zeros, the guest caches them like any data.
    std::fs::File::create(&data)
        .and_then(|f| f.set_len(data_mib << 20))
        .map_err(|e| format!("{}: {e}", data.display()))?;
    let mut c = config(
        memory_mib,
        1,
        Some(BalloonConfig {
            size_mib: 0,
            deflate_on_oom: true,
            free_page_reporting: true,
            stats_interval: 1,
            free_page_hinting: false,
            deflate_prefault,
        }),
    );
    c.initramfs = Some(rootfs_dir().join("initramfs.cpio.gz"));
    c.cmdline_extra = "root=/dev/vda".into();
    c.disks = vec![
        DiskSpec {
            path: root,
            readonly: false,
            id: "root".into(),
        },
        DiskSpec {
            path: data,
            readonly: true,
            id: "data".into(),
        },
    ];
    c.extra_args = vec!["--api-socket".into(), socket.to_string_lossy().into_owned()];
    if debug_log {
        c.extra_args.extend(["--log-level".into(), "debug".into()]);
    }
    let (vm, _) = boot(&ebb()?, &c)?;
    Ok((vm, socket))
}

/// `key`'s figure in MiB from /proc/meminfo lines in `text`.
fn meminfo_line_mib(text: &str, key: &str) -> Result<u64, String> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .ok_or_else(|| format!("no {key} in the guest's meminfo: {text}"))
}

fn meminfo_mib(vm: &mut GuestVm, key: &str) -> Result<u64, String> {
    Ok(guest_meminfo_kib(vm, key)? / 1024)
}

fn get_json(client: &Client, path: &str) -> Result<Value, String> {
    let r = client.get(path).map_err(|e| format!("GET {path}: {e}"))?;
    ensure(r.status == 200, || {
        format!("GET {path}: {} {}", r.status, r.text())
    })?;
    r.json().map_err(|e| format!("GET {path}: {e}"))
}

fn patch(client: &Client, path: &str, body: &str) -> Result<(), String> {
    let r = client
        .request("PATCH", path, Some(body.as_bytes()))
        .map_err(|e| format!("PATCH {path}: {e}"))?;
    ensure(r.status == 204, || {
        format!("PATCH {path} {body}: {} {}", r.status, r.text())
    })
}

/// Polls `GET /balloon/policy` until its last decision is `steady` or `limit` passes:
/// how long that took (`None` if it never did) and the last answer.
fn wait_steady(client: &Client, limit: Duration) -> Result<(Option<Duration>, Value), String> {
    let started = Instant::now();
    let mut last = Value::Null;
    while started.elapsed() < limit {
        std::thread::sleep(Duration::from_secs(2));
        last = get_json(client, "/balloon/policy")?;
        if last["last_decision"]["reason"] == "steady" {
            return Ok((Some(started.elapsed()), last));
        }
    }
    Ok((None, last))
}

/// Reads `count` MiB of the data disk from `skip` MiB in the guest; dd's own seconds.
fn dd_read_s(vm: &mut GuestVm, skip: u64, count: u64) -> Result<f64, String> {
    let out = sh(
        vm,
        &format!("dd if=/dev/vdb of=/dev/null bs=1M skip={skip} count={count} 2>&1"),
    )?;
    parse_dd_seconds(&out).ok_or_else(|| format!("no time in dd's output: {out:?}"))
}

/// The seconds in dd's summary (`... copied, 0.123 s, 1.1 GB/s`).
fn parse_dd_seconds(out: &str) -> Option<f64> {
    let after = out.rsplit_once("copied, ")?.1;
    after.split_whitespace().next()?.parse().ok()
}

/// MiB read from the data disk so far (/sys/block/vdb/stat, sectors read).
fn disk_read_mib(vm: &mut GuestVm) -> Result<f64, String> {
    let out = sh(vm, "cat /sys/block/vdb/stat")?;
    let sectors: u64 = out
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("/sys/block/vdb/stat: {out:?}"))?;
    Ok(sectors as f64 * 512.0 / 1048576.0)
}

/// The guest's memory stall totals from /proc/pressure/memory (`some`, `full`), in
/// milliseconds; `None` when its kernel has no PSI.
fn guest_memory_stall_ms(vm: &mut GuestVm) -> Result<Option<(f64, f64)>, String> {
    let out = sh(vm, "cat /proc/pressure/memory 2>/dev/null || true")?;
    let total = |kind: &str| {
        out.lines()
            .find(|l| l.starts_with(kind))
            .and_then(|l| l.rsplit_once("total="))
            .and_then(|(_, v)| v.trim().parse::<u64>().ok())
            .map(|us| us as f64 / 1000.0)
    };
    Ok(total("some").zip(total("full")))
}

/// Allocation stalls the guest has counted (direct reclaim entries, all zones).
fn guest_alloc_stalls(vm: &mut GuestVm) -> Result<u64, String> {
    let out = sh(vm, "grep '^allocstall_' /proc/vmstat || true")?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum())
}

/// The policy's decisions the VMM logged (at debug level) after the first `from` bytes
/// of its stderr.
fn decisions_since(vm: &GuestVm, from: usize) -> Vec<String> {
    vm.stderr_text()
        .get(from..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("balloon policy:"))
        .map(str::to_owned)
        .collect()
}

/// The balloon's traffic counters (`ebb` of `GET /balloon/statistics`) in MiB: what a
/// phase of `bench-policy` moved through the balloon.
fn balloon_traffic_mib(client: &Client) -> Result<[f64; 4], String> {
    let ebb = &get_json(client, "/balloon/statistics")?["ebb"];
    let field = |name: &str, unit: f64| {
        ebb[name]
            .as_f64()
            .map(|v| v * unit / (1u64 << 20) as f64)
            .ok_or_else(|| format!("no ebb.{name} in GET /balloon/statistics"))
    };
    Ok([
        field("deflated_pages", 4096.0)?,
        field("oom_deflated_pages", 4096.0)?,
        field("prefaulted_bytes", 1.0)?,
        field("reported_discarded_bytes", 1.0)?,
    ])
}

/// One side of `bench-policy`: the hot set's re-reads, then an allocation. With
/// `decisions_log`, the policy's decisions logged during the allocation are returned too.
fn policy_phase(
    vm: &mut GuestVm,
    client: &Client,
    hot_mib: u64,
    rereads: u64,
    touch_mib: u64,
    decisions_log: bool,
) -> Result<Value, String> {
    let disk_before = disk_read_mib(vm)?;
    let mut times = Vec::new();
    for _ in 0..rereads {
        times.push(dd_read_s(vm, 0, hot_mib)?);
    }
    let from_disk = disk_read_mib(vm)? - disk_before;
    let stall_before = guest_memory_stall_ms(vm)?;
    let stalls_before = guest_alloc_stalls(vm)?;
    let oom_before = guest_vmstat(vm, "oom_kill")?;
    let faults_before = crate::procfs::minor_faults(vm.pid()).ctx("reading the VMM's faults")?;
    let traffic_before = balloon_traffic_mib(client)?;
    let log_before = vm.stderr_text().len();
    let t = Instant::now();
    let touched = cmd_within(vm, &format!("touch {touch_mib}"), Duration::from_secs(300))?;
    let touch_s = t.elapsed().as_secs_f64();
    let traffic_after = balloon_traffic_mib(client)?;
    let moved = |i: usize| (traffic_after[i] - traffic_before[i]).round();
    let decisions = if decisions_log {
        decisions_since(vm, log_before)
    } else {
        Vec::new()
    };
    let host_faults = crate::procfs::minor_faults(vm.pid())
        .ctx("reading the VMM's faults")?
        .saturating_sub(faults_before);
    let stall_after = guest_memory_stall_ms(vm)?;
    let stalls = guest_alloc_stalls(vm)? - stalls_before;
    let oom = guest_vmstat(vm, "oom_kill")? - oom_before;
    cmd_within(vm, "free", Duration::from_secs(120))?;
    let stall = stall_before
        .zip(stall_after)
        .map(|(b, a)| json!({ "some_ms": a.0 - b.0, "full_ms": a.1 - b.1 }));
    ensure(touched["ok"] == true && oom == 0, || {
        format!("the guest could not take {touch_mib} MiB: {touched}, {oom} OOM kills")
    })?;
    Ok(json!({
        "reread_s": times,
        "reread_median_s": median(&times),
        "reread_from_disk_mib": from_disk,
        "touch_s": touch_s,
        "touch_host_faults": host_faults,
        "touch_memory_stall": stall,
        "touch_alloc_stalls": stalls,
        "touch_balloon_mib": {
            "deflated": moved(0),
            "deflated_on_oom": moved(1),
            "prefaulted": moved(2),
            "reported_discarded": moved(3),
        },
        "touch_decisions": decisions,
        "oom_kills": oom,
    }))
}

fn bench_policy(ctx: &Ctx, args: &Args) -> Result<Value, String> {
    bench_policy_with(ctx, args, true)
}

fn bench_policy_with(_ctx: &Ctx, args: &Args, prefault_default: bool) -> Result<Value, String> {
    args.check_known(&[
        "memory_mib",
        "hot_mib",
        "cold_mib",
        "rereads",
        "period_s",
        "touch_mib",
        "settle_s",
        "deflate_prefault",
        "debug_log",
    ])?;
    let memory_mib: u64 = args.get("memory_mib", 1024)?;
    let deflate_prefault: bool = args.get("deflate_prefault", prefault_default)?;
    let hot_mib: u64 = args.get("hot_mib", 128)?;
    let cold_mib: u64 = args.get("cold_mib", 512)?;
    let rereads: u64 = args.get("rereads", 5)?;
    let period_s: u64 = args.get("period_s", 10)?;
    let touch_mib: u64 = args.get("touch_mib", 512)?;
    let settle_s: u64 = args.get("settle_s", 180)?;
    // Lists the policy's decisions during the allocation (the VMM's debug log).
    let debug_log: bool = args.get("debug_log", false)?;
    ensure(rereads > 0 && hot_mib > 0, || {
        "bench-policy needs rereads and hot_mib above 0".into()
    })?;
    let dir = scratch_dir("policy-bench")?;
    let (mut vm, socket) = boot_disk_guest(
        &dir,
        memory_mib,
        hot_mib + cold_mib + 64,
        debug_log,
        deflate_prefault,
    )?;
    let client = Client::new(&socket, Duration::from_secs(30));

    // The sleeper keeps /dev/vdb's cache (see read_disk_command); the first read of the
    // hot set is the cost of a miss.
    let first = cmd_within(&mut vm, &read_disk_command(0), Duration::from_secs(60))?;
    ensure(first["status"] == 0, || {
        format!("opening the data disk: {first}")
    })?;
    let miss_s = dd_read_s(&mut vm, 0, hot_mib)?;
    let cold_s = dd_read_s(&mut vm, hot_mib, cold_mib)?;
    // The hot set stays hot: re-read in the background for the rest of the run.
    sh(
        &mut vm,
        &format!(
            "(while :; do dd if=/dev/vdb of=/dev/null bs=1M count={hot_mib}; sleep {period_s}; \
             done >/dev/null 2>&1 &)"
        ),
    )?;
    std::thread::sleep(Duration::from_secs(2 * period_s));
    let rss_before = settled_rss(&vm, Duration::from_secs(6), Duration::from_secs(90), 4096)?;
    progress(&format!(
        "hot set {hot_mib} MiB read from disk in {miss_s:.2} s, cold {cold_mib} MiB in \
         {cold_s:.2} s; guest RAM RSS {} MiB",
        mib(rss_before)
    ));
    let off = policy_phase(&mut vm, &client, hot_mib, rereads, touch_mib, false)?;
    progress(&format!("policy off: {off}"));

    let log_before = vm.stderr_text().len();
    patch(&client, "/balloon/policy", r#"{"enabled": true}"#)?;
    let (settled, last) = wait_steady(&client, Duration::from_secs(settle_s))?;
    if debug_log {
        let decisions = decisions_since(&vm, log_before);
        progress(&format!(
            "policy decisions while settling:\n{}",
            decisions.join("\n")
        ));
    }
    let balloon = get_json(&client, "/balloon")?;
    let rss_policy = settled_rss(&vm, Duration::from_secs(6), Duration::from_secs(90), 4096)?;
    progress(&format!(
        "policy on: {} at a {} MiB balloon, guest RAM RSS {} -> {} MiB",
        settled.map_or(
            format!(
                "not steady after {settle_s} s (last: {})",
                last["last_decision"]
            ),
            |d| format!("steady after {:.1} s", d.as_secs_f64())
        ),
        balloon["actual_mib"],
        mib(rss_before),
        mib(rss_policy)
    ));
    let mut on = policy_phase(&mut vm, &client, hot_mib, rereads, touch_mib, debug_log)?;
    let decisions = on["touch_decisions"].take();
    progress(&format!("policy on: {on}"));
    if let Some(lines) = decisions.as_array().filter(|l| !l.is_empty()) {
        let lines: Vec<&str> = lines.iter().filter_map(Value::as_str).collect();
        progress(&format!(
            "policy decisions during the touch:\n{}",
            lines.join("\n")
        ));
    }
    on["touch_decisions"] = decisions;
    let after = get_json(&client, "/balloon/policy")?;
    let slowdown = on["reread_median_s"].as_f64().unwrap_or(f64::NAN)
        / off["reread_median_s"].as_f64().unwrap_or(f64::NAN)
        - 1.0;
    let row = |name: &str, p: &Value| {
        let stall = &p["touch_memory_stall"];
        format!(
            "{name:<7} {:>14.3} {:>17.1} {:>8.1} {:>12} {:>14} {:>14} {:>12}",
            p["reread_median_s"].as_f64().unwrap_or(f64::NAN),
            p["reread_from_disk_mib"].as_f64().unwrap_or(f64::NAN),
            p["touch_s"].as_f64().unwrap_or(f64::NAN),
            p["touch_host_faults"].to_string(),
            stall["some_ms"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.0}")),
            stall["full_ms"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.0}")),
            p["touch_alloc_stalls"].to_string(),
        )
    };
    let table = format!(
        "bench-policy ({memory_mib} MiB guest, hot set {hot_mib} MiB read from disk in \
         {miss_s:.2} s, cold {cold_mib} MiB, touch {touch_mib} MiB; policy settled at a {} MiB \
         balloon, guest RAM RSS {:.0} -> {:.0} MiB; deflate_prefault {}: {} MiB backed ahead \
         of the touch)\n\
         policy   re-read med s  re-read disk MiB  touch s  host faults  stall some ms  \
         stall full ms  allocstalls\n{}\n{}\nhot set re-read with the policy: {:+.1}%\n",
        balloon["actual_mib"],
        mib(rss_before),
        mib(rss_policy),
        if deflate_prefault { "on" } else { "off" },
        on["touch_balloon_mib"]["prefaulted"],
        row("off", &off),
        row("auto", &on),
        slowdown * 100.0
    ) + &format!(
        "balloon during the touch with the policy: {} MiB deflated ({} by the guest on OOM), \
         {} MiB backed ahead, {} MiB reported and discarded\n",
        on["touch_balloon_mib"]["deflated"],
        on["touch_balloon_mib"]["deflated_on_oom"],
        on["touch_balloon_mib"]["prefaulted"],
        on["touch_balloon_mib"]["reported_discarded"],
    );
    progress(&table);
    poweroff_ebb(&mut vm)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "memory_mib": memory_mib,
        "deflate_prefault": deflate_prefault,
        "hot_mib": hot_mib,
        "cold_mib": cold_mib,
        "hot_miss_s": miss_s,
        "cold_read_s": cold_s,
        "rss_before_policy_mib": mib(rss_before),
        "rss_policy_mib": mib(rss_policy),
        "policy_settled_s": settled.map(|d| d.as_secs_f64()),
        "balloon_mib": balloon["actual_mib"],
        "off": off,
        "auto": on,
        "reread_slowdown": slowdown,
        "decisions": after["decisions"],
        "table": table,
    }))
}

fn policy_cache(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&[
        "memory_mib",
        "cache_mib",
        "touch_mib",
        "settle_s",
        "debug_log",
    ])?;
    let memory_mib: u64 = args.get("memory_mib", 1024)?;
    let cache_mib: u64 = args.get("cache_mib", 512)?;
    let touch_mib: u64 = args.get("touch_mib", 512)?;
    let settle_s: u64 = args.get("settle_s", 120)?;
    // Prints the policy's decisions (the VMM's debug log) once it settled.
    let debug_log: bool = args.get("debug_log", false)?;
    let dir = scratch_dir("policy")?;
    let (mut vm, socket) = boot_disk_guest(&dir, memory_mib, cache_mib + 64, debug_log, true)?;
    let client = Client::new(&socket, Duration::from_secs(30));
    let policy = get_json(&client, "/balloon/policy")?;
    ensure(policy["enabled"] == false, || {
        format!("the policy is on without policy=auto: {policy}")
    })?;

    // Fill the cache; reporting cannot touch it.
    let idle_rss = settled_rss(&vm, Duration::from_secs(4), Duration::from_secs(60), 4096)?;
    let read = cmd_within(
        &mut vm,
        &read_disk_command(cache_mib),
        Duration::from_secs(300),
    )?;
    ensure(read["status"] == 0, || {
        format!("reading the data disk: {read}")
    })?;
    let cached_mib = meminfo_mib(&mut vm, "Buffers")? + meminfo_mib(&mut vm, "Cached")?;
    ensure(cached_mib >= cache_mib / 2, || {
        format!("the guest caches only {cached_mib} MiB after reading {cache_mib} MiB: {read}")
    })?;
    let reporting_rss = settled_rss(&vm, Duration::from_secs(6), Duration::from_secs(90), 4096)?;
    progress(&format!(
        "cache: guest caches {cached_mib} MiB; guest RAM RSS idle {} MiB, after the read \
         with reporting alone {} MiB",
        mib(idle_rss),
        mib(reporting_rss)
    ));

    // The policy takes the idle cache.
    let oom_before = guest_vmstat(&mut vm, "oom_kill")?;
    patch(&client, "/balloon/policy", r#"{"enabled": true}"#)?;
    let (settled, last) = wait_steady(&client, Duration::from_secs(settle_s))?;
    let settled = settled
        .ok_or_else(|| format!("the policy did not settle within {settle_s} s; last: {last}"))?;
    let balloon = get_json(&client, "/balloon")?;
    let policy_rss = settled_rss(&vm, Duration::from_secs(6), Duration::from_secs(90), 4096)?;
    // Where the guest's memory is once settled: what it kept, free memory in blocks too
    // small to report (below 2 MiB), its watermarks, and what its balloon driver said.
    let guest_after = sh(
        &mut vm,
        "grep -E '^(MemFree|MemAvailable|Buffers|Cached|Active\\(file\\)|Inactive\\(file\\)|\
         AnonPages|Shmem|SReclaimable|SUnreclaim|PageTables|KernelStack):' /proc/meminfo; \
         cat /proc/buddyinfo; grep -E '^Node|^ +(min|low|high|managed|protection)' \
         /proc/zoneinfo; dmesg | grep -iE 'oom|puff|balloon' | tail -n 20",
    )?;
    progress(&format!("guest after settling:\n{guest_after}"));
    let cached_after =
        meminfo_line_mib(&guest_after, "Buffers")? + meminfo_line_mib(&guest_after, "Cached")?;
    if debug_log {
        let decisions = decisions_since(&vm, 0);
        progress(&format!("policy decisions:\n{}", decisions.join("\n")));
    }
    let given_back = mib(reporting_rss) - mib(policy_rss);
    progress(&format!(
        "policy: settled in {:.1} s at a {} MiB balloon; guest caches {cached_after} MiB; \
         guest RAM RSS {} -> {} MiB ({given_back:.0} MiB back); decisions {}",
        settled.as_secs_f64(),
        balloon["actual_mib"],
        mib(reporting_rss),
        mib(policy_rss),
        last["decisions"]
    ));
    // The trim must not take the guest below what it needs: its deflate-on-OOM notifier
    // taking pages back means an allocation found no memory.
    let oom_deflated = get_json(&client, "/balloon/statistics")?["ebb"]["oom_deflated_pages"]
        .as_u64()
        .ok_or("no ebb.oom_deflated_pages in GET /balloon/statistics")?;
    ensure(oom_deflated == 0, || {
        format!(
            "the guest took {oom_deflated} pages back from the balloon through deflate-on-OOM \
             while the policy settled: {last}"
        )
    })?;
    // The guest is quiet while the policy settles: it must have trimmed its cache.
    let trims = last["decisions"]["trim_cache"].as_u64().unwrap_or(0);
    ensure(trims >= 1, || {
        format!("the policy settled without trimming the quiet guest's cache: {last}")
    })?;
    ensure(given_back >= cached_mib as f64 / 2.0, || {
        format!(
            "the policy gave back {given_back:.0} MiB of a {cached_mib} MiB cache (want at \
             least half)"
        )
    })?;

    // The guest needs memory again: the policy (and deflate-on-OOM under it) gives it.
    let t = Instant::now();
    let touched = cmd_within(
        &mut vm,
        &format!("touch {touch_mib}"),
        Duration::from_secs(300),
    )?;
    let touch_s = t.elapsed().as_secs_f64();
    let oom = guest_vmstat(&mut vm, "oom_kill")? - oom_before;
    let after_touch = get_json(&client, "/balloon/policy")?;
    let balloon_after = get_json(&client, "/balloon")?;
    progress(&format!(
        "touch {touch_mib} MiB: {touch_s:.1} s, OOM kills {oom}, balloon {} MiB, last \
         decision {}",
        balloon_after["actual_mib"], after_touch["last_decision"]
    ));
    ensure(touched["ok"] == true && oom == 0, || {
        format!("the guest could not take {touch_mib} MiB back: {touched}, {oom} OOM kills")
    })?;
    let peak = ram_rss(&vm)?;
    poweroff_ebb(&mut vm)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "cached_mib": cached_mib,
        "idle_rss_mib": mib(idle_rss),
        "reporting_rss_mib": mib(reporting_rss),
        "policy_rss_mib": mib(policy_rss),
        "given_back_mib": given_back,
        "settle_s": settled.as_secs_f64(),
        "balloon_mib": balloon["actual_mib"],
        "trims": trims,
        "cached_after_mib": cached_after,
        "guest_after_settle": guest_after,
        "touch_mib": touch_mib,
        "touch_s": touch_s,
        "oom_kills": oom,
        "rss_after_touch_mib": mib(peak),
        "decisions": after_touch["decisions"],
    }))
}

#[cfg(test)]
mod tests {
    use super::{meminfo_line_mib, parse_dd_seconds};

    #[test]
    fn meminfo_figures_come_from_their_own_line() {
        let text = "MemFree:          218868 kB\nBuffers:             376 kB\n\
                    Cached:             3940 kB\nSwapCached: 0 kB\n";
        assert_eq!(meminfo_line_mib(text, "MemFree"), Ok(213));
        assert_eq!(meminfo_line_mib(text, "Cached"), Ok(3));
        assert!(meminfo_line_mib(text, "Shmem").is_err());
    }

    #[test]
    fn dd_seconds_come_from_its_summary_line() {
        let out = "128+0 records in\n128+0 records out\n134217728 bytes (134 MB, 128 MiB) \
                   copied, 0.213 s, 630 MB/s\n";
        assert_eq!(parse_dd_seconds(out), Some(0.213));
        assert_eq!(parse_dd_seconds("dd: error reading '/dev/vdb'"), None);
    }
}
