//! The automatic balloon policy (`--balloon ...,policy=auto`): after each statistics
//! report it sets the balloon target that keeps the guest at its working set.
//!
//! The rule, in order, first match wins:
//! 1. The guest is short: an OOM kill or allocation stall since the last report, more
//!    major faults per second than `fault_rate` (it is re-reading evicted cache or
//!    swapping), or less available memory than `headroom` by the next report if it keeps
//!    falling as fast as since the last one. Deflate at once: by that shortfall below
//!    the headroom, and by at least a `step` when the guest is faulting or stalling.
//!    Inflating then waits `cooldown`.
//! 2. In the cooldown, or the guest has not caught up with the last target yet: hold.
//!    (Memory a guest is still to take back from the balloon counts as available in
//!    rule 1: a deflate is not repeated before the guest has taken it.)
//! 3. The guest has more than `headroom` (plus a quarter of it, the hysteresis)
//!    available: inflate by the excess, at most `step` per report (twice that while the
//!    host is under memory pressure), aiming at the middle of that band so that small
//!    moves of the guest's figures do not bounce the target. Inflating takes free memory first, then makes the
//!    guest drop cache it does not use; cache it does use shows up as major faults,
//!    which rule 1 answers.
//! 4. Within the band, the guest keeps up to `headroom` as page cache, resident on the
//!    host. Once it has been quiet (no major faults and at most [`QUIET_MINOR_FAULTS`]
//!    minor faults per second, so no process is running) for a `cooldown`, and holds
//!    more than an eighth of a headroom of cache, the policy trims: it inflates until the
//!    guest's free memory and cache together are down to what it must keep (an eighth of
//!    the headroom, and at least half the reserves MemAvailable leaves aside, so that the
//!    guest stays above its watermarks) or its cache is gone, then deflates back. The
//!    host discards every page the balloon takes, cache included. The guest gets its
//!    headroom back as free pages the host no longer backs, so it costs the host what an
//!    idle guest does. Any sign of need during a trim (rule 1, with free memory and cache
//!    below half of what the trim keeps) ends it at once.
//!
//! The target always stays within `[min, max]`. While the guest is short (a deflate for
//! need and its cooldown, or a deflate below the target on OOM) the device asks for
//! statistics every 250 ms instead of every interval ([`crate::SHORT_STATS_INTERVAL`]).
//! Deflate-on-OOM, where negotiated, stays the safety net for bursts faster than that.

use std::fmt;
use std::time::Duration;

/// Tuning of the policy, in bytes unless said otherwise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicySettings {
    /// Memory the guest keeps available (MemAvailable) beyond what the balloon holds.
    pub headroom: u64,
    /// Smallest balloon the policy sets.
    pub min: u64,
    /// Largest balloon the policy sets.
    pub max: u64,
    /// Largest inflate per decision.
    pub step: u64,
    /// Major faults per second above which the guest counts as short of memory.
    pub fault_rate: u64,
    /// How long inflating waits after a deflate.
    pub cooldown: Duration,
    /// Host memory pressure (PSI `some avg10`, percent) above which inflating is faster.
    pub host_pressure: f64,
    /// Whether a quiet guest's cache is trimmed (rule 4).
    pub trim: bool,
}

impl PolicySettings {
    /// Defaults for a guest of `ram` bytes: headroom an eighth of RAM (128 MiB to 1 GiB),
    /// steps of a sixteenth, and a balloon that leaves the guest at least 128 MiB.
    pub fn for_ram(ram: u64) -> Self {
        const MIB: u64 = 1 << 20;
        Self {
            headroom: (ram / 8).clamp(128 * MIB, 1024 * MIB),
            min: 0,
            max: ram.saturating_sub(128 * MIB),
            step: (ram / 16).max(32 * MIB),
            fault_rate: 200,
            cooldown: Duration::from_secs(20),
            host_pressure: 10.0,
            trim: true,
        }
    }

    /// Checks the settings against a guest of `ram` bytes.
    pub fn check(&self, ram: u64) -> Result<(), String> {
        let mib = |b: u64| b >> 20;
        if self.headroom >= ram {
            return Err(format!(
                "policy headroom {} MiB is not below guest memory ({} MiB)",
                mib(self.headroom),
                mib(ram)
            ));
        }
        if self.max > ram {
            return Err(format!(
                "policy max {} MiB is above guest memory ({} MiB)",
                mib(self.max),
                mib(ram)
            ));
        }
        if self.min > self.max {
            return Err(format!(
                "policy min {} MiB is above policy max {} MiB",
                mib(self.min),
                mib(self.max)
            ));
        }
        if self.step == 0 {
            return Err("policy step must be above 0".into());
        }
        if !(0.0..=100.0).contains(&self.host_pressure) {
            return Err(format!(
                "policy host pressure {} is not a percentage",
                self.host_pressure
            ));
        }
        Ok(())
    }
}

/// Minor faults per second at or below which a guest counts as quiet (an idle Linux
/// guest takes none: its kernel threads fault nothing in; any process that runs does).
pub const QUIET_MINOR_FAULTS: f64 = 5.0;

/// The host's memory pressure, read at each decision.
pub trait HostPressure: Send {
    /// PSI `some avg10` of memory, in percent; `None` when it cannot be read.
    fn memory_some_avg10(&mut self) -> Option<f64>;
}

/// What the policy sees at one statistics report.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    /// Time since an arbitrary fixed start (monotonic).
    pub at: Duration,
    /// The balloon's current target, bytes.
    pub target: u64,
    /// What the guest holds in the balloon, bytes.
    pub actual: u64,
    /// What the guest took back below the target since the last report on its own
    /// (deflate-on-OOM), bytes.
    pub oom_deflated: u64,
    /// The guest's available memory, bytes.
    pub available: Option<u64>,
    /// The guest's free memory, bytes.
    pub free: Option<u64>,
    /// The guest's file pages (page cache, buffers, shared memory), bytes.
    pub caches: Option<u64>,
    /// The guest's major faults so far.
    pub major_faults: Option<u64>,
    /// The guest's minor faults so far.
    pub minor_faults: Option<u64>,
    /// The guest's OOM kills so far (Linux 6.12+ reports them).
    pub oom_kills: Option<u64>,
    /// The guest's allocation stalls so far (Linux 6.12+).
    pub alloc_stalls: Option<u64>,
    /// The host's memory pressure, PSI `some avg10` in percent.
    pub host_pressure: Option<f64>,
}

/// Why the policy chose a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The guest reports no available memory: nothing to decide on.
    NoStats,
    /// Available memory is within the headroom band.
    Steady,
    /// The guest has not caught up with the last target.
    Catching,
    /// A deflate was recent.
    Cooldown,
    /// Idle memory above the headroom: inflate.
    Inflate,
    /// Idle memory above the headroom while the host is under pressure: inflate faster.
    InflateHostPressure,
    /// Less available than the headroom: deflate.
    DeflateLow,
    /// Major faults above the rate: deflate.
    DeflateFaults,
    /// An OOM kill or allocation stall in the guest: deflate.
    DeflateStall,
    /// Within the band with cache to trim: waiting for the guest to stay quiet.
    TrimWait,
    /// A quiet guest holds cache: inflate into it.
    Trim,
    /// Trimming: the guest is still giving the balloon its cache.
    Trimming,
    /// The trim is done: deflate back, leaving the guest its headroom as free pages.
    TrimRelease,
}

impl Reason {
    /// Every reason, for metrics.
    pub const ALL: [Reason; 13] = [
        Reason::NoStats,
        Reason::Steady,
        Reason::Catching,
        Reason::Cooldown,
        Reason::Inflate,
        Reason::InflateHostPressure,
        Reason::DeflateLow,
        Reason::DeflateFaults,
        Reason::DeflateStall,
        Reason::TrimWait,
        Reason::Trim,
        Reason::Trimming,
        Reason::TrimRelease,
    ];

    /// Whether the decision deflates because the guest is short of memory (it will use
    /// what it gets back at once).
    pub fn deflates_for_need(self) -> bool {
        matches!(
            self,
            Reason::DeflateLow | Reason::DeflateFaults | Reason::DeflateStall
        )
    }

    /// The name used in the API, metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Reason::NoStats => "no_stats",
            Reason::Steady => "steady",
            Reason::Catching => "catching_up",
            Reason::Cooldown => "cooldown",
            Reason::Inflate => "inflate_idle",
            Reason::InflateHostPressure => "inflate_host_pressure",
            Reason::DeflateLow => "deflate_low_available",
            Reason::DeflateFaults => "deflate_major_faults",
            Reason::DeflateStall => "deflate_oom_or_stall",
            Reason::TrimWait => "trim_waiting_for_quiet",
            Reason::Trim => "trim_cache",
            Reason::Trimming => "trimming",
            Reason::TrimRelease => "trim_release",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// The target the policy set, bytes (4 KiB-aligned).
    pub target: u64,
    /// Why.
    pub reason: Reason,
    /// When (as [`Observation::at`]).
    pub at: Duration,
}

/// The policy as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyView {
    /// The settings.
    pub settings: PolicySettings,
    /// Whether the policy sets the target.
    pub enabled: bool,
    /// The latest decision.
    pub last_decision: Option<Decision>,
    /// Decisions so far, per reason.
    pub decisions: Vec<(Reason, u64)>,
    /// The policy's clock now (as [`Observation::at`]), to age the last decision.
    pub now: Duration,
}

/// A trim under way.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Trim {
    /// The target before the trim, where it returns.
    back_to: u64,
    /// The target of the trim.
    aim: u64,
    /// Free memory and cache the guest keeps at the aim; below half of it, it is short.
    keep: u64,
    /// When it started.
    started: Duration,
}

/// The policy's state between reports.
#[derive(Debug, Clone)]
pub struct AutoPolicy {
    settings: PolicySettings,
    enabled: bool,
    last: Option<Observation>,
    last_deflate: Option<Duration>,
    last_decision: Option<Decision>,
    decisions: [u64; Reason::ALL.len()],
    /// Since when the guest has been quiet, without the policy moving its target.
    quiet_since: Option<Duration>,
    trim: Option<Trim>,
    /// Reclaimable cache the guest kept after the last trim: the next one waits until it
    /// grew (cache the guest would not give up is not trimmed again and again).
    kept_after_trim: u64,
}

impl AutoPolicy {
    /// A policy with `settings` (checked by the caller), on or off.
    pub fn new(settings: PolicySettings, enabled: bool) -> Self {
        Self {
            settings,
            enabled,
            last: None,
            last_deflate: None,
            last_decision: None,
            decisions: [0; Reason::ALL.len()],
            quiet_since: None,
            trim: None,
            kept_after_trim: 0,
        }
    }

    /// The settings.
    pub fn settings(&self) -> PolicySettings {
        self.settings
    }

    /// Replaces the settings (checked by the caller).
    pub fn set_settings(&mut self, settings: PolicySettings) {
        self.settings = settings;
    }

    /// Whether the policy sets the target.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Turns the policy on or off; turning it on starts from fresh observations.
    pub fn set_enabled(&mut self, enabled: bool) {
        if enabled && !self.enabled {
            self.last = None;
            self.last_deflate = None;
            self.quiet_since = None;
            self.trim = None;
        }
        self.enabled = enabled;
    }

    /// The policy as the API shows it, at `now` on its clock.
    pub fn view(&self, now: Duration) -> PolicyView {
        PolicyView {
            settings: self.settings,
            enabled: self.enabled,
            last_decision: self.last_decision,
            decisions: self.decisions(),
            now,
        }
    }

    /// The latest decision.
    pub fn last_decision(&self) -> Option<Decision> {
        self.last_decision
    }

    /// Decisions so far, per reason.
    pub fn decisions(&self) -> Vec<(Reason, u64)> {
        Reason::ALL
            .iter()
            .zip(self.decisions)
            .map(|(r, n)| (*r, n))
            .collect()
    }

    /// The target for the guest as `now` shows it.
    pub fn decide(&mut self, now: Observation) -> Decision {
        self.quiet_since = if self.quiet(&now) {
            Some(self.quiet_since.unwrap_or(now.at))
        } else {
            None
        };
        let (target, reason) = self.rule(&now);
        let target = target.clamp(self.settings.min, self.settings.max) & !4095;
        match reason {
            _ if reason.deflates_for_need() => {
                self.last_deflate = Some(now.at);
                self.trim = None;
            }
            Reason::Trim => {
                self.trim = Some(Trim {
                    back_to: now.target,
                    aim: target,
                    keep: trim_keep(&self.settings, &now),
                    started: now.at,
                })
            }
            Reason::TrimRelease => {
                self.trim = None;
                self.kept_after_trim = reclaimable(&now).unwrap_or(0);
            }
            _ => {}
        }
        // The quiet time counts from the policy's last move.
        if !matches!(reason, Reason::Steady | Reason::TrimWait) {
            self.quiet_since = None;
        }
        self.last = Some(now);
        self.decisions[Reason::ALL.iter().position(|r| *r == reason).unwrap_or(0)] += 1;
        let decision = Decision {
            target,
            reason,
            at: now.at,
        };
        self.last_decision = Some(decision);
        decision
    }

    fn rule(&self, now: &Observation) -> (u64, Reason) {
        let s = &self.settings;
        let Some(available) = now.available else {
            return (now.target, Reason::NoStats);
        };
        let grew = |field: fn(&Observation) -> Option<u64>| match (self.last.as_ref(), field(now)) {
            (Some(last), Some(n)) => field(last).is_some_and(|l| n > l),
            _ => false,
        };
        let fault_rate = self.rate_since_last(now, |o| o.major_faults);
        // Deflate from what the guest holds, not from a target it has not reached.
        let holding = now.target.min(now.actual);
        // A trim takes the guest below its headroom on purpose, and below what
        // MemAvailable calls available (which leaves the kernel's reserves aside): only
        // free memory and cache together below half of what the trim leaves count as
        // short then, and any deflate ends the trim where it began.
        let (gauge, floor): (fn(&Observation) -> Option<u64>, u64) = match self.trim {
            Some(trim) => (spare, trim.keep / 2),
            None => (|o| o.available, s.headroom),
        };
        let level = gauge(now).unwrap_or(available);
        // A guest that used memory since the last report is likely to use as much again
        // before the next one: count that as already gone. What it used is its fall, less
        // what went into the balloon; while it is short (the policy deflated for need, or
        // it deflated below the target on OOM), plus what the balloon gave back, which it
        // used as it came (a deflate hides a fall). Other deflates (the end of a trim)
        // give back memory the guest did not ask for, and its figures need not add up
        // across them. A report with the same figures as the last one is no news (the
        // guest has not looked again since): counting the deflates since as used would
        // deflate on and on.
        let fresh = self.last.is_none_or(|last| {
            (last.available, last.free, last.caches) != (now.available, now.free, now.caches)
        });
        let short = fresh
            && (self
                .last_decision
                .is_some_and(|d| d.reason.deflates_for_need())
                || now.oom_deflated > 0);
        let falling = self.last.map_or(0, |last| {
            let before = gauge(&last).unwrap_or(level);
            if short {
                (before + last.actual).saturating_sub(level + now.actual)
            } else {
                let fell = before.saturating_sub(level);
                fell.saturating_sub(now.actual.saturating_sub(last.actual))
            }
        });
        // Pages the guest is still to take back from the balloon (a deflate it has not
        // caught up with) are as good as available: do not deflate them twice.
        let returning = now.actual.saturating_sub(now.target);
        let shortfall = floor.saturating_sub((level + returning).saturating_sub(falling));
        let deflate_by = |by: u64| {
            let to = holding.saturating_sub(by);
            self.trim.map_or(to, |t| to.min(t.back_to))
        };
        if grew(|o| o.oom_kills) || grew(|o| o.alloc_stalls) {
            return (deflate_by(shortfall.max(s.step)), Reason::DeflateStall);
        }
        if fault_rate.is_some_and(|r| r > s.fault_rate as f64) {
            return (deflate_by(shortfall.max(s.step)), Reason::DeflateFaults);
        }
        if shortfall > 0 {
            return (deflate_by(shortfall), Reason::DeflateLow);
        }
        if self
            .last_deflate
            .is_some_and(|at| now.at.saturating_sub(at) < s.cooldown)
        {
            return (now.target, Reason::Cooldown);
        }
        if let Some(trim) = self.trim {
            // Cache gone, the balloon would only take free memory the guest keeps for itself.
            let reached = now.actual + s.step / 8 >= trim.aim
                || now.caches.is_some_and(|c| c <= s.headroom / 16);
            // A guest that gave nothing between two reports of the trim has no more to give.
            let stuck = self.last.is_some_and(|last| {
                last.at > trim.started && last.at < now.at && now.actual <= last.actual
            });
            let too_long = now.at.saturating_sub(trim.started) >= 2 * s.cooldown;
            if reached || stuck || too_long {
                return (trim.back_to, Reason::TrimRelease);
            }
            return (trim.aim, Reason::Trimming);
        }
        if now.actual + s.step / 2 < now.target || returning > 0 {
            return (now.target, Reason::Catching);
        }
        // What the guest is still to put into the balloon (within half a step of the
        // target) will come out of what it has available: inflating by it again would
        // overshoot the band, then deflate for need.
        let pending = now.target.saturating_sub(now.actual);
        let excess = available.saturating_sub(pending).saturating_sub(s.headroom);
        if excess <= s.headroom / 4 {
            let cache = reclaimable(now).unwrap_or(0);
            if !s.trim || cache <= (s.headroom / 8).max(self.kept_after_trim + s.headroom / 8) {
                return (now.target, Reason::Steady);
            }
            return match self.quiet_since {
                Some(since) if now.at.saturating_sub(since) >= s.cooldown => (
                    now.target
                        + spare(now)
                            .unwrap_or(available)
                            .saturating_sub(trim_keep(s, now)),
                    Reason::Trim,
                ),
                Some(_) => (now.target, Reason::TrimWait),
                // A guest at work uses its cache.
                None => (now.target, Reason::Steady),
            };
        }
        let pressed = now.host_pressure.is_some_and(|p| p > s.host_pressure);
        let step = if pressed { 2 * s.step } else { s.step };
        let reason = if pressed {
            Reason::InflateHostPressure
        } else {
            Reason::Inflate
        };
        (now.target + (excess - s.headroom / 8).min(step), reason)
    }

    /// Whether the guest ran nothing since the last report: no major faults and almost
    /// no minor faults. Unknown counts make a guest not quiet.
    fn quiet(&self, now: &Observation) -> bool {
        let major = self.rate_since_last(now, |o| o.major_faults);
        let minor = self.rate_since_last(now, |o| o.minor_faults);
        major.is_some_and(|r| r == 0.0) && minor.is_some_and(|r| r <= QUIET_MINOR_FAULTS)
    }

    /// How fast a counter of the guest grew per second since the last report; `None`
    /// without a last report, a later one, or the counter in both.
    fn rate_since_last(
        &self,
        now: &Observation,
        counter: fn(&Observation) -> Option<u64>,
    ) -> Option<f64> {
        let last = self.last.as_ref().filter(|last| now.at > last.at)?;
        let grew = counter(now)?.saturating_sub(counter(last)?);
        Some(grew as f64 / (now.at - last.at).as_secs_f64())
    }
}

/// The guest's cache: its file pages where it reports them, else what is available
/// beyond its free memory (which undercounts: MemAvailable leaves the kernel's reserves
/// aside).
fn reclaimable(now: &Observation) -> Option<u64> {
    now.caches
        .or_else(|| Some(now.available?.saturating_sub(now.free?)))
}

/// What a balloon can take from a guest that runs nothing: its free memory and its cache.
/// `None` unless the guest reports both.
fn spare(now: &Observation) -> Option<u64> {
    Some(now.free? + now.caches?)
}

/// Free memory and cache a trim leaves the guest: an eighth of the headroom, and at least
/// half the kernel's reserves. Those are what MemAvailable leaves aside from free memory
/// and cache (the high watermarks, and part of the low ones): below its low watermark the
/// guest reclaims on every allocation, below its min one it fails them.
fn trim_keep(s: &PolicySettings, now: &Observation) -> u64 {
    let reserves = match (spare(now), now.available) {
        (Some(spare), Some(available)) => spare.saturating_sub(available),
        _ => 0,
    };
    (s.headroom / 8).max(reserves / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn settings() -> PolicySettings {
        PolicySettings::for_ram(4 * GIB)
    }

    fn obs(secs: u64, target: u64, available: u64) -> Observation {
        Observation {
            at: Duration::from_secs(secs),
            target,
            actual: target,
            available: Some(available),
            major_faults: Some(0),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_scale_with_the_guest_and_pass_their_own_check() {
        let s = PolicySettings::for_ram(5 * GIB);
        assert_eq!(s.headroom, 640 * MIB);
        assert_eq!(s.step, 320 * MIB);
        assert_eq!(s.max, 5 * GIB - 128 * MIB);
        assert!(s.check(5 * GIB).is_ok());
        assert_eq!(PolicySettings::for_ram(512 * MIB).headroom, 128 * MIB);
        assert_eq!(PolicySettings::for_ram(64 * GIB).headroom, GIB);
    }

    #[test]
    fn contradictory_settings_are_refused_with_the_figures() {
        let ram = GIB;
        let mut s = PolicySettings::for_ram(ram);
        s.headroom = 2 * GIB;
        assert!(s.check(ram).unwrap_err().contains("headroom 2048 MiB"));
        let mut s = PolicySettings::for_ram(ram);
        s.min = 900 * MIB;
        s.max = 800 * MIB;
        assert!(s.check(ram).unwrap_err().contains("min 900 MiB is above"));
        let mut s = PolicySettings::for_ram(ram);
        s.max = 2 * GIB;
        assert!(s.check(ram).is_err());
        let mut s = PolicySettings::for_ram(ram);
        s.step = 0;
        assert!(s.check(ram).is_err());
    }

    /// Idle memory is taken a step at a time down to the headroom, then the policy holds.
    #[test]
    fn idle_memory_is_inflated_in_steps_down_to_the_headroom() {
        let s = settings();
        let mut p = AutoPolicy::new(s, true);
        let mut target = 0;
        let mut available = 3 * GIB;
        for secs in 0..20 {
            let d = p.decide(obs(secs, target, available));
            // The guest follows: the balloon takes from what was available.
            available -= d.target - target;
            target = d.target;
        }
        assert!(
            available >= s.headroom && available <= s.headroom + s.headroom / 4,
            "available {} MiB, headroom {} MiB",
            available / MIB,
            s.headroom / MIB
        );
        assert_eq!(p.last_decision().unwrap().reason, Reason::Steady);
        // Never more than a step per decision.
        let mut p = AutoPolicy::new(s, true);
        assert_eq!(p.decide(obs(0, 0, 3 * GIB)).target, s.step);
    }

    #[test]
    fn a_guest_short_of_memory_gets_it_back_at_once_and_inflating_waits() {
        let s = settings();
        let mut p = AutoPolicy::new(s, true);
        let d = p.decide(obs(0, 2 * GIB, s.headroom - 300 * MIB));
        assert_eq!(d.reason, Reason::DeflateLow);
        assert_eq!(d.target, 2 * GIB - 300 * MIB);
        // Plenty available again soon after: the cooldown holds the target.
        let d = p.decide(obs(5, d.target, 3 * GIB));
        assert_eq!(d.reason, Reason::Cooldown);
        assert_eq!(d.target, 2 * GIB - 300 * MIB);
        let d = p.decide(obs(5 + s.cooldown.as_secs(), d.target, 3 * GIB));
        assert_eq!(d.reason, Reason::Inflate);
    }

    /// A guest whose available memory is falling gets back what it will be short of by
    /// the next report, before it is short.
    #[test]
    fn a_falling_guest_is_given_memory_ahead_of_its_fall() {
        let s = settings();
        let mut p = AutoPolicy::new(s, true);
        p.decide(obs(0, 2 * GIB, s.headroom + 500 * MIB));
        // 300 MiB gone in a report: 200 MiB above the headroom now, 100 below predicted.
        let d = p.decide(obs(1, 2 * GIB, s.headroom + 200 * MIB));
        assert_eq!(d.reason, Reason::DeflateLow);
        assert_eq!(d.target, 2 * GIB - 100 * MIB);
        // What went into the balloon is no fall.
        let mut p = AutoPolicy::new(s, true);
        p.decide(obs(0, GIB, s.headroom + 500 * MIB));
        let d = p.decide(obs(1, GIB + 300 * MIB, s.headroom + 200 * MIB));
        assert_ne!(d.reason, Reason::DeflateLow);
    }

    /// A guest a little behind its target (within half a step: not caught up, not far
    /// enough to wait for) is inflated by its excess less what it still owes, so the
    /// balloon does not overshoot the band.
    #[test]
    fn an_inflate_counts_what_the_guest_still_owes() {
        let s = settings();
        let mut p = AutoPolicy::new(s, true);
        let mut o = obs(0, GIB, s.headroom + 400 * MIB);
        o.actual = GIB - 100 * MIB;
        let d = p.decide(o);
        assert_eq!(d.reason, Reason::Inflate);
        // 300 MiB above the headroom once the guest has paid: aim at the band's middle
        // (not a whole step, which the 400 MiB seen would have asked for).
        assert_eq!(d.target, GIB + 300 * MIB - s.headroom / 8);
        assert!(300 * MIB - s.headroom / 8 < s.step);
    }

    /// A guest using memory as fast as the balloon gives it back keeps the same level:
    /// what it used is still a fall, and the next deflate covers the next one.
    #[test]
    fn a_fall_a_deflate_covered_is_still_a_fall() {
        let s = settings();
        let mut p = AutoPolicy::new(s, true);
        p.decide(obs(0, 2 * GIB, s.headroom + 50 * MIB));
        // 300 MiB used, 300 MiB deflated (by the guest on OOM): same level as before,
        // though its free memory moved (a fresh report).
        let mut o = obs(1, 2 * GIB, s.headroom + 50 * MIB);
        o.free = Some(100 * MIB);
        o.actual = 2 * GIB - 300 * MIB;
        o.oom_deflated = 300 * MIB;
        let d = p.decide(o);
        assert_eq!(d.reason, Reason::DeflateLow);
        assert_eq!(d.target, 2 * GIB - 300 * MIB - 250 * MIB);
        // The same figures again (the guest has not looked since) while the balloon
        // shrank: no fall, no further deflate.
        let mut stale = o;
        stale.at = Duration::from_secs(2);
        stale.target = d.target;
        stale.actual = d.target;
        stale.oom_deflated = 0;
        let d2 = p.decide(stale);
        assert_eq!((d2.reason, d2.target), (Reason::Cooldown, d.target));
        // The guest steadily uses 200 MiB a report: each deflate keeps it at its headroom.
        let mut p = AutoPolicy::new(s, true);
        let (mut target, mut available) = (2 * GIB, s.headroom);
        p.decide(obs(0, target, available));
        for secs in 1..8 {
            available -= 200 * MIB;
            let mut o = obs(secs, target, available);
            o.free = Some(secs * MIB);
            let d = p.decide(o);
            // The guest takes the deflate back at once.
            available += target - d.target;
            target = d.target;
            if secs > 1 {
                assert!(
                    available >= s.headroom,
                    "report {secs}: {} MiB available",
                    available / MIB
                );
            }
        }
    }

    #[test]
    fn major_faults_above_the_rate_deflate_a_step_even_with_memory_available() {
        let s = settings();
        let mut p = AutoPolicy::new(s, true);
        let mut o = obs(0, GIB, s.headroom + 10 * MIB);
        p.decide(o);
        o.at = Duration::from_secs(2);
        o.major_faults = Some(2 * s.fault_rate + 2 * 1000);
        let d = p.decide(o);
        assert_eq!(d.reason, Reason::DeflateFaults);
        assert_eq!(d.target, GIB - s.step);
        // A few faults a second are normal.
        o.at = Duration::from_secs(4);
        o.major_faults = o.major_faults.map(|f| f + 10);
        assert_ne!(p.decide(o).reason, Reason::DeflateFaults);
    }

    #[test]
    fn an_oom_kill_in_the_guest_deflates() {
        let s = settings();
        let mut p = AutoPolicy::new(s, true);
        let mut o = obs(0, GIB, GIB);
        o.oom_kills = Some(0);
        p.decide(o);
        o.at = Duration::from_secs(1);
        o.oom_kills = Some(1);
        let d = p.decide(o);
        assert_eq!(d.reason, Reason::DeflateStall);
        assert!(d.target <= GIB - s.step);
    }

    /// Deflating starts from what the guest holds, so a target it never reached does not
    /// leave the guest short.
    #[test]
    fn deflating_counts_from_what_the_guest_holds() {
        let s = settings();
        let mut p = AutoPolicy::new(s, true);
        let mut o = obs(0, 2 * GIB, s.headroom - 100 * MIB);
        o.actual = GIB;
        assert_eq!(p.decide(o).target, GIB - 100 * MIB);
    }

    #[test]
    fn a_deflate_the_guest_has_not_caught_up_with_is_not_repeated() {
        // Deflated to 1 GiB, the guest still holds 1.2 GiB and is 150 MiB short of its
        // headroom: the 200 MiB on their way back cover it.
        let s = settings();
        let mut p = AutoPolicy::new(s, true);
        let mut o = obs(0, GIB, s.headroom - 150 * MIB);
        o.actual = GIB + 200 * MIB;
        let d = p.decide(o);
        assert_eq!((d.reason, d.target), (Reason::Catching, GIB));
        // 250 MiB short: only the 50 MiB not on their way back are deflated.
        let mut p = AutoPolicy::new(s, true);
        let mut o = obs(1, GIB, s.headroom - 250 * MIB);
        o.actual = GIB + 200 * MIB;
        let d = p.decide(o);
        assert_eq!((d.reason, d.target), (Reason::DeflateLow, GIB - 50 * MIB));
    }

    #[test]
    fn the_end_of_a_trim_is_not_taken_for_a_shortage() {
        let mut p = trimming();
        let d = p.decide(report(26, 1536, 1530, 60, 20, 7));
        assert_eq!((d.reason, d.target), (Reason::TrimRelease, 1000 * MIB));
        // The guest has not deflated yet: its available memory is still low.
        let d = p.decide(report(28, 1000, 1530, 40, 20, 7));
        assert_eq!((d.reason, d.target), (Reason::Catching, 1000 * MIB));
    }

    #[test]
    fn a_guest_behind_its_target_is_not_asked_for_more() {
        let s = settings();
        let mut p = AutoPolicy::new(s, true);
        let mut o = obs(0, 2 * GIB, 3 * GIB);
        o.actual = GIB;
        let d = p.decide(o);
        assert_eq!((d.reason, d.target), (Reason::Catching, 2 * GIB));
    }

    #[test]
    fn host_pressure_doubles_the_step() {
        let s = settings();
        let mut p = AutoPolicy::new(s, true);
        let mut o = obs(0, 0, 3 * GIB);
        o.host_pressure = Some(s.host_pressure + 1.0);
        let d = p.decide(o);
        assert_eq!(
            (d.reason, d.target),
            (Reason::InflateHostPressure, 2 * s.step)
        );
    }

    #[test]
    fn the_target_stays_within_min_and_max() {
        let mut s = settings();
        s.min = 100 * MIB;
        s.max = 200 * MIB;
        let mut p = AutoPolicy::new(s, true);
        assert_eq!(p.decide(obs(0, 150 * MIB, 3 * GIB)).target, 200 * MIB);
        let mut p = AutoPolicy::new(s, true);
        assert_eq!(p.decide(obs(0, 150 * MIB, 0)).target, 100 * MIB);
        assert_eq!(p.decisions().iter().map(|(_, n)| n).sum::<u64>(), 1);
    }

    #[test]
    fn no_available_figure_means_no_change() {
        let mut p = AutoPolicy::new(settings(), true);
        let mut o = obs(0, 300 * MIB, 0);
        o.available = None;
        let d = p.decide(o);
        assert_eq!((d.reason, d.target), (Reason::NoStats, 300 * MIB));
    }

    /// A report of a guest at `target` holding `actual`, with `available` and `free`
    /// MiB and `minor` minor faults so far.
    fn report(
        secs: u64,
        target: u64,
        actual: u64,
        available: u64,
        free: u64,
        minor: u64,
    ) -> Observation {
        Observation {
            at: Duration::from_secs(secs),
            target: target * MIB,
            actual: actual * MIB,
            available: Some(available * MIB),
            free: Some(free * MIB),
            major_faults: Some(0),
            minor_faults: Some(minor),
            ..Default::default()
        }
    }

    /// Reports every 2 s from `from` to `to` (exclusive), made by `report_at`; each
    /// decision must hold the target at `target` MiB for `reason`.
    fn assert_holds(
        p: &mut AutoPolicy,
        (from, to): (u64, u64),
        report_at: impl Fn(u64) -> Observation,
        reason: Reason,
        target: u64,
    ) {
        for secs in (from..to).step_by(2) {
            let d = p.decide(report_at(secs));
            assert_eq!((d.reason, d.target), (reason, target * MIB), "at {secs} s");
        }
    }

    #[test]
    fn a_quiet_guest_is_trimmed_of_its_cache_after_a_cooldown_and_given_it_back_free() {
        // 4 GiB: headroom 512 MiB, cooldown 20 s. 600 MiB available is within the band,
        // 550 MiB of it cache.
        let mut p = AutoPolicy::new(settings(), true);
        assert_eq!(
            p.decide(report(0, 1000, 1000, 600, 50, 7)).reason,
            Reason::Steady
        );
        let quiet_with_cache = |secs| report(secs, 1000, 1000, 600, 50, 7);
        assert_holds(&mut p, (2, 22), quiet_with_cache, Reason::TrimWait, 1000);
        // Quiet for 20 s: inflate until an eighth of the headroom is left.
        let d = p.decide(report(22, 1000, 1000, 600, 50, 7));
        assert_eq!(
            (d.reason, d.target),
            (Reason::Trim, (1000 + 600 - 64) * MIB)
        );
        // Below the headroom on purpose: no deflate while above a sixteenth of it.
        let d = p.decide(report(24, 1536, 1300, 300, 40, 7));
        assert_eq!((d.reason, d.target), (Reason::Trimming, 1536 * MIB));
        let d = p.decide(report(26, 1536, 1505, 70, 40, 7));
        assert_eq!((d.reason, d.target), (Reason::TrimRelease, 1000 * MIB));
        // Back where it was, the headroom now free: nothing left to trim.
        let d = p.decide(report(28, 1000, 1000, 600, 580, 7));
        assert_eq!((d.reason, d.target), (Reason::Steady, 1000 * MIB));
        let quiet_and_free = |secs| report(secs, 1000, 1000, 600, 580, 7);
        assert_holds(&mut p, (30, 80), quiet_and_free, Reason::Steady, 1000);
    }

    #[test]
    fn with_trim_off_a_quiet_guest_keeps_its_cache() {
        let mut p = AutoPolicy::new(
            PolicySettings {
                trim: false,
                ..settings()
            },
            true,
        );
        let quiet_with_cache = |secs| report(secs, 1000, 1000, 600, 50, 7);
        assert_holds(&mut p, (0, 120), quiet_with_cache, Reason::Steady, 1000);
    }

    #[test]
    fn a_guest_running_anything_keeps_its_cache() {
        let mut p = AutoPolicy::new(settings(), true);
        // 6 minor faults a second: a process runs now and then.
        let busy = |secs| report(secs, 1000, 1000, 600, 50, 6 * secs);
        assert_holds(&mut p, (0, 120), busy, Reason::Steady, 1000);
        // Unknown fault counts are not quiet either.
        let mut p = AutoPolicy::new(settings(), true);
        let unknown = |secs| Observation {
            minor_faults: None,
            ..report(secs, 1000, 1000, 600, 50, 0)
        };
        assert_holds(&mut p, (0, 120), unknown, Reason::Steady, 1000);
    }

    /// A policy 2 s into a trim from 1000 MiB to 1536 MiB.
    fn trimming() -> AutoPolicy {
        let mut p = AutoPolicy::new(settings(), true);
        for secs in (0..22).step_by(2) {
            p.decide(report(secs, 1000, 1000, 600, 50, 7));
        }
        assert_eq!(
            p.decide(report(22, 1000, 1000, 600, 50, 7)).reason,
            Reason::Trim
        );
        assert_eq!(
            p.decide(report(24, 1536, 1200, 400, 40, 7)).reason,
            Reason::Trimming
        );
        p
    }

    #[test]
    fn a_guest_that_needs_memory_during_a_trim_ends_it_where_it_began() {
        // Major faults: the guest wants its cache back.
        let mut p = trimming();
        let mut o = report(26, 1536, 1300, 300, 40, 7);
        o.major_faults = Some(5000);
        let d = p.decide(o);
        assert_eq!((d.reason, d.target), (Reason::DeflateFaults, 1000 * MIB));
        // The trim is over: the cooldown holds, then the headroom rule applies again.
        let d = p.decide(report(28, 1000, 1000, 700, 40, 7));
        assert_eq!(d.reason, Reason::Cooldown);
        // Available below a sixteenth of the headroom (32 MiB) during a trim.
        let mut p = trimming();
        let d = p.decide(report(26, 1536, 1450, 30, 20, 7));
        assert_eq!((d.reason, d.target), (Reason::DeflateLow, 1000 * MIB));
    }

    #[test]
    fn a_trim_ends_when_the_guest_gives_nothing_more_or_it_takes_too_long() {
        let mut p = trimming();
        assert_eq!(
            p.decide(report(26, 1536, 1300, 300, 40, 7)).reason,
            Reason::Trimming
        );
        let d = p.decide(report(28, 1536, 1300, 300, 40, 7));
        assert_eq!((d.reason, d.target), (Reason::TrimRelease, 1000 * MIB));

        let mut p = trimming();
        let mut actual = 1200;
        let mut secs = 26;
        let reason = loop {
            actual += 1;
            let d = p.decide(report(secs, 1536, actual, 300, 40, 7));
            if d.reason != Reason::Trimming {
                break d.reason;
            }
            secs += 2;
        };
        assert_eq!(reason, Reason::TrimRelease);
        // Twice the cooldown after the trim began at 22 s.
        assert_eq!(secs, 62);
    }

    #[test]
    fn cache_a_guest_kept_through_a_trim_is_not_trimmed_again_until_it_grows() {
        let mut p = trimming();
        // The guest kept 300 MiB of cache it would not give up.
        let d = p.decide(report(26, 1536, 1530, 400, 100, 7));
        assert_eq!(d.reason, Reason::TrimRelease);
        for secs in (28..100).step_by(2) {
            let d = p.decide(report(secs, 1000, 1000, 600, 300, 7));
            assert_eq!(d.reason, Reason::Steady, "at {secs} s");
        }
        // It read more: 450 MiB of cache is more than an eighth of the headroom above
        // what it kept.
        let reasons: Vec<Reason> = (100..130)
            .step_by(2)
            .map(|secs| p.decide(report(secs, 1000, 1000, 600, 150, 7)).reason)
            .collect();
        assert!(reasons.contains(&Reason::Trim), "{reasons:?}");
    }

    /// A guest that reports its file pages: MemAvailable leaves the kernel's reserves
    /// aside (600 MiB available of 50 MiB free and 750 MiB cache), the trim does not.
    fn with_cache(o: Observation, caches: u64) -> Observation {
        Observation {
            caches: Some(caches * MIB),
            ..o
        }
    }

    #[test]
    fn a_trim_takes_the_cache_memavailable_leaves_aside_down_to_a_margin() {
        let mut p = AutoPolicy::new(settings(), true);
        for secs in (0..22).step_by(2) {
            p.decide(with_cache(report(secs, 1000, 1000, 600, 50, 7), 750));
        }
        // Free and cache down to half the kernel's reserves (200 MiB), more than an eighth
        // of the headroom (64 MiB).
        let d = p.decide(with_cache(report(22, 1000, 1000, 600, 50, 7), 750));
        assert_eq!(
            (d.reason, d.target),
            (Reason::Trim, (1000 + 50 + 750 - 100) * MIB)
        );
        // Nothing is available by MemAvailable's count, but 320 MiB is spare: go on.
        let d = p.decide(with_cache(report(24, 1700, 1500, 0, 20, 7), 300));
        assert_eq!((d.reason, d.target), (Reason::Trimming, 1700 * MIB));
        // Spare below half of what the trim leaves (50 MiB): it ends where it began.
        let d = p.decide(with_cache(report(26, 1700, 1600, 0, 40, 7), 5));
        assert_eq!((d.reason, d.target), (Reason::DeflateLow, 1000 * MIB));
        // Cache down to a sixteenth of the headroom (32 MiB): the trim is done, short of
        // its aim.
        let mut p = AutoPolicy::new(settings(), true);
        for secs in (0..=22).step_by(2) {
            p.decide(with_cache(report(secs, 1000, 1000, 600, 50, 7), 750));
        }
        let d = p.decide(with_cache(report(24, 1700, 1500, 0, 200, 7), 33));
        assert_eq!(d.reason, Reason::Trimming);
        let d = p.decide(with_cache(report(26, 1700, 1550, 0, 150, 7), 32));
        assert_eq!((d.reason, d.target), (Reason::TrimRelease, 1000 * MIB));
    }

    #[test]
    fn the_cache_kept_through_a_trim_is_the_guests_file_pages_at_its_end() {
        let mut p = AutoPolicy::new(settings(), true);
        for secs in (0..=22).step_by(2) {
            p.decide(with_cache(report(secs, 1000, 1000, 600, 50, 7), 750));
        }
        let d = p.decide(with_cache(report(24, 1700, 1690, 0, 100, 7), 60));
        assert_eq!(d.reason, Reason::TrimRelease);
        // 100 MiB of cache is less than an eighth of the headroom above the 60 MiB kept.
        for secs in (26..100).step_by(2) {
            let d = p.decide(with_cache(report(secs, 1000, 1000, 560, 400, 7), 100));
            assert_eq!(d.reason, Reason::Steady, "at {secs} s");
        }
        let reasons: Vec<Reason> = (100..130)
            .step_by(2)
            .map(|secs| {
                p.decide(with_cache(report(secs, 1000, 1000, 560, 300, 7), 200))
                    .reason
            })
            .collect();
        assert!(reasons.contains(&Reason::Trim), "{reasons:?}");
    }
}
