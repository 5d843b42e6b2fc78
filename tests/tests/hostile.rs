//! A hostile guest and the process's hardening, in one test-host run (`hostile-flood`):
//! every Ebb thread runs under its seccomp filter with no_new_privs, no descriptor leaks
//! into a child, guest RAM stays out of core dumps; a guest that drives the balloon itself
//! floods the inflate, reporting and statistics queues and sends malformed chains for 20 s
//! each, while the API keeps answering, the VMM's own memory stays flat, memory the guest
//! never handed over stays intact, and SIGTERM still ends Ebb at once.
//!
//! Run: `cargo test --release -p ebb-tests --test hostile -- --nocapture`

use std::path::Path;
use std::time::Duration;

use ebb_tests::scenarios::batch::{self, Batch};

#[test]
fn a_hostile_guest_cannot_stall_flood_or_bloat_ebb() {
    let b = Batch::new(&["hostile-flood"], 2048, Duration::from_secs(20 * 60));
    let out = batch::run_all_ok(Path::new(env!("CARGO_BIN_EXE_ebb-scenario")), &b)
        .unwrap_or_else(|e| panic!("{e}"));
    let data = &out.result("hostile-flood").unwrap()["data"];
    for flood in data["floods"].as_array().unwrap() {
        eprintln!(
            "FLOOD {}: completed {} api p99 {:.1} ms max {:.1} ms, VMM RSS growth {:.2} MiB",
            flood["mode"],
            flood["guest"]["completed"],
            flood["api_p99_ms"].as_f64().unwrap_or(f64::NAN),
            flood["api_max_ms"].as_f64().unwrap_or(f64::NAN),
            flood["vmm_rss_growth_mib"].as_f64().unwrap_or(f64::NAN),
        );
    }
    assert_eq!(data["floods"].as_array().unwrap().len(), 4, "{data}");
    eprintln!("SIGTERM to exit: {} ms", data["sigterm_to_exit_ms"]);
}
