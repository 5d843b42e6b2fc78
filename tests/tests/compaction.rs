//! Balloon pages under guest compaction (`balloon-compaction`): with balloon pages
//! interleaved with a 1 GiB guest's free memory, compaction and a request for more huge
//! pages than free 2 MiB blocks migrate balloon pages (`balloon_migrate` grows), the
//! balloon keeps its size, the host's RSS grows only by the huge pages, and the huge pages
//! are allocated.
//!
//! Run: `cargo test --release -p ebb-tests --test compaction -- --nocapture`

use std::path::Path;
use std::time::Duration;

use ebb_tests::scenarios::batch::{self, Batch};

#[test]
fn balloon_pages_follow_guest_compaction() {
    let b = Batch::new(&["balloon-compaction"], 2048, Duration::from_secs(15 * 60));
    let out = batch::run_all_ok(Path::new(env!("CARGO_BIN_EXE_ebb-scenario")), &b)
        .unwrap_or_else(|e| panic!("{e}"));
    let data = &out.result("balloon-compaction").unwrap()["data"];
    eprintln!("COMPACTION: {data}");
    assert!(data["balloon_migrate"].as_u64().unwrap_or(0) > 0, "{data}");
}
