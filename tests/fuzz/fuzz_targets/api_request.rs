//! The REST API's routing and request parsing on arbitrary requests (method, path,
//! headers, body), answered by a fake VM on its own thread as the event loop would.
//! Oracles: no panic, every answer a valid HTTP status with a JSON or text body, and
//! libFuzzer's -timeout for a request that never completes.
#![no_main]

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use ebb_balloon::policy::{AutoPolicy, PolicySettings};
use ebb_balloon::BalloonOptions;
use ebb_vmm::api::backend::{BalloonSnapshot, DiskSnapshot, MemoryUsage, VmState, VmSummary};
use ebb_vmm::api::dispatch::{self, Dispatcher};
use ebb_vmm::api::routes::{self, BodyLimits};
use ebb_vmm::api::{ApiError, VmBackend};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

/// A VM that accepts everything the API layer lets through.
struct FakeVm {
    balloon: BalloonSnapshot,
}

impl VmBackend for FakeVm {
    fn summary(&self) -> VmSummary {
        VmSummary {
            state: VmState::Running,
            uptime: Duration::from_secs(1),
            vcpus: 1,
            memory_bytes: self.balloon.guest_memory_bytes,
            kernel: "k".into(),
            initramfs: None,
            cmdline: "c".into(),
            pid: 1,
            memory_backing: "anon",
        }
    }
    fn memory_usage(&self) -> MemoryUsage {
        MemoryUsage::default()
    }
    fn balloon(&self) -> Option<BalloonSnapshot> {
        Some(self.balloon.clone())
    }
    fn disks(&self) -> Vec<DiskSnapshot> {
        Vec::new()
    }
    fn set_balloon_target(&mut self, pages: u64) -> Result<(), ApiError> {
        assert!(
            pages * 4096 <= self.balloon.guest_memory_bytes,
            "checked by the API"
        );
        self.balloon.target_pages = pages as u32;
        Ok(())
    }
    fn set_balloon_stats_interval(&mut self, secs: u32) -> Result<(), ApiError> {
        self.balloon.stats_interval_s = secs;
        Ok(())
    }
    fn set_balloon_policy(
        &mut self,
        settings: PolicySettings,
        enabled: bool,
    ) -> Result<(), ApiError> {
        settings
            .check(self.balloon.guest_memory_bytes)
            .expect("checked by the API");
        let policy = self.balloon.policy.as_mut().expect("checked by the API");
        policy.settings = settings;
        policy.enabled = enabled;
        Ok(())
    }
    fn press_power_button(&mut self) -> Result<(), ApiError> {
        Ok(())
    }
    fn stop(&mut self, _reason: &str) {}
}

struct Shared {
    runtime: tokio::runtime::Runtime,
    dispatcher: Mutex<Dispatcher>,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (dispatcher, queue) = dispatch::channel(Duration::from_secs(5)).expect("channel");
        std::thread::spawn(move || {
            let mut vm = FakeVm {
                balloon: BalloonSnapshot {
                    options: BalloonOptions {
                        target_pages: 0,
                        deflate_on_oom: true,
                        free_page_reporting: true,
                        stats_interval_s: 1,
                        free_page_hinting: false,
                        hint_discard: Default::default(),
                        deflate_prefault: true,
                    },
                    guest_memory_bytes: 1 << 30,
                    target_pages: 0,
                    actual_pages: 0,
                    stats_interval_s: 1,
                    driver_ready: true,
                    counters: Default::default(),
                    stats: None,
                    hint: Default::default(),
                    policy: Some(
                        AutoPolicy::new(PolicySettings::for_ram(1 << 30), false)
                            .view(Duration::ZERO),
                    ),
                },
            };
            loop {
                let mut fd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(queue.wake_fd()),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: polling one descriptor we own, with a timeout.
                unsafe { libc::poll(&mut fd, 1, 100) };
                queue.run_pending(&mut vm, 64);
            }
        });
        Shared {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime"),
            dispatcher: Mutex::new(dispatcher),
        }
    })
}

const METHODS: [&str; 7] = ["GET", "PATCH", "PUT", "POST", "DELETE", "HEAD", "OPTIONS"];
const PATHS: [&str; 9] = [
    "/balloon",
    "/balloon/statistics",
    "/balloon/policy",
    "/vm",
    "/vm/shutdown",
    "/vm/stop",
    "/metrics",
    "/",
    "/balloon/../vm",
];

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let method = METHODS[usize::from(data[0]) % METHODS.len()];
    let (path, body) = if data[1] & 0x80 == 0 {
        (
            PATHS[usize::from(data[1]) % PATHS.len()].to_string(),
            &data[3..],
        )
    } else {
        // A path of the fuzzer's own, up to the first NUL.
        let rest = &data[3..];
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let path = format!("/{}", String::from_utf8_lossy(&rest[..end]));
        (path, rest.get(end + 1..).unwrap_or(&[]))
    };
    let mut builder = Request::builder().method(method).uri(path.as_str());
    if data[2] & 1 != 0 {
        builder = builder.header("content-type", "application/json");
    }
    if data[2] & 2 != 0 {
        builder = builder.header("content-length", (body.len() / 2).to_string());
    }
    let Ok(request) = builder.body(Body::from(body.to_vec())) else {
        return; // not a request hyper would have let through
    };
    let s = shared();
    let dispatcher = s.dispatcher.lock().unwrap().clone();
    let router = routes::router(
        dispatcher,
        BodyLimits {
            max_bytes: 16 * 1024,
            timeout: Duration::from_secs(1),
        },
    );
    let response = s
        .runtime
        .block_on(router.oneshot(request))
        .expect("the router is infallible");
    let status = response.status().as_u16();
    assert!((200..600).contains(&status), "status {status}");
});
