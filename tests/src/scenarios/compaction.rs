//! Balloon pages under guest compaction: Linux makes ballooned pages movable, and when
//! compaction moves one it inflates a new page and deflates the old one. Ebb must follow:
//! `balloon-compaction` holds a 512 MiB balloon in a 1 GiB guest, fragments the guest's
//! memory, compacts it and asks for huge pages; `balloon_migrate` in the guest's
//! /proc/vmstat must grow, the balloon keep its size, host RSS stay within a few MiB and
//! the huge pages be allocated.

use std::time::Duration;

use serde_json::{json, Value};

use super::support::{boot, cmd, config, ebb, ensure, mib, ram_rss, settled_rss, sh, wait_balloon};
use super::{progress, Args, Ctx, ScenarioDef};
use crate::guest::{BalloonConfig, GuestVm};

/// The scenarios of this family.
pub const SCENARIOS: &[ScenarioDef] = &[ScenarioDef {
    name: "balloon-compaction",
    help: "a 512 MiB balloon in a 1 GiB guest, memory fragmented, then compact_memory and \
           nr_hugepages: balloon_migrate grows, the balloon keeps its size, guest RAM RSS \
           grows by at most the huge pages plus `slack_mib`, the huge pages are allocated \
           (args: memory_mib=1024 balloon_mib=512 hugepages=64 slack_mib=16)",
    run: balloon_compaction,
}];

fn vmstat(vm: &mut GuestVm, key: &str) -> Result<u64, String> {
    let out = sh(
        vm,
        &format!("grep '^{key} ' /proc/vmstat || echo '{key} 0'"),
    )?;
    out.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("/proc/vmstat {key}: {out:?}"))
}

fn balloon_compaction(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["memory_mib", "balloon_mib", "hugepages", "slack_mib"])?;
    let memory_mib: u64 = args.get("memory_mib", 1024)?;
    let balloon_mib: u64 = args.get("balloon_mib", 512)?;
    let hugepages: u64 = args.get("hugepages", 64)?;
    let slack_mib: u64 = args.get("slack_mib", 16)?;
    let c = config(
        memory_mib,
        1,
        Some(BalloonConfig {
            size_mib: balloon_mib,
            deflate_on_oom: false,
            free_page_reporting: true,
            stats_interval: 0,
            free_page_hinting: false,
        }),
    );
    let (mut vm, _) = boot(&ebb()?, &c)?;
    let target = balloon_mib * 256;
    let (before, _) = wait_balloon(&mut vm, Duration::from_secs(240), |p| p >= target)?;
    // Fragment: many small files in tmpfs, every other one removed, so free memory is
    // scattered between used pages and the balloon's pages.
    sh(
        &mut vm,
        "mkdir -p /dev/shm/frag && i=0; while [ $i -lt 3000 ]; do \
         dd if=/dev/zero of=/dev/shm/frag/$i bs=32k count=1 2>/dev/null; i=$((i+1)); done; \
         i=0; while [ $i -lt 3000 ]; do rm -f /dev/shm/frag/$i; i=$((i+2)); done",
    )?;
    let rss_before = settled_rss(&vm, Duration::from_secs(4), Duration::from_secs(40), 2048)?;
    let migrated_before = vmstat(&mut vm, "balloon_migrate")?;
    sh(&mut vm, "echo 1 > /proc/sys/vm/compact_memory")?;
    sh(
        &mut vm,
        &format!("echo {hugepages} > /proc/sys/vm/nr_hugepages"),
    )?;
    let got = sh(&mut vm, "cat /proc/sys/vm/nr_hugepages")?;
    let got: u64 = got
        .trim()
        .parse()
        .map_err(|_| format!("nr_hugepages: {got:?}"))?;
    let migrated = vmstat(&mut vm, "balloon_migrate")? - migrated_before;
    let after = cmd(&mut vm, "balloon")?;
    let rss_after = settled_rss(&vm, Duration::from_secs(4), Duration::from_secs(40), 2048)?;
    let peak = ram_rss(&vm)?.max(rss_after);
    progress(&format!(
        "compaction: balloon_migrate +{migrated}, {got}/{hugepages} huge pages, balloon {} -> {} \
         pages, guest RAM RSS {} -> {} MiB",
        before["inflated_pages"],
        after["inflated_pages"],
        mib(rss_before),
        mib(rss_after)
    ));
    ensure(migrated > 0, || {
        "compaction migrated no balloon page (balloon_migrate did not grow)".into()
    })?;
    ensure(after["inflated_pages"] == before["inflated_pages"], || {
        format!("the balloon changed size: {before} -> {after}")
    })?;
    ensure(got == hugepages, || {
        format!("only {got} of {hugepages} huge pages were allocated")
    })?;
    // The huge pages are zeroed by the guest (they reach the host); beyond that, moving
    // balloon pages must not cost the host memory: each new balloon page is discarded.
    let allowed = rss_before + (hugepages * 2 + slack_mib) * 1024;
    ensure(rss_after <= allowed, || {
        format!(
            "guest RAM RSS grew from {} to {} MiB (allowed {} MiB: huge pages + slack)",
            mib(rss_before),
            mib(rss_after),
            mib(allowed)
        )
    })?;
    super::support::poweroff_ebb(&mut vm)?;
    Ok(json!({
        "balloon_migrate": migrated,
        "hugepages": got,
        "balloon_pages": after["inflated_pages"],
        "rss_before_mib": mib(rss_before),
        "rss_after_mib": mib(rss_after),
        "rss_peak_mib": mib(peak),
    }))
}
