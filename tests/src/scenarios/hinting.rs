//! Free page hinting seen from the host: the host asks, the guest hands over its free
//! memory, Ebb gives back what still holds zeros. `hint-reclaim` measures how fast memory a
//! guest touched and freed comes back with a hinting run, side by side with free page
//! reporting (the guest's own pace) in the same test host, what a run costs an idle guest,
//! and that memory the guest still uses keeps its contents.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ebb_ctl::client::Client;
use serde_json::{json, Value};

use super::support::{
    boot, cmd, cmd_within, config, ebb, ensure, mib, poweroff_ebb, ram_rss, scratch_dir,
    settled_rss, sh, u64_field, watch_rss,
};
use super::{ms, progress, Args, Ctx, ScenarioDef};
use crate::guest::{BalloonConfig, EventView, GuestVm};

/// The scenarios of this family.
pub const SCENARIOS: &[ScenarioDef] = &[
    ScenarioDef {
        name: "hint-reclaim",
        help: "free page hinting vs reporting on Ebb: touch `touch_mib` and free it, then (a) a \
           hinting run (reporting off) and (b) reporting alone; time until `pct`% of the \
           touched memory is back on the host, the run's own figures, what a run costs an \
           idle guest, and a checksummed file that must survive (args: memory_mib=1024 \
           touch_mib=768 pct=90 limit_s=120 unchecked=false; unchecked=true discards \
           hinted blocks without the zero check (--unsafe-unchecked-hinting): what a run \
           costs when the host's share is only the discard)",
        run: hint_reclaim,
    },
    ScenarioDef {
        name: "hint-corruption",
        help: "no lost writes: the guest churns a checksummed working set (`churn`, sized to \
               `set_pct`% of its available memory) under memory pressure while the host runs \
               `runs` hinting runs back to back (acknowledge_on_stop=false, held `hold_ms`, \
               then stop), so the guest's shrinker hands hinted blocks back mid-run; any \
               corrupted page fails it. With unchecked=true Ebb discards blocks unchecked \
               (--unsafe-unchecked-hinting) and the scenario reports how many runs were \
               followed by corruption instead of failing (args: runs=20 unchecked=false \
               memory_mib=1024 cpus=2 set_pct=85 hold_ms=1000 churn_s=40 burners=0: guest \
               processes that only spin, so vCPUs compete with Ebb for the host's CPUs)",
        run: hint_corruption,
    },
];

const CANARY_MIB: u64 = 32;

fn canary(vm: &mut GuestVm, write: bool) -> Result<String, String> {
    let line = if write {
        format!(
            "dd if=/dev/urandom of=/dev/shm/canary bs=1M count={CANARY_MIB} 2>/dev/null && \
             md5sum /dev/shm/canary"
        )
    } else {
        "md5sum /dev/shm/canary".to_string()
    };
    Ok(sh(vm, &line)?
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Guest CPU time so far (user + system + softirq of all CPUs), in ms.
fn guest_cpu_ms(vm: &mut GuestVm) -> Result<u64, String> {
    let t = cmd(vm, "cpustat")?;
    let hz = u64_field(&t, "user_hz")?.max(1);
    let ticks = u64_field(&t, "user")? + u64_field(&t, "system")? + u64_field(&t, "softirq")?;
    Ok(ticks * 1000 / hz)
}

fn status(client: &Client) -> Result<Value, String> {
    let r = client
        .get("/balloon/hinting/status")
        .map_err(|e| e.to_string())?;
    ensure(r.status == 200, || format!("hinting status: {}", r.text()))?;
    r.json().map_err(|e| e.to_string())
}

/// Starts a run and waits for the guest to finish it; returns the last status and how
/// long the guest took.
fn run_hint(client: &Client, limit: Duration) -> Result<(Value, Duration), String> {
    let t0 = Instant::now();
    let r = client
        .send_json(
            "PATCH",
            "/balloon/hinting/start",
            &json!({"acknowledge_on_stop": true}),
        )
        .map_err(|e| e.to_string())?;
    ensure(r.status == 204, || format!("hinting start: {}", r.text()))?;
    loop {
        let s = status(client)?;
        if matches!(s["state"].as_str(), Some("stopped" | "done")) {
            return Ok((s, t0.elapsed()));
        }
        if t0.elapsed() > limit {
            return Err(format!(
                "the hinting run did not finish within {limit:?}: {s}"
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn guest_config(
    memory_mib: u64,
    reporting: bool,
    hinting: bool,
    socket: &Path,
) -> crate::guest::GuestConfig {
    let balloon = BalloonConfig {
        deflate_on_oom: false,
        free_page_reporting: reporting,
        free_page_hinting: hinting,
        deflate_prefault: true,
        ..BalloonConfig::default()
    };
    let mut c = config(memory_mib, 1, Some(balloon));
    c.extra_args = vec!["--api-socket".into(), socket.to_string_lossy().into_owned()];
    c
}

fn hint_reclaim(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["memory_mib", "touch_mib", "pct", "limit_s", "unchecked"])?;
    let memory_mib: u64 = args.get("memory_mib", 1024)?;
    let touch_mib: u64 = args.get("touch_mib", 768)?;
    let pct: u64 = args.get("pct", 90)?;
    let limit = Duration::from_secs(args.get("limit_s", 120)?);
    let unchecked: bool = args.get("unchecked", false)?;
    let dir = scratch_dir("hint")?;
    let ebb = ebb()?;

    // (a) Hinting, reporting off: only the host's request gives memory back.
    let socket = dir.join("hint.sock");
    let mut hinting_config = guest_config(memory_mib, false, true, &socket);
    if unchecked {
        hinting_config
            .extra_args
            .push("--unsafe-unchecked-hinting".into());
    }
    let (mut vm, _) = boot(&ebb, &hinting_config)?;
    let client = Client::new(&socket, Duration::from_secs(30));
    let idle_before = settled_rss(&vm, Duration::from_secs(4), Duration::from_secs(30), 2048)?;
    // An idle run: the guest zeroes (init_on_alloc) and hands over all its free memory.
    // Sampled while the run goes: the guest zeroes each block before handing it over.
    let stop = AtomicBool::new(false);
    let idle_cpu0 = guest_cpu_ms(&mut vm)?;
    let (pid, bytes) = (vm.pid(), memory_mib << 20);
    let (idle, sampled_peak) = thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(kib) = crate::procfs::guest_ram_rss_kib(pid, bytes) {
                    peak = peak.max(kib);
                }
                thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        let run = run_hint(&client, limit);
        stop.store(true, Ordering::Relaxed);
        (run, sampler.join().unwrap_or(0))
    });
    // A run the API could not finish says what became of the VMM.
    let (idle_status, idle_took) = idle.map_err(|e| format!("{e}\n{}", vm.diagnostics()))?;
    let idle_cpu = guest_cpu_ms(&mut vm)?.saturating_sub(idle_cpu0);
    // The canary is written after the idle run, so that run saw a guest that never
    // touched its memory.
    let sum = canary(&mut vm, true)?;
    let idle_after = settled_rss(&vm, Duration::from_secs(3), Duration::from_secs(20), 2048)?;
    let idle_peak = sampled_peak.max(idle_after);
    progress(&format!(
        "idle hint: {} ms, guest CPU {idle_cpu} ms, {} MiB given back, RSS {} -> peak {} -> {} MiB",
        idle_took.as_millis(),
        idle_status["discarded_bytes"].as_u64().unwrap_or(0) >> 20,
        mib(idle_before),
        mib(idle_peak),
        mib(idle_after)
    ));

    let pre = settled_rss(&vm, Duration::from_secs(4), Duration::from_secs(30), 2048)?;
    cmd_within(
        &mut vm,
        &format!("touch {touch_mib}"),
        Duration::from_secs(300),
    )?;
    let touched_peak = ram_rss(&vm)?;
    ensure(touched_peak >= pre + touch_mib * 1024 * 9 / 10, || {
        format!("touching {touch_mib} MiB raised RSS only from {pre} to {touched_peak} KiB")
    })?;
    cmd(&mut vm, "free")?;
    let after_free = ram_rss(&vm)?;
    let goal = touched_peak - (touched_peak - pre) * pct / 100;
    let cpu0 = guest_cpu_ms(&mut vm)?;
    let t0 = Instant::now();
    let (hint_status, hint_took) =
        run_hint(&client, limit).map_err(|e| format!("{e}\n{}", vm.diagnostics()))?;
    let hint_cpu = guest_cpu_ms(&mut vm)?.saturating_sub(cpu0);
    let (trace, hit) = watch_rss(&vm, limit, Duration::from_millis(50), |_, rss| rss <= goal)?;
    let back_after = t0.elapsed();
    ensure(hit.is_some(), || {
        format!(
            "after the hinting run RSS stayed at {} MiB (goal {} MiB): {}",
            mib(trace.last_kib()),
            mib(goal),
            hint_status
        )
    })?;
    let now = canary(&mut vm, false)?;
    ensure(now == sum, || {
        format!("the guest's data changed through hinting: md5 {sum} before, {now} after")
    })?;
    // The guest works on normally afterwards: its blocks came back to it.
    cmd_within(
        &mut vm,
        &format!("touch {touch_mib}"),
        Duration::from_secs(300),
    )?;
    cmd(&mut vm, "free")?;
    let metrics = client
        .get("/balloon/statistics")
        .ok()
        .and_then(|r| r.json().ok())
        .unwrap_or(Value::Null);
    poweroff_ebb(&mut vm)?;
    progress(&format!(
        "hinting: {pct}% of {touch_mib} MiB back {} ms after the start request (guest run {} ms, \
         guest CPU {hint_cpu} ms)",
        back_after.as_millis(),
        hint_took.as_millis()
    ));

    // (b) Reporting alone, same guest size and touch.
    let socket = dir.join("report.sock");
    let (mut vm, _) = boot(&ebb, &guest_config(memory_mib, true, false, &socket))?;
    let pre_r = settled_rss(&vm, Duration::from_secs(4), Duration::from_secs(30), 2048)?;
    cmd_within(
        &mut vm,
        &format!("touch {touch_mib}"),
        Duration::from_secs(300),
    )?;
    let peak_r = ram_rss(&vm)?;
    let goal_r = peak_r - (peak_r.saturating_sub(pre_r)) * pct / 100;
    cmd(&mut vm, "free")?;
    let t1 = Instant::now();
    let (trace_r, hit_r) = watch_rss(&vm, limit, Duration::from_millis(200), |_, rss| {
        rss <= goal_r
    })?;
    let report_back = hit_r.map(|_| t1.elapsed());
    poweroff_ebb(&mut vm)?;
    progress(&format!(
        "reporting: {pct}% back after {}",
        report_back.map_or("never (limit)".to_string(), |d| format!(
            "{} ms",
            d.as_millis()
        ))
    ));

    Ok(json!({
        "memory_mib": memory_mib,
        "touch_mib": touch_mib,
        "pct": pct,
        "unchecked": unchecked,
        "idle": {
            "rss_before_mib": mib(idle_before),
            "rss_peak_mib": mib(idle_peak),
            "rss_after_mib": mib(idle_after),
            "run_ms": ms(idle_took),
            "guest_cpu_ms": idle_cpu,
            "status": idle_status,
        },
        "hinting": {
            "pre_touch_rss_mib": mib(pre),
            "peak_rss_mib": mib(touched_peak),
            "after_free_rss_mib": mib(after_free),
            "back_ms": ms(back_after),
            "run_ms": ms(hint_took),
            "guest_cpu_ms": hint_cpu,
            "status": hint_status,
            "trace": trace.to_json(),
            "statistics": metrics["ebb"]["hinting"],
        },
        "reporting": {
            "pre_touch_rss_mib": mib(pre_r),
            "peak_rss_mib": mib(peak_r),
            "back_ms": report_back.map(ms),
            "trace": trace_r.to_json(),
        },
    }))
}

/// The table `ebb-bench hint` prints.
pub fn table(d: &Value) -> String {
    let gib = |m: &Value| m.as_f64().unwrap_or(f64::NAN) / 1024.0;
    let st = &d["hinting"]["status"];
    let idle = &d["idle"];
    format!(
        "hint: {:.1} GiB guest touched and freed {:.1} GiB; time until {}% of it is back on the host\n\
         \x20 hinting (Ebb, reporting off{}): {} ms after the start request (the guest's run: {} \
         ms, of which the host checking and discarding: {} ms; {} blocks, {:.0} MiB given \
         back, {:.0} MiB kept; guest CPU (user+system+softirq): {} ms)\n\
         \x20 reporting (Ebb, the guest's pace): {} ms after the free\n\
         \x20 idle guest that never touched its memory, one run: {} ms, {:.0} MiB given back \
         ({:.0} MiB kept), guest CPU {} ms, guest RAM RSS {} -> peak {} -> {} MiB\n",
        gib(&d["memory_mib"]),
        gib(&d["touch_mib"]),
        d["pct"],
        if d["unchecked"] == true {
            ", UNCHECKED discards"
        } else {
            ""
        },
        d["hinting"]["back_ms"],
        d["hinting"]["run_ms"],
        st["host_ms"],
        st["blocks"],
        st["discarded_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        st["kept_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        d["hinting"]["guest_cpu_ms"],
        d["reporting"]["back_ms"],
        idle["run_ms"],
        idle["status"]["discarded_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        idle["status"]["kept_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        idle["guest_cpu_ms"],
        idle["rss_before_mib"],
        idle["rss_peak_mib"],
        idle["rss_after_mib"],
    )
}

/// One hinting run of `hint-corruption`, as the host drove it.
struct DrivenRun {
    started: Instant,
    status: Value,
    /// From the start request to the guest's STOP.
    run_ms: u64,
}

fn hint_patch(client: &Client, path: &str, body: &Value) -> Result<(), String> {
    let r = client
        .send_json("PATCH", path, body)
        .map_err(|e| format!("{path}: {e}"))?;
    ensure(r.status == 204, || {
        format!("{path}: {} {}", r.status, r.text())
    })
}

/// Waits (up to `limit`) for a `churn` event after the first `seen`; returns how many
/// there are now. A cycle ends with that event and the next one starts by growing the
/// working set: a run started then overlaps the workload's allocations.
fn next_cycle(view: &EventView, seen: usize, limit: Duration, quit: &AtomicBool) -> usize {
    let t0 = Instant::now();
    loop {
        let n = view
            .events()
            .iter()
            .filter(|e| e.value["event"] == "churn")
            .count();
        if n > seen || t0.elapsed() > limit || quit.load(Ordering::Relaxed) {
            return n;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `runs` hinting runs, each as the workload starts a cycle: start without
/// acknowledge_on_stop, wait for the guest's STOP, leave the guest holding its blocks for
/// `hold` (its shrinker gives them back as the workload needs memory), then stop. Ends
/// early when `quit` is set.
fn drive_runs(
    client: &Client,
    view: &EventView,
    runs: u64,
    hold: Duration,
    quit: &AtomicBool,
) -> (Vec<DrivenRun>, Option<String>) {
    let mut done = Vec::new();
    let mut cycles = 0;
    for i in 0..runs {
        cycles = next_cycle(view, cycles, Duration::from_secs(60), quit);
        if quit.load(Ordering::Relaxed) {
            return (
                done,
                Some(format!("stopped after {i} runs: the workload ended")),
            );
        }
        let started = Instant::now();
        let one = (|| {
            hint_patch(
                client,
                "/balloon/hinting/start",
                &json!({"acknowledge_on_stop": false}),
            )?;
            let stopped = loop {
                let s = status(client)?;
                if s["state"] == "stopped" {
                    break s;
                }
                if started.elapsed() > Duration::from_secs(120) || quit.load(Ordering::Relaxed) {
                    return Err(format!("hinting run {} did not stop: {s}", i + 1));
                }
                thread::sleep(Duration::from_millis(20));
            };
            let run_ms = ms(started.elapsed());
            thread::sleep(hold);
            hint_patch(client, "/balloon/hinting/stop", &json!({}))?;
            Ok((stopped, run_ms))
        })();
        match one {
            Ok((status, run_ms)) => done.push(DrivenRun {
                started,
                status,
                run_ms,
            }),
            Err(e) => return (done, Some(e)),
        }
    }
    (done, None)
}

/// What the guest's `churn` events say about corruption over time: (when, pages newly
/// found corrupted).
fn corruption_found(events: &[crate::guest::Received]) -> Vec<(Instant, u64)> {
    let mut out = Vec::new();
    let mut seen = 0;
    for e in events.iter().filter(|e| e.value["event"] == "churn") {
        if e.value["cycle"] == 1 {
            seen = 0; // a new churn command counts from zero
        }
        let total = e.value["pages_corrupted"].as_u64().unwrap_or(0);
        if total > seen {
            out.push((e.at, total - seen));
        }
        seen = total;
    }
    out
}

fn hint_corruption(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&[
        "runs",
        "unchecked",
        "memory_mib",
        "cpus",
        "set_pct",
        "hold_ms",
        "churn_s",
        "burners",
    ])?;
    let runs: u64 = args.get("runs", 20)?;
    let unchecked: bool = args.get("unchecked", false)?;
    let memory_mib: u64 = args.get("memory_mib", 1024)?;
    let cpus: u32 = args.get("cpus", 2)?;
    let set_pct: u64 = args.get("set_pct", 85)?;
    let hold = Duration::from_millis(args.get("hold_ms", 1000)?);
    let churn_s: u64 = args.get("churn_s", 40)?;
    let burners: u32 = args.get("burners", 0)?;
    ensure(runs > 0 && (1..=95).contains(&set_pct), || {
        "runs must be at least 1 and set_pct from 1 to 95".to_string()
    })?;
    let dir = scratch_dir("hint-corruption")?;
    let socket = dir.join("api.sock");
    let mut config = guest_config(memory_mib, false, true, &socket);
    config.cpus = cpus;
    if unchecked {
        config.extra_args.push("--unsafe-unchecked-hinting".into());
    }
    let (mut vm, _) = boot(&ebb()?, &config)?;
    let client = Client::new(&socket, Duration::from_secs(30));
    let available = u64_field(&cmd(&mut vm, "meminfo")?, "mem_available_kib")?;
    // 4 MiB slots; the workload holds between half of this and all of it.
    let set_mib = ((available / 1024 * set_pct / 100) & !3).max(8);
    for _ in 0..burners {
        sh(
            &mut vm,
            "nohup sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 &",
        )?;
    }
    progress(&format!(
        "hint-corruption: {runs} runs, {} discard, churning {set_mib} MiB of {} MiB available",
        if unchecked { "UNCHECKED" } else { "checked" },
        available / 1024
    ));

    let quit = AtomicBool::new(false);
    let t0 = Instant::now();
    let view = vm.event_view();
    let (churns, workload_error, (driven, driver_error)) = thread::scope(|scope| {
        let driver = scope.spawn(|| drive_runs(&client, &view, runs, hold, &quit));
        let mut churns = Vec::new();
        let mut error = None;
        // The workload runs until the host has done all its runs.
        while !driver.is_finished() {
            let line = format!("churn {set_mib} {churn_s}");
            // Well inside the test's job timeout, so a stuck guest or VMM is reported
            // with the VMM's threads while they are still there to read.
            match vm.command(&line, Duration::from_secs(churn_s + 180)) {
                Ok(r) if r["cmd"] == "churn" && r.get("pages_checked").is_some() => churns.push(r),
                Ok(r) => {
                    error = Some(format!("the workload failed: {r}"));
                    break;
                }
                Err(e) => {
                    error = Some(format!("the workload did not answer: {e}"));
                    break;
                }
            }
        }
        quit.store(true, Ordering::Relaxed);
        let driven = driver
            .join()
            .unwrap_or_else(|_| (Vec::new(), Some("the run driver panicked".into())));
        (churns, error, driven)
    });
    let took = t0.elapsed();

    // Which runs were followed by newly found corruption (before the next run started).
    let found = corruption_found(&vm.events());
    let mut per_run = vec![0u64; driven.len()];
    let mut before_any_run = 0;
    for (at, pages) in &found {
        match driven.iter().rposition(|r| r.started <= *at) {
            Some(i) => per_run[i] += pages,
            None => before_any_run += pages,
        }
    }
    let checked: u64 = churns
        .iter()
        .map(|c| c["pages_checked"].as_u64().unwrap_or(0))
        .sum();
    let corrupted: u64 = churns
        .iter()
        .map(|c| c["pages_corrupted"].as_u64().unwrap_or(0))
        .sum();
    let allocated: u64 = churns
        .iter()
        .map(|c| c["allocated_mib"].as_u64().unwrap_or(0))
        .sum();
    let bad_pages: Vec<Value> = churns
        .iter()
        .filter(|c| c["pages_corrupted"].as_u64().unwrap_or(0) > 0)
        .map(|c| c["bad_pages"].clone())
        .collect();
    let runs_corrupted = per_run.iter().filter(|&&p| p > 0).count();
    let sum = |key: &str| -> u64 {
        driven
            .iter()
            .map(|r| r.status[key].as_u64().unwrap_or(0))
            .sum()
    };
    let run_ms: Vec<u64> = driven.iter().map(|r| r.run_ms).collect();
    let alive = workload_error.is_none();
    // How the guest found memory: reclaim stalls and kswapd runs (the shrinker's callers),
    // huge page faults.
    let vmstat = if alive {
        sh(
            &mut vm,
            "cat /sys/kernel/mm/transparent_hugepage/enabled; grep -E \
             '^(allocstall_|pageoutrun|thp_fault_|compact_stall)' /proc/vmstat",
        )
        .unwrap_or_else(|e| e)
    } else {
        String::new()
    };
    if alive {
        poweroff_ebb(&mut vm)?;
    } else {
        vm.kill();
    }
    progress(&format!(
        "hint-corruption: {} runs in {} s ({} MiB hinted, {} MiB discarded, {} MiB kept: written before the host looked); \
         workload: {checked} pages checked, {corrupted} corrupted, {allocated} MiB allocated; \
         runs followed by corruption: {runs_corrupted}",
        driven.len(),
        took.as_secs(),
        sum("hinted_bytes") >> 20,
        sum("discarded_bytes") >> 20,
        sum("kept_bytes") >> 20,
    ));
    let data = json!({
        "unchecked": unchecked,
        "runs": driven.len(),
        "runs_asked": runs,
        "set_mib": set_mib,
        "burners": burners,
        "host_ms": sum("host_ms"),
        "seconds": took.as_secs(),
        "pages_checked": checked,
        "pages_corrupted": corrupted,
        "allocated_mib": allocated,
        "runs_with_corruption": runs_corrupted,
        "corrupted_pages_per_run": per_run,
        "corrupted_before_any_run": before_any_run,
        "bad_pages": bad_pages,
        "churn_commands": churns.len(),
        "run_ms": run_ms,
        "hinted_mib": sum("hinted_bytes") >> 20,
        "discarded_mib": sum("discarded_bytes") >> 20,
        "kept_mib": sum("kept_bytes") >> 20,
        "blocks": sum("blocks"),
        "workload_error": workload_error,
        "driver_error": driver_error,
        "guest_vmstat": vmstat,
    });
    if unchecked {
        // The evidence run: a dead or corrupted guest is what it looks for, not a failure.
        return Ok(data);
    }
    ensure(corrupted == 0, || {
        format!(
            "LOST WRITES: the guest found {corrupted} corrupted pages of {checked} checked \
             across {} hinting runs ({runs_corrupted} runs followed by corruption; first bad \
             page indexes: {}); Ebb discarded memory the guest had written",
            driven.len(),
            Value::from(bad_pages.clone())
        )
    })?;
    if let Some(e) = &data["workload_error"].as_str() {
        return Err(format!("hint-corruption: {e}"));
    }
    if let Some(e) = &data["driver_error"].as_str() {
        return Err(format!("hint-corruption: after {} runs: {e}", driven.len()));
    }
    ensure(driven.len() as u64 == runs, || {
        format!("only {} of {runs} hinting runs were done", driven.len())
    })?;
    ensure(sum("blocks") > 0, || {
        format!("no run handed over a block, so nothing was tested: {data}")
    })?;
    Ok(data)
}
