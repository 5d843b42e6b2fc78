//! Ebb's API model: what the VMM's REST server and its clients (`ebb-ctl`, the tests)
//! share, with no VMM, HTTP or async code in it.
//!
//! - [`json`]: the request and response bodies of the API (serde).
//! - [`balloon`]: [`BalloonConfig`], the balloon's configuration, with the `--balloon`
//!   command-line syntax ([`std::str::FromStr`] and [`std::fmt::Display`]).
//! - [`disk`]: [`DiskConfig`], a disk's configuration, with the `--disk` syntax.
//! - [`units`]: sizes: units, parsing (`512M`, `1.5G`) and display.
//! - [`options`]: `key=value,...` option lists and their [`ParseError`].
//! - [`OPENAPI_YAML`]: the OpenAPI document describing the API.

pub mod balloon;
pub mod disk;
pub mod json;
pub mod options;
pub mod units;

pub use balloon::{BalloonConfig, PolicyConfig, MAX_POLICY_COOLDOWN_S};
pub use disk::DiskConfig;
pub use json::{
    BalloonInfo, BalloonStatistics, BalloonStatsUpdate, BalloonUpdate, DiskInfo, EbbBalloonStats,
    EmptyBody, Fault, HintCounters, HintStart, HintStatus, LatencySummary, PolicyDecision,
    PolicyInfo, PolicyUpdate, Rejects, RssInfo, VmInfo, VmState,
};
pub use options::ParseError;

/// The OpenAPI 3 document of the API (`vmm/api-model/openapi.yaml`).
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");

#[cfg(test)]
mod tests {
    #[test]
    fn openapi_document_parses() {
        let doc: serde_yaml::Value = serde_yaml::from_str(super::OPENAPI_YAML).unwrap();
        assert_eq!(doc["openapi"].as_str(), Some("3.0.3"));
        assert!(doc["paths"]["/balloon"].is_mapping());
    }
}
