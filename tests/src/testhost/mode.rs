//! Where jobs run: directly on this machine (ordinary KVM) or in the nested test host.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Error, ENV_TEST_HOST};

/// Where scenarios run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostMode {
    /// On this machine (ordinary KVM).
    Direct,
    /// In the nested emulated test host (QEMU TCG + emulated SVM).
    Nested,
}

impl HostMode {
    pub fn as_str(self) -> &'static str {
        match self {
            HostMode::Direct => "direct",
            HostMode::Nested => "nested",
        }
    }

    /// The mode to use: `EBB_TEST_HOST` when set, else what [`HostMode::probe`] finds.
    pub fn detect() -> Result<HostMode, Error> {
        match std::env::var(ENV_TEST_HOST) {
            Ok(v) if !v.is_empty() => v.parse(),
            _ => Ok(Self::probe().0),
        }
    }

    /// What this machine needs, ignoring the override, with the reason.
    pub fn probe() -> (HostMode, String) {
        if Path::new("/sys/module/kvm_pvm").exists() {
            return (
                HostMode::Nested,
                "kvm_pvm is loaded: /dev/kvm is PVM and cannot boot a stock Linux kernel".into(),
            );
        }
        if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            return (HostMode::Nested, format!("/dev/kvm is not usable: {e}"));
        }
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let has_flag = |flag: &str| {
            cpuinfo
                .lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|w| w == flag))
        };
        if !has_flag("svm") && !has_flag("vmx") {
            return (
                HostMode::Nested,
                "/proc/cpuinfo has no svm/vmx flag: no hardware virtualization".into(),
            );
        }
        (
            HostMode::Direct,
            "/dev/kvm is usable and the CPU has hardware virtualization".into(),
        )
    }
}

impl fmt::Display for HostMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for HostMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "direct" => Ok(HostMode::Direct),
            "nested" => Ok(HostMode::Nested),
            other => Err(Error::Setup(format!(
                "{ENV_TEST_HOST}={other}: expected `direct` or `nested`"
            ))),
        }
    }
}
