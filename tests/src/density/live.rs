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
use crate::guest::{BalloonConfig, GuestArtifacts, GuestConfig, GuestVm, KernelImage, VmmRef};
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
        let artifacts = GuestArtifacts::locate().map_err(|e| e.to_string())?;
        let config = GuestConfig {
            memory_mib: cfg.guest_mib(),
            cpus: 1,
            balloon: Some(BalloonConfig {
                size_mib: 0,
                deflate_on_oom: false,
                free_page_reporting: spec.reporting,
                stats_interval: 0,
                free_page_hinting: false,
            }),
            // The same kernel image for both VMMs.
            kernel: Some(KernelImage::Elf),
            ..GuestConfig::default()
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
        })
    }
}

impl Launcher for LiveLauncher {
    fn emulated(&self) -> bool {
        self.emulated
    }

    fn launch(&mut self, _index: u32) -> Result<Box<dyn GuestHandle>, String> {
        let vm = GuestVm::spawn_with(self.kind.clone(), &self.config, &self.artifacts)
            .map_err(|e| e.to_string())?;
        // Children inherit our -1000; the VMMs are the ones the kernel should pick.
        let _ = write(format!("/proc/{}/oom_score_adj", vm.pid()), "500");
        let pid = vm.pid();
        let bytes = self.config.memory_mib << 20;
        Ok(Box::new(LiveGuest { vm, pid, bytes }))
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
}

impl LiveGuest {
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
        match self.vm.wait_ready(timeout) {
            Ok(_) => Ok(()),
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
                TouchOutcome::VmmFailed(format!("{first} ({})", self.exit_text()))
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
