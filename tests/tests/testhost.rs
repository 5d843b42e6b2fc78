//! End-to-end check of the test host harness: `smoke-shell` and `qemu-boot` in ONE run
//! (one L1 boot in nested mode). Takes a few minutes in nested mode.
//!
//! Run: `cargo test -p ebb-tests --test testhost -- --nocapture`
//! (`EBB_TEST_HOST=direct|nested` forces the mode.)

use std::time::Duration;

use ebb_tests::guest;
use ebb_tests::testhost::{self, HostMode, Scenario};
use serde_json::Value;

/// Builds the default guest on this machine before any scenario needs it (inside the
/// nested test host the cache is read-only). `EBB_GUEST_PREBUILT=1` uses the artifacts
/// already in the cache instead (they must exist).
fn build_guest() {
    let artifacts = if std::env::var("EBB_GUEST_PREBUILT").is_ok_and(|v| v == "1") {
        guest::GuestArtifacts::locate()
    } else {
        guest::build_default_guest()
    };
    let a = artifacts.unwrap_or_else(|e| panic!("{e}"));
    eprintln!("default guest: {}", a.dir.display());
}

fn results(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("scenario").is_some())
        .collect()
}

fn find<'a>(results: &'a [Value], name: &str) -> &'a Value {
    results
        .iter()
        .find(|r| r["scenario"] == name)
        .unwrap_or_else(|| panic!("no result line for {name}"))
}

#[test]
fn smoke_shell_and_qemu_boot_in_one_test_host() {
    let (probed, why) = HostMode::probe();
    let mode = HostMode::detect().expect("EBB_TEST_HOST");
    eprintln!("host mode: {mode} (probe: {probed}: {why})");
    build_guest();

    let scenario = Scenario {
        argv: vec![
            env!("CARGO_BIN_EXE_ebb-scenario").to_string(),
            "--json".into(),
            "batch".into(),
            "smoke-shell".into(),
            "qemu-boot".into(),
        ],
        l1_memory_mib: 2048,
        timeout: Duration::from_secs(15 * 60),
        ..Scenario::default()
    };
    let out = testhost::run(&scenario).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "run: mode {} attempts {} status {} timings {:?} dir {}",
        out.mode,
        out.attempts,
        out.status,
        out.timings,
        out.out_dir.display()
    );
    eprintln!("scenario stdout:\n{}", out.stdout);
    let results = results(&out.stdout);
    out.ensure_success().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.mode, mode);

    let smoke = find(&results, "smoke-shell");
    assert_eq!(smoke["ok"], true, "{smoke}");
    let facts = &smoke["data"];
    assert_eq!(facts["host"], mode.as_str());
    assert_eq!(facts["dev_kvm"], true, "{facts}");
    assert_eq!(facts["kvm_api_version"], 12, "{facts}");
    assert!(
        facts["cpu_svm"].as_u64().unwrap_or(0) + facts["cpu_vmx"].as_u64().unwrap_or(0) > 0,
        "{facts}"
    );
    assert_eq!(facts["kvm_pvm"], false, "{facts}");
    assert_eq!(facts["tmp_writable"], true, "{facts}");
    assert_eq!(facts["guest_built"], true, "{facts}");
    if mode == HostMode::Nested {
        let mods = facts["kvm_modules"].to_string();
        assert!(
            mods.contains("kvm_amd"),
            "kvm_amd not loaded in L1: {facts}"
        );
        assert_eq!(facts["npt_or_ept"], "Y", "{facts}");
        assert_eq!(facts["cpus_online"], "0-1", "{facts}");
        let ready_in_l1 = out.timings.l1_boot_to_scenario.expect("L1 boot time");
        assert!(ready_in_l1 < Duration::from_secs(120), "{ready_in_l1:?}");
    }

    let boot = find(&results, "qemu-boot");
    assert_eq!(boot["ok"], true, "{boot}");
    let d = &boot["data"];
    assert!(
        d["ready_line"].as_str().unwrap().starts_with("EBB-READY"),
        "{d}"
    );
    assert_eq!(d["cpus"], 1, "{d}");
    let mem_total = d["meminfo"]["mem_total_kib"].as_u64().unwrap();
    assert!(
        (400 * 1024..=512 * 1024).contains(&mem_total),
        "MemTotal {mem_total} KiB for a 512 MiB guest"
    );
    assert_eq!(d["memtotal_kib_ready"].as_u64().unwrap(), mem_total, "{d}");
    assert_eq!(d["balloon_ready"], true, "{d}");
    assert_eq!(d["balloon"]["present"], true, "{d}");
    // The guest touched some of its RAM while booting; QEMU's RAM mapping shows it.
    let ram_rss = d["guest_ram_rss_kib"].as_u64().unwrap();
    assert!(
        ram_rss > 1024 && ram_rss <= 512 * 1024,
        "guest RAM RSS {ram_rss} KiB"
    );
    assert!(d["process_rss_kib"].as_u64().unwrap() >= ram_rss, "{d}");
    assert_eq!(d["exit_status"], 0, "{d}");
    eprintln!(
        "TIMINGS mode={} l1_boot_to_scenario={:?} qemu_ready_ms={} qemu_total_ms={} \
         scenario={:?} l1_shutdown={:?} prepare={:?} total={:?}",
        out.mode,
        out.timings.l1_boot_to_scenario,
        d["ready_ms"],
        d["total_ms"],
        out.timings.scenario,
        out.timings.l1_shutdown,
        out.timings.prepare,
        out.timings.total
    );
}
