//! Every memory backing gives memory back (`backing-anon`, `backing-memfd` and
//! `backing-hugetlb`: one guest each, in one test host): with `--memory
//! ...,backing=anon|memfd|hugetlb`, inflating the balloon, a free page hinting run and free
//! page reporting each return memory the guest touched and freed: guest RAM RSS and, for
//! memfd and hugetlb, the memfd's allocated blocks fall.
//!
//! Run: `cargo test --release -p ebb-tests --test backings -- --nocapture`

use std::path::Path;
use std::time::Duration;

use ebb_tests::scenarios::batch::{self, Batch};

#[test]
fn every_backing_gives_memory_back() {
    let b = Batch::new(
        &["backing-anon", "backing-memfd", "backing-hugetlb"],
        2048,
        Duration::from_secs(12 * 60),
    );
    let out = batch::run_all_ok(Path::new(env!("CARGO_BIN_EXE_ebb-scenario")), &b)
        .unwrap_or_else(|e| panic!("{e}"));
    for backing in ["anon", "memfd", "hugetlb"] {
        let name = format!("backing-{backing}");
        let d = &out.result(&name).unwrap_or_else(|| panic!("no {name}"))["data"];
        eprintln!(
            "BACKING {backing}: inflate {} -> {} MiB, hinting {} -> {} MiB, reporting {} -> {} \
             MiB (RSS; file blocks for memfd/hugetlb)",
            d["inflate"]["before"],
            d["inflate"]["after"],
            d["hinting"]["before"],
            d["hinting"]["after"],
            d["reporting"]["before"],
            d["reporting"]["after"],
        );
    }
}
