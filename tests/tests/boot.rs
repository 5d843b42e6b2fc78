//! Boot end to end, in ONE test-host run (one L1 boot in nested mode, ~5 min):
//! - `smoke-shell`: the host the scenarios run on has a usable hardware KVM (in nested
//!   mode: kvm_amd with nested paging in L1);
//! - `qemu-boot`: the default guest boots under QEMU (the reference: if it fails, the
//!   guest or the test host is broken, not Ebb);
//! - `cli-host-limits`: the command-line errors that need a usable KVM;
//! - `boot-basic` (1 GiB, bzImage), `boot-smp-reboot` (2 vCPUs, guest reboot),
//!   `boot-elf-serial-file` (PVH, console to a file), `boot-5g-sigterm` (RAM above 4 GiB,
//!   SIGTERM).
//!
//! Run: `cargo test --release -p ebb-tests --test boot -- --nocapture`
//! (`EBB_TEST_HOST=direct|nested` forces the mode; `EBB_GUEST_PREBUILT=1` uses the guest
//! in the cache instead of running resources/build-guest.sh.)

use std::path::Path;
use std::time::Duration;

use ebb_tests::scenarios::batch::{self, Batch};
use ebb_tests::testhost::HostMode;

const SCENARIOS: &[&str] = &[
    "smoke-shell",
    "qemu-boot",
    "cli-host-limits",
    "boot-basic",
    "boot-smp-reboot",
    "boot-elf-serial-file",
    "boot-5g-sigterm",
    "boot-elf-long64",
    "boot-triple-fault",
];

#[test]
fn boot_scenarios_in_one_test_host() {
    let mode = HostMode::detect().expect("EBB_TEST_HOST");
    // Guests run one at a time; the 5 GiB one is populated lazily and touches 512 MiB.
    let b = Batch::new(SCENARIOS, 2048, Duration::from_secs(25 * 60));
    let out = batch::run_all_ok(Path::new(env!("CARGO_BIN_EXE_ebb-scenario")), &b)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.mode, mode);

    // The facts the scenarios rest on.
    let facts = &out.result("smoke-shell").unwrap()["data"];
    assert_eq!(facts["host"], mode.as_str());
    assert_eq!(facts["kvm_api_version"], 12, "{facts}");
    assert_eq!(facts["kvm_pvm"], false, "{facts}");
    if mode == HostMode::Nested {
        assert!(
            facts["kvm_modules"].to_string().contains("kvm_amd"),
            "{facts}"
        );
        assert_eq!(facts["npt_or_ept"], "Y", "{facts}");
    }
    let basic = &out.result("boot-basic").unwrap()["data"];
    assert_eq!(basic["cpus"]["online"], 1, "{basic}");
    assert!(
        basic["boot_protocol"].as_str().unwrap().contains("Long64"),
        "{basic}"
    );
    let elf = &out.result("boot-elf-serial-file").unwrap()["data"];
    assert!(
        elf["boot_protocol"].as_str().unwrap().contains("Pvh"),
        "{elf}"
    );
    let big = &out.result("boot-5g-sigterm").unwrap()["data"];
    assert_eq!(big["exit_status"], 143, "{big}");
    assert!(
        big["ram_map"]["ranges"]
            .to_string()
            .contains("0x100000000-"),
        "no RAM above 4 GiB: {big}"
    );
    let long64 = &out.result("boot-elf-long64").unwrap()["data"];
    assert!(
        long64["boot_protocol"].as_str().unwrap().contains("Long64"),
        "{long64}"
    );
    assert_eq!(
        out.result("boot-triple-fault").unwrap()["data"]["exit_status"],
        2
    );
    let smp = &out.result("boot-smp-reboot").unwrap()["data"];
    assert_eq!(smp["cpus"]["online"], 2, "{smp}");
    assert_eq!(smp["exit_status"], 0, "{smp}");
    eprintln!(
        "TIMINGS mode={} total={:?} l1_boot_to_scenario={:?} scenario={:?}",
        out.mode, out.timings.total, out.timings.l1_boot_to_scenario, out.timings.scenario
    );
}
