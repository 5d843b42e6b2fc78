//! Benchmarks: Ebb against QEMU on the same guest, in the same test-host run. They print
//! figures and never assert timings (absolute times inside the emulated test host are
//! slow and noisy: compare the two VMMs measured side by side).
//!
//! - `bench-boot`: spawn to `EBB-READY` (median of N boots each, alternating VMMs) and the
//!   VMM's own memory with the guest idle (process RSS minus guest-RAM RSS).
//!   QEMU: `-M microvm,acpi=on`, same kernel image, initramfs and command line.
//! - `bench-inflate`: a 1 GiB guest's balloon going to 768 MiB. Observed from the host
//!   with `perf` on the VMM's `madvise(MADV_DONTNEED)` calls inside guest RAM (count and
//!   first-to-last time), and from the target being set once the guest is ready (Ebb:
//!   `PATCH /balloon` on its REST API; QEMU: QMP `balloon`) to the balloon being full
//!   (`GET /balloon` `actual_mib`; QMP `query-balloon`). Same ELF kernel for both; free
//!   page reporting off for both so that only inflation discards.
//! - `bench-reclaim`: a guest touches N MiB and frees it; time until guest-RAM RSS is back
//!   within 5% of its pre-touch value (and until 95% of the touched memory is back), and
//!   what stays resident. Free page reporting on for both (QEMU:
//!   `virtio-balloon-device,free-page-reporting=on`).

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::support::{
    boot, cmd, cmd_within, config, ebb, ensure, kernel_arg, median, mib, poweroff_any, ram_rss,
    settled_rss, u64_field, wait_balloon, watch_rss, OrStr,
};
use super::{ms, progress, Args, Ctx, ScenarioDef};
use crate::guest::{BalloonConfig, GuestConfig, GuestVm, KernelImage, VmmKind, VmmRef};
use crate::madvise::{self, MadviseTrace};

/// The scenarios of this family.
pub const SCENARIOS: &[ScenarioDef] = &[
    ScenarioDef {
        name: "bench-boot",
        help: "Ebb vs QEMU microvm: spawn to EBB-READY (median of `runs`) and VMM memory \
               overhead with the guest idle (args: runs=5 memory_mib=512 kernel=elf|bzimage \
               idle_s=3)",
        run: bench_boot,
    },
    ScenarioDef {
        name: "bench-inflate",
        help: "Ebb vs QEMU: balloon to 768 MiB on a 1 GiB guest: time and madvise calls \
               per GiB, seen with perf (args: memory_mib=1024 size_mib=768)",
        run: bench_inflate,
    },
    ScenarioDef {
        name: "bench-reclaim",
        help: "Ebb vs QEMU with free page reporting: touch N MiB, free, time until guest-RAM \
               RSS is within 5% of its pre-touch value, residual RSS; the median of `runs` \
               (args: memory_mib=1024 touch_mib=768 limit_s thp=host|on|off vmms=both|ebb \
               runs=1)",
        run: bench_reclaim,
    },
    ScenarioDef {
        name: "bench-api",
        help: "Ebb's REST API: p50/p99 of GET and PATCH /balloon over `requests` requests \
               with the guest's CPU busy (`ebb-ctl bench`), and the VMM's CPU use over \
               `idle_s` with the guest idle and an API connection open (args: \
               requests=1000 idle_s=30)",
        run: bench_api,
    },
];

const GIB: f64 = (1u64 << 30) as f64;

fn kinds() -> Result<Vec<VmmRef>, String> {
    crate::guest::find_qemu().s()?;
    Ok(vec![ebb()?, super::support::qemu()?])
}

fn stats(v: &[f64]) -> Value {
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    json!({ "median": median(v).unwrap_or(0.0), "min": min, "max": max, "all": v })
}

// ---------------------------------------------------------------------------------------
// bench-boot

fn bench_boot(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["runs", "memory_mib", "kernel", "idle_s"])?;
    let runs: usize = args.get("runs", 5)?;
    let memory_mib: u64 = args.get("memory_mib", 512)?;
    let kernel_name: String = args.get("kernel", "elf".to_string())?;
    let idle = Duration::from_secs(args.get("idle_s", 3)?);
    let kinds = kinds()?;
    let mut ready: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut overhead: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut ram: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut argvs: Vec<Vec<String>> = vec![Vec::new(); kinds.len()];
    for run in 0..runs {
        for (i, kind) in kinds.iter().enumerate() {
            let mut c = config(memory_mib, 1, None);
            c.kernel = Some(kernel_arg(&kernel_name)?);
            let (mut vm, r) = boot(kind, &c)?;
            thread::sleep(idle);
            let proc_rss = vm.process_rss_kib().ctx("VmRSS")?;
            let ram_rss = ram_rss(&vm)?;
            poweroff_any(&mut vm)?;
            progress(&format!(
                "bench-boot run {}/{runs}: {} ready in {} ms, overhead {} MiB",
                run + 1,
                kind.name(),
                ms(r.elapsed),
                mib(proc_rss - ram_rss)
            ));
            ready[i].push(ms(r.elapsed) as f64);
            overhead[i].push(mib(proc_rss.saturating_sub(ram_rss)));
            ram[i].push(mib(ram_rss));
            argvs[i] = vm.argv().to_vec();
        }
    }
    let mut out = serde_json::Map::new();
    for (i, kind) in kinds.iter().enumerate() {
        out.insert(
            kind.name().into(),
            json!({
                "argv": argvs[i],
                "ready_ms": stats(&ready[i]),
                "overhead_mib": stats(&overhead[i]),
                "guest_ram_rss_mib": stats(&ram[i]),
            }),
        );
    }
    out.insert(
        "params".into(),
        json!({ "runs": runs, "memory_mib": memory_mib, "kernel": kernel_name, "idle_s": idle.as_secs() }),
    );
    Ok(Value::Object(out))
}

// ---------------------------------------------------------------------------------------
// bench-inflate

fn trace_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ebb-bench-{}-{tag}.perf", std::process::id()))
}

fn madvise_json(vm: &GuestVm, calls: Result<Vec<madvise::Call>, String>) -> Value {
    let calls = match calls {
        Ok(c) => c,
        Err(e) => return json!({ "error": e }),
    };
    let map = match vm.guest_ram_mapping() {
        Ok(m) => m,
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let s = madvise::summarize(&calls, map.start, map.size_bytes());
    let per_gib = if s.bytes > 0 {
        s.calls as f64 / (s.bytes as f64 / GIB)
    } else {
        0.0
    };
    json!({
        "calls": s.calls,
        "bytes": s.bytes,
        "calls_per_gib": (per_gib * 10.0).round() / 10.0,
        "span_ms": (s.span_s * 1000.0).round(),
        "other_calls": s.other_calls,
    })
}

fn inflate_config(memory_mib: u64, size_mib: u64, extra: Vec<String>) -> GuestConfig {
    let mut c = config(
        memory_mib,
        1,
        Some(BalloonConfig {
            size_mib,
            deflate_on_oom: false,
            free_page_reporting: false,
            stats_interval: 0,
            free_page_hinting: false,
            deflate_prefault: true,
        }),
    );
    c.extra_args = extra;
    // The same kernel image for both VMMs.
    c.kernel = Some(KernelImage::Elf);
    c
}

fn bench_inflate(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["memory_mib", "size_mib"])?;
    let memory_mib: u64 = args.get("memory_mib", 1024)?;
    let size_mib: u64 = args.get("size_mib", 768)?;
    let target = size_mib * 256;
    let mut out = serde_json::Map::new();
    for vmm in kinds()? {
        let v = inflate_one(&vmm, memory_mib, size_mib, target)?;
        out.insert(vmm.name().into(), v);
    }
    out.insert(
        "params".into(),
        json!({ "memory_mib": memory_mib, "size_mib": size_mib, "target_pages": target }),
    );
    Ok(Value::Object(out))
}

/// One VMM's inflation: the target goes over its balloon control (Ebb: the REST API,
/// QEMU: QMP) once the guest is ready, and the control is polled until the balloon is
/// full.
fn inflate_one(vmm: &VmmRef, memory_mib: u64, size_mib: u64, target: u64) -> Result<Value, String> {
    let kind = vmm.kind();
    // Ebb's API socket in a scratch directory, QEMU's QMP socket in the temporary one.
    let (dir, socket) = match kind {
        VmmKind::Ebb => {
            let dir = super::support::scratch_dir("inflate-api")?;
            let socket = dir.join("api.sock");
            (Some(dir), socket)
        }
        VmmKind::Qemu => {
            let sock =
                std::env::temp_dir().join(format!("ebb-bench-{}-qmp.sock", std::process::id()));
            let _ = std::fs::remove_file(&sock);
            (None, sock)
        }
    };
    // How often, and how long, the balloon's size is polled.
    let (every, limit) = match kind {
        VmmKind::Ebb => (Duration::from_millis(250), Duration::from_secs(600)),
        VmmKind::Qemu => (Duration::from_millis(100), Duration::from_secs(300)),
    };
    let c = inflate_config(memory_mib, 0, vmm.control_args(&socket));
    let (mut vm, r) = boot(vmm, &c)?;
    let mut control = vmm.balloon_control(&socket, memory_mib)?;
    let rss_before = ram_rss(&vm)?;
    let trace = MadviseTrace::start(vm.pid(), &trace_path(kind.as_str()));
    let t0 = Instant::now();
    control.set_balloon(size_mib)?;
    let mut polls = 0u32;
    let mut last = 0;
    let done = super::support::poll(limit, every, || {
        polls += 1;
        last = control.balloon_mib()?;
        Ok::<_, String>((last >= size_mib).then_some(()))
    })?;
    let set_to_full = t0.elapsed();
    ensure(done.is_some(), || {
        format!(
            "{}'s balloon did not reach {size_mib} MiB within {} s (last: {last} MiB)",
            vmm.name(),
            limit.as_secs()
        )
    })?;
    // The guest's view: Ebb's until the driver counts every page, QEMU's once.
    let b = match kind {
        VmmKind::Ebb => wait_balloon(&mut vm, Duration::from_secs(60), |p| p >= target)?.0,
        VmmKind::Qemu => cmd(&mut vm, "balloon")?,
    };
    thread::sleep(Duration::from_secs(1));
    let mad = match trace {
        Ok(t) => madvise_json(&vm, t.stop()),
        Err(e) => json!({ "error": e }),
    };
    let rss = ram_rss(&vm)?;
    poweroff_any(&mut vm)?;
    drop(control);
    match dir {
        Some(dir) => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        None => {
            let _ = std::fs::remove_file(&socket);
        }
    }
    // `api_to_full_ms`/`api_polls` for Ebb, `qmp_to_full_ms`/`qmp_polls` for QEMU.
    let control_key = vmm.control_name().to_lowercase();
    let mut v = json!({
        "argv": vm.argv(),
        "ready_ms": ms(r.elapsed),
        "balloon": b,
        "madvise": mad,
        "guest_ram_rss_before_mib": mib(rss_before),
        "guest_ram_rss_full_mib": mib(rss),
    });
    v[format!("{control_key}_to_full_ms")] = json!(ms(set_to_full));
    v[format!("{control_key}_polls")] = json!(polls);
    Ok(v)
}

// ---------------------------------------------------------------------------------------
// bench-reclaim

/// Ebb's report latency from its Prometheus histogram: count, mean and the median's
/// bucket (upper edge), in microseconds.
pub fn report_latency_from_metrics(text: &str) -> Value {
    let name = "ebb_balloon_report_latency_seconds";
    let value = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
    let mut count = None;
    let mut sum = None;
    let mut buckets = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(name) {
            if rest.starts_with("_count ") {
                count = value(line);
            } else if rest.starts_with("_sum ") {
                sum = value(line);
            } else if let Some(b) = rest.strip_prefix("_bucket{le=\"") {
                let le = b.split('"').next().unwrap_or("");
                if let (Ok(le), Some(n)) = (le.parse::<f64>(), value(line)) {
                    buckets.push((le, n));
                }
            }
        }
    }
    let (Some(count), Some(sum)) = (count, sum) else {
        return json!({ "error": "no report latency in /metrics" });
    };
    let p50 = buckets
        .iter()
        .find(|(_, n)| count > 0.0 && *n >= count / 2.0)
        .map(|(le, _)| (le * 1e6).round());
    json!({
        "reports": count,
        "mean_us": if count > 0.0 { Some((sum / count * 1e6).round()) } else { None },
        "p50_bucket_us": p50,
    })
}

fn reclaim_one(
    kind: &VmmRef,
    memory_mib: u64,
    touch_mib: u64,
    limit: Duration,
    thp: Option<bool>,
) -> Result<Value, String> {
    let mut c = config(
        memory_mib,
        1,
        Some(BalloonConfig {
            size_mib: 0,
            deflate_on_oom: false,
            free_page_reporting: true,
            stats_interval: 0,
            free_page_hinting: false,
            deflate_prefault: true,
        }),
    );
    c.thp = thp;
    c.kernel = Some(KernelImage::Elf);
    // Ebb's report latency comes from its metrics.
    let api_dir = super::support::scratch_dir("reclaim-api")?;
    let socket = api_dir.join("api.sock");
    if kind.kind() == VmmKind::Ebb {
        c.extra_args = vec!["--api-socket".into(), socket.to_string_lossy().into_owned()];
    }
    let (mut vm, r) = boot(kind, &c)?;
    let b = cmd(&mut vm, "balloon")?;
    let pre = settled_rss(&vm, Duration::from_secs(4), Duration::from_secs(30), 2048)?;
    let touch = cmd_within(
        &mut vm,
        &format!("touch {touch_mib}"),
        Duration::from_secs(1800),
    )?;
    let peak = ram_rss(&vm)?;
    cmd(&mut vm, "free")?;
    let within5 = pre + pre / 20;
    let t95_goal = pre + peak.saturating_sub(pre) / 20;
    let mut t95: Option<Duration> = None;
    let mut last_drop: (Duration, u64) = (Duration::ZERO, peak);
    let (trace, hit) = watch_rss(&vm, limit, Duration::from_millis(500), |el, rss| {
        if t95.is_none() && rss <= t95_goal {
            t95 = Some(el);
        }
        if rss + 2048 < last_drop.1 {
            last_drop = (el, rss);
        }
        // Done when within 5% of the pre-touch value, or when 95% is back and nothing
        // more has come back for 20 s.
        rss <= within5
            || (t95.is_some() && el.saturating_sub(last_drop.0) > Duration::from_secs(20))
    })?;
    let last = trace.last_kib();
    let reached = last <= within5;
    let m = cmd(&mut vm, "meminfo")?;
    let latency = if kind.kind() == VmmKind::Ebb {
        let client = ebb_ctl::client::Client::new(&socket, Duration::from_secs(10));
        match client.get("/metrics") {
            Ok(resp) => report_latency_from_metrics(&resp.text()),
            Err(e) => json!({ "error": e.to_string() }),
        }
    } else {
        json!({ "error": "QEMU does not expose it" })
    };
    poweroff_any(&mut vm)?;
    let _ = std::fs::remove_dir_all(&api_dir);
    Ok(json!({
        "argv": vm.argv(),
        "report_latency": latency,
        "ready_ms": ms(r.elapsed),
        "features": b["features"],
        "pre_touch_rss_mib": mib(pre),
        "peak_rss_mib": mib(peak),
        "touch_ms": touch["ms"],
        "within5_goal_mib": mib(within5),
        "within5_ms": if reached { hit.map(ms) } else { None },
        "t95_ms": t95.map(ms),
        "watched_ms": trace.samples.last().map(|s| s.0),
        "final_rss_mib": mib(last),
        "residual_mib": mib(last.saturating_sub(pre)),
        "guest_mem_free_kib": u64_field(&m, "mem_free_kib")?,
        "rss_samples": trace.to_json(),
    }))
}

fn bench_reclaim(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["memory_mib", "touch_mib", "limit_s", "thp", "vmms", "runs"])?;
    let memory_mib: u64 = args.get("memory_mib", 1024)?;
    let touch_mib: u64 = args.get("touch_mib", 768)?;
    let default_limit = if memory_mib > 2048 { 300 } else { 120 };
    let limit = Duration::from_secs(args.get("limit_s", default_limit)?);
    let thp_arg: String = args.get("thp", "host".to_string())?;
    let thp = match thp_arg.as_str() {
        "on" => Some(true),
        "off" => Some(false),
        "host" => None,
        other => return Err(format!("thp={other}: expected on, off or host")),
    };
    let vmms: String = args.get("vmms", "both".to_string())?;
    let kinds = match vmms.as_str() {
        "both" => kinds()?,
        "ebb" => vec![ebb()?],
        other => return Err(format!("vmms={other}: expected both or ebb")),
    };
    let runs: usize = args.get("runs", 1)?;
    ensure(runs >= 1, || "runs must be at least 1".into())?;
    // Alternating VMMs, so slow phases of the emulated host hit both alike.
    let mut all: Vec<Vec<Value>> = vec![Vec::new(); kinds.len()];
    for run in 0..runs {
        for (i, kind) in kinds.iter().enumerate() {
            let r = reclaim_one(kind, memory_mib, touch_mib, limit, thp)
                .map_err(|e| format!("{} (run {}): {e}", kind.name(), run + 1))?;
            progress(&format!(
                "bench-reclaim run {}/{runs}: {} back within 5% after {} ms",
                run + 1,
                kind.name(),
                r["within5_ms"]
            ));
            all[i].push(r);
        }
    }
    let mut out = serde_json::Map::new();
    for (i, kind) in kinds.iter().enumerate() {
        out.insert(kind.name().into(), summarize_reclaim(&all[i]));
    }
    out.insert(
        "params".into(),
        json!({ "memory_mib": memory_mib, "touch_mib": touch_mib, "limit_s": limit.as_secs(),
                "thp": thp_arg, "runs": runs }),
    );
    Ok(Value::Object(out))
}

/// The run with the median reclaim time, with every run's key figures beside it.
fn summarize_reclaim(runs: &[Value]) -> Value {
    // A run that never got within 5% sorts last.
    let key = |r: &Value| r["within5_ms"].as_f64().unwrap_or(f64::INFINITY);
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| key(&runs[a]).total_cmp(&key(&runs[b])));
    let mut rep = runs[order[(runs.len() - 1) / 2]].clone();
    let pick = |k: &str| -> Vec<Value> { runs.iter().map(|r| r[k].clone()).collect() };
    rep["all_runs"] = json!({
        "within5_ms": pick("within5_ms"),
        "t95_ms": pick("t95_ms"),
        "residual_mib": pick("residual_mib"),
        "touch_ms": pick("touch_ms"),
    });
    rep
}

// ---------------------------------------------------------------------------------------
// bench-api

fn ebb_ctl_bench(socket: &std::path::Path, requests: u64, idle_s: u64) -> Result<Value, String> {
    let ebb = super::support::ebb_binary()?;
    let ctl = ebb.with_file_name("ebb-ctl");
    let out = std::process::Command::new(&ctl)
        .arg("--api-socket")
        .arg(socket)
        .args(["--json", "bench", "--requests"])
        .arg(requests.to_string())
        .arg("--idle-seconds")
        .arg(idle_s.to_string())
        .output()
        .ctx(&format!("running {}", ctl.display()))?;
    ensure(out.status.success(), || {
        format!(
            "ebb-ctl bench: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    serde_json::from_slice(&out.stdout).ctx("ebb-ctl bench output")
}

fn bench_api(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["requests", "idle_s"])?;
    let requests: u64 = args.get("requests", 1000)?;
    let idle_s: u64 = args.get("idle_s", 30)?;
    let dir = super::support::scratch_dir("bench-api")?;
    let socket = dir.join("api.sock");
    let mut c = config(
        1024,
        1,
        Some(BalloonConfig {
            size_mib: 0,
            deflate_on_oom: false,
            free_page_reporting: true,
            stats_interval: 1,
            free_page_hinting: false,
            deflate_prefault: true,
        }),
    );
    c.kernel = Some(KernelImage::Elf);
    c.extra_args = vec!["--api-socket".into(), socket.to_string_lossy().into_owned()];
    let (mut vm, r) = boot(&ebb()?, &c)?;
    // The guest's vCPU busy in a loop while the requests run.
    super::support::sh(
        &mut vm,
        "(while :; do :; done) </dev/null >/dev/null 2>&1 & echo $! > /tmp/busy.pid",
    )?;
    let busy = ebb_ctl_bench(&socket, requests, 0)?;
    // SIGKILL: the guest's init ignores SIGTERM and its children inherit that.
    super::support::sh(
        &mut vm,
        "p=$(cat /tmp/busy.pid); kill -9 $p; sleep 1; ! kill -0 $p 2>/dev/null",
    )
    .map_err(|e| format!("stopping the guest's busy loop: {e}"))?;
    thread::sleep(Duration::from_secs(3));
    let idle = ebb_ctl_bench(&socket, 10, idle_s)?;
    let rss = vm.process_rss_kib().ctx("VmRSS")?;
    let ram = ram_rss(&vm)?;
    poweroff_any(&mut vm)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "ready_ms": ms(r.elapsed),
        "busy": busy,
        "idle": idle["idle"],
        "vmm_overhead_mib": mib(rss.saturating_sub(ram)),
        "params": { "requests": requests, "idle_s": idle_s },
    }))
}

// ---------------------------------------------------------------------------------------
// Tables

fn num(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if f.fract() == 0.0 {
                format!("{}", f as i64)
            } else {
                format!("{f:.1}")
            }
        }
        other => other.to_string(),
    }
}

fn secs(v: &Value) -> String {
    match v.as_f64() {
        Some(ms) => format!("{:.1} s", ms / 1000.0),
        None => "-".into(),
    }
}

fn row(cells: &[String], widths: &[usize]) -> String {
    let mut s = String::new();
    for (i, c) in cells.iter().enumerate() {
        let w = widths.get(i).copied().unwrap_or(12);
        if i == 0 {
            s.push_str(&format!("{c:<w$}"));
        } else {
            s.push_str(&format!("  {c:>w$}"));
        }
    }
    s.trim_end().to_string()
}

/// A readable table of one benchmark's result line (`{"scenario","ok","data"|"error"}`).
pub fn table(result: &Value) -> String {
    let name = result["scenario"].as_str().unwrap_or("?");
    if result["ok"] != true {
        return format!(
            "{name}: FAILED: {}\n",
            result["error"].as_str().unwrap_or("?")
        );
    }
    let d = &result["data"];
    let mut s = String::new();
    match name {
        "bench-boot" => {
            let p = &d["params"];
            s.push_str(&format!(
                "boot: spawn to EBB-READY, {} MiB guest, {} kernel, {} runs each; VMM overhead = \
                 process RSS - guest RAM RSS after {} s idle\n",
                p["memory_mib"],
                p["kernel"].as_str().unwrap_or("?"),
                p["runs"],
                p["idle_s"]
            ));
            let w = [6, 14, 18, 16, 16];
            s.push_str(&row(
                &[
                    "vmm",
                    "ready median",
                    "ready min..max",
                    "overhead MiB",
                    "guest RAM MiB",
                ]
                .map(String::from),
                &w,
            ));
            s.push('\n');
            for kind in VmmKind::ALL {
                // The result's keys are the VMMs' names.
                let v = kind.as_str();
                let x = &d[v];
                s.push_str(&row(
                    &[
                        v.to_string(),
                        secs(&x["ready_ms"]["median"]),
                        format!(
                            "{}..{}",
                            secs(&x["ready_ms"]["min"]),
                            secs(&x["ready_ms"]["max"])
                        ),
                        num(&x["overhead_mib"]["median"]),
                        num(&x["guest_ram_rss_mib"]["median"]),
                    ],
                    &w,
                ));
                s.push('\n');
            }
        }
        "bench-inflate" => {
            let p = &d["params"];
            s.push_str(&format!(
                "inflate: {} MiB guest, balloon to {} MiB, reporting off; madvise(MADV_DONTNEED) \
                 in guest RAM seen with perf\n",
                p["memory_mib"], p["size_mib"]
            ));
            let w = [6, 15, 14, 13, 20, 14];
            s.push_str(&row(
                &[
                    "vmm",
                    "first..last",
                    "madvise calls",
                    "calls/GiB",
                    "target set..full",
                    "RSS full MiB",
                ]
                .map(String::from),
                &w,
            ));
            s.push('\n');
            for kind in VmmKind::ALL {
                // The result's keys are the VMMs' names.
                let v = kind.as_str();
                let x = &d[v];
                let m = &x["madvise"];
                let set_to_full = match kind {
                    VmmKind::Qemu => format!("{} (QMP)", secs(&x["qmp_to_full_ms"])),
                    VmmKind::Ebb => format!("{} (API)", secs(&x["api_to_full_ms"])),
                };
                let (span, calls, per) = if m.get("error").is_some() {
                    ("perf n/a".to_string(), "-".to_string(), "-".to_string())
                } else {
                    (
                        secs(&m["span_ms"]),
                        num(&m["calls"]),
                        num(&m["calls_per_gib"]),
                    )
                };
                s.push_str(&row(
                    &[
                        v.to_string(),
                        span,
                        calls,
                        per,
                        set_to_full,
                        num(&x["guest_ram_rss_full_mib"]),
                    ],
                    &w,
                ));
                s.push('\n');
                if let Some(e) = m.get("error") {
                    s.push_str(&format!("  ({v}: perf: {})\n", e.as_str().unwrap_or("?")));
                }
            }
        }
        "bench-reclaim" => {
            let p = &d["params"];
            s.push_str(&format!(
                "reclaim: {} MiB guest touches {} MiB and frees it; free page reporting on; Ebb \
                 THP: {}; median of {} run(s)\n",
                p["memory_mib"],
                p["touch_mib"],
                p["thp"].as_str().unwrap_or("host"),
                p["runs"].as_u64().unwrap_or(1)
            ));
            let w = [6, 12, 10, 10, 14, 14, 14, 12, 16];
            s.push_str(&row(
                &[
                    "vmm",
                    "pre MiB",
                    "peak MiB",
                    "touch",
                    "to 95% back",
                    "to pre+5%",
                    "final MiB",
                    "residual",
                    "report p50/mean",
                ]
                .map(String::from),
                &w,
            ));
            s.push('\n');
            for kind in VmmKind::ALL {
                // The result's keys are the VMMs' names.
                let v = kind.as_str();
                let x = &d[v];
                if x.is_null() {
                    continue;
                }
                let l = &x["report_latency"];
                let latency = if l.get("error").is_some() {
                    "n/a".to_string()
                } else {
                    format!("{}/{} us", num(&l["p50_bucket_us"]), num(&l["mean_us"]))
                };
                let within = if x["within5_ms"].is_null() {
                    format!("not in {}", secs(&x["watched_ms"]))
                } else {
                    secs(&x["within5_ms"])
                };
                s.push_str(&row(
                    &[
                        v.to_string(),
                        num(&x["pre_touch_rss_mib"]),
                        num(&x["peak_rss_mib"]),
                        secs(&x["touch_ms"]),
                        secs(&x["t95_ms"]),
                        within,
                        num(&x["final_rss_mib"]),
                        format!("{} MiB", num(&x["residual_mib"])),
                        latency,
                    ],
                    &w,
                ));
                s.push('\n');
                if let Some(w5) = x["all_runs"]["within5_ms"]
                    .as_array()
                    .filter(|a| a.len() > 1)
                {
                    let all: Vec<String> = w5.iter().map(secs).collect();
                    s.push_str(&format!(
                        "  ({v}: to pre+5% in each run: {})\n",
                        all.join(", ")
                    ));
                }
            }
        }
        "bench-api" => {
            let p = &d["params"];
            s.push_str(&format!(
                "api: {} requests per kind with the guest's CPU busy (ebb-ctl bench)\n",
                p["requests"]
            ));
            let w = [28, 10, 10, 10];
            s.push_str(&row(
                &["request", "p50 us", "p99 us", "max us"].map(String::from),
                &w,
            ));
            s.push('\n');
            if let Some(kinds) = d["busy"]["latency"].as_object() {
                for (k, f) in kinds {
                    s.push_str(&row(
                        &[
                            k.clone(),
                            format!("{:.0}", f["p50_us"].as_f64().unwrap_or(0.0)),
                            format!("{:.0}", f["p99_us"].as_f64().unwrap_or(0.0)),
                            format!("{:.0}", f["max_us"].as_f64().unwrap_or(0.0)),
                        ],
                        &w,
                    ));
                    s.push('\n');
                }
            }
            let i = &d["idle"];
            s.push_str(&format!(
                "guest idle, API connection open for {:.0} s: VMM threads {:.2}% of a core, vCPU \
                 threads {:.2}%; VMM overhead {} MiB\n",
                i["seconds"].as_f64().unwrap_or(0.0),
                i["vmm_threads_cpu_percent"].as_f64().unwrap_or(0.0),
                i["vcpu_threads_cpu_percent"].as_f64().unwrap_or(0.0),
                num(&d["vmm_overhead_mib"])
            ));
        }
        "bench-footprint" => s.push_str(&super::footprint::table(d)),
        "hint-reclaim" => s.push_str(&super::hinting::table(d)),
        "bench-disk" => s.push_str(&super::disk::table(d)),
        // Scenarios that render their own table.
        _ if d["table"].is_string() => s.push_str(d["table"].as_str().unwrap_or_default()),
        _ => s.push_str(&format!("{name}: {d}\n")),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_render() {
        let boot = json!({"scenario":"bench-boot","ok":true,"data":{
            "params":{"memory_mib":512,"kernel":"elf","runs":5,"idle_s":3},
            "ebb":{"ready_ms":{"median":14000.0,"min":13000.0,"max":15000.0},"overhead_mib":{"median":3.2},"guest_ram_rss_mib":{"median":60.0}},
            "qemu":{"ready_ms":{"median":15000.0,"min":14000.0,"max":16000.0},"overhead_mib":{"median":40.0},"guest_ram_rss_mib":{"median":70.0}}}});
        let t = table(&boot);
        assert!(
            t.contains("ebb") && t.contains("14.0 s") && t.contains("3.2"),
            "{t}"
        );
        let metrics = "ebb_balloon_report_latency_seconds_bucket{le=\"0.000064\"} 1\n\
            ebb_balloon_report_latency_seconds_bucket{le=\"0.000128\"} 3\n\
            ebb_balloon_report_latency_seconds_bucket{le=\"+Inf\"} 4\n\
            ebb_balloon_report_latency_seconds_sum 0.0004\n\
            ebb_balloon_report_latency_seconds_count 4\n";
        let l = report_latency_from_metrics(metrics);
        assert_eq!(l["p50_bucket_us"], 128.0, "{l}");
        assert_eq!(l["mean_us"], 100.0, "{l}");
        assert!(report_latency_from_metrics("").get("error").is_some());
        let inflate = json!({"scenario":"bench-inflate","ok":true,"data":{
            "params":{"memory_mib":1024,"size_mib":768},
            "ebb":{"api_to_full_ms":2500,"madvise":{"span_ms":1200.0,"calls":3,"calls_per_gib":4.0},"guest_ram_rss_full_mib":300.0},
            "qemu":{"qmp_to_full_ms":3000,"madvise":{"error":"no perf"},"guest_ram_rss_full_mib":310.0}}});
        let t = table(&inflate);
        assert!(
            t.contains("2.5 s (API)")
                && t.contains("3.0 s (QMP)")
                && t.contains("perf n/a")
                && t.contains("(qemu: perf: no perf)"),
            "{t}"
        );
        let failed = json!({"scenario":"bench-inflate","ok":false,"error":"boom"});
        assert!(table(&failed).contains("FAILED: boom"));
    }
}
