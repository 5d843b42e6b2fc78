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
    settled_rss, sh, watch_rss,
};
use super::{ms, progress, Args, Ctx, ScenarioDef};
use crate::guest::{BalloonConfig, GuestVm};

/// The scenarios of this family.
pub const SCENARIOS: &[ScenarioDef] = &[ScenarioDef {
    name: "hint-reclaim",
    help: "free page hinting vs reporting on Ebb: touch `touch_mib` and free it, then (a) a \
           hinting run (reporting off) and (b) reporting alone; time until `pct`% of the \
           touched memory is back on the host, the run's own figures, what a run costs an \
           idle guest, and a checksummed file that must survive (args: memory_mib=1024 \
           touch_mib=768 pct=90 limit_s=120)",
    run: hint_reclaim,
}];

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
        ..BalloonConfig::default()
    };
    let mut c = config(memory_mib, 1, Some(balloon));
    c.extra_args = vec!["--api-socket".into(), socket.to_string_lossy().into_owned()];
    c
}

fn hint_reclaim(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["memory_mib", "touch_mib", "pct", "limit_s"])?;
    let memory_mib: u64 = args.get("memory_mib", 1024)?;
    let touch_mib: u64 = args.get("touch_mib", 768)?;
    let pct: u64 = args.get("pct", 90)?;
    let limit = Duration::from_secs(args.get("limit_s", 120)?);
    let dir = scratch_dir("hint")?;
    let ebb = ebb()?;

    // (a) Hinting, reporting off: only the host's request gives memory back.
    let socket = dir.join("hint.sock");
    let (mut vm, _) = boot(&ebb, &guest_config(memory_mib, false, true, &socket))?;
    let client = Client::new(&socket, Duration::from_secs(30));
    let sum = canary(&mut vm, true)?;
    let idle_before = settled_rss(&vm, Duration::from_secs(4), Duration::from_secs(30), 2048)?;
    // An idle run: the guest zeroes (init_on_alloc) and hands over all its free memory.
    // Sampled while the run goes: the guest zeroes each block before handing it over.
    let stop = AtomicBool::new(false);
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
    let (idle_status, idle_took) = idle?;
    let idle_after = settled_rss(&vm, Duration::from_secs(3), Duration::from_secs(20), 2048)?;
    let idle_peak = sampled_peak.max(idle_after);
    progress(&format!(
        "idle hint: {} ms, RSS {} -> peak {} -> {} MiB",
        idle_took.as_millis(),
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
    let t0 = Instant::now();
    let (hint_status, hint_took) = run_hint(&client, limit)?;
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
        "hinting: {pct}% of {touch_mib} MiB back {} ms after the start request (guest run {} ms)",
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
        "idle": {
            "rss_before_mib": mib(idle_before),
            "rss_peak_mib": mib(idle_peak),
            "rss_after_mib": mib(idle_after),
            "run_ms": ms(idle_took),
            "status": idle_status,
        },
        "hinting": {
            "pre_touch_rss_mib": mib(pre),
            "peak_rss_mib": mib(touched_peak),
            "after_free_rss_mib": mib(after_free),
            "back_ms": ms(back_after),
            "run_ms": ms(hint_took),
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
    format!(
        "hint: {:.1} GiB guest touched and freed {:.1} GiB; time until {}% of it is back on the host\n\
         \x20 hinting (Ebb, reporting off): {} ms after the start request (the guest's run: {} \
         ms, of which the host checking and discarding: {} ms; {} blocks, {:.0} MiB given \
         back, {:.0} MiB kept)\n\
         \x20 reporting (Ebb, the guest's pace): {} ms after the free\n\
         \x20 idle guest, one run: {} ms, guest RAM RSS {} -> peak {} -> {} MiB\n",
        gib(&d["memory_mib"]),
        gib(&d["touch_mib"]),
        d["pct"],
        d["hinting"]["back_ms"],
        d["hinting"]["run_ms"],
        st["host_ms"],
        st["blocks"],
        st["discarded_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        st["kept_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        d["reporting"]["back_ms"],
        d["idle"]["run_ms"],
        d["idle"]["rss_before_mib"],
        d["idle"]["rss_peak_mib"],
        d["idle"]["rss_after_mib"],
    )
}
