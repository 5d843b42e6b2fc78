//! [`LiveVm`]: the [`VmBackend`] of a running VM. It runs on the event-loop thread and
//! takes the balloon's, the disks' and the GED's locks only for the duration of a call,
//! the same way the virtio event handler does; vCPU threads never wait on the API.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ebb_balloon::policy::PolicySettings;
use ebb_balloon::Balloon;
use ebb_block::Block;
use ebb_devices::bus::lock;
use ebb_devices::exit::{ExitSignal, VmExit};
use ebb_devices::ged::{Ged, GED_EVENT_POWER_BUTTON};
use ebb_devices::virtio::mmio::MmioTransport;

use super::backend::{
    ApiError, BalloonSnapshot, DiskSnapshot, MemoryUsage, VmBackend, VmState, VmSummary,
};
use crate::config::VmConfig;

/// The parts of a running VM the API reaches.
pub struct LiveVm {
    exit: Arc<ExitSignal>,
    balloon: Option<Arc<Mutex<MmioTransport<Balloon>>>>,
    disks: Vec<Arc<Mutex<MmioTransport<Block>>>>,
    ged: Option<Arc<Mutex<Ged>>>,
    started: Instant,
    config: VmConfig,
    ram_host_start: usize,
    ram_bytes: u64,
    power_button_pressed: bool,
}

impl std::fmt::Debug for LiveVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveVm")
            .field("balloon", &self.balloon.is_some())
            .field("ged", &self.ged.is_some())
            .finish_non_exhaustive()
    }
}

/// What [`LiveVm::new`] needs.
pub struct LiveVmParts {
    /// The VM's stop request.
    pub exit: Arc<ExitSignal>,
    /// The balloon's transport, when there is a balloon.
    pub balloon: Option<Arc<Mutex<MmioTransport<Balloon>>>>,
    /// The disks' transports, in command-line order.
    pub disks: Vec<Arc<Mutex<MmioTransport<Block>>>>,
    /// The Generic Event Device, when there is one.
    pub ged: Option<Arc<Mutex<Ged>>>,
    /// When the VM was built.
    pub started: Instant,
    /// The configuration it was built from.
    pub config: VmConfig,
    /// Host address of guest RAM (`GuestRam::host_start`).
    pub ram_host_start: usize,
    /// Guest RAM bytes.
    pub ram_bytes: u64,
}

impl LiveVm {
    /// A backend over `parts`.
    pub fn new(parts: LiveVmParts) -> Self {
        Self {
            exit: parts.exit,
            balloon: parts.balloon,
            disks: parts.disks,
            ged: parts.ged,
            started: parts.started,
            config: parts.config,
            ram_host_start: parts.ram_host_start,
            ram_bytes: parts.ram_bytes,
            power_button_pressed: false,
        }
    }
}

impl LiveVm {
    /// Runs `request` on the balloon under its transport's lock; the device's refusals
    /// are the client's mistakes (400).
    fn balloon_request<T>(
        &self,
        request: impl FnOnce(&mut Balloon) -> Result<T, ebb_balloon::device::BalloonError>,
    ) -> Result<T, ApiError> {
        let balloon = self.balloon.as_ref().ok_or_else(ApiError::no_balloon)?;
        request(lock(balloon).device_mut()).map_err(|e| ApiError::bad_request(e.to_string()))
    }
}

impl VmBackend for LiveVm {
    fn summary(&self) -> VmSummary {
        let state = if self.exit.is_requested() {
            VmState::Stopping
        } else if self.power_button_pressed {
            VmState::ShuttingDown
        } else {
            VmState::Running
        };
        VmSummary {
            state,
            uptime: self.started.elapsed(),
            vcpus: self.config.cpus,
            memory_bytes: self.ram_bytes,
            memory_backing: self.config.memory.backing.name(),
            kernel: self.config.kernel.display().to_string(),
            initramfs: self
                .config
                .initramfs
                .as_ref()
                .map(|p| p.display().to_string()),
            cmdline: self.config.cmdline.clone(),
            pid: std::process::id(),
        }
    }

    fn memory_usage(&self) -> MemoryUsage {
        MemoryUsage {
            guest_ram_rss: mapping_rss("/proc/self/smaps", self.ram_host_start)
                .map_err(|e| tracing::debug!("API: guest RAM RSS: {e}"))
                .ok(),
            process_rss: process_rss("/proc/self/status")
                .map_err(|e| tracing::debug!("API: process RSS: {e}"))
                .ok(),
        }
    }

    fn balloon(&self) -> Option<BalloonSnapshot> {
        let transport = lock(self.balloon.as_ref()?);
        let b = transport.device();
        Some(BalloonSnapshot {
            options: b.options(),
            guest_memory_bytes: self.ram_bytes,
            target_pages: b.target_pages(),
            actual_pages: b.actual_pages(),
            stats_interval_s: b.stats_interval_s(),
            driver_ready: transport.is_activated(),
            counters: b.counters(),
            stats: b.stats().cloned(),
            policy: b.policy_view(),
            hint: b.hint_status().unwrap_or_default(),
        })
    }

    fn disks(&self) -> Vec<DiskSnapshot> {
        self.disks
            .iter()
            .map(|d| {
                let transport = lock(d);
                let b = transport.device();
                DiskSnapshot {
                    path: b.path().display().to_string(),
                    id: b.id().to_string(),
                    readonly: b.readonly(),
                    capacity_bytes: b.capacity(),
                    driver_ready: transport.is_activated(),
                    counters: b.counters(),
                }
            })
            .collect()
    }

    fn set_balloon_policy(
        &mut self,
        settings: PolicySettings,
        enabled: bool,
    ) -> Result<(), ApiError> {
        self.balloon_request(|b| {
            let policy = b
                .policy_mut()
                .ok_or(ebb_balloon::device::BalloonError::StatsDisabled)?;
            policy.set_settings(settings);
            policy.set_enabled(enabled);
            Ok(())
        })
    }

    fn set_balloon_target(&mut self, pages: u64) -> Result<(), ApiError> {
        self.balloon_request(|b| b.set_target_pages(pages))
    }

    fn start_hinting(&mut self, acknowledge_on_stop: bool) -> Result<u32, ApiError> {
        self.balloon_request(|b| b.start_hinting(acknowledge_on_stop))
    }

    fn stop_hinting(&mut self) -> Result<(), ApiError> {
        self.balloon_request(Balloon::stop_hinting)
    }

    fn set_balloon_stats_interval(&mut self, secs: u32) -> Result<(), ApiError> {
        let balloon = self.balloon.as_ref().ok_or_else(ApiError::no_balloon)?;
        lock(balloon)
            .device_mut()
            .set_stats_interval(secs)
            .map_err(|e| match e {
                ebb_balloon::device::BalloonError::Timer(_) => ApiError::internal(e.to_string()),
                _ => ApiError::bad_request(e.to_string()),
            })
    }

    fn press_power_button(&mut self) -> Result<(), ApiError> {
        if self.exit.is_requested() {
            return Err(ApiError::unavailable("the VM is already stopping"));
        }
        let ged = self
            .ged
            .as_ref()
            .ok_or_else(|| ApiError::conflict("the VM has no ACPI power button"))?;
        lock(ged)
            .notify(GED_EVENT_POWER_BUTTON)
            .map_err(|e| ApiError::internal(format!("cannot raise the GED interrupt: {e}")))?;
        self.power_button_pressed = true;
        tracing::info!("API: pressed the ACPI power button");
        Ok(())
    }

    fn stop(&mut self, reason: &str) {
        self.exit.request(VmExit::Stopped(reason.to_string()));
    }
}

/// Memory the mapping starting at `start` holds in an smaps file, in bytes: its `Rss`
/// plus its hugetlb pages (`Shared_Hugetlb`, `Private_Hugetlb`), which `Rss` leaves out.
/// Reading stops at that mapping, so the kernel does not walk the ones after it.
pub fn mapping_rss(smaps: &str, start: usize) -> io::Result<u64> {
    let reader = BufReader::new(File::open(smaps)?);
    let mut total: Option<u64> = None;
    for line in reader.lines() {
        let line = line?;
        if let Some(sum) = total.as_mut() {
            let field = ["Rss:", "Shared_Hugetlb:", "Private_Hugetlb:"]
                .iter()
                .find_map(|f| line.strip_prefix(f));
            if let Some(v) = field {
                *sum += parse_kib(v)?;
                continue;
            }
            if line.starts_with("VmFlags:") {
                break;
            }
        }
        // Mapping headers look like "7f0000000000-7f0020000000 rw-p 00000000 00:00 0".
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((s, _)) = range.split_once('-') {
                if let Ok(s) = usize::from_str_radix(s, 16) {
                    if total.is_some() {
                        break;
                    }
                    if s == start {
                        total = Some(0);
                    }
                }
            }
        }
    }
    total.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no mapping at {start:#x} in {smaps}"),
        )
    })
}

/// `VmRSS` from a `/proc/PID/status` file, in bytes.
pub fn process_rss(status: &str) -> io::Result<u64> {
    let text = std::fs::read_to_string(status)?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .map(parse_kib)
        .unwrap_or_else(|| {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no VmRSS in {status}"),
            ))
        })
}

fn parse_kib(v: &str) -> io::Result<u64> {
    v.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .map(|k| k * 1024)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("'{v}': {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_of_a_touched_mapping() {
        let len = 8 << 20;
        // SAFETY: a fresh anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: writing inside the mapping just made.
        unsafe { std::ptr::write_bytes(p as *mut u8, 1, 4 << 20) };
        let rss = mapping_rss("/proc/self/smaps", p as usize).unwrap();
        // The kernel may have merged the mapping with a neighbour; at least 4 MiB is in.
        assert!(rss >= 4 << 20, "{rss}");
        assert!(process_rss("/proc/self/status").unwrap() >= rss);
        assert!(mapping_rss("/proc/self/smaps", 4096).is_err());
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(p, len) };
    }

    /// Hugetlb guest RAM: its pages are not in `Rss`, they are counted beside it.
    #[test]
    fn hugetlb_pages_count_with_rss() {
        let path = std::env::temp_dir().join(format!("ebb-smaps-{}", std::process::id()));
        std::fs::write(
            &path,
            "7f0000000000-7f0040000000 rw-s 00000000 00:01 77   /memfd:ebb-guest-ram (deleted)\n\
             Size:            1048576 kB\n\
             Rss:                   4 kB\n\
             Shared_Hugetlb:   262144 kB\n\
             Private_Hugetlb:    2048 kB\n\
             VmFlags: rd wr sh mr mw me ms dd ht\n\
             7f0040000000-7f0040001000 rw-p 00000000 00:00 0\n\
             Rss:                   4 kB\n",
        )
        .unwrap();
        let smaps = path.to_str().unwrap();
        assert_eq!(
            mapping_rss(smaps, 0x7f00_0000_0000).unwrap(),
            (4 + 262144 + 2048) << 10
        );
        assert_eq!(mapping_rss(smaps, 0x7f00_4000_0000).unwrap(), 4 << 10);
        std::fs::remove_file(&path).unwrap();
    }
}
