//! The REST API against a running Ebb with real guests, in ONE test-host run:
//! - `api-endpoints`: every endpoint, every error class (hostile clients included),
//!   concurrent clients, statistics tracking the guest's meminfo, `PUT /vm/stop`;
//! - `api-no-balloon-shutdown`: stale socket replaced, 409 without a balloon,
//!   `PUT /vm/shutdown` powers the guest off;
//! - `api-runtime-inflate`: a 2 GiB guest that touched and freed 1.7 GiB gives 1 GiB back
//!   through `PATCH /balloon` (actual within 60 s, RSS down >= 800 MiB), then deflates and
//!   allocates 1.5 GiB. The guest runs with `init_on_alloc=0`: its zeroing of every
//!   ballooned page, emulated, would otherwise take most of the 60 s (see the scenario).
//!
//! Run: `cargo test --release -p ebb-tests --test api -- --nocapture`

use std::path::Path;
use std::time::Duration;

use ebb_tests::scenarios::batch::{self, Batch};

const SCENARIOS: &[&str] = &[
    "api-endpoints",
    "api-no-balloon-shutdown",
    "api-runtime-inflate",
];

#[test]
fn api_scenarios_in_one_test_host() {
    // The 2 GiB guest touches 1.7 GiB, plus L1 itself.
    let b = Batch::new(SCENARIOS, 3072, Duration::from_secs(30 * 60));
    let out = batch::run_all_ok(Path::new(env!("CARGO_BIN_EXE_ebb-scenario")), &b)
        .unwrap_or_else(|e| panic!("{e}"));
    let inflate = &out.result("api-runtime-inflate").unwrap()["data"];
    let rss = &inflate["guest_ram_rss_mib"];
    assert!(
        rss["freed"].as_f64().unwrap() - rss["inflated"].as_f64().unwrap() >= 800.0,
        "{inflate}"
    );
    assert!(
        inflate["inflate_ms"].as_u64().unwrap() <= 60_000,
        "{inflate}"
    );
    eprintln!(
        "TIMINGS mode={} total={:?} scenario={:?}",
        out.mode, out.timings.total, out.timings.scenario
    );
}
