//! Free page hinting with a real guest (`hint-reclaim`): an idle run, then a run after the
//! guest touched and freed memory gives 75% of it back, the guest's checksummed data
//! survives and it keeps working; reporting alone measured beside it. (Hinting hands over
//! whole 4 MiB free blocks only: after a 512 MiB touch in a 1 GiB guest 86% came back in
//! one run, so 90%, the benchmark's mark, is too close for a test.)
//!
//! And no lost writes (`hint-corruption`): a guest churns a checksummed working set under
//! memory pressure through 20 hinting runs that leave it holding its blocks, so its
//! shrinker hands hinted blocks back mid-run; not one page may be corrupted.
//!
//! Run: `cargo test --release -p ebb-tests --test hinting -- --nocapture`

use std::path::Path;
use std::time::Duration;

use ebb_tests::scenarios::batch::{self, Batch};

#[test]
fn a_hinting_run_gives_freed_memory_back_without_losing_data() {
    let b = Batch::new(
        &["hint-reclaim:touch_mib=512:pct=75"],
        2048,
        Duration::from_secs(15 * 60),
    );
    let out = batch::run_all_ok(Path::new(env!("CARGO_BIN_EXE_ebb-scenario")), &b)
        .unwrap_or_else(|e| panic!("{e}"));
    let data = &out.result("hint-reclaim").unwrap()["data"];
    eprintln!(
        "HINT: 75% back in {} ms (run {} ms, {} MiB given back, {} MiB kept); reporting: {} ms; \
         idle run {} ms",
        data["hinting"]["back_ms"],
        data["hinting"]["run_ms"],
        data["hinting"]["status"]["discarded_bytes"]
            .as_u64()
            .unwrap_or(0)
            >> 20,
        data["hinting"]["status"]["kept_bytes"]
            .as_u64()
            .unwrap_or(0)
            >> 20,
        data["reporting"]["back_ms"],
        data["idle"]["run_ms"],
    );
    assert!(
        data["hinting"]["status"]["blocks"].as_u64().unwrap_or(0) > 0,
        "{data}"
    );
}

#[test]
fn hinting_runs_under_memory_pressure_lose_no_guest_write() {
    let b = Batch::new(
        &["hint-corruption:runs=20"],
        2048,
        Duration::from_secs(10 * 60),
    );
    let out = batch::run_all_ok(Path::new(env!("CARGO_BIN_EXE_ebb-scenario")), &b)
        .unwrap_or_else(|e| panic!("{e}"));
    let data = &out.result("hint-corruption").unwrap()["data"];
    eprintln!(
        "HINT-CORRUPTION: {} runs, {} pages checked, {} corrupted, {} MiB allocated fresh, \
         {} MiB hinted, {} MiB kept (written by the guest before Ebb's check), {} s",
        data["runs"],
        data["pages_checked"],
        data["pages_corrupted"],
        data["allocated_mib"],
        data["hinted_mib"],
        data["kept_mib"],
        data["seconds"],
    );
    assert_eq!(data["runs"], 20, "{data}");
    assert_eq!(data["pages_corrupted"], 0, "{data}");
    assert!(data["pages_checked"].as_u64().unwrap_or(0) > 0, "{data}");
}
