//! The nested test host's recovery, end to end (~2 min): a batch whose test host dies
//! part-way goes on in a fresh one with only what had not finished, and with the facts
//! the first part noted (`testhost-crash-once` crashes L1's kernel the first time); a
//! scenario whose guest the emulation crashed is rerun alone in a fresh one, with the
//! batch's notes (`testhost-guest-crash-once` fails as if so the first time).
//!
//! Always nested (the direct mode has no L1 to lose; the nested one runs on any machine).
//!
//! Run: `cargo test --release -p ebb-tests --test testhost -- --nocapture`

use std::path::Path;
use std::time::Duration;

use ebb_tests::scenarios::batch::{self, Batch};
use ebb_tests::testhost::HostMode;

/// Runs `items` as one batch in the nested test host; all must pass.
fn run_nested(items: &[&str]) -> ebb_tests::testhost::RunOutput {
    let b = Batch {
        mode: Some(HostMode::Nested),
        ..Batch::new(items, 1024, Duration::from_secs(5 * 60))
    };
    batch::run_all_ok(Path::new(env!("CARGO_BIN_EXE_ebb-scenario")), &b)
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_batch_resumes_in_a_fresh_test_host_after_l1_dies() {
    let out = run_nested(&["testhost-note-boot", "testhost-crash-once"]);
    assert_eq!(out.mode, HostMode::Nested);
    assert_eq!(out.attempts, 2, "{}", out.stdout);
    let noted = out
        .results
        .iter()
        .filter(|r| r["scenario"] == "testhost-note-boot")
        .collect::<Vec<_>>();
    assert_eq!(noted.len(), 1, "the part that finished ran once: {noted:?}");
    let crash = &out.result("testhost-crash-once").unwrap()["data"];
    // The second part recalled the first part's note, in another boot of L1.
    assert_eq!(
        crash["noted_boot_id"], noted[0]["data"]["boot_id"],
        "{crash}"
    );
    assert_ne!(crash["boot_id"], crash["noted_boot_id"], "{crash}");
}

#[test]
fn a_scenario_whose_guest_crashed_is_rerun_in_a_fresh_test_host() {
    let out = run_nested(&[
        "testhost-note-boot",
        "testhost-guest-crash-once",
        "smoke-shell",
    ]);
    assert_eq!(out.results.len(), 3, "{}", out.stdout);
    let rerun = out.result("testhost-guest-crash-once").unwrap();
    let earlier = rerun["earlier_attempts"].as_array().unwrap();
    assert_eq!(earlier.len(), 1, "{rerun}");
    assert_eq!(earlier[0]["ok"], false, "{rerun}");
    // Only the crashed scenario ran again, elsewhere, knowing the first boot's note.
    assert_eq!(
        out.stdout.matches("\"scenario\":\"smoke-shell\"").count(),
        1
    );
    let data = &rerun["data"];
    let noted = &out.result("testhost-note-boot").unwrap()["data"]["boot_id"];
    assert_eq!(&data["noted_boot_id"], noted, "{rerun}");
    assert_ne!(data["boot_id"], data["noted_boot_id"], "{rerun}");
}
