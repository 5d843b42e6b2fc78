//! Same-page merging across identical guests (`bench-ksm`, a benchmark): with the host's
//! KSM running, `guests` identical idle guests with merging on (Ebb's `--memory
//! ...,merge=on`, QEMU's `mem-merge=on`), then the same with it off; the host memory in
//! use before and after ksmd has scanned, what KSM says it saved (`pages_sharing`), and
//! the CPU time ksmd spent. Guest RAM RSS is shown too but does not fall: a merged page
//! still counts in the RSS of every process that maps it.

use std::fs;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::support::{boot, config, ebb, ensure, poweroff_any, qemu};
use super::{progress, Args, Ctx, ScenarioDef};
use crate::guest::{GuestVm, VmmRef};
use crate::util::mib;

/// The scenarios of this family.
pub const SCENARIOS: &[ScenarioDef] = &[ScenarioDef {
    name: "bench-ksm",
    help: "KSM across identical idle guests: `guests` guests of `memory_mib` per VMM, merging \
           on and off, ksmd scanning `pages_to_scan` pages every 20 ms for `settle_s`: guest \
           RAM RSS before and after, KSM pages_sharing, ksmd CPU seconds (args: guests=3 \
           memory_mib=512 settle_s=60 pages_to_scan=1000)",
    run: bench_ksm,
}];

const KSM: &str = "/sys/kernel/mm/ksm";

fn ksm_read(name: &str) -> Result<u64, String> {
    let path = format!("{KSM}/{name}");
    fs::read_to_string(&path)
        .map_err(|e| format!("{path}: {e} (the host kernel needs CONFIG_KSM)"))?
        .trim()
        .parse()
        .map_err(|e| format!("{path}: {e}"))
}

fn ksm_write(name: &str, value: &str) -> Result<(), String> {
    let path = format!("{KSM}/{name}");
    fs::write(&path, value).map_err(|e| format!("writing {value} to {path}: {e}"))
}

/// CPU seconds ksmd has used, from /proc/PID/stat of the kernel thread named `ksmd`.
fn ksmd_cpu_s() -> Result<f64, String> {
    let ticks = 100.0; // USER_HZ on Linux
    for entry in fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))? {
        let Ok(entry) = entry else { continue };
        let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() != "ksmd" {
            continue;
        }
        let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // Fields after the `(comm)`: state is the 3rd field overall, utime the 14th.
        let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let get = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        if let (Some(utime), Some(stime)) = (get(11), get(12)) {
            return Ok((utime + stime) / ticks);
        }
    }
    Err("no ksmd thread in /proc".into())
}

/// Host memory in use: `MemTotal - MemAvailable`.
fn host_used_kib() -> Result<u64, String> {
    let total = crate::procfs::meminfo_kib("MemTotal").map_err(|e| e.to_string())?;
    let available = crate::procfs::meminfo_kib("MemAvailable").map_err(|e| e.to_string())?;
    Ok(total.saturating_sub(available))
}

fn total_rss_kib(vms: &[GuestVm]) -> Result<u64, String> {
    let mut sum = 0;
    for vm in vms {
        sum += vm
            .guest_ram_rss_kib()
            .map_err(|e| format!("guest RAM RSS: {e}"))?;
    }
    Ok(sum)
}

fn one_run(vmm: &VmmRef, merge: bool, args: &RunArgs) -> Result<Value, String> {
    ksm_write("run", "2")?; // unmerge whatever an earlier run left
    ksm_write("pages_to_scan", &args.pages_to_scan.to_string())?;
    ksm_write("sleep_millisecs", "20")?;
    let mut c = config(args.memory_mib, 1, None);
    c.merge = merge;
    let mut vms = Vec::new();
    for _ in 0..args.guests {
        let (vm, _) = boot(vmm, &c)?;
        vms.push(vm);
    }
    // Let the guests finish booting work before the first figure.
    std::thread::sleep(Duration::from_secs(5));
    let before = total_rss_kib(&vms)?;
    let host_before = host_used_kib()?;
    let cpu_before = ksmd_cpu_s()?;
    ksm_write("run", "1")?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(args.settle_s));
    let after = total_rss_kib(&vms)?;
    let host_after = host_used_kib()?;
    let cpu = ksmd_cpu_s()? - cpu_before;
    let sharing = ksm_read("pages_sharing")?;
    let shared = ksm_read("pages_shared")?;
    let full_scans = ksm_read("full_scans")?;
    ksm_write("run", "0")?;
    for vm in &mut vms {
        poweroff_any(vm)?;
    }
    let row = json!({
        "vmm": vmm.name(),
        "merge": merge,
        "guests": args.guests,
        "rss_before_mib": mib(before),
        "rss_after_mib": mib(after),
        "host_used_before_mib": mib(host_before),
        "host_used_after_mib": mib(host_after),
        "saved_mib": (sharing * 4) as f64 / 1024.0,
        "pages_sharing": sharing,
        "pages_shared": shared,
        "full_scans": full_scans,
        "ksmd_cpu_s": cpu,
        "settle_s": started.elapsed().as_secs_f64(),
    });
    progress(&format!("ksm: {row}"));
    Ok(row)
}

struct RunArgs {
    guests: u32,
    memory_mib: u64,
    settle_s: u64,
    pages_to_scan: u64,
}

fn bench_ksm(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["guests", "memory_mib", "settle_s", "pages_to_scan"])?;
    let run = RunArgs {
        guests: args.get("guests", 3)?,
        memory_mib: args.get("memory_mib", 512)?,
        settle_s: args.get("settle_s", 60)?,
        pages_to_scan: args.get("pages_to_scan", 1000)?,
    };
    ensure(run.guests >= 2, || {
        "bench-ksm needs at least 2 guests".into()
    })?;
    ksm_read("run")?;
    let mut rows = Vec::new();
    for vmm in [ebb()?, qemu()?] {
        for merge in [true, false] {
            rows.push(one_run(&vmm, merge, &run)?);
        }
    }
    let mut table = format!(
        "ksm: {} idle guests of {} MiB per VMM, ksmd {} pages / 20 ms for {} s\n\
         {:<6} {:<6} {:>16} {:>16} {:>14} {:>12} {:>10}\n",
        run.guests,
        run.memory_mib,
        run.pages_to_scan,
        run.settle_s,
        "vmm",
        "merge",
        "host used before",
        "host used after",
        "KSM saved",
        "guest RAM RSS",
        "ksmd CPU"
    );
    for r in &rows {
        table.push_str(&format!(
            "{:<6} {:<6} {:>12.0} MiB {:>12.0} MiB {:>10.0} MiB {:>8.0} MiB {:>8.1} s\n",
            r["vmm"].as_str().unwrap_or("?"),
            if r["merge"] == true { "on" } else { "off" },
            r["host_used_before_mib"].as_f64().unwrap_or(f64::NAN),
            r["host_used_after_mib"].as_f64().unwrap_or(f64::NAN),
            r["saved_mib"].as_f64().unwrap_or(f64::NAN),
            r["rss_after_mib"].as_f64().unwrap_or(f64::NAN),
            r["ksmd_cpu_s"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    Ok(json!({ "rows": rows, "table": table }))
}
