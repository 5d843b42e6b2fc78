//! The automatic balloon policy against page cache, which free page reporting never sees:
//! `policy-cache` boots the Debian root file system guest with a data disk, reads the disk
//! (its cache grows), shows that reporting leaves that memory on the host, turns the
//! policy on through the API and measures what comes back; then the guest allocates more
//! than it has available, and the policy must give memory back without an OOM kill.

use std::time::{Duration, Instant};

use ebb_ctl::client::Client;
use serde_json::{json, Value};

use super::disk::{copy_image, rootfs_dir};
use super::support::{
    boot, cmd_within, config, ebb, ensure, guest_meminfo_kib, guest_vmstat, poweroff_ebb, ram_rss,
    scratch_dir, settled_rss,
};
use super::{progress, Args, Ctx, ScenarioDef};
use crate::guest::{BalloonConfig, DiskSpec, GuestVm};
use crate::util::mib;

/// The scenarios of this family.
pub const SCENARIOS: &[ScenarioDef] = &[ScenarioDef {
    name: "policy-cache",
    help: "the Debian disk guest reads `cache_mib` of its data disk; with reporting alone \
           the cache stays on the host; `PATCH /balloon/policy {\"enabled\":true}` must give \
           back at least half of it within `settle_s`; then the guest touches `touch_mib` \
           and gets it without an OOM kill (args: memory_mib=1024 cache_mib=512 \
           touch_mib=512 settle_s=120)",
    run: policy_cache,
}];

/// The guest command that reads `mib` MiB of the data disk into the page cache. Linux
/// drops a block device's cache when its last opener closes it, so a sleeper keeps
/// /dev/vdb open for the guest's lifetime.
pub fn read_disk_command(mib: u64) -> String {
    format!(
        "sh (sleep 1000000 </dev/vdb >/dev/null 2>&1 &) ; \
         dd if=/dev/vdb of=/dev/null bs=1M count={mib} 2>&1"
    )
}

fn meminfo_mib(vm: &mut GuestVm, key: &str) -> Result<u64, String> {
    Ok(guest_meminfo_kib(vm, key)? / 1024)
}

fn get_json(client: &Client, path: &str) -> Result<Value, String> {
    let r = client.get(path).map_err(|e| format!("GET {path}: {e}"))?;
    ensure(r.status == 200, || {
        format!("GET {path}: {} {}", r.status, r.text())
    })?;
    r.json().map_err(|e| format!("GET {path}: {e}"))
}

fn patch(client: &Client, path: &str, body: &str) -> Result<(), String> {
    let r = client
        .request("PATCH", path, Some(body.as_bytes()))
        .map_err(|e| format!("PATCH {path}: {e}"))?;
    ensure(r.status == 204, || {
        format!("PATCH {path} {body}: {} {}", r.status, r.text())
    })
}

fn policy_cache(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["memory_mib", "cache_mib", "touch_mib", "settle_s"])?;
    let memory_mib: u64 = args.get("memory_mib", 1024)?;
    let cache_mib: u64 = args.get("cache_mib", 512)?;
    let touch_mib: u64 = args.get("touch_mib", 512)?;
    let settle_s: u64 = args.get("settle_s", 120)?;
    let dir = scratch_dir("policy")?;
    let socket = dir.join("api.sock");
    let root = dir.join("root.ext4");
    let data = dir.join("data.img");
    copy_image(&root)?;
    // Sparse: the host reads holes as zeros, the guest caches them like any data.
    std::fs::File::create(&data)
        .and_then(|f| f.set_len((cache_mib + 64) << 20))
        .map_err(|e| format!("{}: {e}", data.display()))?;
    let mut c = config(
        memory_mib,
        1,
        Some(BalloonConfig {
            size_mib: 0,
            deflate_on_oom: true,
            free_page_reporting: true,
            stats_interval: 1,
            free_page_hinting: false,
        }),
    );
    c.initramfs = Some(rootfs_dir().join("initramfs.cpio.gz"));
    c.cmdline_extra = "root=/dev/vda".into();
    c.disks = vec![
        DiskSpec {
            path: root,
            readonly: false,
            id: "root".into(),
        },
        DiskSpec {
            path: data,
            readonly: true,
            id: "data".into(),
        },
    ];
    c.extra_args = vec!["--api-socket".into(), socket.to_string_lossy().into_owned()];
    let (mut vm, _) = boot(&ebb()?, &c)?;
    let client = Client::new(&socket, Duration::from_secs(30));
    let policy = get_json(&client, "/balloon/policy")?;
    ensure(policy["enabled"] == false, || {
        format!("the policy is on without policy=auto: {policy}")
    })?;

    // Fill the cache; reporting cannot touch it.
    let idle_rss = settled_rss(&vm, Duration::from_secs(4), Duration::from_secs(60), 4096)?;
    let read = cmd_within(
        &mut vm,
        &read_disk_command(cache_mib),
        Duration::from_secs(300),
    )?;
    ensure(read["status"] == 0, || {
        format!("reading the data disk: {read}")
    })?;
    let cached_mib = meminfo_mib(&mut vm, "Buffers")? + meminfo_mib(&mut vm, "Cached")?;
    ensure(cached_mib >= cache_mib / 2, || {
        format!("the guest caches only {cached_mib} MiB after reading {cache_mib} MiB: {read}")
    })?;
    let reporting_rss = settled_rss(&vm, Duration::from_secs(6), Duration::from_secs(90), 4096)?;
    progress(&format!(
        "cache: guest caches {cached_mib} MiB; guest RAM RSS idle {} MiB, after the read \
         with reporting alone {} MiB",
        mib(idle_rss),
        mib(reporting_rss)
    ));

    // The policy takes the idle cache.
    let oom_before = guest_vmstat(&mut vm, "oom_kill")?;
    patch(&client, "/balloon/policy", r#"{"enabled": true}"#)?;
    let started = Instant::now();
    let mut settled = None;
    let mut last = Value::Null;
    while started.elapsed() < Duration::from_secs(settle_s) {
        std::thread::sleep(Duration::from_secs(2));
        last = get_json(&client, "/balloon/policy")?;
        let reason = last["last_decision"]["reason"].as_str().unwrap_or("");
        if reason == "steady" {
            settled = Some(started.elapsed());
            break;
        }
    }
    let settled = settled
        .ok_or_else(|| format!("the policy did not settle within {settle_s} s; last: {last}"))?;
    let balloon = get_json(&client, "/balloon")?;
    let policy_rss = settled_rss(&vm, Duration::from_secs(6), Duration::from_secs(90), 4096)?;
    let cached_after = meminfo_mib(&mut vm, "Buffers")? + meminfo_mib(&mut vm, "Cached")?;
    let given_back = mib(reporting_rss) - mib(policy_rss);
    progress(&format!(
        "policy: settled in {:.1} s at a {} MiB balloon; guest caches {cached_after} MiB; \
         guest RAM RSS {} -> {} MiB ({given_back:.0} MiB back); decisions {}",
        settled.as_secs_f64(),
        balloon["actual_mib"],
        mib(reporting_rss),
        mib(policy_rss),
        last["decisions"]
    ));
    ensure(given_back >= cached_mib as f64 / 2.0, || {
        format!(
            "the policy gave back {given_back:.0} MiB of a {cached_mib} MiB cache (want at \
             least half)"
        )
    })?;

    // The guest needs memory again: the policy (and deflate-on-OOM under it) gives it.
    let t = Instant::now();
    let touched = cmd_within(
        &mut vm,
        &format!("touch {touch_mib}"),
        Duration::from_secs(300),
    )?;
    let touch_s = t.elapsed().as_secs_f64();
    let oom = guest_vmstat(&mut vm, "oom_kill")? - oom_before;
    let after_touch = get_json(&client, "/balloon/policy")?;
    let balloon_after = get_json(&client, "/balloon")?;
    progress(&format!(
        "touch {touch_mib} MiB: {touch_s:.1} s, OOM kills {oom}, balloon {} MiB, last \
         decision {}",
        balloon_after["actual_mib"], after_touch["last_decision"]
    ));
    ensure(touched["ok"] == true && oom == 0, || {
        format!("the guest could not take {touch_mib} MiB back: {touched}, {oom} OOM kills")
    })?;
    let peak = ram_rss(&vm)?;
    poweroff_ebb(&mut vm)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "cached_mib": cached_mib,
        "idle_rss_mib": mib(idle_rss),
        "reporting_rss_mib": mib(reporting_rss),
        "policy_rss_mib": mib(policy_rss),
        "given_back_mib": given_back,
        "settle_s": settled.as_secs_f64(),
        "balloon_mib": balloon["actual_mib"],
        "cached_after_mib": cached_after,
        "touch_mib": touch_mib,
        "touch_s": touch_s,
        "oom_kills": oom,
        "rss_after_touch_mib": mib(peak),
        "decisions": after_touch["decisions"],
    }))
}
