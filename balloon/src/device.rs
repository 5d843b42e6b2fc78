//! The virtio-balloon device: configuration space, features, and which queue is which
//! (decided once, when the driver activates the device). The queues' work lives in
//! [`crate::queues`].

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ebb_devices::faults::{self, GuestFault};
use ebb_devices::ram::GuestRam;
use ebb_devices::virtio::{
    Activation, ActivationError, InterruptKind, QueueWork, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::Queue;
use vmm_sys_util::timerfd::TimerFd;

use crate::counters::BalloonCounters;
use crate::pages::PageSet;
use crate::policy::{AutoPolicy, HostPressure, Observation, PolicyView, Reason};
use crate::protocol::{
    self, config, max_queue_size, queue_roles, QueueRole, BALLOON_PAGE_SIZE, F_DEFLATE_ON_OOM,
    F_FREE_PAGE_HINT, F_PAGE_POISON, F_PAGE_REPORTING, F_STATS_VQ,
};
use crate::queues::hinting::{self, HintControl, HintDiscard};
use crate::queues::inflate::{self, Prefault};
use crate::queues::reporting::{ReportedPages, ReportingQueue};
use crate::queues::statistics::StatsQueue;
use crate::queues::{self, notify, PASS_TIME_LIMIT};
use crate::stats::GuestStats;

/// Event id of the statistics timer.
const STATS_TIMER_EVENT: u32 = 0;

/// How often statistics are asked for while the policy sees the guest short of memory
/// (it deflated for need and is in the cooldown after, or the guest deflated below the
/// target on OOM): a guest allocating fast would otherwise wait a whole interval for each
/// deflate. At most four small reports a second, and only while the policy is on.
pub const SHORT_STATS_INTERVAL: Duration = Duration::from_millis(250);

/// How the balloon is configured at VM start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonOptions {
    /// Initial target in 4 KiB pages.
    pub target_pages: u32,
    /// Offer DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Offer PAGE_REPORTING (and PAGE_POISON with it).
    pub free_page_reporting: bool,
    /// Seconds between statistics requests; 0 leaves the statistics queue out.
    pub stats_interval_s: u32,
    /// Offer FREE_PAGE_HINT.
    pub free_page_hinting: bool,
    /// How hinted blocks are discarded ([`HintDiscard::Checked`] needs guest RAM with a
    /// write fence).
    pub hint_discard: HintDiscard,
    /// Back pages on the host before a guest that is short of memory gets them back from
    /// the balloon (see [`inflate::Prefault`]).
    pub deflate_prefault: bool,
}

/// Errors from host-side requests.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonError {
    /// The target exceeds guest memory.
    #[error("balloon target of {requested} pages exceeds guest memory ({available} pages)")]
    TargetTooLarge {
        /// Requested pages.
        requested: u64,
        /// Guest RAM pages.
        available: u64,
    },
    /// Statistics were not enabled at boot, so the queue does not exist.
    #[error(
        "balloon statistics were disabled at boot (stats_interval=0); they cannot be turned on now"
    )]
    StatsDisabled,
    /// The statistics interval could not be changed.
    #[error("cannot change the statistics interval: {0}")]
    Timer(String),
    /// Free page hinting was not enabled at boot.
    #[error(
        "free page hinting was not enabled at boot (start ebb with --balloon \
         ...,free_page_hinting=on)"
    )]
    HintingDisabled,
    /// Checked hinting needs guest RAM registered for write protection.
    #[error("free page hinting needs guest RAM with a write fence")]
    NoWriteFence,
}

/// The device once the driver is ready: guest RAM, the negotiated features, and each
/// queue under its role.
struct Active {
    ram: GuestRam,
    negotiated: u64,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// The role of each queue index the transport numbers, for kicks.
    roles: Vec<Option<QueueRole>>,
    inflate: Queue,
    deflate: Queue,
    statistics: Option<StatsQueue>,
    hinting: Option<Queue>,
    reporting: Option<ReportingQueue>,
}

impl Active {
    /// Sorts the driver's queues by role, as the negotiated features number them.
    fn new(activation: Activation) -> Result<Self, ActivationError> {
        let roles_by_index = queue_roles(activation.features);
        let mut roles = Vec::new();
        let (mut inflate, mut deflate, mut statistics, mut hinting, mut reporting) =
            (None, None, None, None, None);
        for q in activation.queues {
            let index = usize::from(q.index);
            let Some(&role) = roles_by_index.get(index) else {
                faults::record(GuestFault::QueueSetup, || {
                    format!(
                        "balloon: the driver set up queue {index} which its features do not use"
                    )
                });
                continue;
            };
            let slot = match role {
                QueueRole::Inflate => &mut inflate,
                QueueRole::Deflate => &mut deflate,
                QueueRole::Stats => &mut statistics,
                QueueRole::Reporting => &mut reporting,
                QueueRole::FreePageHint => &mut hinting,
            };
            *slot = Some(q.queue);
            if roles.len() <= index {
                roles.resize(index + 1, None);
            }
            roles[index] = Some(role);
        }
        let missing = |role| ActivationError(format!("the {role:?} queue is missing"));
        let inflate = inflate.ok_or_else(|| missing(QueueRole::Inflate))?;
        let deflate = deflate.ok_or_else(|| missing(QueueRole::Deflate))?;
        for (role, feature, present) in [
            (QueueRole::Stats, F_STATS_VQ, statistics.is_some()),
            (QueueRole::Reporting, F_PAGE_REPORTING, reporting.is_some()),
            (QueueRole::FreePageHint, F_FREE_PAGE_HINT, hinting.is_some()),
        ] {
            if activation.features & feature != 0 && !present {
                faults::record(GuestFault::QueueSetup, || {
                    format!("balloon: {role:?} negotiated but its queue was not set up")
                });
            }
        }
        Ok(Self {
            ram: activation.ram,
            negotiated: activation.features,
            interrupt: activation.interrupt,
            roles,
            inflate,
            deflate,
            statistics: statistics.map(StatsQueue::new),
            hinting,
            reporting: reporting.map(ReportingQueue::new),
        })
    }

    fn role_of(&self, index: u16) -> Option<QueueRole> {
        self.roles.get(usize::from(index)).copied().flatten()
    }
}

/// A virtio-balloon device.
pub struct Balloon {
    options: BalloonOptions,
    /// Features offered to the driver.
    offered: u64,
    ram_pages: u64,
    target_pages: u32,
    actual_pages: u32,
    poison_val: u32,
    active: Option<Active>,
    /// Pages in the balloon, from inflate and deflate traffic.
    held: PageSet,
    counters: BalloonCounters,
    stats: Option<GuestStats>,
    stats_interval_s: u32,
    stats_timer: TimerFd,
    /// Statistics are asked for every [`SHORT_STATS_INTERVAL`] (the guest is short).
    short_stats: bool,
    /// `oom_deflated_pages` at the policy's last decision.
    oom_deflated_at_decision: u64,
    poison_warned: bool,
    hint: HintControl,
    /// How long one pass over a queue may run (see [`PASS_TIME_LIMIT`]).
    pass_time_limit: Duration,
    /// The automatic policy, when configured (on or off).
    policy: Option<AutoPolicy>,
    /// Where the policy reads the host's memory pressure.
    host_pressure: Option<Box<dyn HostPressure>>,
    /// The policy's clock starts here.
    created: Instant,
    /// Which deflated pages are backed on the host before the guest gets them.
    prefault: Prefault,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("options", &self.options)
            .field("target_pages", &self.target_pages)
            .field("actual_pages", &self.actual_pages)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl Balloon {
    /// A balloon for the guest whose RAM is `ram`.
    pub fn new(options: BalloonOptions, ram: &GuestRam) -> Result<Self, BalloonError> {
        let ram_pages = ram.size() / BALLOON_PAGE_SIZE;
        if u64::from(options.target_pages) > ram_pages {
            return Err(BalloonError::TargetTooLarge {
                requested: options.target_pages.into(),
                available: ram_pages,
            });
        }
        let mut offered = VIRTIO_F_VERSION_1;
        if options.stats_interval_s > 0 {
            offered |= F_STATS_VQ;
        }
        if options.deflate_on_oom {
            offered |= F_DEFLATE_ON_OOM;
        }
        if options.free_page_reporting {
            // PAGE_POISON lets guests that poison or zero freed pages keep reporting.
            offered |= F_PAGE_REPORTING | F_PAGE_POISON;
        }
        if options.free_page_hinting {
            if options.hint_discard == HintDiscard::Checked && !ram.has_write_fence() {
                return Err(BalloonError::NoWriteFence);
            }
            offered |= F_FREE_PAGE_HINT;
        }
        let stats_timer = TimerFd::new().map_err(|e| BalloonError::Timer(e.to_string()))?;
        // SAFETY: setting O_NONBLOCK on a descriptor this struct owns.
        unsafe {
            let fd = stats_timer.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        let ram_end = ram
            .slots()
            .iter()
            .map(|(gpa, len, _)| gpa.0 + len)
            .max()
            .unwrap_or(0);
        Ok(Self {
            options,
            offered,
            ram_pages,
            target_pages: options.target_pages,
            actual_pages: 0,
            poison_val: 0,
            active: None,
            held: PageSet::new(ram_end),
            counters: BalloonCounters::default(),
            stats: None,
            stats_interval_s: options.stats_interval_s,
            stats_timer,
            short_stats: false,
            oom_deflated_at_decision: 0,
            poison_warned: false,
            hint: HintControl::default(),
            pass_time_limit: PASS_TIME_LIMIT,
            policy: None,
            host_pressure: None,
            created: Instant::now(),
            prefault: Prefault {
                enabled: options.deflate_prefault,
                ..Prefault::default()
            },
        })
    }

    /// Hands the target to `policy` (which decides at each statistics report while it
    /// is enabled), reading the host's pressure from `host_pressure`. Needs the
    /// statistics queue.
    pub fn set_policy(
        &mut self,
        policy: AutoPolicy,
        host_pressure: Option<Box<dyn HostPressure>>,
    ) -> Result<(), BalloonError> {
        if self.offered & F_STATS_VQ == 0 {
            return Err(BalloonError::StatsDisabled);
        }
        self.policy = Some(policy);
        self.host_pressure = host_pressure;
        Ok(())
    }

    /// The automatic policy, when one was configured.
    pub fn policy(&self) -> Option<&AutoPolicy> {
        self.policy.as_ref()
    }

    /// The automatic policy as the API shows it.
    pub fn policy_view(&self) -> Option<PolicyView> {
        let now = self.created.elapsed();
        self.policy.as_ref().map(|p| p.view(now))
    }

    /// The automatic policy, to change its settings or turn it on or off.
    pub fn policy_mut(&mut self) -> Option<&mut AutoPolicy> {
        self.policy.as_mut()
    }

    /// Lets the policy set the target from the statistics just received.
    fn apply_policy(&mut self) {
        let Some(policy) = self.policy.as_mut().filter(|p| p.enabled()) else {
            // Deflates while the policy is off are not news when it is turned on.
            self.oom_deflated_at_decision = self.counters.oom_deflated_pages;
            self.set_short_stats(false);
            return;
        };
        let Some(stats) = self.stats.as_ref() else {
            return;
        };
        let observation = Observation {
            at: self.created.elapsed(),
            target: u64::from(self.target_pages) * BALLOON_PAGE_SIZE,
            actual: u64::from(self.actual_pages) * BALLOON_PAGE_SIZE,
            oom_deflated: (self.counters.oom_deflated_pages - self.oom_deflated_at_decision)
                * BALLOON_PAGE_SIZE,
            available: stats.available_memory,
            free: stats.free_memory,
            caches: stats.disk_caches,
            major_faults: stats.major_faults,
            minor_faults: stats.minor_faults,
            oom_kills: stats.oom_kills,
            alloc_stalls: stats.alloc_stalls,
            host_pressure: self
                .host_pressure
                .as_mut()
                .and_then(|p| p.memory_some_avg10()),
        };
        let decision = policy.decide(observation);
        let headroom = policy.settings().headroom / BALLOON_PAGE_SIZE;
        self.oom_deflated_at_decision = self.counters.oom_deflated_pages;
        // Not while the guest catches up with a larger target: that is no shortage.
        self.set_short_stats(
            decision.reason.deflates_for_need()
                || decision.reason == Reason::Cooldown
                || observation.oom_deflated > 0,
        );
        let pages = decision.target / BALLOON_PAGE_SIZE;
        tracing::debug!(
            "balloon policy: {} -> {} MiB ({}; available {:?} MiB, free {:?} MiB, \
             caches {:?} MiB, actual {} MiB, major faults {:?}, host pressure {:?})",
            observation.target >> 20,
            decision.target >> 20,
            decision.reason,
            observation.available.map(|a| a >> 20),
            observation.free.map(|a| a >> 20),
            observation.caches.map(|a| a >> 20),
            observation.actual >> 20,
            observation.major_faults,
            observation.host_pressure,
        );
        if pages != u64::from(self.target_pages) {
            // The policy keeps its target within guest RAM (its max is checked).
            if let Err(e) = self.set_target_pages(pages) {
                tracing::warn!("balloon policy: {e}");
            }
            if decision.reason.deflates_for_need() {
                // The guest needs what it is asked to give back at once, up to about a
                // headroom: a deflate that ends a trim gives back more than that.
                self.prefault.asked_pages = self.held.len().saturating_sub(pages).min(headroom);
            }
        }
    }

    /// Sets how long one pass over a queue may run before it yields (the budgets of
    /// units still apply); tests that count passes lift it.
    pub fn set_pass_time_limit(&mut self, limit: Duration) {
        self.pass_time_limit = limit;
    }

    /// The options the device was created with.
    pub fn options(&self) -> BalloonOptions {
        self.options
    }

    /// Target size in pages (host-set).
    pub fn target_pages(&self) -> u32 {
        self.target_pages
    }

    /// Size in pages the guest reports.
    pub fn actual_pages(&self) -> u32 {
        self.actual_pages
    }

    /// Pages Ebb currently knows to be in the balloon (from inflate/deflate traffic).
    pub fn held_pages(&self) -> u64 {
        self.held.len()
    }

    /// What the device has done so far.
    pub fn counters(&self) -> BalloonCounters {
        self.counters
    }

    /// The latest statistics report, if any.
    pub fn stats(&self) -> Option<&GuestStats> {
        self.stats.as_ref()
    }

    /// Current statistics interval in seconds (0 = off).
    pub fn stats_interval_s(&self) -> u32 {
        self.stats_interval_s
    }

    /// The guest's page poison value (meaningful when PAGE_POISON was negotiated).
    pub fn poison_val(&self) -> u32 {
        self.poison_val
    }

    /// Free page hinting: the host's and the guest's command ids and the current run.
    pub fn hint_status(&self) -> Result<HintControl, BalloonError> {
        if self.offered & F_FREE_PAGE_HINT == 0 {
            return Err(BalloonError::HintingDisabled);
        }
        Ok(self.hint)
    }

    /// Asks the guest for a hinting run; with `acknowledge_on_stop` the host says DONE
    /// as soon as the guest stops. Returns the run's command id.
    pub fn start_hinting(&mut self, acknowledge_on_stop: bool) -> Result<u32, BalloonError> {
        if self.offered & F_FREE_PAGE_HINT == 0 {
            return Err(BalloonError::HintingDisabled);
        }
        let id = self.hint.start(acknowledge_on_stop, Instant::now());
        self.config_changed();
        Ok(id)
    }

    /// Tells the guest the host is done with the hinted blocks (they go back to its
    /// allocator); ends a run still going.
    pub fn stop_hinting(&mut self) -> Result<(), BalloonError> {
        if self.offered & F_FREE_PAGE_HINT == 0 {
            return Err(BalloonError::HintingDisabled);
        }
        self.hint.done();
        self.config_changed();
        Ok(())
    }

    fn config_changed(&self) {
        if let Some(a) = &self.active {
            a.interrupt.trigger(InterruptKind::Config);
        }
    }

    /// Sets the target and tells the guest.
    pub fn set_target_pages(&mut self, pages: u64) -> Result<(), BalloonError> {
        if pages > self.ram_pages || pages > u64::from(u32::MAX) {
            return Err(BalloonError::TargetTooLarge {
                requested: pages,
                available: self.ram_pages,
            });
        }
        self.target_pages = pages as u32;
        // A new target says nothing of need: only the policy's deflates for need (set
        // after this) are backed ahead of the guest.
        self.prefault.asked_pages = 0;
        self.config_changed();
        Ok(())
    }

    /// Changes how often statistics are requested (only when they were enabled at boot).
    pub fn set_stats_interval(&mut self, secs: u32) -> Result<(), BalloonError> {
        if self.offered & F_STATS_VQ == 0 {
            return Err(BalloonError::StatsDisabled);
        }
        self.stats_interval_s = secs;
        self.arm_stats_timer()
    }

    fn arm_stats_timer(&mut self) -> Result<(), BalloonError> {
        let result = if self.stats_interval_s == 0 || self.active.is_none() {
            self.stats_timer.clear()
        } else {
            let mut d = Duration::from_secs(self.stats_interval_s.into());
            if self.short_stats {
                d = d.min(SHORT_STATS_INTERVAL);
            }
            self.stats_timer.reset(d, Some(d))
        };
        result.map_err(|e| BalloonError::Timer(e.to_string()))
    }

    /// Asks for statistics every [`SHORT_STATS_INTERVAL`] while `short`, else at the
    /// configured interval. The timer is re-armed only on a change, so a guest repeating
    /// what set it cannot hold its next request back.
    fn set_short_stats(&mut self, short: bool) {
        if short != self.short_stats {
            self.short_stats = short;
            if let Err(e) = self.arm_stats_timer() {
                tracing::warn!("balloon: {e}");
            }
        }
    }

    /// Whether statistics are asked for every [`SHORT_STATS_INTERVAL`] now.
    pub fn short_stats(&self) -> bool {
        self.short_stats
    }

    fn config_bytes(&self) -> [u8; config::LEN_WITH_POISON as usize] {
        let mut c = [0u8; config::LEN_WITH_POISON as usize];
        c[0..4].copy_from_slice(&self.target_pages.to_le_bytes());
        c[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        c[8..12].copy_from_slice(&self.hint.host_cmd.to_le_bytes());
        c[12..16].copy_from_slice(&self.poison_val.to_le_bytes());
        c
    }

    fn config_len(&self) -> u64 {
        if self.offered & F_PAGE_POISON != 0 {
            config::LEN_WITH_POISON
        } else if self.offered & F_FREE_PAGE_HINT != 0 {
            config::LEN_WITH_HINT_CMD_ID
        } else {
            config::LEN_BASIC
        }
    }

    /// Whether reported pages may be discarded: not when the guest expects free pages to
    /// hold a non-zero poison pattern, since a discarded page comes back as zeros.
    fn reported_pages(&mut self, negotiated: u64) -> ReportedPages {
        if negotiated & F_PAGE_POISON == 0 || self.poison_val == 0 {
            return ReportedPages::Discard;
        }
        if !self.poison_warned {
            self.poison_warned = true;
            tracing::warn!(
                "balloon: the guest poisons free pages with {:#x}; reported pages are kept \
                 (discarding would hand back zero pages)",
                self.poison_val
            );
        }
        ReportedPages::Keep
    }

    /// Does the work of the queue with `role` within its budget: pop each chain,
    /// validate, discard, give it back; then interrupt the guest once.
    fn process_role(&mut self, role: QueueRole) -> QueueWork {
        let Some(negotiated) = self.active.as_ref().map(|a| a.negotiated) else {
            return QueueWork::Done;
        };
        let reported = match role {
            QueueRole::Reporting => self.reported_pages(negotiated),
            _ => ReportedPages::Discard,
        };
        let Some(active) = self.active.as_mut() else {
            return QueueWork::Done;
        };
        let counters = &mut self.counters;
        let time_limit = self.pass_time_limit;
        let (ram, interrupt) = (&active.ram, active.interrupt.as_ref());
        let noticed = Instant::now();
        let mut new_stats = false;
        let (queue, pass) = match role {
            QueueRole::Inflate => {
                let q = &mut active.inflate;
                let pass = inflate::inflate(ram, q, &mut self.held, counters, time_limit);
                (q, pass)
            }
            QueueRole::Deflate => {
                let q = &mut active.deflate;
                self.prefault.target_pages = u64::from(self.target_pages);
                let prefault = &mut self.prefault;
                let pass = inflate::deflate(ram, q, &mut self.held, counters, time_limit, prefault);
                (q, pass)
            }
            QueueRole::Stats => {
                let Some(s) = active.statistics.as_mut() else {
                    return QueueWork::Done;
                };
                let before = counters.stats_updates;
                let pass = s.take_reports(ram.memory(), &mut self.stats, counters);
                new_stats = counters.stats_updates > before;
                (s.queue_mut(), pass)
            }
            QueueRole::Reporting => {
                let Some(r) = active.reporting.as_mut() else {
                    return QueueWork::Done;
                };
                let pass = r.process(ram, reported, counters, time_limit);
                if pass.gave_back {
                    counters.report_latency.record(noticed.elapsed());
                }
                (r.queue_mut(), pass)
            }
            QueueRole::FreePageHint => {
                let Some(q) = active.hinting.as_mut() else {
                    return QueueWork::Done;
                };
                let mode = self.options.hint_discard;
                let done = hinting::process(ram, q, &mut self.hint, mode, counters, time_limit);
                if done.config_changed {
                    interrupt.trigger(InterruptKind::Config);
                }
                (q, done.pass)
            }
        };
        if pass.gave_back {
            notify(queue, ram.memory(), interrupt);
        }
        if new_stats {
            self.apply_policy();
        }
        pass.work
    }

    /// Hands the held statistics buffer back so the guest refills it.
    fn request_stats(&mut self) {
        let _ = self.stats_timer.wait();
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(stats) = active.statistics.as_mut() else {
            return;
        };
        if stats.request(active.ram.memory(), &mut self.counters) {
            queues::notify(
                stats.queue_mut(),
                active.ram.memory(),
                active.interrupt.as_ref(),
            );
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        protocol::VIRTIO_ID_BALLOON
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        queue_roles(self.offered)
            .into_iter()
            .map(max_queue_size)
            .collect()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.config_bytes();
        let len = self.config_len();
        let end = offset.checked_add(data.len() as u64);
        match end {
            Some(end) if end <= len => {
                data.copy_from_slice(&bytes[offset as usize..end as usize]);
            }
            _ => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(raw) = <[u8; 4]>::try_from(data) else {
            self.counters.rejected_config_writes += 1;
            return;
        };
        let value = u32::from_le_bytes(raw);
        match offset {
            config::ACTUAL if u64::from(value) <= self.ram_pages => {
                let floor = self.actual_pages.min(self.target_pages);
                self.counters.oom_deflated_pages += u64::from(floor.saturating_sub(value));
                self.actual_pages = value;
                // Deflated on OOM: the policy should see the guest soon.
                if value < floor && self.policy.as_ref().is_some_and(|p| p.enabled()) {
                    self.set_short_stats(true);
                }
            }
            config::POISON_VAL if self.offered & F_PAGE_POISON != 0 => self.poison_val = value,
            _ => self.counters.rejected_config_writes += 1,
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivationError> {
        let active = Active::new(activation)?;
        self.held.clear();
        self.active = Some(active);
        if let Err(e) = self.arm_stats_timer() {
            tracing::warn!("balloon: {e}");
        }
        // Buffers queued before DRIVER_OK wait for the transport's kick: this runs on the
        // vCPU thread that wrote DRIVER_OK, where device work does not belong.
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.short_stats = false;
        self.actual_pages = 0;
        self.poison_val = 0;
        self.held.clear();
        self.hint.reset();
        let _ = self.stats_timer.clear();
    }

    fn process_queue(&mut self, index: u16) -> QueueWork {
        match self.active.as_ref().and_then(|a| a.role_of(index)) {
            Some(role) => self.process_role(role),
            None => QueueWork::Done,
        }
    }

    fn event_fds(&self) -> Vec<(RawFd, u32)> {
        if self.offered & F_STATS_VQ != 0 {
            vec![(self.stats_timer.as_raw_fd(), STATS_TIMER_EVENT)]
        } else {
            Vec::new()
        }
    }

    fn process_event(&mut self, id: u32) {
        if id == STATS_TIMER_EVENT {
            self.request_stats();
        }
    }
}
