//! The automatic balloon policy against page cache (`policy-cache`): a Debian disk guest
//! reads 512 MiB of its data disk; reporting alone leaves that cache on the host; with
//! the policy turned on through the API at least half of it comes back, the quiet guest's
//! cache trimmed; then the guest
//! touches 512 MiB and gets it without an OOM kill.
//!
//! Run: `cargo test --release -p ebb-tests --test policy -- --nocapture`

use std::path::Path;
use std::time::Duration;

use ebb_tests::scenarios::batch::{self, Batch};

#[test]
fn the_policy_takes_idle_cache_and_gives_memory_back_on_demand() {
    let b = Batch::new(&["policy-cache"], 3072, Duration::from_secs(15 * 60));
    let out = batch::run_all_ok(Path::new(env!("CARGO_BIN_EXE_ebb-scenario")), &b)
        .unwrap_or_else(|e| panic!("{e}"));
    let data = &out.result("policy-cache").unwrap()["data"];
    eprintln!("POLICY: {data}");
    assert_eq!(data["oom_kills"], 0, "{data}");
    assert!(data["trims"].as_u64().unwrap_or(0) >= 1, "{data}");
    assert!(
        data["given_back_mib"].as_f64().unwrap_or(0.0) > 0.0,
        "{data}"
    );
}
