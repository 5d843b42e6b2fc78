//! A hostile guest against a running Ebb: the guest takes the balloon from Linux and
//! floods it from rings of its own (`hostile` in the guest tool), while the host measures
//! what that costs the VMM (its own RSS, the API's latency) and checks the process's
//! hardening (seccomp on every thread, no_new_privs, close-on-exec descriptors, guest
//! RAM out of core dumps).

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ebb_ctl::client::Client;
use serde_json::{json, Value};

use super::support::{boot, cmd_within, config, ebb, ensure, OrStr, EXIT_TIMEOUT};
use super::{ms, progress, Args, Ctx, ScenarioDef};
use crate::guest::BalloonConfig;
use crate::procfs;
use crate::util::median;

/// The scenarios of this family.
pub const SCENARIOS: &[ScenarioDef] = &[ScenarioDef {
    name: "hostile-flood",
    help: "Ebb's process hardening (every thread under seccomp, no_new_privs, descriptors \
           close-on-exec, guest RAM out of core dumps), then a guest that drives the balloon \
           itself floods each queue for `secs` (inflate, report, stats, malformed chains): \
           the API answers throughout (p99 below `max_p99_ms`), the VMM's own RSS grows less \
           than `max_growth_mib`, memory the guest never gave stays intact, and SIGTERM \
           ends Ebb within 5 s (args: secs=20 modes=inflate,report,stats,malformed \
           memory_mib=1024 max_p99_ms=250 max_growth_mib=64)",
    run: hostile_flood,
}];

/// What the host saw while one flood ran.
#[derive(Default)]
struct Samples {
    latencies_ms: Vec<f64>,
    failures: u64,
    vmm_rss_kib: Vec<u64>,
}

/// Polls `GET /balloon` and the VMM's own RSS until `stop`.
fn sample(socket: &Path, pid: u32, memory_bytes: u64, stop: Arc<AtomicBool>) -> Samples {
    let client = Client::new(socket, Duration::from_secs(30));
    let mut s = Samples::default();
    let mut last_rss = Instant::now() - Duration::from_secs(1);
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        match client.get("/balloon") {
            Ok(r) if r.status == 200 => s.latencies_ms.push(t.elapsed().as_secs_f64() * 1e3),
            _ => s.failures += 1,
        }
        if last_rss.elapsed() >= Duration::from_millis(250) {
            last_rss = Instant::now();
            if let (Ok(all), Ok(ram)) = (
                procfs::process_rss_kib(pid),
                procfs::guest_ram_rss_kib(pid, memory_bytes),
            ) {
                s.vmm_rss_kib.push(all.saturating_sub(ram));
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    s
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The hardening a running Ebb shows in /proc.
fn hardening(pid: u32, memory_bytes: u64) -> Result<Value, String> {
    let mut threads = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task")).ctx("listing threads")? {
        let dir = entry.s()?.path();
        let status = fs::read_to_string(dir.join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let name = fs::read_to_string(dir.join("comm")).unwrap_or_default();
        threads.push(json!({
            "name": name.trim(),
            "seccomp": field("Seccomp:"),
            "no_new_privs": field("NoNewPrivs:"),
        }));
    }
    let unfiltered: Vec<&Value> = threads
        .iter()
        .filter(|t| t["seccomp"] != "2" || t["no_new_privs"] != "1")
        .collect();
    ensure(unfiltered.is_empty(), || {
        format!("threads without a seccomp filter or no_new_privs: {unfiltered:?}")
    })?;
    let mut inherited = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo")).ctx("listing descriptors")? {
        let path = entry.s()?.path();
        let fd: u32 = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if fd <= 2 {
            continue; // stdin, stdout, stderr are the parent's to give
        }
        let info = fs::read_to_string(&path).unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 8).ok())
            .unwrap_or(0);
        if flags & 0o2000000 == 0 {
            let target = fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
            inherited.push(format!("{fd} -> {}", target.display()));
        }
    }
    ensure(inherited.is_empty(), || {
        format!("descriptors a child would inherit (no O_CLOEXEC): {inherited:?}")
    })?;
    let maps = procfs::smaps(pid).ctx("reading smaps")?;
    let ram = procfs::find_guest_ram(&maps, memory_bytes).ok_or("no guest RAM mapping")?;
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).ctx("reading smaps")?;
    let start = format!("{:x}-", ram.start);
    let flags = smaps
        .lines()
        .skip_while(|l| !l.starts_with(&start))
        .find_map(|l| l.strip_prefix("VmFlags:"))
        .unwrap_or("")
        .to_string();
    ensure(flags.split_whitespace().any(|f| f == "dd"), || {
        format!("guest RAM is not marked MADV_DONTDUMP: VmFlags {flags}")
    })?;
    Ok(json!({ "threads": threads, "guest_ram_vmflags": flags.trim() }))
}

fn hostile_flood(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&[
        "secs",
        "modes",
        "memory_mib",
        "max_p99_ms",
        "max_growth_mib",
    ])?;
    let secs: u64 = args.get("secs", 20)?;
    let modes: String = args.get("modes", "inflate,report,stats,malformed".to_string())?;
    let memory_mib: u64 = args.get("memory_mib", 1024)?;
    let max_p99_ms: f64 = args.get("max_p99_ms", 250.0)?;
    let max_growth_mib: u64 = args.get("max_growth_mib", 64)?;
    let dir = super::support::scratch_dir("hostile")?;
    let socket = dir.join("api.sock");
    let mut c = config(
        memory_mib,
        2,
        Some(BalloonConfig {
            size_mib: 0,
            deflate_on_oom: false,
            free_page_reporting: true,
            stats_interval: 1,
            free_page_hinting: false,
            deflate_prefault: true,
        }),
    );
    // A disk too, so its I/O threads are among the threads checked (the default guest
    // has no virtio-blk driver: the device just sits there).
    let image = dir.join("scratch.img");
    fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .ctx("creating the scratch disk image")?;
    c.extra_args = vec![
        "--api-socket".into(),
        socket.to_string_lossy().into_owned(),
        "--disk".into(),
        format!("path={},id=scratch", image.display()),
    ];
    let (mut vm, _ready) = boot(&ebb()?, &c)?;
    let pid = vm.pid();
    let memory_bytes = vm.memory_bytes();
    let hardening = hardening(pid, memory_bytes)?;
    progress("hardening checked: every thread filtered, descriptors close-on-exec");

    let mut floods = Vec::new();
    for mode in modes.split(',') {
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (socket, stop) = (socket.clone(), stop.clone());
            thread::spawn(move || sample(&socket, pid, memory_bytes, stop))
        };
        let started = Instant::now();
        let result = cmd_within(
            &mut vm,
            &format!("hostile {mode} {secs}"),
            Duration::from_secs(secs + 120),
        );
        stop.store(true, Ordering::Relaxed);
        let samples = sampler.join().map_err(|_| "the sampler panicked")?;
        let result = result?;
        let mut lat = samples.latencies_ms.clone();
        lat.sort_by(f64::total_cmp);
        let p99 = percentile(&lat, 0.99);
        let first = samples.vmm_rss_kib.first().copied().unwrap_or(0);
        let peak = samples.vmm_rss_kib.iter().copied().max().unwrap_or(0);
        let growth_mib = peak.saturating_sub(first) as f64 / 1024.0;
        let flood = json!({
            "mode": mode,
            "guest": result,
            "wall_ms": ms(started.elapsed()),
            "api_requests": lat.len(),
            "api_failures": samples.failures,
            "api_p50_ms": median(&lat),
            "api_p99_ms": p99,
            "api_max_ms": lat.last(),
            "vmm_rss_start_mib": first as f64 / 1024.0,
            "vmm_rss_peak_mib": peak as f64 / 1024.0,
            "vmm_rss_growth_mib": growth_mib,
        });
        progress(&format!("{mode}: {flood}"));
        ensure(result["pages_moved"] == false, || {
            format!("{mode}: the guest kernel moved the pages it gave the device: {flood}")
        })?;
        ensure(result["bystander_intact"] == true, || {
            format!("{mode}: memory the guest never gave the device changed: {flood}")
        })?;
        ensure(
            mode == "malformed" || result["completed"].as_u64() > Some(0),
            || format!("{mode}: the device completed nothing: {flood}"),
        )?;
        ensure(samples.failures == 0 && !lat.is_empty(), || {
            format!("{mode}: API requests failed during the flood: {flood}")
        })?;
        ensure(p99 <= max_p99_ms, || {
            format!("{mode}: API p99 {p99:.1} ms above {max_p99_ms} ms: {flood}")
        })?;
        ensure(growth_mib <= max_growth_mib as f64, || {
            format!("{mode}: the VMM's RSS grew {growth_mib:.1} MiB: {flood}")
        })?;
        floods.push(flood);
    }
    let metrics = Client::new(&socket, Duration::from_secs(30))
        .get("/metrics")
        .ctx("GET /metrics")?
        .text();
    let faults: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("ebb_guest_faults_total{"))
        .collect();
    let sigterm = Instant::now();
    vm.signal(libc::SIGTERM).ctx("sending SIGTERM")?;
    let exit = vm.wait_exit(EXIT_TIMEOUT).s()?;
    let exit_ms = ms(sigterm.elapsed());
    let status = crate::util::status_code(exit.status);
    ensure(status == 143, || {
        format!("after SIGTERM: status {status}, stderr {}", exit.stderr)
    })?;
    ensure(exit_ms <= 5000, || format!("SIGTERM took {exit_ms} ms"))?;
    let _ = fs::remove_dir_all(&dir);
    Ok(json!({
        "hardening": hardening,
        "floods": floods,
        "guest_faults": faults,
        "sigterm_to_exit_ms": exit_ms,
    }))
}
