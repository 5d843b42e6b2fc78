//! Benchmarks: Ebb against QEMU on the same guest in the same test-host run, printed as
//! tables (see [`ebb_tests::scenarios::bench`] for what each measures and how).
//!
//! ```text
//! cargo run --release -p ebb-tests --bin ebb-bench -- [boot|inflate|reclaim|reclaim-1g|reclaim-5g|thp|api|footprint|hint|disk|ksm|policy|all]... [--runs N]
//! ```
//! Runs directly on a KVM host, in the nested test host elsewhere (one L1 boot for all the
//! benchmarks asked for). Figures, not pass/fail: the exit status is 0 when every
//! benchmark ran, 1 otherwise. The raw JSON goes to `target/bench/<time>.json`.
//!
//! `ebb-bench --inside ...` is the runner the test host executes (like `ebb-scenario`).

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ebb_tests::paths;
use ebb_tests::scenarios::{
    self, batch, bench, disk, footprint, hinting, merge, policy, ScenarioDef,
};

const FAMILIES: &[&[ScenarioDef]] = &[
    bench::SCENARIOS,
    footprint::SCENARIOS,
    hinting::SCENARIOS,
    disk::SCENARIOS,
    merge::SCENARIOS,
    policy::SCENARIOS,
];

fn usage() -> ExitCode {
    eprintln!("{}", usage_text());
    ExitCode::from(2)
}

fn usage_text() -> &'static str {
    "usage: ebb-bench [boot|inflate|reclaim|reclaim-1g|reclaim-5g|thp|api|footprint|hint|disk|ksm|policy|all]... [--runs N]\n\
         \n  boot     spawn to EBB-READY (median of N, default 5) and VMM memory overhead\
         \n  inflate  balloon 768 MiB of a 1 GiB guest: time, madvise calls per GiB\
         \n  reclaim  free page reporting: 1 GiB guest freeing 768 MiB, 5 GiB freeing 4.5 GiB\
         \n           (reclaim-1g, reclaim-5g: one of them)\
         \n  thp      Ebb's touch and reclaim with guest RAM in huge pages (thp=on) and not (thp=off)\
         \n  api      REST API latency with the guest busy, VMM CPU use when idle\
         \n  disk      fio in the guest on virtio-blk, Ebb vs QEMU microvm\
         \n  hint      free page hinting vs reporting: a 5 GiB guest touches and frees 4.5 GiB\
         \n  footprint idle host RSS of 1, 5 and 15 GiB guests and where it goes, Ebb vs QEMU\
         \n  ksm      same-page merging across 3 identical idle guests: RSS saved, ksmd CPU\
         \n  policy   what the automatic balloon costs a guest: hot-set re-reads, allocation stalls\
         \n  all      everything (default)"
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--inside") {
        args.remove(0);
        return scenarios::main_with_args(FAMILIES, args);
    }
    let mut which: Vec<String> = Vec::new();
    let mut runs = 5u32;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{}", usage_text());
                return ExitCode::SUCCESS;
            }
            "--runs" => match it.next().and_then(|v| v.parse().ok()) {
                Some(n) => runs = n,
                None => return usage(),
            },
            "boot" | "inflate" | "reclaim" | "reclaim-1g" | "reclaim-5g" | "thp" | "api"
            | "footprint" | "hint" | "disk" | "ksm" | "policy" | "all" => which.push(a),
            _ => return usage(),
        }
    }
    if which.is_empty() || which.iter().any(|w| w == "all") {
        which = vec![
            "boot".into(),
            "inflate".into(),
            "reclaim".into(),
            "thp".into(),
            "api".into(),
            "footprint".into(),
            "hint".into(),
            "disk".into(),
            "ksm".into(),
            "policy".into(),
        ];
    }
    let mut items = Vec::new();
    let mut l1_memory_mib = 2048;
    let mut minutes = 10;
    for w in &which {
        match w.as_str() {
            "boot" => {
                items.push(format!("bench-boot:runs={runs}"));
                minutes += 2 * runs as u64;
            }
            "inflate" => {
                items.push("bench-inflate".to_string());
                minutes += 10;
            }
            "reclaim" | "reclaim-1g" | "reclaim-5g" => {
                if w != "reclaim-5g" {
                    items.push("bench-reclaim:memory_mib=1024:touch_mib=768:runs=3".to_string());
                    minutes += 25;
                }
                if w != "reclaim-1g" {
                    items.push("bench-reclaim:memory_mib=5120:touch_mib=4608".to_string());
                    // The 5 GiB guest touches 4.5 GiB: L1 holds it all at the peak.
                    l1_memory_mib = 6144;
                    minutes += 30;
                }
            }
            "api" => {
                items.push(format!("bench-api:requests={}", 1000));
                minutes += 5;
            }
            "disk" => {
                // The data image through a loop device: its page cache reads without
                // waiting (the test host's tmpfs, Linux 6.1, cannot), as on ext4 or xfs;
                // Ebb, Ebb answering small cached reads on its event loop, and QEMU in
                // the same test host.
                items.push("bench-disk:data_on=loop:vmms=ebb+ebb-cached+qemu".to_string());
                minutes += 20;
            }
            "hint" => {
                // The issue's figure: a 5 GiB guest that touched and freed 4.5 GiB.
                items.push("hint-reclaim:memory_mib=5120:touch_mib=4608".to_string());
                l1_memory_mib = l1_memory_mib.max(6144);
                minutes += 20;
            }
            "policy" => {
                // Side by side: deflated pages backed ahead of the guest, and not.
                items.push("bench-policy".to_string());
                items.push("bench-policy-no-prefault".to_string());
                minutes += 30;
            }
            "ksm" => {
                items.push("bench-ksm".to_string());
                l1_memory_mib = l1_memory_mib.max(3072);
                minutes += 15;
            }
            "footprint" => {
                items.push("bench-footprint".to_string());
                l1_memory_mib = l1_memory_mib.max(3072);
                minutes += 20;
            }
            "thp" => {
                for thp in ["on", "off"] {
                    items.push(format!(
                        "bench-reclaim:memory_mib=1024:touch_mib=768:thp={thp}:vmms=ebb"
                    ));
                }
                minutes += 10;
            }
            _ => {}
        }
    }
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ebb-bench: cannot find myself: {e}");
            return ExitCode::FAILURE;
        }
    };
    let b = batch::Batch {
        items: items.clone(),
        l1_memory_mib,
        timeout: Duration::from_secs(minutes * 60),
        env: Vec::new(),
        mode: None,
        kvm_amd_params: Vec::new(),
    };
    eprintln!(
        "ebb-bench: running {} in one test-host run (L1 {} MiB, limit {} min)",
        items.join(" "),
        l1_memory_mib,
        minutes
    );
    let out = match batch::run(&me, &["--inside"], &b) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ebb-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let dir = paths::target_dir().join("bench");
    let file = dir.join(format!("{stamp}.json"));
    let raw: Vec<String> = out.results.iter().map(|r| r.to_string()).collect();
    if std::fs::create_dir_all(&dir).is_ok() && std::fs::write(&file, raw.join("\n") + "\n").is_ok()
    {
        eprintln!("ebb-bench: raw results in {}", file.display());
    }
    println!(
        "host: {} (test-host run {:.0} s, L1 boot {:.1} s)\n",
        out.mode,
        out.timings.total.as_secs_f64(),
        out.timings
            .l1_boot_to_scenario
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    );
    for r in &out.results {
        println!("{}", bench::table(r));
    }
    let expected: Vec<&str> = items
        .iter()
        .map(|i| i.split(':').next().unwrap_or(""))
        .collect();
    let failures = out.failures(&expected);
    if !failures.is_empty() || out.results.len() != items.len() || !out.success() {
        eprintln!(
            "ebb-bench: {} of {} benchmarks did not complete:\n{}\n{}",
            failures
                .len()
                .max(items.len() - out.results.len().min(items.len())),
            items.len(),
            failures.join("\n"),
            out.report()
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
