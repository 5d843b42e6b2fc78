//! Balloon pages under guest compaction: Linux makes ballooned pages movable, and when
//! compaction moves one it inflates a new page and deflates the old one. Ebb must follow:
//! `balloon-compaction` fills a 1 GiB guest with 128 KiB tmpfs files whose pages
//! interleave, removes every other one, inflates the balloon into those holes and removes
//! the rest, so balloon pages sit in nearly every 2 MiB block of free memory. It then compacts and asks for more huge pages
//! than there are free 2 MiB blocks: `balloon_migrate` in the guest's /proc/vmstat must
//! grow, the balloon keep its size, host RSS grow only by the huge pages and the huge pages
//! be allocated.

use std::time::{Duration, Instant};

use ebb_ctl::client::Client;
use serde_json::{json, Value};

use super::support::{
    boot, cmd, cmd_within, config, ebb, ensure, guest_meminfo_kib, guest_vmstat, mib, ram_rss,
    scratch_dir, settled_rss, sh, wait_balloon,
};
use super::{progress, Args, Ctx, ScenarioDef};
use crate::guest::{BalloonConfig, GuestVm};

/// The scenarios of this family.
pub const SCENARIOS: &[ScenarioDef] = &[ScenarioDef {
    name: "balloon-compaction",
    help: "a 1 GiB guest's free memory interleaved with balloon pages (128 KiB tmpfs files, \
           every other one removed, the balloon inflated into the holes, the rest removed), \
           then compact_memory and more huge pages than free 2 MiB blocks: balloon_migrate \
           grows, the balloon keeps its size, guest RAM RSS grows by at most the huge pages \
           plus `slack_mib`, the huge pages are allocated \
           (args: memory_mib=1024 headroom_mib=160 frag_mib=256 extra_hugepages=32 \
           slack_mib=16)",
    run: balloon_compaction,
}];

/// Tmpfs file size used to fragment the guest's memory: smaller than a huge page, so
/// each 2 MiB block holds several files and, after the holes are ballooned, balloon pages.
const FILE_KIB: u64 = 128;

/// Free blocks of order 9 (2 MiB) or larger in the guest, counted in 2 MiB blocks.
fn free_huge_blocks(vm: &mut GuestVm) -> Result<u64, String> {
    let info = sh(vm, "cat /proc/buddyinfo")?;
    let mut blocks = 0;
    for line in info.lines() {
        // "Node 0, zone   DMA32  a0 a1 ... a10"
        let counts: Vec<u64> = line
            .split_whitespace()
            .skip(4)
            .map(|c| c.parse().map_err(|_| format!("/proc/buddyinfo: {line:?}")))
            .collect::<Result<_, _>>()?;
        for (order, count) in counts.iter().enumerate().skip(9) {
            blocks += count << (order - 9);
        }
    }
    Ok(blocks)
}

fn balloon_compaction(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&[
        "memory_mib",
        "headroom_mib",
        "frag_mib",
        "extra_hugepages",
        "slack_mib",
    ])?;
    let memory_mib: u64 = args.get("memory_mib", 1024)?;
    let headroom_mib: u64 = args.get("headroom_mib", 160)?;
    let frag_mib: u64 = args.get("frag_mib", 256)?;
    let extra_hugepages: u64 = args.get("extra_hugepages", 32)?;
    let slack_mib: u64 = args.get("slack_mib", 16)?;
    let dir = scratch_dir("compaction")?;
    let socket = dir.join("api.sock");
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
    c.extra_args = vec!["--api-socket".into(), socket.to_string_lossy().into_owned()];
    let (mut vm, _) = boot(&ebb()?, &c)?;
    let client = Client::new(&socket, Duration::from_secs(30));

    // Fill most of the guest's memory with small files, 256 written at once by one `tee`
    // so their pages interleave, and remove every other one: the free memory is then small
    // holes spread over all of it.
    let available_mib = guest_meminfo_kib(&mut vm, "MemAvailable")? / 1024;
    ensure(available_mib > headroom_mib + 64, || {
        format!("the guest has only {available_mib} MiB available")
    })?;
    // At most `frag_mib` of files: Linux moves a balloon page with an inflate and a deflate
    // round trip each, so compacting all of a 1 GiB guest's balloon pages takes minutes
    // under emulation (CI saw compact_memory run past 120 s with 348 MiB ballooned).
    let files = (available_mib - headroom_mib).min(frag_mib) * 1024 / FILE_KIB;
    sh(
        &mut vm,
        &format!(
            "mkdir -p /mnt/frag && mount -t tmpfs -o size=100% frag /mnt/frag && \
             cd /mnt/frag && seq 0 {last} | xargs -n 256 sh -c \
             'head -c {bytes} /dev/zero | tee \"$@\" >/dev/null' tee && \
             seq 0 2 {last} | xargs rm",
            last = files - 1,
            bytes = FILE_KIB * 1024
        ),
    )?;
    // The balloon takes the holes (the allocator splits the smallest free blocks first);
    // removing the remaining files leaves free memory interleaved with balloon pages.
    let balloon_mib = files / 2 * FILE_KIB / 1024;
    let r = client
        .request(
            "PATCH",
            "/balloon",
            Some(format!("{{\"amount_mib\": {balloon_mib}}}").as_bytes()),
        )
        .map_err(|e| format!("PATCH /balloon: {e}"))?;
    ensure(r.status == 204, || {
        format!("PATCH /balloon: {} {}", r.status, r.text())
    })?;
    let target = balloon_mib * 256;
    let (before, _) = wait_balloon(&mut vm, Duration::from_secs(240), |p| p >= target)?;
    sh(&mut vm, "umount /mnt/frag")?;

    let rss_before = settled_rss(&vm, Duration::from_secs(4), Duration::from_secs(40), 2048)?;
    let migrated_before = guest_vmstat(&mut vm, "balloon_migrate")?;
    // More huge pages than free 2 MiB blocks: compaction must empty blocks, and the only
    // movable pages left in the interleaved region are the balloon's.
    let free_blocks = free_huge_blocks(&mut vm)?;
    let hugepages = free_blocks + extra_hugepages;
    let compacted = Instant::now();
    let r = cmd_within(
        &mut vm,
        "sh echo 1 > /proc/sys/vm/compact_memory",
        Duration::from_secs(300),
    )?;
    ensure(r["status"] == 0, || format!("compact_memory: {r}"))?;
    let compact_s = compacted.elapsed().as_secs_f64();
    sh(
        &mut vm,
        &format!("echo {hugepages} > /proc/sys/vm/nr_hugepages"),
    )?;
    let got = sh(&mut vm, "cat /proc/sys/vm/nr_hugepages")?;
    let got: u64 = got
        .trim()
        .parse()
        .map_err(|_| format!("nr_hugepages: {got:?}"))?;
    let migrated = guest_vmstat(&mut vm, "balloon_migrate")? - migrated_before;
    let after = cmd(&mut vm, "balloon")?;
    let rss_after = settled_rss(&vm, Duration::from_secs(4), Duration::from_secs(40), 2048)?;
    let peak = ram_rss(&vm)?.max(rss_after);
    progress(&format!(
        "compaction: {files} files of {FILE_KIB} KiB, balloon {balloon_mib} MiB, \
         {free_blocks} free 2 MiB blocks; compact_memory {compact_s:.1} s, balloon_migrate \
         +{migrated}, {got}/{hugepages} huge pages, balloon {} -> {} pages, guest RAM RSS {} \
         -> {} MiB",
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
        "balloon_mib": balloon_mib,
        "free_huge_blocks_before": free_blocks,
        "balloon_migrate": migrated,
        "compact_memory_s": compact_s,
        "hugepages": got,
        "balloon_pages": after["inflated_pages"],
        "rss_before_mib": mib(rss_before),
        "rss_after_mib": mib(rss_after),
        "rss_peak_mib": mib(peak),
    }))
}
