//! `ebb-density`: how many guests fit on a host of H GiB without swap, for Ebb with free
//! page reporting on and off and for QEMU, each run on a fresh host of the same size.
//!
//! ```text
//! ebb-density [--scale full|small] [--host-gib H] [--guest-gib G] [--touch-gib T]
//!             [--max-guests N] [--runs ebb-on,ebb-off,ebb-auto,qemu-on]
//!             [--workload touch|cache] [--cache-mib N] [--out DIR]
//!             [--mode direct|nested] [--kvm-amd NAME=VALUE]...
//! ```
//! `ebb-auto` is Ebb with reporting and the automatic balloon policy. `--workload cache`
//! boots each guest from the Debian root file system and has it read `--cache-mib` of a
//! data disk (default: half the guest, at most 2 GiB) before it touches and frees memory
//! and again after the free, so the guests hold page cache that free page reporting
//! never sees.
//! `--scale full` is the published setup (15 GiB host, 5 GiB guests touching 4.5 GiB),
//! `--scale small` (the default) a quick one (3, 1, 0.8). Where the local KVM runs stock
//! guests, each run is bounded by a memory cgroup; elsewhere each run boots the nested
//! test host with H GiB of RAM. Prints a progress line per guest and a table; writes
//! `density.json`, `density.svg` and `density.txt` to `--out` (default
//! `target/density/<time>`). `--kvm-amd` loads the nested test host's kvm-amd with a
//! module parameter (`npt=0`: shadow paging); it has no meaning on a direct host.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ebb_tests::density::live::{enter_memory_cgroup, protect_self, HostLimit, LiveLauncher};
use ebb_tests::density::report::DensityReport;
use ebb_tests::density::{run_density, DensityConfig, GuestRecord, RunResult, RunSpec};
use ebb_tests::guest::{build_default_guest, build_ebb_binary};
use ebb_tests::paths;
use ebb_tests::results;
use ebb_tests::testhost::{self, HostMode, Job};

struct Options {
    cfg: DensityConfig,
    runs: Vec<RunSpec>,
    out: Option<PathBuf>,
    mode: Option<HostMode>,
    /// Module parameters for the nested test host's kvm-amd.
    kvm_amd_params: Vec<String>,
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("ebb-density: {msg}");
    eprintln!("{USAGE}");
    ExitCode::from(2)
}

const USAGE: &str =
    "usage: ebb-density [--scale full|small] [--host-gib H] [--guest-gib G] [--touch-gib T] \
         [--max-guests N] [--runs ebb-on,ebb-off,ebb-auto,qemu-on] [--workload touch|cache] \
         [--cache-mib N] [--out DIR] [--mode direct|nested] [--kvm-amd NAME=VALUE]...\n\
         (README \"The density benchmark\" says what each run does and what it prints)";

fn parse(args: &[String]) -> Result<Options, String> {
    let mut cfg = DensityConfig::small();
    let mut overrides: Vec<(String, String)> = Vec::new();
    let mut runs = vec![
        RunSpec::parse("ebb-on").expect("label"),
        RunSpec::parse("ebb-off").expect("label"),
        RunSpec::parse("qemu-on").expect("label"),
    ];
    let mut out = None;
    let mut mode = None;
    let mut workload_cache = false;
    let mut kvm_amd_params = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--scale" => {
                cfg = match value()?.as_str() {
                    "full" => DensityConfig::full(),
                    "small" => DensityConfig::small(),
                    other => return Err(format!("unknown scale {other:?}: full or small")),
                }
            }
            "--workload" => match value()?.as_str() {
                "touch" => workload_cache = false,
                "cache" => workload_cache = true,
                other => return Err(format!("unknown workload {other:?}: touch or cache")),
            },
            "--host-gib" | "--guest-gib" | "--touch-gib" | "--max-guests" | "--cache-mib" => {
                overrides.push((a.clone(), value()?))
            }
            "--runs" => {
                runs = value()?
                    .split(',')
                    .map(|l| RunSpec::parse(l.trim()).ok_or(format!("unknown run {l:?}")))
                    .collect::<Result<_, _>>()?
            }
            "--out" => out = Some(PathBuf::from(value()?)),
            "--mode" => mode = Some(value()?.parse().map_err(|e| format!("{e}"))?),
            "--kvm-amd" => kvm_amd_params.push(value()?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    // Explicit sizes apply on top of the chosen scale, whatever the order.
    for (k, v) in overrides {
        let num = |v: &str| {
            v.parse::<f64>()
                .map_err(|_| format!("{k}: not a number: {v:?}"))
        };
        match k.as_str() {
            "--host-gib" => cfg.host_gib = num(&v)?,
            "--guest-gib" => cfg.guest_gib = num(&v)?,
            "--touch-gib" => cfg.touch_gib = num(&v)?,
            "--cache-mib" => {
                cfg.cache_mib = v.parse().map_err(|_| format!("{k}: not MiB: {v:?}"))?
            }
            _ => cfg.max_guests = v.parse().map_err(|_| format!("{k}: not a count: {v:?}"))?,
        }
    }
    if workload_cache && cfg.cache_mib == 0 {
        // A few GiB at full scale; half the guest at small scale.
        cfg.cache_mib = (cfg.guest_mib() / 2).min(2048);
    }
    if workload_cache {
        // A policy guest settles in steps: inflating, a cooldown of quiet, a trim.
        cfg.settle_timeout_s = cfg.settle_timeout_s.max(180);
    }
    if !workload_cache {
        cfg.cache_mib = 0;
    }
    if cfg.touch_gib >= cfg.guest_gib || cfg.touch_gib <= 0.0 {
        return Err("--touch-gib must be positive and smaller than --guest-gib".into());
    }
    if cfg.host_gib <= cfg.guest_gib * 0.5 || cfg.max_guests == 0 || runs.is_empty() {
        return Err(
            "the host must be larger than half a guest, with at least one guest and one run".into(),
        );
    }
    Ok(Options {
        cfg,
        runs,
        out,
        mode,
        kvm_amd_params,
    })
}

fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let uname = std::process::Command::new("uname")
        .arg("-srm")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = ebb_tests::procfs::meminfo_kib("MemTotal").unwrap_or(0) / (1 << 20);
    format!("{uname}; {cpu}; {cores} cores; {mem} GiB")
}

/// The inside of one run: launch guests on this host and print the result line.
fn inner(label: &str, cfg_json: &str, where_: &str) -> ExitCode {
    let (Some(spec), Ok(cfg)) = (
        RunSpec::parse(label),
        serde_json::from_str::<DensityConfig>(cfg_json),
    ) else {
        eprintln!("ebb-density: bad inner arguments");
        return ExitCode::from(2);
    };
    if let Err(e) = protect_self() {
        eprintln!("ebb-density: cannot protect the benchmark from the OOM killer: {e}");
        return ExitCode::FAILURE;
    }
    let limit = if where_ == "direct" {
        match enter_memory_cgroup(cfg.host_gib, label) {
            Ok(dir) => HostLimit::Cgroup(dir),
            Err(e) => {
                eprintln!("ebb-density: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        HostLimit::WholeHost
    };
    let mut launcher = match LiveLauncher::new(spec, &cfg, limit, where_) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ebb-density: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = run_density(
        spec,
        &cfg,
        &mut launcher,
        Duration::from_secs(1),
        &mut |line| {
            println!("{line}");
            let _ = std::io::stdout().flush();
        },
        &mut |rec| {
            if let Ok(data) = serde_json::to_value(rec) {
                results::emit(GUEST_JOB, label, true, serde_json::json!({ "data": data }));
            }
        },
    );
    match serde_json::to_value(&result) {
        Ok(data) => {
            results::emit("density", label, true, serde_json::json!({ "data": data }));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ebb-density: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The result line each guest's record travels in, as soon as its bring-up ended.
const GUEST_JOB: &str = "density-guest";

/// The guest records of the current run, as they arrived (a run stopped from outside is
/// rebuilt from them).
static GUEST_RECORDS: Mutex<Vec<GuestRecord>> = Mutex::new(Vec::new());

fn guest_records() -> std::sync::MutexGuard<'static, Vec<GuestRecord>> {
    GUEST_RECORDS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shows a run's progress lines as they arrive, and keeps its guests' records.
fn show_progress(line: &str) {
    if !results::is_result(line) {
        println!("  {line}");
        let _ = std::io::stdout().flush();
        return;
    }
    for r in results::parse(line) {
        if r["job"] == GUEST_JOB {
            if let Ok(rec) = serde_json::from_value::<GuestRecord>(r["data"].clone()) {
                guest_records().push(rec);
            }
        }
    }
}

fn run_one(spec: RunSpec, opts: &Options, mode: HostMode, me: &Path) -> Result<RunResult, String> {
    let cfg_json = serde_json::to_string(&opts.cfg).map_err(|e| e.to_string())?;
    let where_ = mode.as_str();
    let per_guest =
        opts.cfg.boot_timeout_s + opts.cfg.touch_timeout_s * 2 + opts.cfg.settle_timeout_s;
    let mut scenario = Job::new([
        me.to_string_lossy().into_owned(),
        "--inner".into(),
        spec.label(),
        cfg_json,
        where_.to_string(),
    ]);
    scenario.mode = Some(mode);
    scenario.kvm_amd_params = opts.kvm_amd_params.clone();
    scenario.l1_memory_mib = (opts.cfg.host_gib * 1024.0).round() as u32;
    scenario.timeout = Duration::from_secs(600 + per_guest * u64::from(opts.cfg.max_guests + 1));
    // The longest a run stays silent: one guest's boot, touch, free and settling.
    scenario.quiet_timeout = Some(Duration::from_secs(per_guest + 120));
    scenario.on_stdout_line = Some(show_progress);
    guest_records().clear();
    let started = Instant::now();
    let out = match testhost::run(&scenario) {
        Ok(out) => out,
        Err(e @ testhost::Error::Timeout(_)) => {
            // A host that stopped making progress (it thrashes without swap, or its
            // kernel hangs) still says how many guests fitted before it.
            let records = std::mem::take(&mut *guest_records());
            if records.is_empty() {
                return Err(e.to_string());
            }
            let why = e.to_string().lines().next().unwrap_or_default().to_string();
            eprintln!("ebb-density: run {} stopped: {why}", spec.label());
            return Ok(RunResult::stalled(
                spec,
                records,
                format!("the host stopped making progress: {why}"),
                started.elapsed().as_secs_f64(),
            ));
        }
        Err(e) => return Err(e.to_string()),
    };
    let result = out
        .results
        .iter()
        .find(|r| r["job"] == "density" && r["ok"] == true)
        .ok_or_else(|| {
            format!(
                "run {} produced no result (status {}):\n{}",
                spec.label(),
                out.status,
                out.report()
            )
        })?;
    eprintln!(
        "ebb-density: run {} done (run dir {})",
        spec.label(),
        result["run_dir"].as_str().unwrap_or("?")
    );
    serde_json::from_value(result["data"].clone())
        .map_err(|e| format!("run {}: bad result: {e}", spec.label()))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if args.first().map(String::as_str) == Some("--inner") {
        if args.len() != 4 {
            return usage("--inner LABEL CONFIG_JSON WHERE");
        }
        return inner(&args[1], &args[2], &args[3]);
    }
    let opts = match parse(&args) {
        Ok(o) => o,
        Err(e) => return usage(&e),
    };
    let mode = match opts.mode.map(Ok).unwrap_or_else(HostMode::detect) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("ebb-density: {e}");
            return ExitCode::FAILURE;
        }
    };
    if mode == HostMode::Direct && !opts.kvm_amd_params.is_empty() {
        return usage("--kvm-amd applies to the nested test host; this host runs guests directly");
    }
    // Everything the runs need is built first: inside the test host the tree is read-only.
    if let Err(e) = build_default_guest().and_then(|_| build_ebb_binary()) {
        eprintln!("ebb-density: {e}");
        return ExitCode::FAILURE;
    }
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ebb-density: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = now_utc();
    let t0 = Instant::now();
    let cfg = &opts.cfg;
    println!(
        "ebb-density: {:.1} GiB host, {:.1} GiB guests touching {:.1} GiB, up to {} guests, runs {}; host: {}",
        cfg.host_gib,
        cfg.guest_gib,
        cfg.touch_gib,
        cfg.max_guests,
        opts.runs.iter().map(RunSpec::label).collect::<Vec<_>>().join(", "),
        match mode {
            HostMode::Direct => "this KVM host, a memory cgroup per run",
            HostMode::Nested => "the nested test host, booted fresh for each run",
        }
    );
    let mut results = Vec::new();
    let mut failed = false;
    for spec in &opts.runs {
        println!("\n== run {}", spec.label());
        match run_one(*spec, &opts, mode, &me) {
            Ok(r) => {
                println!(
                    "   {} guests fit; stopped by: {}",
                    r.guests_fit,
                    r.failure
                        .as_ref()
                        .map(|f| format!("guest {} {:?}", f.guest, f.kind))
                        .unwrap_or_else(|| "max guests".into())
                );
                results.push(r);
            }
            Err(e) => {
                eprintln!("ebb-density: run {} failed: {e}", spec.label());
                failed = true;
            }
        }
    }
    let report = DensityReport {
        host_gib: cfg.host_gib,
        guest_gib: cfg.guest_gib,
        touch_gib: cfg.touch_gib,
        runs: results,
        config: cfg.clone(),
        started_utc: started.clone(),
        machine: format!(
            "{}; guests: {}{}",
            machine(),
            mode.as_str(),
            if opts.kvm_amd_params.is_empty() {
                String::new()
            } else {
                format!(" (kvm-amd {})", opts.kvm_amd_params.join(","))
            }
        ),
        wall_s: t0.elapsed().as_secs_f64(),
    };
    let out = opts.out.clone().unwrap_or_else(|| {
        paths::target_dir()
            .join("density")
            .join(started.replace(':', ""))
    });
    println!("\n{}", report.table());
    match report.write(&out) {
        Ok(()) => println!("wrote {}/density.{{json,svg,txt}}", out.display()),
        Err(e) => {
            eprintln!("ebb-density: writing results to {}: {e}", out.display());
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
