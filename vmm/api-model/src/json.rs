//! The JSON shapes of the API. Balloon shapes follow Firecracker's API (same field names
//! and meanings); Ebb's own additions are extra fields a Firecracker client ignores.
//!
//! Every type derives both `Serialize` and `Deserialize`: the server writes them, and
//! `ebb-ctl` and the tests read them back.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::balloon::BalloonConfig;
use crate::units::MIB;

/// Body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// What went wrong.
    pub fault_message: String,
}

/// `PATCH /balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// New target in MiB.
    pub amount_mib: u32,
}

/// `GET /balloon/policy`: the automatic policy's settings and what it last did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyInfo {
    /// The policy sets the balloon target.
    pub enabled: bool,
    /// Memory the guest keeps available beyond the balloon, MiB.
    pub headroom_mib: u64,
    /// Smallest balloon the policy sets, MiB.
    pub min_mib: u64,
    /// Largest balloon the policy sets, MiB.
    pub max_mib: u64,
    /// Largest inflate per decision, MiB.
    pub step_mib: u64,
    /// Major faults per second above which the guest counts as short of memory.
    pub fault_rate_per_s: u64,
    /// Seconds inflating waits after a deflate.
    pub cooldown_s: u64,
    /// Host PSI `some avg10` (percent) above which inflating is faster.
    pub host_pressure_pct: f64,
    /// Whether a quiet guest's cache is trimmed.
    pub trim: bool,
    /// The latest decision (`null` before the first statistics report).
    pub last_decision: Option<PolicyDecision>,
    /// Decisions so far, per reason.
    pub decisions: std::collections::BTreeMap<String, u64>,
}

/// One decision of the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDecision {
    /// The target it set, MiB.
    pub target_mib: u64,
    /// Why (`inflate_idle`, `deflate_low_available`, `steady`, ...).
    pub reason: String,
    /// Milliseconds since.
    pub age_ms: u64,
}

/// `PATCH /balloon/policy`: any of the fields; those left out keep their value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyUpdate {
    /// Turn the policy on or off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// New headroom, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headroom_mib: Option<u64>,
    /// New smallest balloon, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_mib: Option<u64>,
    /// New largest balloon, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mib: Option<u64>,
    /// New largest inflate per decision, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_mib: Option<u64>,
    /// New major fault rate (per second) above which the guest counts as short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_rate_per_s: Option<u64>,
    /// New wait after a deflate before inflating again, seconds (at most an hour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_s: Option<u64>,
    /// Trim a quiet guest's cache, or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trim: Option<bool>,
}

/// `PATCH /balloon/statistics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// New statistics interval in seconds (1..=65535).
    pub stats_polling_interval_s: u16,
}

/// A body that must be empty or `{}` (`PUT /vm/shutdown`, `PUT /vm/stop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyBody {}

/// `GET /balloon` (and `balloon` in `GET /vm`): the balloon's configuration as it is now
/// and the size the guest reports.
///
/// On the wire this is Firecracker's `Balloon` plus reporting and the current sizes, all
/// sizes in whole MiB (rounded down): `amount_mib`, `deflate_on_oom`,
/// `stats_polling_interval_s`, `free_page_reporting`, `target_mib` (same as
/// `amount_mib`), `actual_mib`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "BalloonWire", into = "BalloonWire")]
pub struct BalloonInfo {
    /// The configuration now: `size` is the current target (what `PATCH /balloon` last
    /// set, or the boot size), `stats_interval_s` the current statistics interval (0 when
    /// statistics were disabled at boot).
    pub config: BalloonConfig,
    /// Balloon size the guest reports, in bytes.
    pub actual_bytes: u64,
}

impl BalloonInfo {
    /// Target balloon size in whole MiB.
    pub fn target_mib(&self) -> u32 {
        mib(self.config.size)
    }

    /// Balloon size the guest reports, in whole MiB.
    pub fn actual_mib(&self) -> u32 {
        mib(self.actual_bytes)
    }
}

fn mib(bytes: u64) -> u32 {
    u32::try_from(bytes / MIB).unwrap_or(u32::MAX)
}

/// [`BalloonInfo`] as it travels.
#[derive(Serialize, Deserialize)]
struct BalloonWire {
    amount_mib: u32,
    deflate_on_oom: bool,
    stats_polling_interval_s: u32,
    free_page_reporting: bool,
    target_mib: u32,
    actual_mib: u32,
    #[serde(default)]
    free_page_hinting: bool,
    #[serde(default = "default_true")]
    deflate_prefault: bool,
}

fn default_true() -> bool {
    true
}

impl From<BalloonInfo> for BalloonWire {
    fn from(b: BalloonInfo) -> Self {
        Self {
            amount_mib: b.target_mib(),
            deflate_on_oom: b.config.deflate_on_oom,
            stats_polling_interval_s: b.config.stats_interval_s,
            free_page_reporting: b.config.free_page_reporting,
            target_mib: b.target_mib(),
            actual_mib: b.actual_mib(),
            free_page_hinting: b.config.free_page_hinting,
            deflate_prefault: b.config.deflate_prefault,
        }
    }
}

impl From<BalloonWire> for BalloonInfo {
    fn from(w: BalloonWire) -> Self {
        Self {
            config: BalloonConfig {
                size: u64::from(w.amount_mib) * MIB,
                deflate_on_oom: w.deflate_on_oom,
                free_page_reporting: w.free_page_reporting,
                stats_interval_s: w.stats_polling_interval_s,
                free_page_hinting: w.free_page_hinting,
                deflate_prefault: w.deflate_prefault,
                policy: Default::default(),
            },
            actual_bytes: u64::from(w.actual_mib) * MIB,
        }
    }
}

/// Report latency figures from the balloon's histogram (power-of-two buckets: a
/// quantile is the upper edge of the bucket holding it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Sum of all samples in microseconds.
    pub sum_us: u64,
    /// Median, microseconds (`null` without samples).
    pub p50_us: Option<u64>,
    /// 99th percentile, microseconds (`null` without samples).
    pub p99_us: Option<u64>,
}

/// Rejected guest input, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejects {
    /// Page numbers outside guest RAM.
    pub pfns: u64,
    /// Malformed descriptors or chains.
    pub descriptors: u64,
    /// Bad writes to the configuration space.
    pub config_writes: u64,
    /// Invalid free page report ranges.
    pub report_ranges: u64,
}

/// Ebb's own balloon counters (the `ebb` object of `GET /balloon/statistics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EbbBalloonStats {
    /// The guest driver is running (DRIVER_OK).
    pub driver_ready: bool,
    /// Statistics reports received from the guest.
    pub stats_updates: u64,
    /// Milliseconds since the latest statistics report (`null` before the first).
    pub stats_age_ms: Option<u64>,
    /// Pages received on the inflate queue.
    pub inflated_pages: u64,
    /// Pages received on the deflate queue.
    pub deflated_pages: u64,
    /// Pages the guest took back below the target without being asked (deflate-on-OOM).
    pub oom_deflated_pages: u64,
    /// Bytes of deflated pages backed on the host before the guest got them back.
    #[serde(default)]
    pub prefaulted_bytes: u64,
    /// Backing deflated pages that failed.
    #[serde(default)]
    pub prefault_failures: u64,
    /// Bytes discarded for inflated pages.
    pub inflate_discarded_bytes: u64,
    /// Free page reports received.
    pub reports: u64,
    /// Ranges in those reports.
    pub reported_ranges: u64,
    /// Bytes the guest reported free.
    pub reported_bytes: u64,
    /// Reported bytes given back to the host.
    pub reported_discarded_bytes: u64,
    /// Reported bytes kept because the guest poisons free pages.
    pub reported_skipped_bytes: u64,
    /// Reported or hinted bytes kept because they do not cover a whole page of the
    /// memory backing (parts of a 2 MiB huge page with `backing=hugetlb`).
    #[serde(default)]
    pub unaligned_kept_bytes: u64,
    /// All bytes given back to the host (inflate + reporting).
    pub discarded_bytes: u64,
    /// `madvise` calls made.
    pub madvise_calls: u64,
    /// `madvise` calls that failed.
    pub madvise_failures: u64,
    /// Rejected guest input.
    pub rejects: Rejects,
    /// Time from noticing a free page report to returning it to the guest.
    pub report_latency: LatencySummary,
    /// Free page hinting, all runs together.
    #[serde(default)]
    pub hinting: HintCounters,
}

/// Free page hinting counters (the `hinting` object of Ebb's balloon counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintCounters {
    /// Runs the guest finished.
    pub runs: u64,
    /// Blocks hinted during runs.
    pub blocks: u64,
    /// Bytes in them.
    pub hinted_bytes: u64,
    /// Hinted bytes given back to the host.
    pub discarded_bytes: u64,
    /// Hinted bytes kept because the guest wrote them again.
    pub kept_bytes: u64,
    /// Blocks and command ids that came outside their run.
    pub stale: u64,
    /// Milliseconds the host spent checking and discarding hinted blocks.
    #[serde(default)]
    pub host_ms: u64,
}

/// `PATCH /balloon/hinting/start` (Firecracker's `BalloonStartCmd`): an empty body
/// means `acknowledge_on_stop: true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HintStart {
    /// Say DONE as soon as the guest has handed over its free memory, so that it gets
    /// its blocks back at once.
    #[serde(default = "yes")]
    pub acknowledge_on_stop: bool,
}

impl Default for HintStart {
    fn default() -> Self {
        Self {
            acknowledge_on_stop: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// `GET /balloon/hinting/status`: Firecracker's `BalloonHintingStatus` (`host_cmd`,
/// `guest_cmd`) plus where the run is and what it did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintStatus {
    /// The last command id the host wrote (0 stop, 1 done, 2 and up a run).
    pub host_cmd: u32,
    /// The last command id the guest sent (`null` before any).
    pub guest_cmd: Option<u32>,
    /// `idle`, `requested`, `running`, `stopped` (the guest is done and holds its
    /// blocks) or `done` (the host said done).
    #[serde(default)]
    pub state: String,
    /// The run's command id.
    #[serde(default)]
    pub run_cmd: u32,
    /// Blocks hinted in this run.
    #[serde(default)]
    pub blocks: u64,
    /// Bytes hinted in this run.
    #[serde(default)]
    pub hinted_bytes: u64,
    /// Bytes given back to the host in this run.
    #[serde(default)]
    pub discarded_bytes: u64,
    /// Bytes kept in this run (the guest wrote them again).
    #[serde(default)]
    pub kept_bytes: u64,
    /// Milliseconds from the start request to the guest's stop (`null` while running).
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// Milliseconds the host spent checking and discarding this run's blocks.
    #[serde(default)]
    pub host_ms: u64,
}

/// `GET /balloon/statistics`: Firecracker's `BalloonStats` plus Ebb's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatistics {
    /// Target in 4 KiB pages.
    pub target_pages: u32,
    /// Pages the guest holds in the balloon.
    pub actual_pages: u32,
    /// Target in MiB.
    pub target_mib: u32,
    /// Balloon size in MiB.
    pub actual_mib: u32,
    /// Memory swapped in, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    /// Memory swapped out, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    /// Major page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Free memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// Total memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// Available memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    /// Disk caches, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    /// Successful hugetlb allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    /// OOM kills (Linux 6.12+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    /// Allocation stalls (Linux 6.12+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_stall: Option<u64>,
    /// Asynchronous scans (Linux 6.12+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_scan: Option<u64>,
    /// Direct scans (Linux 6.12+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_scan: Option<u64>,
    /// Asynchronous reclaims (Linux 6.12+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_reclaim: Option<u64>,
    /// Direct reclaims (Linux 6.12+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_reclaim: Option<u64>,
    /// Ebb's own counters.
    pub ebb: EbbBalloonStats,
}

/// Where the VM is in its life, as far as the API can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The guest runs.
    Running,
    /// The power button was pressed; the guest has not powered off yet.
    ShuttingDown,
    /// The VMM is stopping (power-off, reset, signal or stop request).
    Stopping,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::ShuttingDown => "shutting down",
            VmState::Stopping => "stopping",
        })
    }
}

/// Host memory figures of `GET /vm`, bytes (`null` when procfs could not be read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RssInfo {
    /// Resident guest RAM: the guest RAM mapping's `Rss` in `/proc/PID/smaps`, plus its
    /// hugetlb pages (`Shared_Hugetlb`, `Private_Hugetlb`), which `Rss` leaves out.
    pub guest_ram_bytes: Option<u64>,
    /// Resident memory of the VMM itself: process RSS minus guest RAM RSS.
    pub vmm_bytes: Option<u64>,
    /// Resident memory of the whole process (`VmRSS`).
    pub process_bytes: Option<u64>,
}

/// A disk in `GET /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The image's path, as given.
    pub path: String,
    /// The disk's ID (its serial number in the guest; the `disk` label in /metrics).
    pub id: String,
    /// Attached read-only.
    pub readonly: bool,
    /// Size in bytes (512-byte sectors times 512).
    pub capacity_bytes: u64,
    /// The guest's driver has set the disk up (DRIVER_OK).
    pub driver_ready: bool,
}

fn default_backing() -> String {
    "anon".into()
}

/// `GET /vm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// `running`, `shutting_down` (power button pressed) or `stopping`.
    pub state: VmState,
    /// Ebb's version.
    pub version: String,
    /// The VMM's process id.
    pub pid: u32,
    /// Seconds since the VM was built.
    pub uptime_s: f64,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// What holds guest RAM: `anon`, `memfd` or `hugetlb` (`--memory ...,backing=`).
    #[serde(default = "default_backing")]
    pub memory_backing: String,
    /// Kernel image path.
    pub kernel: String,
    /// Initramfs path.
    pub initramfs: Option<String>,
    /// Kernel command line as given (without the devices Ebb appends).
    pub cmdline: String,
    /// The balloon's configuration, `null` without a balloon.
    pub balloon: Option<BalloonInfo>,
    /// The disks, in command-line order (the guest's vda, vdb, ...).
    #[serde(default)]
    pub disks: Vec<DiskInfo>,
    /// Host memory use.
    pub rss: RssInfo,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn balloon_info_has_firecrackers_shape_in_whole_mib() {
        let info = BalloonInfo {
            config: BalloonConfig {
                size: 100 * MIB + 3 * 4096,
                deflate_on_oom: true,
                free_page_reporting: false,
                stats_interval_s: 2,
                free_page_hinting: false,
                deflate_prefault: true,
                policy: Default::default(),
            },
            actual_bytes: 50 * MIB,
        };
        assert_eq!((info.target_mib(), info.actual_mib()), (100, 50));
        let v = serde_json::to_value(info).unwrap();
        assert_eq!(
            v,
            json!({
                "amount_mib": 100,
                "deflate_on_oom": true,
                "stats_polling_interval_s": 2,
                "free_page_reporting": false,
                "target_mib": 100,
                "actual_mib": 50,
                "free_page_hinting": false,
                "deflate_prefault": true,
            })
        );
        // Field order is the wire order (ebb-ctl --json prints the body as it came).
        let text = serde_json::to_string(&info).unwrap();
        assert!(
            text.starts_with(r#"{"amount_mib":100,"deflate_on_oom":true,"#),
            "{text}"
        );
        let back: BalloonInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back.config.size, 100 * MIB);
        assert_eq!(back.config.stats_interval_s, 2);
        assert_eq!(back.actual_bytes, 50 * MIB);
    }

    #[test]
    fn hinting_bodies_match_firecrackers() {
        // An empty start body acknowledges on stop; unknown fields are refused.
        assert!(HintStart::default().acknowledge_on_stop);
        let s: HintStart = serde_json::from_str(r#"{"acknowledge_on_stop":false}"#).unwrap();
        assert!(!s.acknowledge_on_stop);
        assert!(
            serde_json::from_str::<HintStart>("{}")
                .unwrap()
                .acknowledge_on_stop
        );
        assert!(serde_json::from_str::<HintStart>(r#"{"ack":true}"#).is_err());
        // Firecracker's status fields, with guest_cmd null before the guest said anything.
        let st: HintStatus = serde_json::from_str(r#"{"host_cmd":2,"guest_cmd":null}"#).unwrap();
        assert_eq!((st.host_cmd, st.guest_cmd), (2, None));
    }

    #[test]
    fn updates_reject_unknown_fields_and_bad_values() {
        assert!(serde_json::from_str::<BalloonUpdate>(r#"{"amount_mib":1}"#).is_ok());
        for bad in [
            r#"{"amount_mib":1,"x":2}"#,
            r#"{"amount_mib":-1}"#,
            r#"{"amount_mib":"1"}"#,
            r#"{"amount_mib":1.5}"#,
            r#"{"amount_mib":4294967296}"#,
            r#"{}"#,
        ] {
            assert!(serde_json::from_str::<BalloonUpdate>(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<BalloonStatsUpdate>(
            r#"{"stats_polling_interval_s":70000}"#
        )
        .is_err());
        assert!(serde_json::from_str::<EmptyBody>("{}").is_ok());
        assert!(serde_json::from_str::<EmptyBody>(r#"{"a":1}"#).is_err());
    }

    #[test]
    fn vm_states_are_snake_case() {
        assert_eq!(
            serde_json::to_value(VmState::ShuttingDown).unwrap(),
            "shutting_down"
        );
        assert_eq!(VmState::ShuttingDown.to_string(), "shutting down");
    }
}
