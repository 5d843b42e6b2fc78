//! Free page reporting seen from the host: a 1 GiB guest touches 768 MiB and frees it;
//! with reporting Ebb's guest-RAM RSS falls back near its value before the touch, without
//! reporting it stays high. Page poisoning: under `init_on_free=1` (poison value 0) the
//! pages still come back; under `page_poison=1` (0xaa) Ebb must keep them, and the guest
//! must find its free pages intact.
//!
//! Every scenario also checks that memory the guest still uses survives: a 32 MiB file of
//! random data in the guest's tmpfs keeps its checksum through the touch, free and
//! reclaim.
//!
//! Notes for later scenarios of the batch: `memtotal_kib:<MiB>:bzimage`,
//! `reporting_reclaim_ms` (how long reporting took to return the memory).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::support::{
    boot, cmd, cmd_within, config, ebb, ensure, feature, mib, poweroff_ebb, ram_rss, settled_rss,
    sh, u64_field, watch_rss, RssTrace,
};
use super::{ms, progress, Args, Ctx, ScenarioDef};
use crate::guest::{BalloonConfig, GuestVm};

/// The scenarios of this family.
pub const SCENARIOS: &[ScenarioDef] = &[
    ScenarioDef {
        name: "reporting-on",
        help: "reporting on: after touch 768 + free, guest-RAM RSS is back within 150 MiB of \
               its pre-touch value within 30 s (args: memory_mib=1024 touch_mib=768 \
               limit_s=30 margin_mib=150)",
        run: reporting_on,
    },
    ScenarioDef {
        name: "reporting-off",
        help: "reporting off: after touch 768 + free, guest-RAM RSS stays high for twice as \
               long as reporting-on needed (default 30 s) (args: memory_mib=1024 \
               touch_mib=768 window_s)",
        run: reporting_off,
    },
    ScenarioDef {
        name: "reporting-init-on-free",
        help: "init_on_free=1 guest: PAGE_POISON negotiated (poison 0), reporting still \
               returns the memory within 30 s (args as reporting-on)",
        run: reporting_init_on_free,
    },
    ScenarioDef {
        name: "reporting-page-poison",
        help: "page_poison=1 guest: PAGE_POISON negotiated with a non-zero poison; Ebb keeps \
               reported pages (RSS stays high), the guest keeps working and finds its free \
               pages intact (args: memory_mib=1024 touch_mib=768 window_s)",
        run: reporting_page_poison,
    },
];

const F_PAGE_POISON: usize = 4;
const F_REPORTING: usize = 5;
/// Size of the file whose checksum must survive.
const CANARY_MIB: u64 = 32;

fn reporting_config(
    memory_mib: u64,
    reporting: bool,
    cmdline_extra: &str,
) -> crate::guest::GuestConfig {
    let mut c = config(
        memory_mib,
        1,
        Some(BalloonConfig {
            size_mib: 0,
            deflate_on_oom: false,
            free_page_reporting: reporting,
            stats_interval: 0,
            free_page_hinting: false,
            deflate_prefault: true,
        }),
    );
    c.cmdline_extra = cmdline_extra.to_string();
    c
}

/// Writes the canary file and returns its checksum.
fn canary_write(vm: &mut GuestVm) -> Result<String, String> {
    let out = sh(
        vm,
        &format!(
            "dd if=/dev/urandom of=/dev/shm/canary bs=1M count={CANARY_MIB} 2>/dev/null && \
             md5sum /dev/shm/canary"
        ),
    )?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn canary_check(vm: &mut GuestVm, sum: &str) -> Result<(), String> {
    let out = sh(vm, "md5sum /dev/shm/canary")?;
    let now = out.split_whitespace().next().unwrap_or_default();
    ensure(now == sum, || {
        format!("the guest's in-use data changed: md5 {sum} before, {now} after")
    })
}

/// What a touch-and-free round measured.
struct Round {
    pre_kib: u64,
    peak_kib: u64,
    freed_at: Instant,
    touch: Value,
    balloon: Value,
}

impl Round {
    fn json(&self) -> Value {
        json!({
            "pre_touch_rss_mib": mib(self.pre_kib),
            "peak_rss_mib": mib(self.peak_kib),
            "touch": self.touch,
            "balloon": self.balloon,
        })
    }
}

/// Boots, checks the features, writes the canary, touches `touch_mib` and frees it.
fn touch_and_free(
    ctx: &Ctx,
    vm: &mut GuestVm,
    memory_mib: u64,
    touch_mib: u64,
    note_memtotal: bool,
    require_growth: bool,
) -> Result<(Round, String), String> {
    if note_memtotal {
        let m = cmd(vm, "meminfo")?;
        ctx.note(
            &format!("memtotal_kib:{memory_mib}:bzimage"),
            json!(u64_field(&m, "mem_total_kib")?),
        );
    }
    let balloon = cmd(vm, "balloon")?;
    let canary = canary_write(vm)?;
    let pre = settled_rss(vm, Duration::from_secs(4), Duration::from_secs(30), 2048)?;
    let touch = cmd_within(vm, &format!("touch {touch_mib}"), Duration::from_secs(300))?;
    let peak = ram_rss(vm)?;
    // The test is only meaningful if the touch really reached the host (a guest that
    // poisons free pages has written all of its RAM before the touch).
    ensure(
        !require_growth || peak >= pre + touch_mib * 1024 * 9 / 10,
        || format!("touching {touch_mib} MiB raised guest RAM RSS only from {pre} to {peak} KiB"),
    )?;
    cmd(vm, "free")?;
    let freed_at = Instant::now();
    progress(&format!(
        "touched {touch_mib} MiB (RSS {} -> {} MiB) and freed it",
        mib(pre),
        mib(peak)
    ));
    Ok((
        Round {
            pre_kib: pre,
            peak_kib: peak,
            freed_at,
            touch,
            balloon,
        },
        canary,
    ))
}

/// Reporting must bring RSS back within `margin` of `pre` within `limit`.
fn expect_reclaim(
    vm: &mut GuestVm,
    round: &Round,
    limit: Duration,
    margin_kib: u64,
) -> Result<(RssTrace, Duration), String> {
    let goal = round.pre_kib + margin_kib;
    let (trace, hit) = watch_rss(vm, limit, Duration::from_millis(500), |_, rss| rss <= goal)?;
    let since_free = round.freed_at.elapsed();
    match hit {
        Some(_) => Ok((trace, since_free)),
        None => Err(format!(
            "guest RAM RSS did not fall to {} MiB (pre-touch {} + {} MiB) within {limit:?} \
             of the free: it is {} MiB (peak {} MiB); samples [ms, MiB]: {}\n{}",
            mib(goal),
            mib(round.pre_kib),
            mib(margin_kib),
            mib(trace.last_kib()),
            mib(round.peak_kib),
            trace.to_json(),
            vm.diagnostics()
        )),
    }
}

/// RSS must stay within `slack` of the peak for `window`.
fn expect_kept(
    vm: &mut GuestVm,
    round: &Round,
    window: Duration,
    slack_kib: u64,
) -> Result<RssTrace, String> {
    let floor = round.peak_kib.saturating_sub(slack_kib);
    let (trace, fell) = watch_rss(vm, window, Duration::from_millis(500), |_, rss| rss < floor)?;
    match fell {
        None => Ok(trace),
        Some(at) => Err(format!(
            "guest RAM RSS fell to {} MiB (peak {} MiB) {at:?} into the window: memory was \
             given back although it should be kept; samples [ms, MiB]: {}",
            mib(trace.last_kib()),
            mib(round.peak_kib),
            trace.to_json()
        )),
    }
}

/// The window for "stays high": twice what reporting-on needed in this batch, at least
/// 10 s; 30 s (the reclaim limit) when there is nothing to go by.
fn keep_window(ctx: &Ctx, args: &Args) -> Result<Duration, String> {
    let default = ctx
        .recall("reporting_reclaim_ms")
        .and_then(|v| v.as_u64())
        .map(|t| Duration::from_millis(t * 2).max(Duration::from_secs(10)))
        .unwrap_or(Duration::from_secs(30));
    Ok(Duration::from_secs(
        args.get("window_s", default.as_secs())?,
    ))
}

fn reclaim_scenario(ctx: &Ctx, args: &Args, cmdline: &str) -> Result<Value, String> {
    args.check_known(&["memory_mib", "touch_mib", "limit_s", "margin_mib"])?;
    let memory_mib: u64 = args.get("memory_mib", 1024)?;
    let touch_mib: u64 = args.get("touch_mib", 768)?;
    let limit = Duration::from_secs(args.get("limit_s", 30)?);
    let margin_kib = args.get::<u64>("margin_mib", 150)? * 1024;
    let c = reporting_config(memory_mib, true, cmdline);
    let (mut vm, ready) = boot(&ebb()?, &c)?;
    let (round, canary) = touch_and_free(
        ctx,
        &mut vm,
        memory_mib,
        touch_mib,
        cmdline.is_empty(),
        true,
    )?;
    ensure(feature(&round.balloon, F_REPORTING) == Some(true), || {
        format!("free page reporting not negotiated: {}", round.balloon)
    })?;
    let poison = feature(&round.balloon, F_PAGE_POISON);
    if cmdline.contains("init_on_free=1") {
        ensure(poison == Some(true), || {
            format!(
                "PAGE_POISON not negotiated under init_on_free=1 (the driver would turn \
                 reporting off): {}",
                round.balloon
            )
        })?;
    }
    let (trace, took) = expect_reclaim(&mut vm, &round, limit, margin_kib)?;
    canary_check(&mut vm, &canary)?;
    let m = cmd(&mut vm, "meminfo")?;
    if cmdline.is_empty() {
        ctx.note("reporting_reclaim_ms", json!(ms(took)));
    }
    let stderr = vm.stderr_text();
    let exit = poweroff_ebb(&mut vm)?;
    Ok(json!({
        "ready_ms": ms(ready.elapsed),
        "cmdline": c.cmdline(),
        "round": round.json(),
        "page_poison_negotiated": poison,
        "reclaimed_within_ms": ms(took),
        "rss_after_mib": mib(trace.last_kib()),
        "rss_samples": trace.to_json(),
        "meminfo": m,
        "vmm_stderr": stderr,
        "exit_status": exit.status.code(),
    }))
}

fn reporting_on(ctx: &Ctx, args: &Args) -> Result<Value, String> {
    reclaim_scenario(ctx, args, "")
}

fn reporting_init_on_free(ctx: &Ctx, args: &Args) -> Result<Value, String> {
    reclaim_scenario(ctx, args, "init_on_free=1")
}

/// Arguments of the scenarios that expect freed memory to stay: guest size, how much it
/// touches, and how long the RSS is watched.
fn keep_args(ctx: &Ctx, args: &Args) -> Result<(u64, u64, Duration), String> {
    args.check_known(&["memory_mib", "touch_mib", "window_s"])?;
    Ok((
        args.get("memory_mib", 1024)?,
        args.get("touch_mib", 768)?,
        keep_window(ctx, args)?,
    ))
}

fn reporting_off(ctx: &Ctx, args: &Args) -> Result<Value, String> {
    let (memory_mib, touch_mib, window) = keep_args(ctx, args)?;
    let c = reporting_config(memory_mib, false, "");
    let (mut vm, ready) = boot(&ebb()?, &c)?;
    let (round, canary) = touch_and_free(ctx, &mut vm, memory_mib, touch_mib, true, true)?;
    ensure(feature(&round.balloon, F_REPORTING) == Some(false), || {
        format!("reporting negotiated although off: {}", round.balloon)
    })?;
    let trace = expect_kept(&mut vm, &round, window, 100 * 1024)?;
    canary_check(&mut vm, &canary)?;
    let exit = poweroff_ebb(&mut vm)?;
    Ok(json!({
        "ready_ms": ms(ready.elapsed),
        "round": round.json(),
        "window_ms": ms(window),
        "rss_min_in_window_mib": mib(trace.min_kib()),
        "rss_samples": trace.to_json(),
        "exit_status": exit.status.code(),
    }))
}

fn reporting_page_poison(ctx: &Ctx, args: &Args) -> Result<Value, String> {
    let (memory_mib, touch_mib, window) = keep_args(ctx, args)?;
    let c = reporting_config(memory_mib, true, "page_poison=1");
    let (mut vm, ready) = boot(&ebb()?, &c)?;
    let (round, canary) = touch_and_free(ctx, &mut vm, memory_mib, touch_mib, false, false)?;
    // page_poison=1 writes the poison to every page it frees, so the guest's whole RAM
    // is resident from boot on: if Ebb discarded reported pages it would fall.
    ensure(round.pre_kib >= memory_mib * 1024 * 3 / 4, || {
        format!(
            "guest RAM RSS only {} KiB in a page_poison=1 guest: is poisoning on?",
            round.pre_kib
        )
    })?;
    ensure(
        feature(&round.balloon, F_PAGE_POISON) == Some(true)
            && feature(&round.balloon, F_REPORTING) == Some(true),
        || {
            format!(
                "page_poison=1 should negotiate PAGE_POISON and keep reporting: {}",
                round.balloon
            )
        },
    )?;
    let trace = expect_kept(&mut vm, &round, window, 100 * 1024)?;
    // The guest reported pages (Ebb says it keeps them)...
    let stderr = vm.stderr_text();
    ensure(stderr.contains("poisons free pages"), || {
        format!("Ebb did not say it keeps poisoned pages; stderr:\n{stderr}")
    })?;
    // ...and finds them intact when it uses them again: page poisoning checks every
    // page it hands out and logs "pagealloc: memory corruption" otherwise.
    let again = cmd_within(
        &mut vm,
        &format!("touch {touch_mib}"),
        Duration::from_secs(300),
    )?;
    cmd(&mut vm, "free")?;
    let corrupt = sh(
        &mut vm,
        "dmesg | grep -c -e 'memory corruption' -e 'single bit error' || true",
    )?;
    ensure(corrupt.trim() == "0", || {
        format!(
            "the guest found corrupted free pages ({} lines):\n{}",
            corrupt.trim(),
            sh(&mut vm, "dmesg | grep -A3 pagealloc | tail -n 20").unwrap_or_default()
        )
    })?;
    canary_check(&mut vm, &canary)?;
    let m = cmd(&mut vm, "meminfo")?;
    let exit = poweroff_ebb(&mut vm)?;
    Ok(json!({
        "ready_ms": ms(ready.elapsed),
        "round": round.json(),
        "window_ms": ms(window),
        "rss_min_in_window_mib": mib(trace.min_kib()),
        "rss_samples": trace.to_json(),
        "touch_again": again,
        "meminfo": m,
        "vmm_stderr": stderr,
        "exit_status": exit.status.code(),
    }))
}
