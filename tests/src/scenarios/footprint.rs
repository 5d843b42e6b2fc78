//! What an idle guest costs the host, and where it goes: Ebb and QEMU microvm side by
//! side on the same kernel and command line, for several guest sizes (`bench-footprint`).
//!
//! For each size and VMM: the host RSS of guest RAM and of the VMM itself once the guest
//! has been idle for `idle_s`; the guest's own accounting of its boot-time memory (the
//! kernel's `Memory:` line: code, data, reserved; the swiotlb it mapped; MemTotal and
//! MemFree); then after touching and freeing `touch_mib` and waiting for free page
//! reporting to settle, the RSS left and the free memory in blocks below 2 MiB (which
//! reporting never sees). QEMU runs twice: with the guest's default swiotlb, and with
//! `swiotlb=noforce` as Ebb gives it, so the saving is attributed fairly.

use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use super::support::{boot, cmd, config, ebb, ensure, poweroff_any, qemu, ram_rss, sh, OrStr};
use super::{progress, Args, Ctx, ScenarioDef};
use crate::guest::{BalloonConfig, KernelImage, VmmRef};
use crate::util::mib;

/// The scenarios of this family.
pub const SCENARIOS: &[ScenarioDef] = &[ScenarioDef {
    name: "bench-footprint",
    help: "idle host RSS per guest size, Ebb vs QEMU microvm (also QEMU with \
           swiotlb=noforce), and where it goes by the guest's own accounting; then the RSS \
           left after touching and freeing memory, and the free memory below 2 MiB blocks \
           (args: sizes_mib=1024,5120,15360 idle_s=12 touch_mib=512 settle_s=20 \
           report_orders=ORDER,... adds Ebb rows whose guest reports free blocks from that \
           buddy order up instead of 9)",
    run: bench_footprint,
}];

/// The guest's view of its boot-time memory.
fn guest_accounting(vm: &mut crate::guest::GuestVm) -> Result<Value, String> {
    let dmesg = sh(
        vm,
        "dmesg | grep -E 'Memory: |software IO TLB|Freeing initrd|Freeing unused kernel' || true",
    )?;
    let meminfo = cmd(vm, "meminfo")?;
    let swiotlb_mib = dmesg
        .lines()
        .find(|l| l.contains("software IO TLB: mapped"))
        .and_then(|l| l.rsplit_once('(').map(|(_, r)| r))
        .and_then(|r| r.strip_suffix("MB)"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Ok(json!({
        "dmesg": dmesg.lines().map(str::trim).collect::<Vec<_>>(),
        "swiotlb_mib": swiotlb_mib,
        "mem_total_kib": meminfo["mem_total_kib"],
        "mem_free_kib": meminfo["mem_free_kib"],
    }))
}

/// Free memory in buddy blocks smaller than 2 MiB (orders 0-8), which free page
/// reporting (order 9 and up) never hands back.
fn free_below_2m_kib(vm: &mut crate::guest::GuestVm) -> Result<u64, String> {
    let text = sh(vm, "cat /proc/buddyinfo")?;
    let mut kib = 0;
    for line in text.lines() {
        // "Node 0, zone   Normal   12 5 3 ..." : counts per order from 0.
        let counts: Vec<u64> = line
            .split_whitespace()
            .skip(4)
            .filter_map(|n| n.parse().ok())
            .collect();
        for (order, count) in counts.iter().enumerate().take(9) {
            kib += count * (4 << order);
        }
    }
    Ok(kib)
}

fn one(
    vmm: &VmmRef,
    label: &str,
    memory_mib: u64,
    cmdline_extra: &str,
    params: (Duration, u64, Duration),
) -> Result<Value, String> {
    let (idle, touch_mib, settle) = params;
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
    c.kernel = Some(KernelImage::Elf);
    c.cmdline_extra = cmdline_extra.to_string();
    let (mut vm, _ready) = boot(vmm, &c)?;
    thread::sleep(idle);
    let idle_ram = ram_rss(&vm)?;
    let idle_process = vm.process_rss_kib().ctx("VmRSS")?;
    let accounting = guest_accounting(&mut vm)?;
    cmd(&mut vm, &format!("touch {touch_mib}"))?;
    cmd(&mut vm, "free")?;
    thread::sleep(settle);
    let settled_ram = ram_rss(&vm)?;
    let below_2m = free_below_2m_kib(&mut vm)?;
    let argv = vm.argv().to_vec();
    poweroff_any(&mut vm)?;
    let out = json!({
        "vmm": label,
        "memory_mib": memory_mib,
        "argv": argv,
        "idle_guest_ram_mib": mib(idle_ram),
        "idle_vmm_mib": mib(idle_process.saturating_sub(idle_ram)),
        "idle_total_mib": mib(idle_process),
        "guest": accounting,
        "after_touch_free": {
            "touch_mib": touch_mib,
            "settled_guest_ram_mib": mib(settled_ram),
            "free_below_2m_mib": mib(below_2m),
        },
    });
    progress(&format!(
        "footprint {label} {memory_mib} MiB: idle {:.0} MiB guest RAM + {:.1} MiB VMM, swiotlb {} MiB",
        mib(idle_ram),
        mib(idle_process.saturating_sub(idle_ram)),
        out["guest"]["swiotlb_mib"]
    ));
    Ok(out)
}

fn bench_footprint(ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&[
        "sizes_mib",
        "idle_s",
        "touch_mib",
        "settle_s",
        "report_orders",
    ])?;
    let sizes: String = args.get("sizes_mib", "1024,5120,15360".to_string())?;
    let idle = Duration::from_secs(args.get("idle_s", 12)?);
    let touch_mib: u64 = args.get("touch_mib", 512)?;
    let settle = Duration::from_secs(args.get("settle_s", 20)?);
    // Extra Ebb rows with the guest reporting free blocks from a smaller order than its
    // default (pageblock order, 2 MiB): what the free memory below 2 MiB would give back.
    let report_orders: String = args.get("report_orders", String::new())?;
    let report_orders: Vec<u32> = report_orders
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().map_err(|_| format!("bad order {s:?}")))
        .collect::<Result<_, _>>()?;
    let sizes: Vec<u64> = sizes
        .split(',')
        .map(|s| s.trim().parse().map_err(|_| format!("bad size {s:?}")))
        .collect::<Result<_, _>>()?;
    if ctx.host == "nested" {
        // QEMU maps all of guest RAM up front; in a test host smaller than the guest the
        // kernel's overcommit heuristic would refuse it (Ebb maps with MAP_NORESERVE).
        std::fs::write("/proc/sys/vm/overcommit_memory", "1").ctx("overcommit_memory")?;
    }
    let (ebb, qemu) = (ebb()?, qemu()?);
    let params = (idle, touch_mib, settle);
    let mut rows = Vec::new();
    for &size in &sizes {
        rows.push(one(&ebb, "ebb", size, "", params)?);
        rows.push(one(&qemu, "qemu", size, "", params)?);
        rows.push(one(&qemu, "qemu+noforce", size, "swiotlb=noforce", params)?);
        for order in &report_orders {
            let extra = format!("page_reporting.page_reporting_order={order}");
            rows.push(one(
                &ebb,
                &format!("ebb+order{order}"),
                size,
                &extra,
                params,
            )?);
        }
    }
    ensure(!rows.is_empty(), || "no sizes given".into())?;
    Ok(json!({
        "rows": rows,
        "params": { "sizes_mib": sizes, "idle_s": idle.as_secs(), "touch_mib": touch_mib,
                    "settle_s": settle.as_secs() },
    }))
}

/// The table `ebb-bench footprint` prints.
pub fn table(d: &Value) -> String {
    let mut s = String::from(
        "footprint: host RSS of an idle guest (guest RAM + VMM), where the guest says it goes, \
         and what touching and freeing leaves behind\n",
    );
    s.push_str(&format!(
        "{:<8} {:<13} {:>10} {:>8} {:>9} {:>8} {:>11} {:>12} {:>11}\n",
        "guest",
        "vmm",
        "idle RSS",
        "VMM",
        "swiotlb",
        "MemFree",
        "reserved",
        "after free",
        "free <2M"
    ));
    for r in d["rows"].as_array().into_iter().flatten() {
        let reserved = r["guest"]["dmesg"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find(|l| l.contains("Memory: "))
            .and_then(|l| l.split(", ").find(|p| p.contains("reserved")))
            .and_then(|p| p.trim().split('K').next().map(str::to_string))
            .and_then(|k| k.parse::<f64>().ok())
            .map(|k| format!("{:.0} MiB", k / 1024.0))
            .unwrap_or_else(|| "?".into());
        s.push_str(&format!(
            "{:<8} {:<13} {:>6.0} MiB {:>4.1} MiB {:>5} MiB {:>4.0} MiB {:>11} {:>8.0} MiB {:>7.1} MiB\n",
            format!("{} GiB", r["memory_mib"].as_u64().unwrap_or(0) as f64 / 1024.0),
            r["vmm"].as_str().unwrap_or("?"),
            r["idle_total_mib"].as_f64().unwrap_or(f64::NAN),
            r["idle_vmm_mib"].as_f64().unwrap_or(f64::NAN),
            r["guest"]["swiotlb_mib"],
            r["guest"]["mem_free_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
            reserved,
            r["after_touch_free"]["settled_guest_ram_mib"].as_f64().unwrap_or(f64::NAN),
            r["after_touch_free"]["free_below_2m_mib"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    s
}
