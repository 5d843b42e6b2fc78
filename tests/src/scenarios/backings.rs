//! Every memory backing gives memory back (`backing-anon`, `backing-memfd`,
//! `backing-hugetlb`): one guest per run on
//! `--memory SIZE,backing=anon|memfd|hugetlb` with a balloon that has free page reporting
//! and hinting, and three ways memory goes back, each measured on its own:
//!
//! 1. inflate: the guest touches and frees memory, the balloon grows into it;
//! 2. hinting: touched and freed again, one hinting run;
//! 3. reporting: touched and freed again, the guest reports it.
//!
//! Reporting is held off during 1 and 2 (the guest's `page_reporting_order` set above
//! every order, and put back for 3), so each step's fall is its own. What is measured is
//! what the host holds for guest RAM: the `Rss` of the mapping (hugetlb pages included)
//! and, for the memfd backings, the file's allocated blocks. A checksummed file the guest
//! keeps must come through unchanged. With hugetlb the scenario
//! reserves the huge pages in the test host first and puts the pool back afterwards.

use std::thread;
use std::time::{Duration, Instant};

use ebb_ctl::client::Client;
use serde_json::{json, Value};

use super::support::{
    boot, cmd, cmd_within, config, ebb, ensure, mib, poll, poweroff_ebb, scratch_dir, settled_rss,
    sh, u64_field, wait_balloon, OrStr,
};
use super::{ms, progress, Args, Ctx, ScenarioDef};
use crate::guest::{BalloonConfig, GuestVm};
use crate::procfs;

/// The scenarios of this family: one per backing.
pub const SCENARIOS: &[ScenarioDef] = &[
    ScenarioDef {
        name: "backing-anon",
        help: "--memory ...,backing=anon: inflate, a hinting run and free page reporting \
               each give touched-and-freed memory back (guest RAM RSS falls) (args: \
               memory_mib=768 touch_mib=320 balloon_mib=160 limit_s=90)",
        run: |ctx, args| backing_reclaim(ctx, args, "anon"),
    },
    ScenarioDef {
        name: "backing-memfd",
        help: "--memory ...,backing=memfd: the same; the memfd's allocated blocks and RSS \
               fall (holes punched, as MADV_DONTNEED frees nothing there) (args: as \
               backing-anon)",
        run: |ctx, args| backing_reclaim(ctx, args, "memfd"),
    },
    ScenarioDef {
        name: "backing-hugetlb",
        help: "--memory ...,backing=hugetlb: the same with 2 MiB huge pages reserved in the \
               test host (and put back): only whole huge pages go back (args: as \
               backing-anon)",
        run: |ctx, args| backing_reclaim(ctx, args, "hugetlb"),
    },
];

const REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// What the host holds for guest RAM.
#[derive(Debug, Clone, Copy)]
struct Held {
    rss_kib: u64,
    file_kib: Option<u64>,
}

impl Held {
    fn read(vm: &GuestVm, file: bool) -> Result<Held, String> {
        let rss_kib = vm.guest_ram_rss_kib().ctx("reading guest RAM RSS")?;
        let file_kib = if file {
            Some(
                procfs::fd_allocated_kib(vm.pid(), "memfd:ebb-guest-ram")
                    .ctx("reading the backing's allocated blocks")?,
            )
        } else {
            None
        };
        Ok(Held { rss_kib, file_kib })
    }

    /// The figure a step is judged on: the file's blocks when there is a file (what the
    /// host really holds), else the RSS.
    fn kib(&self) -> u64 {
        self.file_kib.unwrap_or(self.rss_kib)
    }

    fn json(&self) -> Value {
        json!({"rss_mib": mib(self.rss_kib), "file_mib": self.file_kib.map(mib)})
    }
}

/// A step's before and after.
fn step(before: Held, after: Held, extra: Value) -> Value {
    let mut v = json!({
        "before": before.json(),
        "after": after.json(),
        "fell_mib": mib(before.kib().saturating_sub(after.kib())),
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    v
}

/// Puts `nr_hugepages` back as it was.
struct PoolGuard(Option<u64>);

impl Drop for PoolGuard {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            let _ = std::fs::write(NR_HUGEPAGES, n.to_string());
        }
    }
}

/// Reserves `pages` more 2 MiB huge pages in this (test) host.
fn reserve_huge_pages(pages: u64) -> Result<PoolGuard, String> {
    let before: u64 = std::fs::read_to_string(NR_HUGEPAGES)
        .ctx(NR_HUGEPAGES)?
        .trim()
        .parse()
        .s()?;
    let guard = PoolGuard(Some(before));
    std::fs::write(NR_HUGEPAGES, (before + pages).to_string()).ctx(NR_HUGEPAGES)?;
    let free = procfs::meminfo_kib("HugePages_Free").s()?;
    ensure(free >= pages, || {
        format!("asked the host for {pages} more huge pages, {free} are free")
    })?;
    progress(&format!("{pages} huge pages reserved (pool was {before})"));
    Ok(guard)
}

fn balloon_to(client: &Client, mib: u64) -> Result<(), String> {
    let r = client
        .send_json("PATCH", "/balloon", &json!({ "amount_mib": mib }))
        .s()?;
    ensure(r.status == 204, || {
        format!("PATCH /balloon {mib} MiB: {}", r.text())
    })
}

fn statistics(client: &Client) -> Value {
    client
        .get("/balloon/statistics")
        .ok()
        .and_then(|r| r.json().ok())
        .map(|v: Value| v["ebb"].clone())
        .unwrap_or(Value::Null)
}

/// Starts a hinting run and waits until the guest stopped.
fn hint(client: &Client, limit: Duration) -> Result<(Value, Duration), String> {
    let t0 = Instant::now();
    let r = client
        .send_json(
            "PATCH",
            "/balloon/hinting/start",
            &json!({"acknowledge_on_stop": true}),
        )
        .s()?;
    ensure(r.status == 204, || format!("hinting start: {}", r.text()))?;
    let done = poll(limit, Duration::from_millis(50), || {
        let r = client.get("/balloon/hinting/status").s()?;
        let s: Value = r.json().s()?;
        Ok::<_, String>(matches!(s["state"].as_str(), Some("stopped" | "done")).then_some(s))
    })?;
    done.map(|s| (s, t0.elapsed()))
        .ok_or_else(|| format!("the hinting run did not finish within {limit:?}"))
}

/// Touches `mib` MiB in the guest and frees it; the host then holds it.
fn touch_and_free(vm: &mut GuestVm, mib: u64) -> Result<(), String> {
    cmd_within(vm, &format!("touch {mib}"), Duration::from_secs(300))?;
    cmd(vm, "free")?;
    Ok(())
}

fn backing_reclaim(_ctx: &Ctx, args: &Args, backing: &str) -> Result<Value, String> {
    args.check_known(&["memory_mib", "touch_mib", "balloon_mib", "limit_s"])?;
    let backing = backing.to_string();
    let memory_mib: u64 = args.get("memory_mib", 768)?;
    let touch_mib: u64 = args.get("touch_mib", 320)?;
    let balloon_mib: u64 = args.get("balloon_mib", 160)?;
    let limit = Duration::from_secs(args.get("limit_s", 90)?);
    let file = match backing.as_str() {
        "anon" => false,
        "memfd" | "hugetlb" => true,
        other => return Err(format!("backing={other}: expected anon, memfd or hugetlb")),
    };
    let _pool = if backing == "hugetlb" {
        reserve_huge_pages(memory_mib / 2)?
    } else {
        PoolGuard(None)
    };
    let dir = scratch_dir(&format!("backing-{backing}"))?;
    let socket = dir.join("api.sock");
    let mut c = config(
        memory_mib,
        1,
        Some(BalloonConfig {
            deflate_on_oom: false,
            free_page_reporting: true,
            free_page_hinting: true,
            deflate_prefault: true,
            // `GET /balloon/statistics` (Ebb's counters) needs the statistics queue.
            stats_interval: 5,
            ..BalloonConfig::default()
        }),
    );
    c.backing = Some(backing.clone());
    c.extra_args = vec!["--api-socket".into(), socket.to_string_lossy().into_owned()];
    let (mut vm, _) = boot(&ebb()?, &c)?;
    let client = Client::new(&socket, Duration::from_secs(30));
    let held = |vm: &GuestVm| Held::read(vm, file);

    // Data the guest keeps must survive every way memory goes back.
    let canary = "md5sum /dev/shm/canary | cut -d' ' -f1";
    let sum = sh(
        &mut vm,
        &format!("dd if=/dev/urandom of=/dev/shm/canary bs=1M count=16 2>/dev/null && {canary}"),
    )?;

    // Reporting off while inflate and hinting are measured.
    let order = sh(&mut vm, &format!("cat {REPORTING_ORDER}"))?
        .trim()
        .to_string();
    sh(&mut vm, &format!("echo 11 > {REPORTING_ORDER}"))?;
    settled_rss(&vm, Duration::from_secs(3), Duration::from_secs(20), 2048)?;

    // 1. Inflate into touched, freed memory.
    touch_and_free(&mut vm, touch_mib)?;
    let before = held(&vm)?;
    let t0 = Instant::now();
    balloon_to(&client, balloon_mib)?;
    wait_balloon(&mut vm, limit, |pages| pages >= balloon_mib * 256)?;
    let inflate_ms = ms(t0.elapsed());
    let after = held(&vm)?;
    let stats = statistics(&client);
    let inflate = step(
        before,
        after,
        json!({"ms": inflate_ms, "discarded_mib": u64_field(&stats, "inflate_discarded_bytes")? >> 20}),
    );
    progress(&format!("{backing}: inflate {balloon_mib} MiB: {inflate}"));
    balloon_to(&client, 0)?;
    wait_balloon(&mut vm, limit, |pages| pages == 0)?;

    // 2. One hinting run.
    touch_and_free(&mut vm, touch_mib)?;
    let before = held(&vm)?;
    let (status, took) = hint(&client, limit)?;
    let after = held(&vm)?;
    let hinting = step(
        before,
        after,
        json!({"ms": ms(took), "status": status, "unaligned_kept_mib": u64_field(&statistics(&client), "unaligned_kept_bytes")? >> 20}),
    );
    progress(&format!("{backing}: hinting: {hinting}"));

    // 3. Reporting, back on.
    sh(&mut vm, &format!("echo {order} > {REPORTING_ORDER}"))?;
    touch_and_free(&mut vm, touch_mib)?;
    let before = held(&vm)?;
    let goal = before.kib().saturating_sub(touch_mib * 1024 / 2);
    let t0 = Instant::now();
    let reached = poll(limit, Duration::from_millis(250), || {
        let now = held(&vm)?;
        Ok::<_, String>((now.kib() <= goal).then_some(now))
    })?;
    let after = reached.map_or_else(|| held(&vm), Ok)?;
    let stats = statistics(&client);
    let reporting = step(
        before,
        after,
        json!({
            "ms": reached.map(|_| ms(t0.elapsed())),
            "discarded_mib": u64_field(&stats, "reported_discarded_bytes")? >> 20,
        }),
    );
    progress(&format!("{backing}: reporting: {reporting}"));
    let now = sh(&mut vm, canary)?;
    ensure(now == sum, || {
        format!("the guest's data changed: md5 {sum} before, {now} after")
    })?;
    let pool = procfs::meminfo_kib("HugePages_Free").ok();
    poweroff_ebb(&mut vm)?;
    thread::sleep(Duration::from_millis(100));
    let _ = std::fs::remove_dir_all(&dir);

    // Each way gives back a good share of what it could: inflate its balloon (hugetlb:
    // only the huge pages the balloon filled whole), hinting and reporting the freed
    // memory.
    let fell = |v: &Value| v["fell_mib"].as_f64().unwrap_or(0.0);
    let inflate_min = if backing == "hugetlb" {
        balloon_mib / 4
    } else {
        balloon_mib * 3 / 4
    };
    let data = json!({
        "backing": backing,
        "memory_mib": memory_mib,
        "touch_mib": touch_mib,
        "balloon_mib": balloon_mib,
        "inflate": inflate,
        "hinting": hinting,
        "reporting": reporting,
        "host_huge_pages_free_kib": pool,
        "statistics": stats,
    });
    ensure(fell(&data["inflate"]) >= inflate_min as f64, || {
        format!("inflating {balloon_mib} MiB gave back less than {inflate_min} MiB: {data}")
    })?;
    ensure(fell(&data["hinting"]) >= (touch_mib / 2) as f64, || {
        format!("a hinting run gave back less than half of {touch_mib} MiB: {data}")
    })?;
    ensure(fell(&data["reporting"]) >= (touch_mib / 2) as f64, || {
        format!("reporting gave back less than half of {touch_mib} MiB: {data}")
    })?;
    Ok(data)
}
