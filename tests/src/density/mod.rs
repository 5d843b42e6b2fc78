//! The density benchmark: how many G GiB guests, each touching T GiB and then freeing it,
//! fit on a host of H GiB without swap.
//!
//! The orchestration ([`run_density`]) launches guests one after another through a
//! [`Launcher`] and classifies each one as fitting or failing; [`live`] provides the real
//! launcher (Ebb or QEMU guests on this host), [`report`] the table, JSON and plot.
//! Keeping the launcher behind a trait lets the classification and reporting be tested
//! without guests.

pub mod live;
pub mod report;

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::guest::TRIPLE_FAULT_EXIT;

/// What a density run measures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DensityConfig {
    /// Host memory (GiB).
    pub host_gib: f64,
    /// Memory of each guest (GiB).
    pub guest_gib: f64,
    /// Memory each guest touches and frees (GiB).
    pub touch_gib: f64,
    /// Stop after this many guests fit.
    pub max_guests: u32,
    /// Longest wait for a guest to boot.
    pub boot_timeout_s: u64,
    /// Longest wait for a guest's touch.
    pub touch_timeout_s: u64,
    /// Longest wait for memory to settle after a free.
    pub settle_timeout_s: u64,
    /// Settled: guest RAM RSS moved less than this fraction of guest memory over
    /// `settle_window_s`.
    pub settle_fraction: f64,
    /// Window for the settle test.
    pub settle_window_s: u64,
    /// The page cache workload: each guest boots from the Debian root file system and
    /// reads this many MiB of a data disk (its cache grows) before it touches and frees
    /// memory, and again after the free (the cache that stays); 0 is the plain workload
    /// on the initramfs guest.
    #[serde(default)]
    pub cache_mib: u64,
}

impl DensityConfig {
    /// The published setup: 15 GiB host, 5 GiB guests touching 4.5 GiB.
    pub fn full() -> Self {
        Self {
            host_gib: 15.0,
            guest_gib: 5.0,
            touch_gib: 4.5,
            max_guests: 16,
            boot_timeout_s: 300,
            touch_timeout_s: 900,
            settle_timeout_s: 180,
            settle_fraction: 0.01,
            settle_window_s: 8,
            cache_mib: 0,
        }
    }

    /// A quick check: 3 GiB host, 1 GiB guests touching 0.8 GiB. (0.9 GiB, the figure in
    /// the original plan, does not fit in a 1 GiB Debian guest: its MemAvailable after
    /// boot is ~877 MiB, so the guest's own OOM killer stops the touch.)
    pub fn small() -> Self {
        Self {
            host_gib: 3.0,
            guest_gib: 1.0,
            touch_gib: 0.8,
            max_guests: 5,
            boot_timeout_s: 240,
            touch_timeout_s: 300,
            settle_timeout_s: 60,
            settle_fraction: 0.01,
            settle_window_s: 6,
            cache_mib: 0,
        }
    }

    /// Guest memory in MiB.
    pub fn guest_mib(&self) -> u64 {
        (self.guest_gib * 1024.0).round() as u64
    }

    /// Touch size in MiB.
    pub fn touch_mib(&self) -> u64 {
        (self.touch_gib * 1024.0).round() as u64
    }
}

pub use crate::vmm::VmmKind;

/// One run: a VMM with reporting on or off, or (Ebb) reporting with the automatic policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// VMM.
    pub vmm: VmmKind,
    /// Free page reporting.
    pub reporting: bool,
    /// The automatic balloon policy (with reporting).
    #[serde(default)]
    pub policy: bool,
}

impl RunSpec {
    /// `ebb-on`, `ebb-off`, `ebb-auto`, `qemu-on`, `qemu-off`.
    pub fn label(&self) -> String {
        let mode = match (self.policy, self.reporting) {
            (true, _) => "auto",
            (false, true) => "on",
            (false, false) => "off",
        };
        format!("{}-{mode}", self.vmm.as_str())
    }

    /// Parses a label (`auto` only for Ebb: QEMU has no policy of its own).
    pub fn parse(label: &str) -> Option<RunSpec> {
        let (vmm, rep) = label.split_once('-')?;
        let vmm: VmmKind = vmm.parse().ok()?;
        let (reporting, policy) = match rep {
            "on" => (true, false),
            "off" => (false, false),
            "auto" if vmm == VmmKind::Ebb => (true, true),
            _ => return None,
        };
        Some(RunSpec {
            vmm,
            reporting,
            policy,
        })
    }
}

/// Why a guest does not fit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The VMM could not be started.
    Launch,
    /// The guest did not reach its ready marker (VMM exited or timed out).
    Boot,
    /// The guest could not complete its touch (guest OOM, VMM killed, timeout).
    Touch,
    /// A VMM that had fitted was killed later (the host ran out of memory).
    Killed,
    /// The host stopped making progress (it thrashed, or its kernel failed): the run
    /// was stopped from outside, and its figures are those of the guests before.
    Stalled,
}

/// The first failure of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// 1-based guest number.
    pub guest: u32,
    /// What failed.
    pub kind: FailureKind,
    /// Exit statuses, kernel OOM messages, errors.
    pub detail: String,
}

/// Per-guest figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestRecord {
    /// 1-based guest number.
    pub guest: u32,
    /// Seconds since the run started when the guest was launched.
    pub launched_at_s: f64,
    /// Launch to ready marker.
    pub boot_s: Option<f64>,
    /// Guest RAM RSS once booted, before any workload: what an idle guest costs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_rss_mib: Option<f64>,
    /// Page cache read duration (cache workload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_s: Option<f64>,
    /// The cache workload's second read, after the free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reread_s: Option<f64>,
    /// Touch duration.
    pub touch_s: Option<f64>,
    /// Guest RAM RSS after the touch.
    pub peak_rss_mib: Option<f64>,
    /// Guest RAM RSS once settled after the free.
    pub settled_rss_mib: Option<f64>,
    /// From the free until RSS came within 5% of its settled value.
    pub reclaim_s: Option<f64>,
    /// Completed its touch and was alive when the run ended.
    pub fits: bool,
    /// Why it was launched a second time (the emulated host crashed its first launch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_retry: Option<String>,
}

/// One sample of the timeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub t_s: f64,
    /// Host memory in use (MiB).
    pub host_used_mib: f64,
    /// Guest RAM RSS of each launched guest (MiB; 0 once gone).
    pub guest_rss_mib: Vec<f64>,
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// VMM.
    pub vmm: VmmKind,
    /// Free page reporting.
    pub reporting: bool,
    /// The automatic balloon policy.
    #[serde(default)]
    pub policy: bool,
    /// Guests that booted, completed their touch and were alive at the end.
    pub guests_fit: u32,
    /// Mean guest RAM RSS of the fitting guests once booted, before their workload.
    #[serde(default)]
    pub idle_mib_per_guest: Option<f64>,
    /// Mean settled guest RAM RSS of the fitting guests.
    pub residual_mib_per_guest: Option<f64>,
    /// Median time from free to settled RSS.
    pub reclaim_s_median: Option<f64>,
    /// The first failure; `None` when the run stopped at `max_guests`.
    pub failure: Option<Failure>,
    /// Per-guest figures.
    pub guests: Vec<GuestRecord>,
    /// Host memory over time.
    pub timeline: Vec<Sample>,
    /// Host memory in use before the first guest (MiB).
    pub baseline_used_mib: f64,
    /// Wall time of the run.
    pub wall_s: f64,
    /// Where it ran (`direct` or `nested`) and how the host was limited.
    pub host: String,
}

/// Outcome of a touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TouchOutcome {
    /// Completed.
    Done,
    /// The guest itself could not allocate (its worker was killed).
    GuestFailed(String),
    /// The VMM died or did not answer.
    VmmFailed(String),
}

/// Reads a memory figure in KiB without blocking on anything but /proc (`None`: gone).
pub type Probe = Arc<dyn Fn() -> Option<u64> + Send + Sync>;

/// A running guest, as the orchestration sees it.
pub trait GuestHandle: Send {
    /// A reader of this guest's RAM RSS for the sampler thread.
    fn rss_probe(&self) -> Probe;
    /// Waits for the ready marker.
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String>;
    /// Touches `mib` MiB and keeps it.
    fn touch(&mut self, mib: u64, timeout: Duration) -> TouchOutcome;
    /// Frees what touch holds.
    fn free(&mut self, timeout: Duration) -> Result<(), String>;
    /// The page cache workload's first step: reads `mib` MiB of the guest's data disk.
    fn read_cache(&mut self, mib: u64, timeout: Duration) -> Result<(), String> {
        let _ = (mib, timeout);
        Err("this guest has no data disk for the page cache workload".into())
    }
    /// Guest RAM RSS in KiB (None once the VMM is gone).
    fn ram_rss_kib(&self) -> Option<u64>;
    /// True while the guest's balloon policy is still moving its target (a guest under
    /// the policy has not settled until the policy calls itself steady, however flat its
    /// RSS: the policy waits out a cooldown after each deflate).
    fn policy_busy(&self) -> bool {
        false
    }
    /// `Some(description)` once the VMM has exited.
    fn exited(&mut self) -> Option<String>;
    /// Stops the VMM.
    fn kill(&mut self);
}

/// Starts guests and reads the host.
pub trait Launcher {
    /// Starts guest number `index` (1-based).
    fn launch(&mut self, index: u32) -> Result<Box<dyn GuestHandle>, String>;
    /// Host memory in use, KiB.
    fn host_used_kib(&self) -> u64;
    /// A reader of host memory in use for the sampler thread.
    fn host_probe(&self) -> Probe;
    /// Kernel OOM-killer messages since the last call.
    fn oom_messages(&mut self) -> Vec<String>;
    /// How the host is set up (for the report).
    fn describe(&self) -> String;
    /// True in the emulated test host, where a guest occasionally triple-faults at random
    /// (QEMU's TCG emulation of SVM): such a boot is retried once rather than counted as
    /// the host being full.
    fn emulated(&self) -> bool {
        false
    }
}

/// Launches guest `index`, waits for it, has it touch and free its memory and waits for
/// its RSS to settle, filling `rec`; the first failure is returned.
#[allow(clippy::too_many_arguments)]
fn bring_up(
    launcher: &mut dyn Launcher,
    cfg: &DensityConfig,
    spec: RunSpec,
    index: u32,
    probes: &Mutex<Vec<Probe>>,
    guests: &mut Vec<Box<dyn GuestHandle>>,
    rec: &mut GuestRecord,
    progress: &mut dyn FnMut(&str),
) -> Result<(), Failure> {
    let fail = |kind: FailureKind, detail: String, launcher: &mut dyn Launcher| Failure {
        guest: index,
        kind,
        detail: with_oom(detail, launcher.oom_messages()),
    };
    let touch_timeout = Duration::from_secs(cfg.touch_timeout_s);
    let t0 = Instant::now();
    let handle = launcher
        .launch(index)
        .map_err(|e| fail(FailureKind::Launch, e, launcher))?;
    lock(probes).push(handle.rss_probe());
    guests.push(handle);
    let g = guests.last_mut().expect("just pushed");
    g.wait_ready(Duration::from_secs(cfg.boot_timeout_s))
        .map_err(|e| fail(FailureKind::Boot, e, launcher))?;
    rec.boot_s = Some(t0.elapsed().as_secs_f64());
    rec.idle_rss_mib = g.ram_rss_kib().map(mib);
    if cfg.cache_mib > 0 {
        let t = Instant::now();
        g.read_cache(cfg.cache_mib, touch_timeout)
            .map_err(|e| fail(FailureKind::Touch, format!("cache read: {e}"), launcher))?;
        rec.cache_s = Some(t.elapsed().as_secs_f64());
        progress(&format!(
            "[{}] guest {index}: read {} MiB into its page cache in {:.1} s (RSS {:.0} MiB)",
            spec.label(),
            cfg.cache_mib,
            rec.cache_s.unwrap_or(0.0),
            g.ram_rss_kib().map(mib).unwrap_or(0.0)
        ));
    }
    progress(&format!(
        "[{}] guest {index}: ready after {:.1} s (RSS when booted {:.0} MiB); touching {} MiB",
        spec.label(),
        rec.boot_s.unwrap_or(0.0),
        rec.idle_rss_mib.unwrap_or(0.0),
        cfg.touch_mib()
    ));

    let t1 = Instant::now();
    match g.touch(cfg.touch_mib(), touch_timeout) {
        TouchOutcome::Done => {}
        TouchOutcome::GuestFailed(e) | TouchOutcome::VmmFailed(e) => {
            return Err(fail(FailureKind::Touch, e, launcher));
        }
    }
    rec.touch_s = Some(t1.elapsed().as_secs_f64());
    let peak = g.ram_rss_kib().map(mib);
    rec.peak_rss_mib = peak;
    g.free(touch_timeout)
        .map_err(|e| fail(FailureKind::Touch, format!("free failed: {e}"), launcher))?;
    // The touch evicted most of the cache; a guest that goes back to its files after the
    // job fills its free memory with cache again, which reporting never sees. Settling
    // is measured from here.
    if cfg.cache_mib > 0 {
        let t = Instant::now();
        g.read_cache(cfg.cache_mib, touch_timeout)
            .map_err(|e| fail(FailureKind::Touch, format!("cache re-read: {e}"), launcher))?;
        rec.reread_s = Some(t.elapsed().as_secs_f64());
        progress(&format!(
            "[{}] guest {index}: freed, then read its {} MiB again in {:.1} s",
            spec.label(),
            cfg.cache_mib,
            rec.reread_s.unwrap_or(0.0),
        ));
    }
    let freed_at = Instant::now();
    let (settled, reclaim) = settle(g.as_ref(), cfg, peak.unwrap_or(0.0), freed_at);
    rec.settled_rss_mib = settled;
    rec.reclaim_s = reclaim;
    progress(&format!(
        "[{}] guest {index}: touched in {:.1} s (RSS {:.0} MiB), settled at {} MiB{}; host in use {:.0} MiB",
        spec.label(),
        rec.touch_s.unwrap_or(0.0),
        peak.unwrap_or(0.0),
        settled.map(|s| format!("{s:.0}")).unwrap_or_else(|| "?".into()),
        reclaim
            .map(|r| format!(" after {r:.1} s"))
            .unwrap_or_default(),
        mib(launcher.host_used_kib())
    ));
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub use crate::util::{median, mib};

/// Runs `spec` with `launcher` and returns its figures; `progress` receives one line per
/// step, `on_record` each guest's figures as soon as its bring-up ended.
pub fn run_density(
    spec: RunSpec,
    cfg: &DensityConfig,
    launcher: &mut dyn Launcher,
    sample_every: Duration,
    progress: &mut dyn FnMut(&str),
    on_record: &mut dyn FnMut(&GuestRecord),
) -> RunResult {
    let start = Instant::now();
    let baseline = mib(launcher.host_used_kib());
    let mut guests: Vec<Box<dyn GuestHandle>> = Vec::new();
    let probes: Arc<Mutex<Vec<Probe>>> = Arc::new(Mutex::new(Vec::new()));
    let timeline = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut records: Vec<GuestRecord> = Vec::new();
    let mut failure: Option<Failure> = None;
    let _ = launcher.oom_messages();

    // The sampler reads /proc only; it never waits for a guest command.
    let host_reader = launcher.host_probe();
    let sampler = {
        let probes = probes.clone();
        let timeline = timeline.clone();
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let host = host_reader();
                let current: Vec<Probe> = lock(&probes).clone();
                let rss: Vec<f64> = current
                    .iter()
                    .map(|p| p().map(mib).unwrap_or(0.0))
                    .collect();
                lock(&timeline).push(Sample {
                    t_s: start.elapsed().as_secs_f64(),
                    host_used_mib: host.map(mib).unwrap_or(0.0),
                    guest_rss_mib: rss,
                });
                thread::sleep(sample_every);
            }
        })
    };

    let mut index = 0u32;
    while failure.is_none() && index < cfg.max_guests {
        index += 1;
        let mut rec = GuestRecord {
            guest: index,
            launched_at_s: start.elapsed().as_secs_f64(),
            ..Default::default()
        };
        progress(&format!(
            "[{}] guest {index}: launching (host in use {:.0} MiB)",
            spec.label(),
            mib(launcher.host_used_kib())
        ));
        let mut outcome = bring_up(
            launcher,
            cfg,
            spec,
            index,
            &probes,
            &mut guests,
            &mut rec,
            progress,
        );
        // The emulated host's own crashes (see TRIPLE_FAULT_EXIT) while the guest boots,
        // touches or settles cost it one more launch; a second crash stands.
        let crash = match &outcome {
            Err(f) if f.kind != FailureKind::Launch => Some(f.detail.clone()),
            Err(_) => None,
            Ok(()) => guests.last_mut().and_then(|g| g.exited()),
        };
        if let Some(detail) = crash {
            if launcher.emulated() && detail.contains(TRIPLE_FAULT_EXIT) {
                progress(&format!(
                    "[{}] guest {index}: crashed in the emulated host ({detail}); launching it once more",
                    spec.label(),
                ));
                if let Some(mut crashed) = guests.pop() {
                    crashed.kill();
                }
                lock(&probes).pop();
                rec = GuestRecord {
                    guest: index,
                    launched_at_s: start.elapsed().as_secs_f64(),
                    crash_retry: Some(detail),
                    ..Default::default()
                };
                outcome = bring_up(
                    launcher,
                    cfg,
                    spec,
                    index,
                    &probes,
                    &mut guests,
                    &mut rec,
                    progress,
                );
            }
        }
        on_record(&rec);
        records.push(rec);
        if let Err(f) = outcome {
            failure = Some(f);
            break;
        }

        // Did making room for this guest kill an earlier one?
        let dead: Vec<(u32, String)> = guests
            .iter_mut()
            .enumerate()
            .filter_map(|(i, g)| g.exited().map(|why| (i as u32 + 1, why)))
            .collect();
        if let Some((guest, why)) = dead.into_iter().next() {
            failure = Some(Failure {
                guest,
                kind: FailureKind::Killed,
                detail: with_oom(why, launcher.oom_messages()),
            });
        }
    }

    // Final check: which guests are still alive?
    thread::sleep(Duration::from_secs(1));
    let mut alive: Vec<bool> = Vec::new();
    for g in guests.iter_mut() {
        alive.push(g.exited().is_none());
    }
    for rec in &mut records {
        let i = (rec.guest - 1) as usize;
        rec.fits = rec.touch_s.is_some()
            && rec.settled_rss_mib.is_some()
            && alive.get(i).copied().unwrap_or(false);
    }
    if failure.is_none() {
        if let Some(rec) = records.iter().find(|r| r.touch_s.is_some() && !r.fits) {
            failure = Some(Failure {
                guest: rec.guest,
                kind: FailureKind::Killed,
                detail: with_oom(
                    "the VMM was gone when the run ended".into(),
                    launcher.oom_messages(),
                ),
            });
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();
    for g in guests.iter_mut() {
        g.kill();
    }

    let timeline = std::mem::take(&mut *lock(&timeline));
    RunResult::from_records(
        spec,
        records,
        failure,
        timeline,
        baseline,
        start.elapsed().as_secs_f64(),
        launcher.describe(),
    )
}

impl RunResult {
    /// The run's figures from its guests' records (`fits` set on each).
    pub fn from_records(
        spec: RunSpec,
        records: Vec<GuestRecord>,
        failure: Option<Failure>,
        timeline: Vec<Sample>,
        baseline_used_mib: f64,
        wall_s: f64,
        host: String,
    ) -> RunResult {
        let fitting: Vec<&GuestRecord> = records.iter().filter(|r| r.fits).collect();
        let mean = |field: fn(&GuestRecord) -> Option<f64>| {
            let values: Vec<f64> = fitting.iter().filter_map(|r| field(r)).collect();
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        };
        let residual = mean(|r| r.settled_rss_mib);
        let idle = mean(|r| r.idle_rss_mib);
        let reclaims: Vec<f64> = fitting.iter().filter_map(|r| r.reclaim_s).collect();
        RunResult {
            vmm: spec.vmm,
            reporting: spec.reporting,
            policy: spec.policy,
            guests_fit: fitting.len() as u32,
            idle_mib_per_guest: idle,
            residual_mib_per_guest: residual,
            reclaim_s_median: median(&reclaims),
            failure,
            guests: records,
            timeline,
            baseline_used_mib,
            wall_s,
            host,
        }
    }

    /// The figures of a run stopped from outside after guest `records.last()`, from the
    /// records it reported: guests that touched and settled count as fitting (they were
    /// alive when last seen), and the next guest failed as [`FailureKind::Stalled`].
    pub fn stalled(
        spec: RunSpec,
        mut records: Vec<GuestRecord>,
        why: String,
        wall_s: f64,
    ) -> RunResult {
        for r in &mut records {
            r.fits = r.touch_s.is_some() && r.settled_rss_mib.is_some();
        }
        let next = records.last().map_or(1, |r| r.guest + u32::from(r.fits));
        let failure = Failure {
            guest: next,
            kind: FailureKind::Stalled,
            detail: why,
        };
        RunResult::from_records(
            spec,
            records,
            Some(failure),
            Vec::new(),
            0.0,
            wall_s,
            "stopped from outside".into(),
        )
    }
}

fn with_oom(detail: String, oom: Vec<String>) -> String {
    if oom.is_empty() {
        detail
    } else {
        format!("{detail}; kernel: {}", oom.join(" | "))
    }
}

/// Waits until guest `slot`'s RSS stops moving; returns (settled RSS, reclaim time).
fn settle(
    guest: &dyn GuestHandle,
    cfg: &DensityConfig,
    peak_mib: f64,
    freed_at: Instant,
) -> (Option<f64>, Option<f64>) {
    let window = Duration::from_secs(cfg.settle_window_s);
    let tolerance = cfg.settle_fraction * cfg.guest_gib * 1024.0;
    let mut history: Vec<(Duration, f64)> = Vec::new();
    // A policy that calls itself steady for one report may be about to act (a trim
    // starts on the report after the guest falls quiet): it must stay steady a window.
    let mut policy_steady_since: Option<Duration> = None;
    loop {
        let Some(rss) = guest.ram_rss_kib().map(mib) else {
            return (None, None);
        };
        let now = freed_at.elapsed();
        history.push((now, rss));
        policy_steady_since = if guest.policy_busy() {
            None
        } else {
            policy_steady_since.or(Some(now))
        };
        let policy_steady = policy_steady_since.is_some_and(|t| now.saturating_sub(t) >= window);
        // Settled when the window behind us moved less than the tolerance (and at least
        // a window has passed: reporting starts ~2 s after a free).
        let in_window: Vec<f64> = history
            .iter()
            .filter(|(t, _)| now.saturating_sub(*t) <= window)
            .map(|(_, r)| *r)
            .collect();
        let spread = in_window.iter().cloned().fold(f64::MIN, f64::max)
            - in_window.iter().cloned().fold(f64::MAX, f64::min);
        if now >= window && spread <= tolerance && policy_steady {
            let settled = rss;
            // Reclaim time: first moment RSS was within 5% of the freed amount above
            // the settled value.
            let threshold = settled + 0.05 * (peak_mib - settled).max(0.0);
            let reached = history
                .iter()
                .find(|(_, r)| *r <= threshold)
                .map(|(t, _)| t.as_secs_f64());
            return (Some(settled), reached);
        }
        if now >= Duration::from_secs(cfg.settle_timeout_s) {
            let threshold = rss + 0.05 * (peak_mib - rss).max(0.0);
            let reached = history
                .iter()
                .find(|(_, r)| *r <= threshold)
                .map(|(t, _)| t.as_secs_f64());
            return (Some(rss), reached);
        }
        thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A fake host: each guest adds `touch` to the host while touched, keeps `residual`
    /// after the free, and the host kills the newest guest when it is full.
    struct FakeHost {
        capacity_mib: u64,
        used: Arc<AtomicU64>,
        residual_mib: u64,
        killed: Arc<Mutex<Vec<u32>>>,
        fail_boot_at: Option<u32>,
        /// Launches that triple-fault while booting: one entry per crash, by guest number.
        crash_boot_of: Vec<u32>,
        /// Launches whose VMM dies with a triple fault during the touch.
        crash_touch_of: Vec<u32>,
        /// Launches whose VMM dies with a triple fault once the guest freed its memory.
        crash_settle_of: Vec<u32>,
        emulated: bool,
        launches: u32,
    }

    struct FakeGuest {
        index: u32,
        used: Arc<AtomicU64>,
        capacity_mib: u64,
        residual_mib: u64,
        rss_mib: Arc<AtomicU64>,
        killed: Arc<Mutex<Vec<u32>>>,
        crashes: bool,
        crashes_in_touch: bool,
        crashes_in_settle: bool,
        crashed: bool,
    }

    impl GuestHandle for FakeGuest {
        fn rss_probe(&self) -> Probe {
            let rss = self.rss_mib.clone();
            Arc::new(move || Some(rss.load(Ordering::SeqCst) * 1024))
        }
        fn wait_ready(&mut self, _: Duration) -> Result<(), String> {
            if self.crashes {
                return Err(format!(
                    "VMM exited: ebb: guest stopped: vCPU 0: {TRIPLE_FAULT_EXIT}"
                ));
            }
            self.rss_mib.store(50, Ordering::SeqCst);
            self.used.fetch_add(50, Ordering::SeqCst);
            Ok(())
        }
        fn touch(&mut self, mib: u64, _: Duration) -> TouchOutcome {
            if self.crashes_in_touch {
                // (This handle is dropped; the guest number lives on in its relaunch.)
                self.rss_mib.store(0, Ordering::SeqCst);
                return TouchOutcome::VmmFailed(format!("ebb: guest stopped: {TRIPLE_FAULT_EXIT}"));
            }
            if self.used.load(Ordering::SeqCst) + mib > self.capacity_mib {
                lock(&self.killed).push(self.index);
                return TouchOutcome::VmmFailed("killed by signal 9".into());
            }
            self.used.fetch_add(mib, Ordering::SeqCst);
            self.rss_mib.store(50 + mib, Ordering::SeqCst);
            TouchOutcome::Done
        }
        fn read_cache(&mut self, mib: u64, _: Duration) -> Result<(), String> {
            // The cache stays: it is not freed with the touch.
            self.used.fetch_add(mib, Ordering::SeqCst);
            self.rss_mib.fetch_add(mib, Ordering::SeqCst);
            Ok(())
        }
        fn free(&mut self, _: Duration) -> Result<(), String> {
            let before = self.rss_mib.load(Ordering::SeqCst);
            if self.crashes_in_settle {
                self.crashed = true;
                self.used.fetch_sub(before, Ordering::SeqCst);
                self.rss_mib.store(0, Ordering::SeqCst);
                return Ok(());
            }
            self.used
                .fetch_sub(before - self.residual_mib, Ordering::SeqCst);
            self.rss_mib.store(self.residual_mib, Ordering::SeqCst);
            Ok(())
        }
        fn ram_rss_kib(&self) -> Option<u64> {
            if lock(&self.killed).contains(&self.index) {
                None
            } else {
                Some(self.rss_mib.load(Ordering::SeqCst) * 1024)
            }
        }
        fn exited(&mut self) -> Option<String> {
            if self.crashed {
                return Some(format!(
                    "VMM exited with exit status: 2: ebb: guest stopped: vCPU 0: {TRIPLE_FAULT_EXIT}"
                ));
            }
            lock(&self.killed)
                .contains(&self.index)
                .then(|| "killed by signal 9".to_string())
        }
        fn kill(&mut self) {}
    }

    impl Launcher for FakeHost {
        fn launch(&mut self, index: u32) -> Result<Box<dyn GuestHandle>, String> {
            if self.fail_boot_at == Some(index) {
                return Err("cannot start".into());
            }
            self.launches += 1;
            let crash = self.crash_boot_of.iter().position(|&i| i == index);
            let crashes = crash.map(|at| self.crash_boot_of.remove(at)).is_some();
            let crash = self.crash_touch_of.iter().position(|&i| i == index);
            let crashes_in_touch = crash.map(|at| self.crash_touch_of.remove(at)).is_some();
            let crash = self.crash_settle_of.iter().position(|&i| i == index);
            let crashes_in_settle = crash.map(|at| self.crash_settle_of.remove(at)).is_some();
            Ok(Box::new(FakeGuest {
                index,
                used: self.used.clone(),
                capacity_mib: self.capacity_mib,
                residual_mib: self.residual_mib,
                rss_mib: Arc::new(AtomicU64::new(0)),
                killed: self.killed.clone(),
                crashes,
                crashes_in_touch,
                crashes_in_settle,
                crashed: false,
            }))
        }
        fn host_used_kib(&self) -> u64 {
            self.used.load(Ordering::SeqCst) * 1024
        }
        fn host_probe(&self) -> Probe {
            let used = self.used.clone();
            Arc::new(move || Some(used.load(Ordering::SeqCst) * 1024))
        }
        fn oom_messages(&mut self) -> Vec<String> {
            Vec::new()
        }
        fn describe(&self) -> String {
            "fake".into()
        }
        fn emulated(&self) -> bool {
            self.emulated
        }
    }

    /// A run without progress lines or record callbacks.
    fn run_quiet(spec: RunSpec, cfg: &DensityConfig, host: &mut FakeHost) -> RunResult {
        run_density(
            spec,
            cfg,
            host,
            Duration::from_millis(50),
            &mut |_| {},
            &mut |_| {},
        )
    }

    fn cfg() -> DensityConfig {
        DensityConfig {
            host_gib: 1.0,
            guest_gib: 0.5,
            touch_gib: 0.4,
            max_guests: 10,
            boot_timeout_s: 1,
            touch_timeout_s: 1,
            settle_timeout_s: 2,
            settle_fraction: 0.01,
            settle_window_s: 1,
            cache_mib: 0,
        }
    }

    fn host(residual: u64) -> FakeHost {
        FakeHost {
            capacity_mib: 1024,
            used: Arc::new(AtomicU64::new(0)),
            residual_mib: residual,
            killed: Arc::new(Mutex::new(Vec::new())),
            fail_boot_at: None,
            crash_boot_of: Vec::new(),
            crash_touch_of: Vec::new(),
            crash_settle_of: Vec::new(),
            emulated: false,
            launches: 0,
        }
    }

    #[test]
    fn small_residual_fits_many_and_stops_at_the_first_failure() {
        let spec = RunSpec {
            vmm: VmmKind::Ebb,
            reporting: true,
            policy: false,
        };
        let mut lines = Vec::new();
        let mut reported = Vec::new();
        let r = run_density(
            spec,
            &cfg(),
            &mut host(60),
            Duration::from_millis(50),
            &mut |l| lines.push(l.to_string()),
            &mut |rec| reported.push(rec.clone()),
        );
        // Each fitting guest leaves 60 MiB; a touch needs 410 MiB on top: (1024-410)/60.
        assert_eq!(r.guests_fit, 10, "{:?}", r.failure);
        // Each guest's record was reported as its bring-up ended, the failed one's too; a
        // run stopped from outside is rebuilt from them.
        let numbers = |recs: &[GuestRecord]| recs.iter().map(|g| g.guest).collect::<Vec<_>>();
        assert_eq!(numbers(&reported), numbers(&r.guests));
        let fitted: Vec<GuestRecord> = reported
            .into_iter()
            .filter(|g| g.touch_s.is_some())
            .take(10)
            .collect();
        let stalled = RunResult::stalled(spec, fitted, "quiet".into(), 1.0);
        assert_eq!(stalled.guests_fit, 10);
        assert_eq!(stalled.residual_mib_per_guest, r.residual_mib_per_guest);
        let f = stalled.failure.unwrap();
        assert_eq!((f.guest, f.kind), (11, FailureKind::Stalled));
        assert!(r.failure.is_none(), "stopped at max_guests");
        assert_eq!(r.residual_mib_per_guest, Some(60.0));
        assert!(lines.iter().any(|l| l.contains("guest 3: ready")));
        assert!(!r.timeline.is_empty());

        let mut h = host(460);
        let r = run_quiet(spec, &cfg(), &mut h);
        // Guests keep 460 MiB each after their free: the third touch does not fit.
        assert_eq!(r.guests_fit, 2);
        let f = r.failure.unwrap();
        assert_eq!((f.guest, f.kind), (3, FailureKind::Touch));
        assert!(f.detail.contains("signal 9"));
        assert!(r
            .guests
            .iter()
            .find(|g| g.guest == 3)
            .unwrap()
            .touch_s
            .is_none());
    }

    #[test]
    fn launch_failures_are_reported() {
        let mut h = host(60);
        h.fail_boot_at = Some(3);
        let spec = RunSpec {
            vmm: VmmKind::Qemu,
            reporting: false,
            policy: false,
        };
        let r = run_quiet(spec, &cfg(), &mut h);
        assert_eq!(r.guests_fit, 2);
        assert_eq!(r.failure.as_ref().unwrap().kind, FailureKind::Launch);
        assert_eq!(r.vmm, VmmKind::Qemu);
    }

    #[test]
    fn a_guest_crash_is_retried_once_only_in_the_emulated_host() {
        let spec = RunSpec {
            vmm: VmmKind::Ebb,
            reporting: true,
            policy: false,
        };
        let mut cfg = cfg();
        cfg.max_guests = 4;
        // Emulated host: guest 2 crashes once, boots on its second launch, all four fit.
        let mut h = host(60);
        h.emulated = true;
        h.crash_boot_of = vec![2];
        let mut lines = Vec::new();
        let r = run_density(
            spec,
            &cfg,
            &mut h,
            Duration::from_millis(50),
            &mut |l| lines.push(l.to_string()),
            &mut |_| {},
        );
        assert_eq!(r.guests_fit, 4, "{:?}", r.failure);
        assert_eq!(h.launches, 5);
        let g2 = &r.guests[1];
        assert!(
            g2.fits
                && g2
                    .crash_retry
                    .as_deref()
                    .unwrap()
                    .contains(TRIPLE_FAULT_EXIT)
        );
        assert!(r.guests.iter().filter(|g| g.crash_retry.is_some()).count() == 1);
        assert!(lines
            .iter()
            .any(|l| l.contains("guest 2: crashed in the emulated host")));
        assert!(r.timeline.iter().all(|s| s.guest_rss_mib.len() <= 4));

        // A crash during the touch: that guest starts over.
        let mut h = host(60);
        h.emulated = true;
        h.crash_touch_of = vec![3];
        let r = run_quiet(spec, &cfg, &mut h);
        assert_eq!(r.guests_fit, 4, "{:?}", r.failure);
        assert_eq!(h.launches, 5);
        assert!(r.guests[2].crash_retry.is_some() && r.guests[2].touch_s.is_some());

        // A crash once the guest freed its memory, while it settles: the same.
        let mut h = host(60);
        h.emulated = true;
        h.crash_settle_of = vec![2];
        let r = run_quiet(spec, &cfg, &mut h);
        assert_eq!(r.guests_fit, 4, "{:?}", r.failure);
        assert_eq!(h.launches, 5);
        assert!(r.guests[1].crash_retry.is_some() && r.guests[1].settled_rss_mib.is_some());

        // A second crash of the same guest stands.
        let mut h = host(60);
        h.emulated = true;
        h.crash_boot_of = vec![2, 2];
        let r = run_quiet(spec, &cfg, &mut h);
        assert_eq!(r.guests_fit, 1);
        assert_eq!(h.launches, 3);
        let f = r.failure.unwrap();
        assert_eq!((f.guest, f.kind), (2, FailureKind::Boot));
        assert!(r.guests[1].crash_retry.is_some());

        // On a real host the same crash is a boot failure at once.
        let mut h = host(60);
        h.crash_boot_of = vec![2];
        let r = run_quiet(spec, &cfg, &mut h);
        assert_eq!(r.guests_fit, 1);
        assert_eq!(r.failure.unwrap().kind, FailureKind::Boot);
        assert_eq!(h.launches, 2);
        assert!(r.guests[1].crash_retry.is_none());
    }

    /// The cache workload reads before the touch and again after the free, and that cache
    /// stays on the host: fewer guests fit than with the plain workload.
    #[test]
    fn the_cache_workload_reads_first_and_its_cache_stays() {
        let spec = RunSpec::parse("ebb-on").unwrap();
        let plain = run_quiet(spec, &cfg(), &mut host(20));
        let mut with_cache = cfg();
        with_cache.cache_mib = 200;
        let mut lines = Vec::new();
        let cached = run_density(
            spec,
            &with_cache,
            &mut host(20),
            Duration::from_millis(50),
            &mut |l| lines.push(l.to_string()),
            &mut |_| {},
        );
        assert!(cached.guests.iter().all(|g| g.cache_s.is_some()));
        assert!(cached
            .guests
            .iter()
            .filter(|g| g.fits)
            .all(|g| g.reread_s.is_some()));
        assert!(plain.guests.iter().all(|g| g.cache_s.is_none()));
        assert!(
            cached.guests_fit < plain.guests_fit,
            "{} vs {}",
            cached.guests_fit,
            plain.guests_fit
        );
        assert!(lines
            .iter()
            .any(|l| l.contains("read 200 MiB into its page cache")));
        assert!(lines
            .iter()
            .any(|l| l.contains("freed, then read its 200 MiB again")));
    }

    /// A guest whose policy is still moving its target is not settled, however flat
    /// its RSS (the policy holds through a cooldown after each deflate), nor is one whose
    /// policy was steady for less than the settle window.
    #[test]
    fn a_guest_under_a_busy_policy_is_not_settled_yet() {
        struct Flat {
            busy_until: Instant,
            /// A moment within the busy time when the policy says it is steady.
            steady_blip: (Instant, Instant),
        }
        impl GuestHandle for Flat {
            fn rss_probe(&self) -> Probe {
                Arc::new(|| Some(100 * 1024))
            }
            fn wait_ready(&mut self, _: Duration) -> Result<(), String> {
                Ok(())
            }
            fn touch(&mut self, _: u64, _: Duration) -> TouchOutcome {
                TouchOutcome::Done
            }
            fn free(&mut self, _: Duration) -> Result<(), String> {
                Ok(())
            }
            fn ram_rss_kib(&self) -> Option<u64> {
                Some(100 * 1024)
            }
            fn policy_busy(&self) -> bool {
                let now = Instant::now();
                let blip = now >= self.steady_blip.0 && now < self.steady_blip.1;
                now < self.busy_until && !blip
            }
            fn exited(&mut self) -> Option<String> {
                None
            }
            fn kill(&mut self) {}
        }
        let mut c = cfg();
        c.settle_timeout_s = 10;
        let t0 = Instant::now();
        let busy = Duration::from_millis(2500);
        let (settled, _) = settle(
            &Flat {
                busy_until: t0 + busy,
                steady_blip: (
                    t0 + Duration::from_millis(1200),
                    t0 + Duration::from_millis(1800),
                ),
            },
            &c,
            500.0,
            t0,
        );
        assert_eq!(settled, Some(100.0));
        assert!(t0.elapsed() >= busy, "settled while the policy was busy");
    }

    #[test]
    fn labels_and_medians() {
        for l in ["ebb-on", "ebb-off", "ebb-auto", "qemu-on", "qemu-off"] {
            assert_eq!(RunSpec::parse(l).unwrap().label(), l);
        }
        assert!(RunSpec::parse("ebb").is_none());
        let auto = RunSpec::parse("ebb-auto").unwrap();
        assert!(auto.policy && auto.reporting);
        assert!(RunSpec::parse("qemu-auto").is_none(), "QEMU has no policy");
    }
}
