//! Guests with a disk (`disk-persist`): the Debian root file system on virtio-blk keeps
//! what the guest synced through a power-off and a SIGKILL of Ebb, a read-only disk is
//! read-only in the guest, and fstrim frees the image's blocks. Needs the image from
//! resources/build-rootfs.sh (ci/setup.sh builds it).
//!
//! Run: `cargo test --release -p ebb-tests --test disk -- --nocapture`

use std::path::Path;
use std::time::Duration;

use ebb_tests::scenarios::batch::{self, Batch};

#[test]
fn a_disk_keeps_what_the_guest_synced() {
    let b = Batch::new(&["disk-persist"], 2048, Duration::from_secs(15 * 60));
    let out = batch::run_all_ok(Path::new(env!("CARGO_BIN_EXE_ebb-scenario")), &b)
        .unwrap_or_else(|e| panic!("{e}"));
    let data = &out.result("disk-persist").unwrap()["data"];
    eprintln!("DISK: {data}");
}
