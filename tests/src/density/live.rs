//! The real launcher: default guests under Ebb or QEMU on this host.
//!
//! The host is "exactly H GiB with no swap" in one of two ways:
//! - nested test host: L1 itself was booted with H GiB and has no swap, so host memory in
//!   use is L1's `MemTotal - MemAvailable`;
//! - direct (a real KVM host): a cgroup v2 with `memory.max` = H GiB and
//!   `memory.swap.max` = 0 holds this process and every VMM it starts.
//!
//! The driver protects itself from the OOM killer (`oom_score_adj` -1000) and makes the
//! VMMs its preferred victims, so a full host kills a guest, never the benchmark.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{DensityConfig, GuestHandle, Launcher, Probe, RunSpec, TouchOutcome};
use crate::guest::{
    BalloonConfig, DiskSpec, GuestArtifacts, GuestConfig, GuestVm, KernelImage, VmmRef,
};
use crate::procfs;

/// How host memory is bounded and measured.
#[derive(Debug, Clone)]
pub enum HostLimit {
    /// The whole (virtual) host: `MemTotal - MemAvailable`.
    WholeHost,
    /// A cgroup v2 directory.
    Cgroup(PathBuf),
}

impl HostLimit {
    fn used_kib(&self) -> Option<u64> {
        match self {
            HostLimit::WholeHost => {
                let total = procfs::meminfo_kib("MemTotal").ok()?;
                let avail = procfs::meminfo_kib("MemAvailable").ok()?;
                Some(total.saturating_sub(avail))
            }
            HostLimit::Cgroup(dir) => fs::read_to_string(dir.join("memory.current"))
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
                .map(|b| b / 1024),
        }
    }
}

fn write(path: impl AsRef<std::path::Path>, value: &str) -> io::Result<()> {
    fs::write(path.as_ref(), value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", path.as_ref().display()),
        )
    })
}

/// Creates a cgroup v2 of `host_gib` without swap and moves this process into it.
pub fn enter_memory_cgroup(host_gib: f64, label: &str) -> io::Result<PathBuf> {
    let root = PathBuf::from("/sys/fs/cgroup");
    if !root.join("cgroup.controllers").exists() {
        return Err(io::Error::other(
            "cgroup v2 is not mounted at /sys/fs/cgroup: the direct density run needs it to \
             limit host memory",
        ));
    }
    let controllers = fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
    if !controllers.split_whitespace().any(|c| c == "memory") {
        write(root.join("cgroup.subtree_control"), "+memory")?;
    }
    let dir = root.join(format!("ebb-density-{}-{label}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let bytes = (host_gib * (1u64 << 30) as f64) as u64;
    write(dir.join("memory.max"), &bytes.to_string())?;
    if dir.join("memory.swap.max").exists() {
        write(dir.join("memory.swap.max"), "0")?;
    }
    write(dir.join("cgroup.procs"), &std::process::id().to_string())?;
    Ok(dir)
}

/// Keeps this process out of the OOM killer's reach.
pub fn protect_self() -> io::Result<()> {
    write("/proc/self/oom_score_adj", "-1000")
}

/// The page cache workload's disks, shared read-only by every guest of a run: the Debian
/// root file system (read from where it was built, nothing copied) and a sparse data
/// image (holes cost the host nothing; the guest caches what it reads all the same).
#[derive(Debug, Clone)]
struct CacheDisks {
    root: PathBuf,
    data: PathBuf,
    /// The data image and the API sockets live here.
    dir: PathBuf,
}

impl CacheDisks {
    fn new(cache_mib: u64, label: &str) -> Result<Self, String> {
        let image = crate::paths::cache_dir().join("rootfs/rootfs.ext4");
        if !image.exists() {
            return Err(format!(
                "{} is missing: the cache workload boots the Debian root file system; build \
                 it with resources/build-rootfs.sh (ci/setup.sh does)",
                image.display()
            ));
        }
        let dir = std::env::temp_dir().join(format!("ebb-density-{}-{label}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let data = dir.join("data.img");
        File::create(&data)
            .and_then(|f| f.set_len((cache_mib + 64) << 20))
            .map_err(|e| format!("{}: {e}", data.display()))?;
        Ok(Self {
            root: image,
            data,
            dir,
        })
    }
}

/// Launches default guests for one run.
pub struct LiveLauncher {
    kind: VmmRef,
    config: GuestConfig,
    artifacts: GuestArtifacts,
    limit: HostLimit,
    kmsg: Option<File>,
    describe: String,
    /// Running inside the emulated (nested) test host.
    emulated: bool,
    /// The cache workload's disks, when it runs.
    cache: Option<CacheDisks>,
    /// Turn the automatic balloon policy on in each guest.
    policy: bool,
}

impl Drop for LiveLauncher {
    fn drop(&mut self) {
        if let Some(c) = &self.cache {
            let _ = fs::remove_dir_all(&c.dir);
        }
    }
}

impl LiveLauncher {
    /// A launcher for `spec` with guests sized by `cfg`, bounded by `limit`.
    pub fn new(
        spec: RunSpec,
        cfg: &DensityConfig,
        limit: HostLimit,
        where_: &str,
    ) -> Result<Self, String> {
        let kind = spec.vmm.vmm().map_err(|e| e.to_string())?;
        if spec.policy && spec.vmm != crate::guest::VmmKind::Ebb {
            return Err(format!(
                "{}: only Ebb has the automatic policy",
                spec.label()
            ));
        }
        let artifacts = GuestArtifacts::locate().map_err(|e| e.to_string())?;
        let mut config = GuestConfig {
            memory_mib: cfg.guest_mib(),
            cpus: 1,
            balloon: Some(BalloonConfig {
                size_mib: 0,
                // The policy's safety net for bursts faster than its statistics.
                deflate_on_oom: spec.policy,
                free_page_reporting: spec.reporting,
                stats_interval: u32::from(spec.policy),
                free_page_hinting: false,
                deflate_prefault: true,
            }),
            // The same kernel image for both VMMs.
            kernel: Some(KernelImage::Elf),
            ..GuestConfig::default()
        };
        let cache = if cfg.cache_mib > 0 {
            let disks = CacheDisks::new(cfg.cache_mib, &spec.label())?;
            config.initramfs = Some(crate::paths::cache_dir().join("rootfs/initramfs.cpio.gz"));
            // Read-only: every guest of the run boots from the same image.
            config.cmdline_extra = "root=/dev/vda ro".into();
            config.disks = vec![
                DiskSpec {
                    path: disks.root.clone(),
                    readonly: true,
                    id: "root".into(),
                },
                DiskSpec {
                    path: disks.data.clone(),
                    readonly: true,
                    id: "data".into(),
                },
            ];
            Some(disks)
        } else {
            None
        };
        let kmsg = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .ok()
            .map(|mut f| {
                let _ = f.seek(SeekFrom::End(0));
                f
            });
        let describe = match &limit {
            HostLimit::WholeHost => format!(
                "{where_}: whole host, MemTotal {:.1} GiB, swap {} KiB",
                procfs::meminfo_kib("MemTotal").unwrap_or(0) as f64 / (1 << 20) as f64,
                procfs::meminfo_kib("SwapTotal").unwrap_or(0)
            ),
            HostLimit::Cgroup(dir) => format!(
                "{where_}: cgroup {} ({:.1} GiB, no swap)",
                dir.display(),
                cfg.host_gib
            ),
        };
        Ok(Self {
            kind,
            config,
            artifacts,
            limit,
            kmsg,
            describe,
            emulated: where_ == "nested",
            cache,
            policy: spec.policy,
        })
    }
}

impl Launcher for LiveLauncher {
    fn emulated(&self) -> bool {
        self.emulated
    }

    fn launch(&mut self, index: u32) -> Result<Box<dyn GuestHandle>, String> {
        let mut config = self.config.clone();
        let socket = self.policy.then(|| {
            let dir = self
                .cache
                .as_ref()
                .map_or_else(std::env::temp_dir, |c| c.dir.clone());
            dir.join(format!(
                "ebb-density-{}-api-{index}.sock",
                std::process::id()
            ))
        });
        if let Some(s) = &socket {
            config.extra_args = vec!["--api-socket".into(), s.to_string_lossy().into_owned()];
        }
        let vm = GuestVm::spawn_with(self.kind.clone(), &config, &self.artifacts)
            .map_err(|e| e.to_string())?;
        // Children inherit our -1000; the VMMs are the ones the kernel should pick.
        let _ = write(format!("/proc/{}/oom_score_adj", vm.pid()), "500");
        let pid = vm.pid();
        let bytes = config.memory_mib << 20;
        Ok(Box::new(LiveGuest {
            vm,
            pid,
            bytes,
            socket,
        }))
    }

    fn host_used_kib(&self) -> u64 {
        self.limit.used_kib().unwrap_or(0)
    }

    fn host_probe(&self) -> Probe {
        let limit = self.limit.clone();
        Arc::new(move || limit.used_kib())
    }

    fn oom_messages(&mut self) -> Vec<String> {
        let Some(kmsg) = self.kmsg.as_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match kmsg.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    let text = rec.split_once(';').map(|(_, t)| t).unwrap_or(&rec).trim();
                    let text = text.lines().next().unwrap_or("").to_string();
                    if text.contains("Out of memory")
                        || text.contains("oom-kill")
                        || text.contains("Killed process")
                        || text.contains("invoked oom-killer")
                    {
                        out.push(text);
                    }
                }
                // EPIPE: records were overwritten; keep reading from the next one.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        out
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

struct LiveGuest {
    vm: GuestVm,
    pid: u32,
    bytes: u64,
    /// The VMM's API socket, when the run uses the automatic policy.
    socket: Option<PathBuf>,
}

impl LiveGuest {
    /// The balloon and its policy as the API shows them, when the run uses one.
    fn balloon_state(&self) -> String {
        let Some(socket) = &self.socket else {
            return String::new();
        };
        let client = ebb_ctl::client::Client::new(socket, Duration::from_secs(10));
        ["/balloon", "/balloon/statistics", "/balloon/policy"]
            .iter()
            .map(|path| match client.request("GET", path, None) {
                Ok(r) => format!("\nGET {path}: {} {}", r.status, r.text()),
                Err(e) => format!("\nGET {path}: {e}"),
            })
            .collect()
    }

    fn exit_text(&mut self) -> String {
        match self.vm.wait_exit(Duration::from_millis(500)) {
            Ok(x) => format!(
                "VMM exited with {}{}",
                x.status,
                x.stderr
                    .lines()
                    .last()
                    .map(|l| format!(": {l}"))
                    .unwrap_or_default()
            ),
            Err(_) => "VMM still running".to_string(),
        }
    }
}

impl GuestHandle for LiveGuest {
    fn rss_probe(&self) -> Probe {
        let (pid, bytes) = (self.pid, self.bytes);
        Arc::new(move || procfs::guest_ram_rss_kib(pid, bytes).ok())
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        if let Err(e) = self.vm.wait_ready(timeout) {
            let first = e.to_string().lines().next().unwrap_or("").to_string();
            return Err(format!("{first} ({})", self.exit_text()));
        }
        if let Some(socket) = &self.socket {
            let client = ebb_ctl::client::Client::new(socket, Duration::from_secs(30));
            let body = br#"{"enabled": true}"#;
            let r = client
                .request("PATCH", "/balloon/policy", Some(body))
                .map_err(|e| format!("turning the balloon policy on: {e}"))?;
            if r.status != 204 {
                return Err(format!(
                    "turning the balloon policy on: {} {}",
                    r.status,
                    r.text()
                ));
            }
        }
        Ok(())
    }

    fn read_cache(&mut self, mib: u64, timeout: Duration) -> Result<(), String> {
        let line = crate::scenarios::policy::read_disk_command(mib);
        match self.vm.command(&line, timeout) {
            Ok(v) if v["ok"] == true && v["status"] == 0 => Ok(()),
            Ok(v) => Err(format!("the guest could not read its data disk: {v}")),
            Err(e) => {
                let first = e.to_string().lines().next().unwrap_or("").to_string();
                Err(format!("{first} ({})", self.exit_text()))
            }
        }
    }

    fn touch(&mut self, mib: u64, timeout: Duration) -> TouchOutcome {
        match self.vm.command(&format!("touch {mib}"), timeout) {
            Ok(v) if v["ok"].as_bool() == Some(true) => TouchOutcome::Done,
            Ok(v) => {
                let available = self
                    .vm
                    .command_ok("meminfo", Duration::from_secs(60))
                    .ok()
                    .and_then(|m| m["mem_available_kib"].as_u64())
                    .map(|k| format!(" (guest MemAvailable now {} MiB)", k / 1024))
                    .unwrap_or_default();
                TouchOutcome::GuestFailed(format!(
                    "the guest could not touch {mib} MiB: {}{available}",
                    v["error"].as_str().unwrap_or("unknown error")
                ))
            }
            Err(e) => {
                let first = e.to_string().lines().next().unwrap_or("").to_string();
                let exit = self.exit_text();
                if exit == "VMM still running" {
                    // The report keeps one line: what the VMM and the guest were doing
                    // goes to the job's stderr, which the run directory keeps.
                    eprintln!(
                        "touch of {mib} MiB timed out with the VMM running:\n{}{}",
                        self.vm.diagnostics(),
                        self.balloon_state(),
                    );
                }
                TouchOutcome::VmmFailed(format!("{first} ({exit})"))
            }
        }
    }

    fn free(&mut self, timeout: Duration) -> Result<(), String> {
        match self.vm.command_ok("free", timeout) {
            Ok(_) => Ok(()),
            Err(e) => {
                let first = e.to_string().lines().next().unwrap_or("").to_string();
                Err(format!("{first} ({})", self.exit_text()))
            }
        }
    }

    fn ram_rss_kib(&self) -> Option<u64> {
        procfs::guest_ram_rss_kib(self.pid, self.bytes).ok()
    }

    fn policy_busy(&self) -> bool {
        let Some(socket) = &self.socket else {
            return false;
        };
        let client = ebb_ctl::client::Client::new(socket, Duration::from_secs(10));
        match client
            .get("/balloon/policy")
            .ok()
            .and_then(|r| r.json().ok())
        {
            Some(v) => {
                let v: serde_json::Value = v;
                v["last_decision"]["reason"] != "steady"
            }
            // An API that does not answer is not a settled guest either.
            None => true,
        }
    }

    fn exited(&mut self) -> Option<String> {
        match self.vm.wait_exit(Duration::ZERO) {
            Ok(x) => Some(format!(
                "VMM exited with {}{}",
                x.status,
                x.stderr
                    .lines()
                    .last()
                    .map(|l| format!(": {l}"))
                    .unwrap_or_default()
            )),
            Err(_) => None,
        }
    }

    fn kill(&mut self) {
        self.vm.kill();
    }
}
