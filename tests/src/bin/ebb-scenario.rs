//! Scenario runner: the command the integration tests run through `ebb_tests::testhost`
//! (directly on a KVM host, or inside the nested test host).
//!
//! ```text
//! ebb-scenario [--json] <name> [key=value ...]
//! ebb-scenario [--json] batch <name>[:key=value...] ...   several scenarios, one L1 boot
//! ebb-scenario list
//! ```
//! See [`ebb_tests::scenarios`] for the output format. The families live in
//! `tests/src/scenarios/`; to add one, add its module there and its `SCENARIOS` here.

use std::process::ExitCode;

use ebb_tests::scenarios::{
    self, api, backings, balloon, bench, boot, cli, compaction, disk, hinting, host, hostile,
    policy, reporting, ScenarioDef,
};

/// Every family this runner offers.
const FAMILIES: &[&[ScenarioDef]] = &[
    host::SCENARIOS,
    api::SCENARIOS,
    boot::SCENARIOS,
    cli::SCENARIOS,
    balloon::SCENARIOS,
    reporting::SCENARIOS,
    bench::SCENARIOS,
    hostile::SCENARIOS,
    hinting::SCENARIOS,
    disk::SCENARIOS,
    compaction::SCENARIOS,
    policy::SCENARIOS,
    backings::SCENARIOS,
];

fn main() -> ExitCode {
    scenarios::main(FAMILIES)
}
