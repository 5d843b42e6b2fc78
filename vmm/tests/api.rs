//! The REST API against a fake VM: the real server, dispatcher and event-loop handler
//! (an event-manager loop in a thread) with a [`VmBackend`] fake instead of a VM, so no
//! KVM is needed. Covers every endpoint, every error class, hostile and slow clients,
//! concurrency, the OpenAPI document (`vmm/api-model/openapi.yaml`) and `ebb-ctl`'s
//! commands against it (the `ebb-ctl` binary's own tests are in `vmm/ctl/tests`).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use ebb_balloon::policy::{AutoPolicy, Observation, PolicySettings, Reason};
use ebb_balloon::stats::GuestStats;
use ebb_balloon::BalloonOptions;
use ebb_block::counters::{BlockCounters, Op, Reject};
use ebb_ctl as ctl;
use ebb_ctl::client::{self, Client, Response};
use ebb_vmm::api::backend::{BalloonSnapshot, DiskSnapshot, MemoryUsage, VmState, VmSummary};
use ebb_vmm::api::{routes, ApiError, ApiHandler, ApiServer, ServerOptions, VmBackend};
use ebb_vmm::seccomp::SeccompMode;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const GUEST_MIB: u64 = 512;

// ---------------------------------------------------------------------------------------
// The fake VM

/// What the fake VM looks like and what the API did to it.
#[derive(Debug, Clone)]
struct FakeState {
    balloon: Option<BalloonSnapshot>,
    disks: Vec<DiskSnapshot>,
    pressed: u32,
    stopped: Option<String>,
    /// Each backend call sleeps this long (a busy event loop).
    delay: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Balloon with statistics every 5 s and a statistics report.
    Stats,
    /// Balloon without statistics.
    NoStats,
    /// No balloon.
    NoBalloon,
}

fn fake_state(kind: Kind) -> FakeState {
    let balloon = match kind {
        Kind::NoBalloon => None,
        Kind::Stats | Kind::NoStats => {
            let stats_interval_s = if kind == Kind::Stats { 5 } else { 0 };
            let mut counters = ebb_balloon::counters::BalloonCounters {
                inflated_pages: 1000,
                deflated_pages: 10,
                oom_deflated_pages: 0,
                inflate_discarded_bytes: 4096 * 1000,
                reports: 7,
                reported_ranges: 20,
                reported_bytes: 20 << 22,
                reported_discarded_bytes: 20 << 22,
                madvise_calls: 30,
                ..Default::default()
            };
            for us in [50, 60, 70, 900] {
                counters.report_latency.record(Duration::from_micros(us));
            }
            Some(BalloonSnapshot {
                options: BalloonOptions {
                    target_pages: 256 * 64,
                    deflate_on_oom: true,
                    free_page_reporting: true,
                    stats_interval_s,
                    // The full-featured fake hints; the one without statistics does not.
                    free_page_hinting: kind == Kind::Stats,
                    hint_discard: Default::default(),
                    deflate_prefault: true,
                },
                guest_memory_bytes: GUEST_MIB * MIB,
                target_pages: 256 * 64,
                actual_pages: 256 * 32,
                stats_interval_s,
                driver_ready: true,
                counters,
                stats: (kind == Kind::Stats).then(|| GuestStats {
                    received_at: Some(SystemTime::now()),
                    free_memory: Some(300 * MIB),
                    total_memory: Some(480 * MIB),
                    available_memory: Some(350 * MIB),
                    minor_faults: Some(12345),
                    ..Default::default()
                }),
                hint: Default::default(),
                // A policy needs statistics: off, with one decision behind it.
                policy: (kind == Kind::Stats).then(|| {
                    let mut p = AutoPolicy::new(PolicySettings::for_ram(GUEST_MIB * MIB), false);
                    p.set_enabled(true);
                    p.decide(Observation {
                        at: Duration::from_secs(10),
                        target: 64 * MIB,
                        actual: 64 * MIB,
                        // Within the headroom band: a steady decision.
                        available: Some(150 * MIB),
                        ..Default::default()
                    });
                    p.set_enabled(false);
                    p.view(Duration::from_secs(12))
                }),
            })
        }
    };
    // The VMs with a balloon have a disk too; the one without has none.
    let disks = match kind {
        Kind::NoBalloon => Vec::new(),
        Kind::Stats | Kind::NoStats => {
            let mut counters = BlockCounters {
                read_bytes: 3 * MIB,
                written_bytes: MIB,
                io_errors: 1,
                ..Default::default()
            };
            for _ in 0..3 {
                counters.count_completed(Op::Read);
            }
            counters.count_completed(Op::Write);
            counters.count_rejected(Reject::Range);
            vec![DiskSnapshot {
                path: "/img/root.raw".into(),
                id: "root".into(),
                readonly: false,
                capacity_bytes: 1 << 30,
                driver_ready: true,
                counters,
            }]
        }
    };
    FakeState {
        balloon,
        disks,
        pressed: 0,
        stopped: None,
        delay: Duration::ZERO,
    }
}

struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        let s = self.0.lock().unwrap();
        if !s.delay.is_zero() {
            thread::sleep(s.delay);
        }
        s
    }
}

impl VmBackend for Fake {
    fn summary(&self) -> VmSummary {
        let s = self.state();
        VmSummary {
            state: if s.stopped.is_some() {
                VmState::Stopping
            } else if s.pressed > 0 {
                VmState::ShuttingDown
            } else {
                VmState::Running
            },
            uptime: Duration::from_millis(12_345),
            vcpus: 2,
            memory_bytes: GUEST_MIB * MIB,
            memory_backing: "anon",
            kernel: "/boot/vmlinuz".into(),
            initramfs: None,
            cmdline: "console=ttyS0".into(),
            pid: std::process::id(),
        }
    }

    fn memory_usage(&self) -> MemoryUsage {
        MemoryUsage {
            guest_ram_rss: Some(100 * MIB),
            process_rss: Some(108 * MIB),
        }
    }

    fn balloon(&self) -> Option<BalloonSnapshot> {
        self.state().balloon.clone()
    }

    fn disks(&self) -> Vec<DiskSnapshot> {
        self.state().disks.clone()
    }

    fn set_balloon_target(&mut self, pages: u64) -> Result<(), ApiError> {
        let mut s = self.state();
        let b = s.balloon.as_mut().expect("checked by the API layer");
        b.target_pages = pages as u32;
        Ok(())
    }

    fn set_balloon_stats_interval(&mut self, secs: u32) -> Result<(), ApiError> {
        let mut s = self.state();
        let b = s.balloon.as_mut().expect("checked by the API layer");
        assert!(
            b.options.stats_interval_s > 0 && secs > 0,
            "checked by the API layer"
        );
        b.stats_interval_s = secs;
        Ok(())
    }

    fn start_hinting(&mut self, acknowledge_on_stop: bool) -> Result<u32, ApiError> {
        let mut s = self.state();
        let b = s.balloon.as_mut().expect("checked by the API layer");
        assert!(b.options.free_page_hinting, "checked by the API layer");
        Ok(b.hint.start(acknowledge_on_stop, std::time::Instant::now()))
    }

    fn stop_hinting(&mut self) -> Result<(), ApiError> {
        let mut s = self.state();
        let b = s.balloon.as_mut().expect("checked by the API layer");
        assert!(b.options.free_page_hinting, "checked by the API layer");
        b.hint.done();
        Ok(())
    }

    fn set_balloon_policy(
        &mut self,
        settings: PolicySettings,
        enabled: bool,
    ) -> Result<(), ApiError> {
        let mut s = self.state();
        let b = s.balloon.as_mut().expect("checked by the API layer");
        let p = b.policy.as_mut().expect("checked by the API layer");
        settings
            .check(b.guest_memory_bytes)
            .expect("checked by the API layer");
        p.settings = settings;
        p.enabled = enabled;
        Ok(())
    }

    fn press_power_button(&mut self) -> Result<(), ApiError> {
        self.state().pressed += 1;
        Ok(())
    }

    fn stop(&mut self, reason: &str) {
        self.state().stopped = Some(reason.to_string());
    }
}

// ---------------------------------------------------------------------------------------
// Harness

fn scratch_dir() -> PathBuf {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ebb-api-test-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Short timeouts so the slow-client tests run quickly; the server thread runs under its
/// seccomp filter as in `ebb`, so every test here also checks the API allow-list (a
/// forbidden call ends the test process with a message naming it).
fn quick_options() -> ServerOptions {
    ServerOptions {
        seccomp: SeccompMode::On,
        max_connections: 32,
        header_timeout: Duration::from_millis(600),
        body_timeout: Duration::from_millis(600),
        write_timeout: Duration::from_millis(600),
        reply_timeout: Duration::from_secs(3),
        max_body_bytes: 16 * 1024,
        shutdown_grace: Duration::from_millis(500),
    }
}

/// A server on a scratch socket with a fake VM behind an event-manager loop.
struct Harness {
    dir: PathBuf,
    path: PathBuf,
    state: Arc<Mutex<FakeState>>,
    server: Option<ApiServer>,
    stop: Arc<AtomicBool>,
    event_loop: Option<JoinHandle<()>>,
}

impl Harness {
    fn new(kind: Kind) -> Self {
        Self::with(kind, quick_options(), true)
    }

    /// `event_loop: false` drops the VMM side: every request must fail with 503.
    fn with(kind: Kind, options: ServerOptions, event_loop: bool) -> Self {
        let dir = scratch_dir();
        let path = dir.join("api.sock");
        let state = Arc::new(Mutex::new(fake_state(kind)));
        let (server, queue) = ebb_vmm::api::start(&path, options).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let event_loop = event_loop.then(|| {
            let fake = Fake(state.clone());
            let stop = stop.clone();
            thread::spawn(move || {
                let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> =
                    EventManager::new().unwrap();
                events.add_subscriber(Box::new(ApiHandler::new(queue, fake)));
                while !stop.load(Ordering::Relaxed) {
                    let _ = events.run_with_timeout(20);
                }
            })
        });
        Self {
            dir,
            path,
            state,
            server: Some(server),
            stop,
            event_loop,
        }
    }

    fn client(&self) -> Client {
        Client::new(&self.path, Duration::from_secs(10))
    }

    fn get(&self, path: &str) -> Response {
        self.client().get(path).unwrap()
    }

    fn send(&self, method: &str, path: &str, body: &str) -> Response {
        self.client()
            .request(method, path, Some(body.as_bytes()))
            .unwrap()
    }

    fn state(&self) -> FakeState {
        self.state.lock().unwrap().clone()
    }

    /// Writes raw bytes on a new connection and reads one response.
    fn raw(&self, bytes: &[u8]) -> Response {
        let mut s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(bytes).unwrap();
        client::read_response(s, &self.path).unwrap()
    }

    fn assert_serving(&self) {
        let r = self.get("/vm");
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.event_loop.take() {
            let _ = t.join();
        }
        drop(self.server.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn json_of(r: &Response) -> Value {
    r.json()
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", r.text()))
}

/// Asserts an error response: status, JSON `fault_message` containing `needle`.
fn assert_fault(r: &Response, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = json_of(r);
    let m = v["fault_message"].as_str().expect("fault_message");
    assert!(m.contains(needle), "'{m}' does not mention '{needle}'");
}

// ---------------------------------------------------------------------------------------
// Endpoints

#[test]
fn get_balloon() {
    let h = Harness::new(Kind::Stats);
    let r = h.get("/balloon");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        json_of(&r),
        json!({
            "amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 5,
            "free_page_reporting": true, "target_mib": 64, "actual_mib": 32,
            "free_page_hinting": true, "deflate_prefault": true
        })
    );
}

#[test]
fn patch_balloon_sets_the_target() {
    let h = Harness::new(Kind::Stats);
    let r = h.send("PATCH", "/balloon", r#"{"amount_mib": 200}"#);
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    assert_eq!(h.state().balloon.unwrap().target_pages, 200 * 256);
    assert_eq!(json_of(&h.get("/balloon"))["amount_mib"], 200);
    // The whole of guest memory is allowed, one MiB more is not.
    let r = h.send(
        "PATCH",
        "/balloon",
        &format!(r#"{{"amount_mib": {GUEST_MIB}}}"#),
    );
    assert_eq!(r.status, 204);
    let r = h.send(
        "PATCH",
        "/balloon",
        &format!(r#"{{"amount_mib": {}}}"#, GUEST_MIB + 1),
    );
    assert_fault(&r, 400, "larger than guest memory");
    assert_eq!(h.state().balloon.unwrap().target_pages, 512 * 256);
    let r = h.send("PATCH", "/balloon", r#"{"amount_mib": 0}"#);
    assert_eq!(r.status, 204);
}

/// The policy's settings and decisions are readable; changes are checked against guest
/// memory; while it is on it owns the target.
#[test]
fn balloon_policy_get_and_patch() {
    let h = Harness::new(Kind::Stats);
    let v = json_of(&h.get("/balloon/policy"));
    assert_eq!(v["enabled"], false);
    // Defaults for a 512 MiB guest: headroom 128 MiB (the floor), steps of 32 MiB, a max leaving it 128 MiB.
    assert_eq!(
        (v["headroom_mib"].as_u64(), v["step_mib"].as_u64()),
        (Some(128), Some(32))
    );
    assert_eq!(v["max_mib"], 384);
    assert_eq!(v["last_decision"]["reason"], "steady");
    assert_eq!(v["last_decision"]["age_ms"], 2000);
    assert_eq!(v["decisions"]["steady"], 1);

    let r = h.send(
        "PATCH",
        "/balloon/policy",
        r#"{"enabled": true, "headroom_mib": 96}"#,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let v = json_of(&h.get("/balloon/policy"));
    assert_eq!(
        (v["enabled"].as_bool(), v["headroom_mib"].as_u64()),
        (Some(true), Some(96))
    );
    let r = h.send(
        "PATCH",
        "/balloon/policy",
        r#"{"fault_rate_per_s": 50, "cooldown_s": 5, "trim": false}"#,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let v = json_of(&h.get("/balloon/policy"));
    assert_eq!(
        (
            v["fault_rate_per_s"].as_u64(),
            v["cooldown_s"].as_u64(),
            v["trim"].as_bool()
        ),
        (Some(50), Some(5), Some(false))
    );
    // The policy owns the target now.
    let r = h.send("PATCH", "/balloon", r#"{"amount_mib": 10}"#);
    assert_fault(&r, 409, "policy sets the target");
    let metrics = h.get("/metrics").text();
    assert!(
        metrics.contains("ebb_balloon_policy_enabled 1"),
        "{metrics}"
    );
    assert!(metrics.contains("ebb_balloon_policy_decisions_total{reason=\"steady\"} 1"));

    for (body, needle) in [
        (
            r#"{"headroom_mib": 512}"#,
            "headroom 512 MiB is not below guest memory",
        ),
        (
            r#"{"min_mib": 300, "max_mib": 200}"#,
            "min 300 MiB is above policy max 200 MiB",
        ),
        (r#"{"max_mib": 1024}"#, "max 1024 MiB is above guest memory"),
        (r#"{"step_mib": 0}"#, "step must be above 0"),
        (r#"{"cooldown_s": 3601}"#, "cooldown_s 3601 is above 3600"),
        (r#"{"fault_rate_per_s": -1}"#, "invalid request body"),
        (r#"{"headroom_mib": 18446744073709551615}"#, "too large"),
        (r#"{"enabled": "yes"}"#, "invalid request body"),
        (r#"{"headroom": 1}"#, "unknown field"),
    ] {
        assert_fault(&h.send("PATCH", "/balloon/policy", body), 400, needle);
    }
    // Nothing half-applied by a refused change.
    assert_eq!(json_of(&h.get("/balloon/policy"))["headroom_mib"], 96);
    let r = h.send("PATCH", "/balloon/policy", r#"{"enabled": false}"#);
    assert_eq!(r.status, 204);
    assert_eq!(
        h.send("PATCH", "/balloon", r#"{"amount_mib": 10}"#).status,
        204
    );

    // Without statistics there is no policy; without a balloon, 409 as everywhere.
    let h = Harness::new(Kind::NoStats);
    assert_fault(&h.get("/balloon/policy"), 400, "stats_interval=SECS");
    assert_fault(
        &h.send("PATCH", "/balloon/policy", r#"{"enabled": true}"#),
        400,
        "statistics",
    );
    let h = Harness::new(Kind::NoBalloon);
    assert_fault(&h.get("/balloon/policy"), 409, "no balloon");
}

#[test]
fn balloon_statistics() {
    let h = Harness::new(Kind::Stats);
    let r = h.get("/balloon/statistics");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json_of(&r);
    assert_eq!(v["target_pages"], 64 * 256);
    assert_eq!(v["actual_pages"], 32 * 256);
    assert_eq!(v["target_mib"], 64);
    assert_eq!(v["actual_mib"], 32);
    assert_eq!(v["free_memory"], 300 * MIB);
    assert_eq!(v["total_memory"], 480 * MIB);
    assert_eq!(v["minor_faults"], 12345);
    // Not reported by the guest: omitted.
    for absent in [
        "swap_in",
        "swap_out",
        "major_faults",
        "disk_caches",
        "oom_kill",
    ] {
        assert!(v.get(absent).is_none(), "{absent}");
    }
    let e = &v["ebb"];
    assert_eq!(e["inflated_pages"], 1000);
    assert_eq!(e["reports"], 7);
    assert_eq!(e["discarded_bytes"], 4096 * 1000 + (20 << 22));
    assert_eq!(e["report_latency"]["count"], 4);
    assert_eq!(e["report_latency"]["p50_us"], 64);
    assert_eq!(e["report_latency"]["p99_us"], 1024);
    assert!(e["stats_age_ms"].as_u64().unwrap() < 60_000);
    assert_eq!(e["rejects"]["pfns"], 0);
}

#[test]
fn balloon_statistics_need_statistics_enabled_at_boot() {
    let h = Harness::new(Kind::NoStats);
    assert_fault(&h.get("/balloon/statistics"), 400, "not enabled at boot");
    let r = h.send(
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s": 3}"#,
    );
    assert_fault(&r, 400, "not enabled at boot");
    assert_eq!(json_of(&h.get("/balloon"))["stats_polling_interval_s"], 0);
}

#[test]
fn patch_statistics_interval() {
    let h = Harness::new(Kind::Stats);
    let r = h.send(
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s": 1}"#,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(h.state().balloon.unwrap().stats_interval_s, 1);
    assert_eq!(json_of(&h.get("/balloon"))["stats_polling_interval_s"], 1);
    let r = h.send(
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s": 0}"#,
    );
    assert_fault(&r, 400, "cannot be turned off");
    let r = h.send(
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s": 65536}"#,
    );
    assert_fault(&r, 400, "invalid request body");
    assert_eq!(h.state().balloon.unwrap().stats_interval_s, 1);
}

#[test]
fn get_vm() {
    let h = Harness::new(Kind::Stats);
    let v = json_of(&h.get("/vm"));
    assert_eq!(v["state"], "running");
    assert_eq!(v["vcpus"], 2);
    assert_eq!(v["memory_mib"], GUEST_MIB);
    assert_eq!(v["memory_backing"], "anon");
    assert_eq!(v["kernel"], "/boot/vmlinuz");
    assert_eq!(v["initramfs"], Value::Null);
    assert_eq!(v["uptime_s"], 12.345);
    assert_eq!(v["pid"], std::process::id());
    assert_eq!(v["balloon"]["amount_mib"], 64);
    assert_eq!(v["rss"]["guest_ram_bytes"], 100 * MIB);
    assert_eq!(v["rss"]["vmm_bytes"], 8 * MIB);
    assert_eq!(v["rss"]["process_bytes"], 108 * MIB);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        v["disks"],
        json!([{
            "path": "/img/root.raw",
            "id": "root",
            "readonly": false,
            "capacity_bytes": 1u64 << 30,
            "driver_ready": true,
        }])
    );
    let none = Harness::new(Kind::NoBalloon);
    assert_eq!(json_of(&none.get("/vm"))["disks"], json!([]));
}

#[test]
fn shutdown_presses_the_power_button_and_stop_stops() {
    let h = Harness::new(Kind::Stats);
    let r = h.client().request("PUT", "/vm/shutdown", None).unwrap();
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(h.state().pressed, 1);
    assert_eq!(json_of(&h.get("/vm"))["state"], "shutting_down");
    // An empty object is fine as a body; anything else is not.
    assert_eq!(h.send("PUT", "/vm/shutdown", "{}").status, 204);
    assert_fault(
        &h.send("PUT", "/vm/shutdown", r#"{"force": true}"#),
        400,
        "unknown field",
    );
    assert_eq!(h.state().pressed, 2);
    let r = h.client().request("PUT", "/vm/stop", None).unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(h.state().stopped.as_deref(), Some(routes::STOP_REASON));
    assert_eq!(routes::STOP_REASON, "API stop request");
    assert_eq!(json_of(&h.get("/vm"))["state"], "stopping");
}

#[test]
fn metrics_are_prometheus_text() {
    let h = Harness::new(Kind::Stats);
    let r = h.get("/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let t = r.text();
    for needle in [
        "# TYPE ebb_balloon_inflated_pages_total counter",
        "ebb_balloon_inflated_pages_total 1000",
        "ebb_balloon_target_bytes 67108864",
        "ebb_balloon_actual_bytes 33554432",
        "# TYPE ebb_balloon_report_latency_seconds histogram",
        "ebb_balloon_report_latency_seconds_count 4",
        "ebb_balloon_report_latency_seconds_bucket{le=\"+Inf\"} 4",
        "ebb_guest_free_memory_bytes 314572800",
        "ebb_guest_ram_rss_bytes 104857600",
        "ebb_vmm_rss_bytes 8388608",
        "ebb_vm_state{state=\"running\"} 1",
        "# TYPE ebb_disk_requests_total counter",
        "ebb_disk_requests_total{disk=\"root\",op=\"read\"} 3",
        "ebb_disk_requests_total{disk=\"root\",op=\"write\"} 1",
        "ebb_disk_read_bytes_total{disk=\"root\"} 3145728",
        "ebb_disk_written_bytes_total{disk=\"root\"} 1048576",
        "ebb_disk_io_errors_total{disk=\"root\"} 1",
        "ebb_disk_rejected_requests_total{disk=\"root\",reason=\"range\"} 1",
        "ebb_disk_capacity_bytes{disk=\"root\"} 1073741824",
    ] {
        assert!(t.contains(needle), "missing '{needle}' in:\n{t}");
    }
    for line in t.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = line.rsplit_once(' ').unwrap();
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad sample: {line}"));
    }
}

#[test]
fn balloon_not_configured_is_409() {
    let h = Harness::new(Kind::NoBalloon);
    assert_fault(&h.get("/balloon"), 409, "no balloon");
    assert_fault(&h.get("/balloon/statistics"), 409, "no balloon");
    assert_fault(
        &h.send("PATCH", "/balloon", r#"{"amount_mib": 1}"#),
        409,
        "no balloon",
    );
    assert_fault(
        &h.send(
            "PATCH",
            "/balloon/statistics",
            r#"{"stats_polling_interval_s": 1}"#,
        ),
        409,
        "no balloon",
    );
    let v = json_of(&h.get("/vm"));
    assert_eq!(v["balloon"], Value::Null);
    let m = h.get("/metrics").text();
    assert!(!m.contains("ebb_balloon_") && m.contains("ebb_vm_uptime_seconds"));
    assert!(!m.contains("ebb_disk_"));
}

// ---------------------------------------------------------------------------------------
// Error classes

#[test]
fn bad_bodies_are_400_with_the_reason() {
    let h = Harness::new(Kind::Stats);
    let cases = [
        ("{\"amount_mib\": ", "EOF while parsing"),
        ("not json", "expected a JSON object"),
        ("[1]", "expected a JSON object"),
        ("{\"amount_mib\": 1, \"extra\": 2}", "unknown field `extra`"),
        ("{\"amount\": 1}", "unknown field `amount`"),
        ("{\"amount_mib\": \"64\"}", "invalid type: string"),
        ("{\"amount_mib\": true}", "invalid type: boolean"),
        ("{\"amount_mib\": 1.5}", "invalid type: floating point"),
        ("{\"amount_mib\": -1}", "invalid value: integer `-1`"),
        (
            "{\"amount_mib\": 4294967296}",
            "invalid value: integer `4294967296`",
        ),
        ("{\"amount_mib\": 99999999999999999999999}", "invalid"),
        ("{}", "missing field `amount_mib`"),
        ("", "needs a JSON body"),
        ("\u{0}\u{1}\u{2}", "invalid request body"),
    ];
    for (body, needle) in cases {
        let r = h.send("PATCH", "/balloon", body);
        assert_eq!(r.status, 400, "{body:?}");
        assert_fault(&r, 400, needle);
    }
    let r = h.client().request("PATCH", "/balloon", None).unwrap();
    assert_fault(&r, 400, "needs a JSON body");
    // Invalid UTF-8 in the body.
    let r = h
        .client()
        .request("PATCH", "/balloon", Some(&[b'{', 0xff, 0xfe, b'}']))
        .unwrap();
    assert_fault(&r, 400, "invalid request body");
    // Nothing changed.
    assert_eq!(h.state().balloon.unwrap().target_pages, 64 * 256);
    h.assert_serving();
}

#[test]
fn unknown_paths_are_404_and_wrong_methods_405() {
    let h = Harness::new(Kind::Stats);
    for path in [
        "/",
        "/balloons",
        "/balloon/",
        "/balloon/hinting",
        "/vm/x",
        "/actions",
    ] {
        assert_fault(&h.get(path), 404, "no such resource");
    }
    assert_fault(
        &h.send("PUT", "/nope", "{}"),
        404,
        "no such resource: /nope",
    );
    for (method, path) in [
        ("PUT", "/balloon"),
        ("DELETE", "/balloon"),
        ("POST", "/balloon/statistics"),
        ("PATCH", "/vm"),
        ("GET", "/vm/shutdown"),
        ("GET", "/vm/stop"),
        ("POST", "/metrics"),
    ] {
        let r = h.client().request(method, path, None).unwrap();
        assert_fault(&r, 405, "is not allowed");
    }
    let r = h.client().request("DELETE", "/balloon", None).unwrap();
    assert_fault(&r, 405, "allowed: GET, PATCH");
    assert_eq!(r.header("allow"), Some("GET, PATCH"));
    h.assert_serving();
}

#[test]
fn garbage_and_non_http_bytes_get_400_and_the_server_keeps_serving() {
    let h = Harness::new(Kind::Stats);
    let garbage: [&[u8]; 5] = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        b"HELLO\r\n\r\n",
        b"GET /vm HTTP/9.9\r\n\r\n",
        b"GET /vm\r\n\r\n",
        b"\x00\x00\x00\x00\r\n\r\n",
    ];
    for g in garbage {
        let mut s = UnixStream::connect(&h.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(g).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 400") || text.starts_with("HTTP/1.1 505"),
            "{g:?} -> {text:?}"
        );
        h.assert_serving();
    }
    // A connection that sends bytes and hangs up at once.
    for _ in 0..20 {
        let mut s = UnixStream::connect(&h.path).unwrap();
        let _ = s.write_all(b"PATCH /balloon HTTP/1.1\r\nContent-Le");
    }
    h.assert_serving();
}

#[test]
fn a_10_mib_body_is_refused_without_being_read() {
    let h = Harness::new(Kind::Stats);
    let big = 10 * 1024 * 1024;
    // With a Content-Length: refused from the header.
    let mut s = UnixStream::connect(&h.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!("PATCH /balloon HTTP/1.1\r\nHost: x\r\nContent-Length: {big}\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut writer = s.try_clone().unwrap();
    let sent = thread::spawn(move || {
        let chunk = vec![b' '; 64 * 1024];
        let mut sent = 0usize;
        while sent < big {
            match writer.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent
    });
    let start = Instant::now();
    let r = client::read_response(s, &h.path).unwrap();
    assert_fault(&r, 413, "larger than 16384 bytes");
    assert!(start.elapsed() < Duration::from_secs(5));
    let sent = sent.join().unwrap();
    assert!(sent < big, "the server read the whole body ({sent} bytes)");
    // Chunked, without a length: refused once past the limit.
    let mut s = UnixStream::connect(&h.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"PATCH /balloon HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let mut writer = s.try_clone().unwrap();
    let sent = thread::spawn(move || {
        let data = vec![b' '; 64 * 1024];
        let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
        chunk.extend_from_slice(&data);
        chunk.extend_from_slice(b"\r\n");
        let mut sent = 0usize;
        while sent < big {
            match writer.write_all(&chunk) {
                Ok(()) => sent += data.len(),
                Err(_) => break,
            }
        }
        sent
    });
    let r = client::read_response(s, &h.path).unwrap();
    assert_fault(&r, 413, "larger than");
    assert!(sent.join().unwrap() < big);
    // Body limit on the actions too.
    let r = h.raw(b"PUT /vm/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n");
    assert_fault(&r, 413, "larger than");
    assert_eq!(h.state().stopped, None);
    h.assert_serving();
}

#[test]
fn half_sent_requests_time_out_without_stalling_others() {
    let h = Harness::new(Kind::Stats);
    // Headers never finished.
    let mut head = UnixStream::connect(&h.path).unwrap();
    head.write_all(b"GET /vm HTTP/1.1\r\nHost: x\r\nX-Slow:")
        .unwrap();
    // Body shorter than announced.
    let mut body = UnixStream::connect(&h.path).unwrap();
    body.write_all(
        b"PATCH /balloon HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{\"amount_mib\"",
    )
    .unwrap();
    // A connection that says nothing at all.
    let mut silent = UnixStream::connect(&h.path).unwrap();
    // Others are served meanwhile, promptly.
    let start = Instant::now();
    for _ in 0..5 {
        h.assert_serving();
    }
    assert!(start.elapsed() < Duration::from_millis(500));
    // The stalled body gets 408.
    body.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let r = client::read_response(body, &h.path).unwrap();
    assert_fault(&r, 408, "not received within");
    // The unfinished head and the silent connection are closed.
    for s in [&mut head, &mut silent] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let started = Instant::now();
        let _ = s.read_to_end(&mut buf);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "not closed in time"
        );
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }
    assert_eq!(h.state().balloon.unwrap().target_pages, 64 * 256);
    h.assert_serving();
}

#[test]
fn a_client_that_never_reads_is_cut_off() {
    let h = Harness::new(Kind::Stats);
    let s = UnixStream::connect(&h.path).unwrap();
    let mut writer = s.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    // Pipelined requests whose answers (about 5 KiB of metrics each) fill the socket.
    let pusher = thread::spawn(move || {
        let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        for _ in 0..20_000 {
            if writer.write_all(req).is_err() {
                break;
            }
        }
    });
    // Others are served while the server is stuck writing to that client.
    for _ in 0..10 {
        h.assert_serving();
    }
    pusher.join().unwrap();
    // The server gave up on it: draining what it wrote ends in EOF or a reset.
    let mut s = s;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let start = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the connection stayed open: {e}"),
        }
        assert!(start.elapsed() < Duration::from_secs(20), "still sending");
    }
    h.assert_serving();
}

#[test]
fn concurrent_clients() {
    let h = Arc::new(Harness::new(Kind::Stats));
    let workers: Vec<_> = (0..16)
        .map(|i| {
            let h = h.clone();
            thread::spawn(move || {
                let c = h.client();
                let mut conn = c.connect().unwrap();
                for j in 0..40 {
                    let r = match (i + j) % 4 {
                        0 => conn.send("GET", "/balloon", None, true).unwrap(),
                        1 => conn
                            .send(
                                "PATCH",
                                "/balloon",
                                Some(format!(r#"{{"amount_mib": {}}}"#, i * 10 + j).as_bytes()),
                                true,
                            )
                            .unwrap(),
                        2 => c.get("/balloon/statistics").unwrap(),
                        _ => c.get("/metrics").unwrap(),
                    };
                    assert!(r.is_success(), "{} {}", r.status, r.text());
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    h.assert_serving();
}

#[test]
fn connections_are_bounded() {
    let options = ServerOptions {
        max_connections: 3,
        header_timeout: Duration::from_secs(5),
        ..quick_options()
    };
    let h = Harness::with(Kind::Stats, options, true);
    let mut held: Vec<_> = (0..3).map(|_| h.client().connect().unwrap()).collect();
    // Make sure the three are accepted before the fourth arrives.
    for c in &mut held {
        assert_eq!(c.send("GET", "/vm", None, true).unwrap().status, 200);
    }
    let r = h.client().get("/vm").unwrap();
    assert_fault(&r, 503, "too many API connections");
    held.pop();
    // The permit comes back when the connection's task ends.
    let start = Instant::now();
    loop {
        let r = h.client().get("/vm").unwrap();
        if r.status == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{}", r.text());
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_stuck_event_loop_gives_503_and_a_gone_one_too() {
    // A backend call that takes longer than the reply timeout.
    let options = ServerOptions {
        reply_timeout: Duration::from_millis(300),
        ..quick_options()
    };
    let h = Harness::with(Kind::Stats, options, true);
    h.state.lock().unwrap().delay = Duration::from_millis(800);
    assert_fault(&h.get("/balloon"), 503, "did not answer within");
    h.state.lock().unwrap().delay = Duration::ZERO;
    thread::sleep(Duration::from_millis(900));
    h.assert_serving();
    // No event loop at all (the VMM is stopping).
    let h = Harness::with(Kind::Stats, quick_options(), false);
    assert_fault(&h.get("/vm"), 503, "stopping");
    assert_fault(
        &h.send("PATCH", "/balloon", r#"{"amount_mib": 1}"#),
        503,
        "stopping",
    );
}

/// A client running as another user (not root) is disconnected unanswered, even when
/// the socket's mode would let it in. Needs root, to become that other user.
#[test]
fn clients_of_other_users_are_refused() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root: it connects as user 65534 to check the API's peer check"
    );
    let h = Harness::new(Kind::Stats);
    std::fs::set_permissions(&h.path, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(&h.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Everything the child needs is prepared before the fork: it makes only raw calls.
    // SAFETY: sockaddr_un is plain data; zeroed is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = h.path.as_os_str().as_encoded_bytes();
    assert!(path.len() < addr.sun_path.len());
    for (slot, &b) in addr.sun_path.iter_mut().zip(path) {
        *slot = b as libc::c_char;
    }
    let request = b"GET /balloon HTTP/1.1\r\nHost: ebb\r\n\r\n";
    // SAFETY: the child makes only async-signal-safe system calls, then _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: raw system calls on our own buffers in the forked child.
        unsafe {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(3);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if fd < 0 || libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
                libc::_exit(2);
            }
            libc::write(fd, request.as_ptr().cast(), request.len());
            let mut answer = [0u8; 64];
            let n = libc::read(fd, answer.as_mut_ptr().cast(), answer.len());
            // Closed (0) or reset (-1: the server dropped it with the request unread).
            libc::_exit(if n <= 0 { 0 } else { 1 });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status));
    match libc::WEXITSTATUS(status) {
        0 => {}
        1 => panic!("the other user's request was answered"),
        2 => panic!("the other user could not connect (the test's chmod did not take)"),
        code => panic!("child failed to switch users ({code})"),
    }
    // This user is still served.
    h.assert_serving();
}

#[test]
fn socket_mode_and_removal() {
    let h = Harness::new(Kind::Stats);
    let mode = std::fs::metadata(&h.path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A second server on the same path is refused while this one lives.
    let e = ebb_vmm::api::start(&h.path, quick_options()).unwrap_err();
    assert!(
        e.to_string().contains("another process is listening"),
        "{e}"
    );
    let path = h.path.clone();
    let dir = h.dir.clone();
    let mut h = h;
    drop(h.server.take());
    assert!(!path.exists(), "socket left behind");
    // A stale socket (nothing listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let (server, _queue) = ebb_vmm::api::start(&path, quick_options()).unwrap();
    assert!(UnixStream::connect(&path).is_ok());
    drop(server);
    assert!(!path.exists());
    assert!(dir.exists());
}

#[test]
fn the_answer_to_stop_arrives_before_the_server_goes() {
    let mut h = Harness::new(Kind::Stats);
    let path = h.path.clone();
    let asker = thread::spawn(move || {
        Client::new(&path, Duration::from_secs(5))
            .request("PUT", "/vm/stop", None)
            .unwrap()
    });
    // Like ebb: wait for the stop request, then stop the event loop and the server.
    let start = Instant::now();
    while h.state().stopped.is_none() {
        assert!(start.elapsed() < Duration::from_secs(5));
        thread::sleep(Duration::from_millis(1));
    }
    h.stop.store(true, Ordering::Relaxed);
    h.event_loop.take().unwrap().join().unwrap();
    drop(h.server.take());
    assert_eq!(asker.join().unwrap().status, 204);
}

// ---------------------------------------------------------------------------------------
// OpenAPI conformance

fn openapi() -> Value {
    serde_yaml::from_str(ebb_api_model::OPENAPI_YAML).expect("openapi.yaml parses")
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let mut node = doc;
            for part in r.trim_start_matches("#/").split('/') {
                node = &node[part];
            }
            assert!(!node.is_null(), "dangling $ref {r}");
            resolve(doc, node)
        }
        None => v,
    }
}

/// Checks `value` against an OpenAPI 3.0 schema (the subset the document uses).
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if value.is_null() {
        return if schema["nullable"] == true {
            Ok(())
        } else {
            Err(format!("{at}: null but not nullable"))
        };
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            validate(doc, s, value, at)?;
        }
    }
    let Some(ty) = schema.get("type").and_then(Value::as_str) else {
        return Ok(());
    };
    let ok = match ty {
        "object" => value.is_object(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        other => return Err(format!("{at}: unsupported type {other}")),
    };
    if !ok {
        return Err(format!("{at}: expected {ty}, got {value}"));
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        if !values.contains(value) {
            return Err(format!("{at}: {value} not in {values:?}"));
        }
    }
    if let (Some(min), Some(v)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        if v < min {
            return Err(format!("{at}: {v} below {min}"));
        }
    }
    if let (Some(max), Some(v)) = (
        schema.get("maximum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        if v > max {
            return Err(format!("{at}: {v} above {max}"));
        }
    }
    if ty == "object" {
        let obj = value.as_object().unwrap();
        let props = schema.get("properties").and_then(Value::as_object);
        for req in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = req.as_str().unwrap();
            if !obj.contains_key(name) {
                return Err(format!("{at}: required field {name} missing"));
            }
        }
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(doc, s, v, &format!("{at}.{k}"))?,
                None if schema["additionalProperties"] == false || props.is_some() => {
                    return Err(format!("{at}: undocumented field {k}"))
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// A request that makes (path, method) answer `status`, and the server kind it needs.
fn trigger(path: &str, method: &str, status: u16) -> (Kind, bool, Vec<u8>) {
    let m = method.to_ascii_uppercase();
    let req = |body: Option<&str>| {
        let mut r = format!("{m} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        if let Some(b) = body {
            r.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len()));
        } else {
            r.push_str("\r\n");
        }
        r.into_bytes()
    };
    let good_body = match (path, method) {
        ("/balloon", "patch") => Some(r#"{"amount_mib": 128}"#),
        ("/balloon/statistics", "patch") => Some(r#"{"stats_polling_interval_s": 2}"#),
        ("/balloon/policy", "patch") => Some(r#"{"enabled": false, "headroom_mib": 64}"#),
        _ => None,
    };
    let bad_body = match method {
        "patch" => r#"{"amount_mib": "lots", "stats_polling_interval_s": -1}"#,
        _ => r#"{"unexpected": 1}"#,
    };
    match status {
        200 | 204 => (Kind::Stats, true, req(good_body)),
        400 if method == "get" => (Kind::NoStats, true, req(None)),
        400 => (Kind::Stats, true, req(Some(bad_body))),
        408 => {
            let mut r = format!("{m} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{")
                .into_bytes();
            r.truncate(r.len());
            (Kind::Stats, true, r)
        }
        409 => (Kind::NoBalloon, true, req(good_body)),
        413 => (
            Kind::Stats,
            true,
            format!("{m} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
                .into_bytes(),
        ),
        503 => (Kind::Stats, false, req(good_body)),
        other => panic!("no trigger for {method} {path} -> {other}: add one"),
    }
}

#[test]
fn openapi_document_lists_every_policy_reason() {
    let doc = openapi();
    let listed: BTreeSet<String> = doc["components"]["schemas"]["PolicyInfo"]["properties"]
        ["last_decision"]["properties"]["reason"]["enum"]
        .as_array()
        .expect("the policy's reasons are an enum in openapi.yaml")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let code: BTreeSet<String> = Reason::ALL.iter().map(|r| r.name().to_string()).collect();
    assert_eq!(listed, code);
}

#[test]
fn openapi_document_matches_the_server() {
    let doc = openapi();
    assert_eq!(doc["openapi"].as_str().unwrap().chars().next(), Some('3'));
    let mut documented = BTreeSet::new();
    let mut checks = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            documented.insert((path.clone(), method.clone()));
            for (code, response) in op["responses"].as_object().unwrap() {
                checks.push((
                    path.clone(),
                    method.clone(),
                    code.parse::<u16>().unwrap(),
                    response.clone(),
                ));
            }
        }
    }
    let served: BTreeSet<_> = routes::ENDPOINTS
        .iter()
        .map(|(p, m)| (p.to_string(), m.to_string()))
        .collect();
    assert_eq!(documented, served, "documented vs served endpoints");

    let servers = [
        (Kind::Stats, true, Harness::new(Kind::Stats)),
        (Kind::NoStats, true, Harness::new(Kind::NoStats)),
        (Kind::NoBalloon, true, Harness::new(Kind::NoBalloon)),
        (
            Kind::Stats,
            false,
            Harness::with(Kind::Stats, quick_options(), false),
        ),
    ];
    for (path, method, status, response) in &checks {
        let (kind, live, request) = trigger(path, method, *status);
        let h = &servers
            .iter()
            .find(|(k, l, _)| *k == kind && *l == live)
            .unwrap()
            .2;
        let r = h.raw(&request);
        let what = format!("{} {path} (documented {status})", method.to_uppercase());
        assert_eq!(r.status, *status, "{what}: got {} {}", r.status, r.text());
        let response = resolve(&doc, response);
        match response.get("content").and_then(Value::as_object) {
            None => assert!(r.body.is_empty(), "{what}: body {:?}", r.text()),
            Some(content) => {
                let (media, spec) = content.iter().next().unwrap();
                let ct = r.header("content-type").unwrap_or_default();
                assert!(ct.starts_with(media.as_str()), "{what}: content-type {ct}");
                if media == "application/json" {
                    let v = json_of(&r);
                    validate(&doc, &spec["schema"], &v, &what).unwrap();
                } else {
                    assert!(!r.body.is_empty());
                }
            }
        }
        // Request bodies the document gives as schemas accept the trigger's good body.
        if *status == 204 {
            if let Some(schema) = doc["paths"][path][method]["requestBody"]["content"]
                ["application/json"]
                .get("schema")
            {
                let (_, _, good) = trigger(path, method, 204);
                let text = String::from_utf8(good).unwrap();
                let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
                let v: Value = if body.is_empty() {
                    json!({})
                } else {
                    serde_json::from_str(body).unwrap()
                };
                validate(&doc, schema, &v, &format!("{what} request")).unwrap();
            }
        }
    }
    // Documented errors for unknown paths and methods.
    let h = &servers[0].2;
    for (r, status) in [(h.get("/nope"), 404), (h.send("DELETE", "/vm", ""), 405)] {
        assert_eq!(r.status, status);
        validate(
            &doc,
            &json!({"$ref": "#/components/schemas/Error"}),
            &json_of(&r),
            "error",
        )
        .unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// ebb-ctl

fn ctl_run(h: &Harness, args: &[&str]) -> (i32, String, String) {
    let mut full = vec!["ebb-ctl", "--api-socket", h.path.to_str().unwrap()];
    full.extend_from_slice(args);
    let parsed = ctl::parse_args(&full).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = ctl::run(&parsed, &mut out, &mut err);
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[test]
fn ebb_ctl_human_output() {
    let h = Harness::new(Kind::Stats);
    let (code, out, err) = ctl_run(&h, &["balloon", "get"]);
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(out.contains("target:              64 MiB"), "{out}");
    assert!(out.contains("statistics:          every 5 s"), "{out}");
    let (code, out, _) = ctl_run(&h, &["balloon", "set", "256M"]);
    assert_eq!(code, 0);
    assert_eq!(out, "balloon target set to 256 MiB\n");
    assert_eq!(h.state().balloon.unwrap().target_pages, 256 * 256);
    let (code, out, err) = ctl_run(&h, &["balloon", "set", "1.5M"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("2 MiB") && err.contains("not a whole number of MiB"),
        "{err}"
    );
    let (code, out, _) = ctl_run(&h, &["balloon", "stats"]);
    assert_eq!(code, 0);
    assert!(out.contains("free 300 MiB"), "{out}");
    assert!(out.contains("report latency: p50 <= 64 us"), "{out}");
    let (code, out, _) = ctl_run(&h, &["balloon", "interval", "3"]);
    assert_eq!((code, out.as_str()), (0, "statistics every 3 s\n"));
    let (code, out, _) = ctl_run(&h, &["vm", "info"]);
    assert_eq!(code, 0);
    assert!(out.contains("guest RAM RSS:  100 MiB"), "{out}");
    assert!(
        out.contains("disk root:      /img/root.raw, 1 GiB, read-write\n"),
        "{out}"
    );
    assert!(out.contains("VMM RSS:        8 MiB"), "{out}");
    let (code, out, _) = ctl_run(&h, &["metrics"]);
    assert!(code == 0 && out.contains("ebb_balloon_reports_total 7"));
    let (code, _, _) = ctl_run(&h, &["vm", "shutdown"]);
    assert_eq!((code, h.state().pressed), (0, 1));
    let (code, out, _) = ctl_run(&h, &["vm", "stop"]);
    assert_eq!((code, out.as_str()), (0, "VM stopped\n"));
    assert!(h.state().stopped.is_some());
}

#[test]
fn ebb_ctl_balloon_policy() {
    let h = Harness::new(Kind::Stats);
    let (code, out, err) = ctl_run(&h, &["balloon", "policy"]);
    assert_eq!((code, err.as_str()), (0, ""));
    assert!(out.contains("policy:              off"), "{out}");
    assert!(out.contains("headroom:            128 MiB"), "{out}");
    assert!(
        out.contains("last decision:       64 MiB (steady), 2.0 s ago"),
        "{out}"
    );
    let (code, out, _) = ctl_run(
        &h,
        &[
            "balloon",
            "policy",
            "--on",
            "--headroom",
            "200M",
            "--fault-rate",
            "40",
            "--cooldown",
            "7",
            "--trim",
            "off",
        ],
    );
    assert_eq!(code, 0);
    assert!(out.contains("trim:                off"), "{out}");
    assert!(out.contains("policy:              auto (on)"), "{out}");
    assert!(out.contains("headroom:            200 MiB"), "{out}");
    assert!(out.contains("7 s after a deflate"), "{out}");
    assert!(out.contains("> 40 major faults/s"), "{out}");
    let (code, out, _) = ctl_run(&h, &["balloon", "policy", "--trim", "on"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("trim:                a quiet guest's cache"),
        "{out}"
    );
    let bad = ctl::parse_args(["ebb-ctl", "balloon", "policy", "--trim", "maybe"])
        .unwrap_err()
        .to_string();
    assert!(bad.contains("expected on or off"), "{bad}");
    let (code, _, err) = ctl_run(&h, &["balloon", "policy", "--headroom", "1G"]);
    assert_eq!(code, 1);
    assert!(err.contains("not below guest memory"), "{err}");
    let (code, out, _) = ctl_run(&h, &["--json", "balloon", "policy", "--off"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["enabled"],
        false
    );
    assert!(ctl::parse_args(["ebb-ctl", "balloon", "policy", "--on", "--off"]).is_err());
}

#[test]
fn ebb_ctl_json_output_is_one_document() {
    let h = Harness::new(Kind::Stats);
    for args in [
        &["balloon", "get"][..],
        &["balloon", "stats"],
        &["vm", "info"],
        &["balloon", "set", "1G"],
        &["balloon", "interval", "2"],
    ] {
        let mut a = args.to_vec();
        a.push("--json");
        let (code, out, _) = ctl_run(&h, &a);
        assert_eq!(out.lines().count(), 1, "{args:?}: {out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        // "balloon set 1G" is more than the 512 MiB guest has.
        if args[1] == "set" {
            assert_eq!(code, ctl::EXIT_API_ERROR);
            assert_eq!(v["ok"], false);
            assert_eq!(v["status"], 400);
            assert!(v["fault_message"].as_str().unwrap().contains("larger than"));
        } else {
            assert_eq!(code, 0, "{args:?}: {out}");
            assert!(v.is_object());
        }
    }
    let (_, out, _) = ctl_run(&h, &["--json", "balloon", "get"]);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["amount_mib"],
        64
    );
    let (_, out, _) = ctl_run(&h, &["--json", "balloon", "set", "100M"]);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        json!({"ok": true, "amount_mib": 100})
    );
}

#[test]
fn ebb_ctl_errors() {
    let h = Harness::new(Kind::NoBalloon);
    let (code, out, err) = ctl_run(&h, &["balloon", "get"]);
    assert_eq!(code, ctl::EXIT_API_ERROR);
    assert_eq!(out, "");
    assert_eq!(
        err,
        "ebb-ctl: the VM has no balloon device (start ebb with --balloon)\n"
    );
    let (code, _, err) = ctl_run(&h, &["balloon", "set", "lots"]);
    assert_eq!(code, ctl::EXIT_USAGE);
    assert!(err.contains("invalid size 'lots'"), "{err}");
    // The binary itself (exit codes, one-line errors, --json) is tested in vmm/ctl/tests.
}

#[test]
fn ebb_ctl_bench_runs() {
    let h = Harness::new(Kind::Stats);
    let (code, out, err) = ctl_run(
        &h,
        &["--json", "bench", "--requests", "20", "--idle-seconds", "1"],
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    for k in [
        "get_balloon_keepalive",
        "get_balloon_new_connection",
        "patch_balloon_keepalive",
    ] {
        assert_eq!(v["latency"][k]["requests"], 20, "{k}");
        assert!(v["latency"][k]["p99_us"].as_f64().unwrap() > 0.0);
    }
    assert!(v["idle"]["vmm_threads_cpu_percent"].as_f64().is_some());
}

// ---------------------------------------------------------------------------------------
// The ebb binary and its socket

/// A synthetic bzImage header Ebb accepts (it cannot boot).
fn fake_kernel(dir: &Path) -> PathBuf {
    let mut b = vec![0u8; 8192];
    b[0x1f1] = 4;
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    b[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
    b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    b[0x258..0x260].copy_from_slice(&(16u64 << 20).to_le_bytes());
    b[0x260..0x264].copy_from_slice(&(48u32 << 20).to_le_bytes());
    let p = dir.join("bzImage");
    std::fs::write(&p, b).unwrap();
    p
}

fn ebb(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ebb"))
        .args(args)
        .args(["--serial", "off", "--kvm-device", "/nonexistent"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn ebb_refuses_a_live_socket_and_replaces_a_stale_one() {
    let dir = scratch_dir();
    let kernel = fake_kernel(&dir);
    let sock = dir.join("api.sock");
    let k = kernel.to_str().unwrap();
    let s = sock.to_str().unwrap();
    // Live: somebody listens.
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (code, err) = ebb(&["--kernel", k, "--api-socket", s]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("ebb: error: cannot serve the API on")
            && err.contains("another process is listening"),
        "{err}"
    );
    assert!(sock.exists(), "the live socket must be left alone");
    drop(listener);
    // Stale: replaced, then removed when ebb exits (here at once: no KVM).
    let (code, err) = ebb(&["--kernel", k, "--api-socket", s]);
    assert_eq!(code, Some(1));
    assert!(err.contains("/nonexistent not found"), "{err}");
    assert!(!sock.exists(), "ebb left its socket behind");
    // Not a socket: refused.
    std::fs::write(&sock, b"x").unwrap();
    let (code, err) = ebb(&["--kernel", k, "--api-socket", s]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not a socket"), "{err}");
    assert!(sock.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn free_page_hinting_endpoints() {
    let h = Harness::new(Kind::Stats);
    let st = json_of(&h.get("/balloon/hinting/status"));
    assert_eq!(st["host_cmd"], 0);
    assert_eq!(st["guest_cmd"], Value::Null);
    assert_eq!(st["state"], "idle");
    // An empty body, as Firecracker allows, acknowledges on stop.
    assert_eq!(h.send("PATCH", "/balloon/hinting/start", "").status, 204);
    let st = json_of(&h.get("/balloon/hinting/status"));
    assert_eq!(
        (st["host_cmd"].as_u64(), st["run_cmd"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(st["state"], "requested");
    let r = h.send(
        "PATCH",
        "/balloon/hinting/start",
        r#"{"acknowledge_on_stop": false}"#,
    );
    assert_eq!(r.status, 204);
    assert_eq!(json_of(&h.get("/balloon/hinting/status"))["host_cmd"], 3);
    assert_fault(
        &h.send("PATCH", "/balloon/hinting/start", r#"{"ack": 1}"#),
        400,
        "unknown field",
    );
    assert_eq!(h.send("PATCH", "/balloon/hinting/stop", "").status, 204);
    let st = json_of(&h.get("/balloon/hinting/status"));
    assert_eq!(
        (st["host_cmd"].as_u64(), st["state"].as_str()),
        (Some(1), Some("done"))
    );

    let no_hint = Harness::new(Kind::NoStats);
    for (method, path) in [
        ("GET", "/balloon/hinting/status"),
        ("PATCH", "/balloon/hinting/start"),
        ("PATCH", "/balloon/hinting/stop"),
    ] {
        assert_fault(&no_hint.send(method, path, ""), 400, "free_page_hinting=on");
    }
    let none = Harness::new(Kind::NoBalloon);
    assert_fault(&none.get("/balloon/hinting/status"), 409, "no balloon");
}
