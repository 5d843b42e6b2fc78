//! Balloon and free page reporting end to end, in ONE test-host run (~8 min nested):
//! - `reporting-on`: touch 768 MiB, free: guest-RAM RSS back within 150 MiB of its
//!   pre-touch value within 30 s;
//! - `reporting-off`: the same stays high (proves the check can fail);
//! - `reporting-init-on-free`: `init_on_free=1` guests still give memory back
//!   (PAGE_POISON negotiated, poison 0);
//! - `reporting-page-poison`: `page_poison=1` guests keep working and Ebb keeps their
//!   reported pages;
//! - `balloon-size`: `--balloon size=256M` reaches 65536 pages, MemTotal drops 256 MiB;
//! - `balloon-deflate-on-oom` (its own test, ignored in CI: see below): 512 MiB balloon,
//!   then `alloc 600` succeeds and the balloon shrinks.
//!
//! Run: `cargo test --release -p ebb-tests --test memory -- --nocapture`

use std::path::Path;
use std::time::Duration;

use ebb_tests::scenarios::batch::{self, Batch};

/// In this order: reporting-on measures the reclaim time the "stays high" windows use and
/// the MemTotal of the 1 GiB guest the balloon checks compare against.
const SCENARIOS: &[&str] = &[
    "reporting-on",
    "reporting-off",
    "reporting-init-on-free",
    "reporting-page-poison",
    "balloon-size",
];

#[test]
fn balloon_and_reporting_in_one_test_host() {
    // One 1 GiB guest at a time, fully touched, plus L1 itself.
    let b = Batch::new(SCENARIOS, 2048, Duration::from_secs(30 * 60));
    let out = batch::run_all_ok(Path::new(env!("CARGO_BIN_EXE_ebb-scenario")), &b)
        .unwrap_or_else(|e| panic!("{e}"));

    let on = &out.result("reporting-on").unwrap()["data"];
    assert!(
        on["reclaimed_within_ms"].as_u64().unwrap() <= 30_000,
        "{on}"
    );
    let off = &out.result("reporting-off").unwrap()["data"];
    assert!(
        off["rss_min_in_window_mib"].as_f64().unwrap()
            > on["rss_after_mib"].as_f64().unwrap() + 300.0,
        "reporting off should keep far more than reporting on: off {off}\non {on}"
    );
    let poison = &out.result("reporting-page-poison").unwrap()["data"];
    assert!(
        poison["vmm_stderr"]
            .as_str()
            .unwrap()
            .contains("poisons free pages"),
        "{poison}"
    );
    let size = &out.result("balloon-size").unwrap()["data"];
    assert_eq!(size["balloon"]["inflated_pages"], 65536, "{size}");
    eprintln!(
        "TIMINGS mode={} total={:?} l1_boot_to_scenario={:?} scenario={:?}",
        out.mode, out.timings.total, out.timings.l1_boot_to_scenario, out.timings.scenario
    );
}

/// In the nested emulated test host (this project's machines and CI) L1's kvm-amd runs
/// with shadow paging (`npt=0`) for this test. With nested paging (the default) a guest
/// that fills a DEFLATE_ON_OOM balloon was crashed (triple fault) or hung, or L1 locked
/// up: about half the runs on 2026-11-23 (QEMU's guests as much as Ebb's), 1 of 10 on
/// 2026-12-03 (the guest stopped answering while it inflated). With `npt=0`: 10 of 10
/// passed on 2026-12-03. On an ordinary KVM host the parameter is not used.
#[test]
fn deflate_on_oom_gives_the_balloon_back_under_memory_pressure() {
    let b = Batch {
        kvm_amd_params: vec!["npt=0".into()],
        ..Batch::new(
            &["balloon-deflate-on-oom"],
            2048,
            Duration::from_secs(15 * 60),
        )
    };
    let out = batch::run_all_ok(Path::new(env!("CARGO_BIN_EXE_ebb-scenario")), &b)
        .unwrap_or_else(|e| panic!("{e}"));
    let oom = &out.result("balloon-deflate-on-oom").unwrap()["data"];
    assert!(oom["deflated_pages"].as_u64().unwrap() > 0, "{oom}");
}
