//! What the API layer needs from a VM: the [`VmBackend`] trait, the snapshots it returns,
//! and [`ApiError`], the error every request can end in.
//!
//! The real VM implements the trait in [`super::vm_backend`]; tests implement it with a
//! fake. Every method runs on the VMM's event-loop thread (see [`super::dispatch`]), so an
//! implementation may touch device state directly but must not block.

use std::fmt;
use std::time::Duration;

pub use ebb_api_model::VmState;
use ebb_balloon::counters::BalloonCounters;
use ebb_balloon::policy::{PolicySettings, PolicyView};
use ebb_balloon::stats::GuestStats;
use ebb_balloon::{BalloonOptions, HintControl};
use ebb_block::counters::BlockCounters;

/// An API error: an HTTP status and the message sent as `{"fault_message": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// What went wrong, for a person.
    pub message: String,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// 400: the request is malformed or its values are out of range.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// 404: no such resource.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, message)
    }

    /// 405: the resource exists but not with this method.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, message)
    }

    /// 408: the client took too long to send the request.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(408, message)
    }

    /// 409: the request does not fit the VM's configuration (e.g. no balloon).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }

    /// 413: the body is larger than the API accepts.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(413, message)
    }

    /// 500: Ebb failed to do something it should be able to do.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }

    /// 503: the VMM cannot answer now (stopping, busy, or overloaded).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, message)
    }

    /// The error every balloon endpoint returns on a VM without a balloon.
    pub fn no_balloon() -> Self {
        Self::conflict("the VM has no balloon device (start ebb with --balloon)")
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ApiError {}

/// The balloon as the API sees it at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct BalloonSnapshot {
    /// How the device was configured at boot.
    pub options: BalloonOptions,
    /// Guest RAM in bytes (the largest possible target).
    pub guest_memory_bytes: u64,
    /// Target in 4 KiB pages (host-set).
    pub target_pages: u32,
    /// Pages the guest says it holds.
    pub actual_pages: u32,
    /// Current statistics interval in seconds (0 = statistics off).
    pub stats_interval_s: u32,
    /// The guest driver has set DRIVER_OK.
    pub driver_ready: bool,
    /// What the device did.
    pub counters: BalloonCounters,
    /// The latest statistics report.
    pub stats: Option<GuestStats>,
    /// Free page hinting: command ids and the current run.
    pub hint: HintControl,
    /// The automatic policy (`None` without a statistics queue, which it needs).
    pub policy: Option<PolicyView>,
}

impl BalloonSnapshot {
    /// True when the statistics queue exists (statistics were enabled at boot).
    pub fn stats_enabled(&self) -> bool {
        self.options.stats_interval_s > 0
    }

    /// True when free page hinting was enabled at boot.
    pub fn hinting_enabled(&self) -> bool {
        self.options.free_page_hinting
    }
}

/// A disk as the API sees it at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSnapshot {
    /// The image's path.
    pub path: String,
    /// The disk's ID.
    pub id: String,
    /// Attached read-only.
    pub readonly: bool,
    /// Size in bytes.
    pub capacity_bytes: u64,
    /// The guest driver has set DRIVER_OK.
    pub driver_ready: bool,
    /// What the device did.
    pub counters: BlockCounters,
}

/// Static and slowly changing facts about the VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSummary {
    /// Life-cycle state.
    pub state: VmState,
    /// Time since the VM was built.
    pub uptime: Duration,
    /// vCPU count.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// What holds guest RAM (`anon`, `memfd`, `hugetlb`).
    pub memory_backing: &'static str,
    /// Kernel image path.
    pub kernel: String,
    /// Initramfs path.
    pub initramfs: Option<String>,
    /// Kernel command line as given by the user.
    pub cmdline: String,
    /// The VMM's process id.
    pub pid: u32,
}

/// Host memory use, in bytes; `None` when procfs could not be read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Resident size of the guest RAM mapping.
    pub guest_ram_rss: Option<u64>,
    /// Resident size of the whole VMM process.
    pub process_rss: Option<u64>,
}

impl MemoryUsage {
    /// Resident memory of the VMM itself: the process minus guest RAM.
    pub fn vmm_rss(&self) -> Option<u64> {
        Some(self.process_rss?.saturating_sub(self.guest_ram_rss?))
    }
}

/// The VM as the API layer drives it. Implemented by the live VM and by test fakes.
pub trait VmBackend: Send {
    /// State, uptime and configuration.
    fn summary(&self) -> VmSummary;
    /// Host memory use (reads procfs: call only when the figures are wanted).
    fn memory_usage(&self) -> MemoryUsage;
    /// The balloon, or `None` when the VM has none.
    fn balloon(&self) -> Option<BalloonSnapshot>;
    /// The disks, in command-line order.
    fn disks(&self) -> Vec<DiskSnapshot>;
    /// Sets the balloon target in 4 KiB pages and tells the guest. The caller has
    /// checked that a balloon exists and that `pages` fits guest memory.
    fn set_balloon_target(&mut self, pages: u64) -> Result<(), ApiError>;
    /// Changes the statistics interval. The caller has checked that statistics were
    /// enabled at boot and that `secs` is not zero.
    fn set_balloon_stats_interval(&mut self, secs: u32) -> Result<(), ApiError>;
    /// Asks the guest for a free page hinting run; returns its command id. The caller
    /// has checked that hinting was enabled at boot.
    fn start_hinting(&mut self, acknowledge_on_stop: bool) -> Result<u32, ApiError> {
        let _ = acknowledge_on_stop;
        Err(ApiError::bad_request("free page hinting is not available"))
    }
    /// Tells the guest the host is done with its hinted pages.
    fn stop_hinting(&mut self) -> Result<(), ApiError> {
        Err(ApiError::bad_request("free page hinting is not available"))
    }
    /// Gives the automatic policy `settings` and turns it on or off. The caller has
    /// checked that the balloon has a policy and that the settings fit guest memory.
    fn set_balloon_policy(
        &mut self,
        settings: PolicySettings,
        enabled: bool,
    ) -> Result<(), ApiError> {
        let _ = (settings, enabled);
        Err(ApiError::bad_request("the balloon policy is not available"))
    }
    /// Presses the ACPI power button.
    fn press_power_button(&mut self) -> Result<(), ApiError>;
    /// Stops the VM now, with `reason` as the exit message.
    fn stop(&mut self, reason: &str);
}
