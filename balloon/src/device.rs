//! The virtio-balloon device.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ebb_devices::virtio::{
    Activation, ActivationError, InterruptKind, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::timerfd::TimerFd;

use crate::counters::BalloonCounters;
use crate::discard::{DiscardReason, DiscardTally};
use crate::pages::{host_range, pfn_is_ram, pfns_to_host_ranges, PageSet};
use crate::protocol::{
    self, config, max_queue_size, queue_roles, QueueRole, BALLOON_PAGE_SIZE, F_DEFLATE_ON_OOM,
    F_PAGE_POISON, F_PAGE_REPORTING, F_STATS_VQ, REPORT_CAPACITY,
};
use crate::stats::{GuestStats, MAX_STATS_BYTES};

/// Descriptors Ebb reads from one inflate or deflate chain (Linux sends one).
const MAX_PFN_CHAIN_DESCRIPTORS: usize = 16;
/// Largest PFN array Ebb reads from one descriptor (Linux sends at most 256 PFNs).
const MAX_PFN_BYTES: u32 = 4096;
/// Descriptors Ebb reads from one statistics chain.
const MAX_STATS_DESCRIPTORS: usize = 4;
/// Event id of the statistics timer.
const STATS_TIMER_EVENT: u32 = 0;

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
}

/// Queues and memory the device uses once the driver is ready.
struct Active {
    mem: GuestMemoryMmap,
    features: u64,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<(QueueRole, Queue)>,
    /// The statistics buffer Ebb holds until it wants fresh numbers.
    stats_head: Option<u16>,
}

impl Active {
    fn queue_mut(&mut self, role: QueueRole) -> Option<&mut Queue> {
        self.queues
            .iter_mut()
            .find(|(r, _)| *r == role)
            .map(|(_, q)| q)
    }
}

/// A virtio-balloon device.
pub struct Balloon {
    options: BalloonOptions,
    features: u64,
    ram_pages: u64,
    num_pages: u32,
    actual: u32,
    poison_val: u32,
    active: Option<Active>,
    pages: PageSet,
    counters: BalloonCounters,
    discards: DiscardTally,
    stats: Option<GuestStats>,
    stats_interval_s: u32,
    stats_timer: TimerFd,
    poison_warned: bool,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("options", &self.options)
            .field("num_pages", &self.num_pages)
            .field("actual", &self.actual)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl Balloon {
    /// A balloon for a guest with `ram_bytes` of RAM whose highest guest physical address
    /// is below `ram_end`.
    pub fn new(
        options: BalloonOptions,
        ram_bytes: u64,
        ram_end: u64,
    ) -> Result<Self, BalloonError> {
        let ram_pages = ram_bytes / BALLOON_PAGE_SIZE;
        if u64::from(options.target_pages) > ram_pages {
            return Err(BalloonError::TargetTooLarge {
                requested: options.target_pages.into(),
                available: ram_pages,
            });
        }
        let mut features = VIRTIO_F_VERSION_1;
        if options.stats_interval_s > 0 {
            features |= F_STATS_VQ;
        }
        if options.deflate_on_oom {
            features |= F_DEFLATE_ON_OOM;
        }
        if options.free_page_reporting {
            // PAGE_POISON lets guests that poison or zero freed pages keep reporting.
            features |= F_PAGE_REPORTING | F_PAGE_POISON;
        }
        let stats_timer = TimerFd::new().map_err(|e| BalloonError::Timer(e.to_string()))?;
        // SAFETY: setting O_NONBLOCK on a descriptor this struct owns.
        unsafe {
            let fd = stats_timer.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        Ok(Self {
            options,
            features,
            ram_pages,
            num_pages: options.target_pages,
            actual: 0,
            poison_val: 0,
            active: None,
            pages: PageSet::new(ram_end),
            counters: BalloonCounters::default(),
            discards: DiscardTally::default(),
            stats: None,
            stats_interval_s: options.stats_interval_s,
            stats_timer,
            poison_warned: false,
        })
    }

    /// The options the device was created with.
    pub fn options(&self) -> BalloonOptions {
        self.options
    }

    /// Target size in pages (host-set).
    pub fn target_pages(&self) -> u32 {
        self.num_pages
    }

    /// Size in pages the guest reports.
    pub fn actual_pages(&self) -> u32 {
        self.actual
    }

    /// Pages Ebb currently knows to be in the balloon (from inflate/deflate traffic).
    pub fn held_pages(&self) -> u64 {
        self.pages.len()
    }

    /// Counters (the discard figures come from the tally shared with the discard work).
    pub fn counters(&self) -> BalloonCounters {
        let discards = self.discards.counts();
        BalloonCounters {
            madvise_calls: discards.calls,
            madvise_failures: discards.failures,
            inflate_discarded_bytes: discards.inflate_bytes,
            reported_discarded_bytes: discards.reported_bytes,
            ..self.counters
        }
    }

    /// The latest statistics report, if any.
    pub fn stats(&self) -> Option<&GuestStats> {
        self.stats.as_ref()
    }

    /// Current statistics interval in seconds (0 = off).
    pub fn stats_interval_s(&self) -> u32 {
        self.stats_interval_s
    }

    /// Features the driver accepted (0 before activation).
    pub fn negotiated_features(&self) -> u64 {
        self.active.as_ref().map(|a| a.features).unwrap_or(0)
    }

    /// The guest's page poison value (meaningful when PAGE_POISON was negotiated).
    pub fn poison_val(&self) -> u32 {
        self.poison_val
    }

    /// Sets the target and tells the guest.
    pub fn set_target_pages(&mut self, pages: u64) -> Result<(), BalloonError> {
        if pages > self.ram_pages || pages > u64::from(u32::MAX) {
            return Err(BalloonError::TargetTooLarge {
                requested: pages,
                available: self.ram_pages,
            });
        }
        self.num_pages = pages as u32;
        if let Some(a) = &self.active {
            a.interrupt.trigger(InterruptKind::Config);
        }
        Ok(())
    }

    /// Changes how often statistics are requested (only when they were enabled at boot).
    pub fn set_stats_interval(&mut self, secs: u32) -> Result<(), BalloonError> {
        if self.features & F_STATS_VQ == 0 {
            return Err(BalloonError::StatsDisabled);
        }
        self.stats_interval_s = secs;
        self.arm_stats_timer()
    }

    fn arm_stats_timer(&mut self) -> Result<(), BalloonError> {
        let result = if self.stats_interval_s == 0 || self.active.is_none() {
            self.stats_timer.clear()
        } else {
            let d = Duration::from_secs(self.stats_interval_s.into());
            self.stats_timer.reset(d, Some(d))
        };
        result.map_err(|e| BalloonError::Timer(e.to_string()))
    }

    fn config_bytes(&self) -> [u8; config::LEN_WITH_POISON as usize] {
        let mut c = [0u8; config::LEN_WITH_POISON as usize];
        c[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        c[4..8].copy_from_slice(&self.actual.to_le_bytes());
        c[12..16].copy_from_slice(&self.poison_val.to_le_bytes());
        c
    }

    fn config_len(&self) -> u64 {
        if self.features & F_PAGE_POISON != 0 {
            config::LEN_WITH_POISON
        } else {
            config::LEN_BASIC
        }
    }

    /// True when reported pages must be kept: the guest expects freed pages to hold a
    /// non-zero poison pattern, and a discarded page would come back as zeros.
    fn must_keep_reported_pages(&self, features: u64) -> bool {
        features & F_PAGE_POISON != 0 && self.poison_val != 0
    }

    fn process_inflate_or_deflate(&mut self, role: QueueRole) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Active {
            mem,
            interrupt,
            queues,
            ..
        } = active;
        let Some((_, queue)) = queues.iter_mut().find(|(r, _)| *r == role) else {
            return;
        };
        let counters = &mut self.counters;
        let pages = &mut self.pages;
        // Inflated ranges are discarded before the buffers go back, as QEMU does: when the
        // guest sees its inflate done, the host has the pages. (Discarding while the guest
        // runs on was measured no faster, and in the emulated test host it coincided with
        // L1 lockups and guest crashes under the madvise/TLB-flush traffic.)
        let mut to_discard = Vec::new();
        let used_any = drain_queue(queue, mem, counters, |chain, mem, counters| {
            let Some(mut pfns) = read_pfns(chain, mem, counters) else {
                return;
            };
            pfns.retain(|&pfn| {
                let ok = pfn_is_ram(mem, pfn);
                if !ok {
                    counters.rejected_pfns += 1;
                }
                ok
            });
            if role == QueueRole::Inflate {
                for &pfn in &pfns {
                    counters.inflated_pages += 1;
                    if !pages.insert(pfn) {
                        counters.repeated_inflates += 1;
                    }
                }
                to_discard.extend(pfns_to_host_ranges(mem, &mut pfns));
            } else {
                for &pfn in &pfns {
                    counters.deflated_pages += 1;
                    if !pages.remove(pfn) {
                        counters.unknown_deflates += 1;
                    }
                }
            }
        });
        for range in to_discard {
            self.discards.discard(range, DiscardReason::Inflate);
        }
        if used_any {
            notify(queue, mem, interrupt.as_ref());
        }
    }

    fn process_stats(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Active {
            mem,
            interrupt,
            queues,
            stats_head,
            ..
        } = active;
        let Some((_, queue)) = queues.iter_mut().find(|(r, _)| *r == QueueRole::Stats) else {
            return;
        };
        let mem = &*mem;
        let mut returned = false;
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.counters.rejected_descriptors += 1;
                    tracing::warn!("balloon: statistics queue: {e}");
                    None
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let mut buf = Vec::new();
            let mut ok = true;
            for (i, desc) in chain.enumerate() {
                if i >= MAX_STATS_DESCRIPTORS
                    || desc.is_write_only()
                    || buf.len() + desc.len() as usize > MAX_STATS_BYTES
                {
                    ok = false;
                    break;
                }
                let start = buf.len();
                buf.resize(start + desc.len() as usize, 0);
                if mem.read_slice(&mut buf[start..], desc.addr()).is_err() {
                    ok = false;
                    break;
                }
            }
            if ok && !buf.is_empty() {
                self.stats = Some(GuestStats::parse(&buf, SystemTime::now()));
                self.counters.stats_updates += 1;
            } else {
                self.counters.rejected_descriptors += 1;
            }
            // Hold one buffer; an extra one (a confused guest) goes straight back.
            if let Some(previous) = stats_head.replace(head) {
                if queue.add_used(mem, previous, 0).is_err() {
                    self.counters.rejected_descriptors += 1;
                }
                returned = true;
            }
        }
        if returned {
            notify(queue, mem, interrupt.as_ref());
        }
    }

    /// Hands the held statistics buffer back so the guest refills it.
    fn request_stats(&mut self) {
        let _ = self.stats_timer.wait();
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(head) = active.stats_head.take() else {
            return;
        };
        let mem = active.mem.clone();
        let interrupt = active.interrupt.clone();
        if let Some(queue) = active.queue_mut(QueueRole::Stats) {
            if queue.add_used(&mem, head, 0).is_ok() {
                notify(queue, &mem, interrupt.as_ref());
            } else {
                self.counters.rejected_descriptors += 1;
            }
        }
    }

    fn process_reporting(&mut self) {
        let noticed = Instant::now();
        let keep = self
            .active
            .as_ref()
            .map(|a| self.must_keep_reported_pages(a.features))
            .unwrap_or(false);
        if keep && !self.poison_warned {
            self.poison_warned = true;
            tracing::warn!(
                "balloon: the guest poisons free pages with {:#x}; reported pages are kept \
                 (discarding would hand back zero pages)",
                self.poison_val
            );
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Active {
            mem,
            interrupt,
            queues,
            ..
        } = active;
        let Some((_, queue)) = queues.iter_mut().find(|(r, _)| *r == QueueRole::Reporting) else {
            return;
        };
        let counters = &mut self.counters;
        let discards = &self.discards;
        let used_any = drain_queue(queue, mem, counters, |chain, mem, counters| {
            counters.reports += 1;
            for (i, desc) in chain.enumerate() {
                if i >= REPORT_CAPACITY {
                    // Linux never reports more; stop reading a hostile chain here.
                    counters.rejected_ranges += 1;
                    break;
                }
                let Some(range) = valid_report_range(mem, &desc) else {
                    counters.rejected_ranges += 1;
                    continue;
                };
                counters.reported_ranges += 1;
                counters.reported_bytes += range.len as u64;
                if keep {
                    counters.skipped_ranges += 1;
                    counters.skipped_bytes += range.len as u64;
                    continue;
                }
                // Before the buffer goes back: the guest reuses reported pages at once.
                discards.discard(range, DiscardReason::Report);
            }
        });
        if used_any {
            notify(queue, mem, interrupt.as_ref());
            self.counters.report_latency.record(noticed.elapsed());
        }
    }
}

/// A reported range Ebb may discard: device-writable, non-empty, page aligned and sized,
/// inside one guest RAM region.
fn valid_report_range(mem: &GuestMemoryMmap, desc: &Descriptor) -> Option<crate::pages::HostRange> {
    let addr = desc.addr().0;
    let len = u64::from(desc.len());
    if !desc.is_write_only()
        || len == 0
        || addr % BALLOON_PAGE_SIZE != 0
        || len % BALLOON_PAGE_SIZE != 0
    {
        return None;
    }
    host_range(mem, addr, len)
}

type Chain<'a> = virtio_queue::DescriptorChain<&'a GuestMemoryMmap>;

/// Pops every available chain, hands it to `handle`, and returns it to the guest.
/// Returns true when at least one buffer was used.
fn drain_queue<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    counters: &mut BalloonCounters,
    mut handle: impl FnMut(Chain<'m>, &'m GuestMemoryMmap, &mut BalloonCounters),
) -> bool {
    let mut used_any = false;
    loop {
        let chain = match queue.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                // A broken available ring (index jumped past the ring): nothing safe to do
                // until the driver resets the device.
                counters.rejected_descriptors += 1;
                tracing::warn!("balloon: queue unusable: {e}");
                None
            }
        };
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        handle(chain, mem, counters);
        match queue.add_used(mem, head, 0) {
            Ok(()) => used_any = true,
            Err(_) => counters.rejected_descriptors += 1,
        }
    }
    used_any
}

/// Reads the PFN array of an inflate or deflate chain; `None` (counted) when the chain is
/// malformed: device-writable, empty, not a multiple of 4 bytes, too long, or outside RAM.
fn read_pfns(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    counters: &mut BalloonCounters,
) -> Option<Vec<u32>> {
    let mut pfns = Vec::new();
    for (i, desc) in chain.enumerate() {
        let len = desc.len();
        if i >= MAX_PFN_CHAIN_DESCRIPTORS
            || desc.is_write_only()
            || len == 0
            || len % 4 != 0
            || len > MAX_PFN_BYTES
        {
            counters.rejected_descriptors += 1;
            return None;
        }
        let mut raw = vec![0u8; len as usize];
        if mem.read_slice(&mut raw, desc.addr()).is_err() {
            counters.rejected_descriptors += 1;
            return None;
        }
        pfns.extend(
            raw.chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    if pfns.is_empty() {
        // A chain whose head index is out of range yields no descriptors.
        counters.rejected_descriptors += 1;
        return None;
    }
    Some(pfns)
}

fn notify(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &dyn VirtioInterrupt) {
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.trigger(InterruptKind::Queue);
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        protocol::VIRTIO_ID_BALLOON
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        queue_roles(self.features)
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
            config::ACTUAL if u64::from(value) <= self.ram_pages => self.actual = value,
            config::POISON_VAL if self.features & F_PAGE_POISON != 0 => self.poison_val = value,
            _ => self.counters.rejected_config_writes += 1,
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivationError> {
        let roles = queue_roles(activation.features);
        let mut queues = Vec::new();
        for q in activation.queues {
            match roles.get(usize::from(q.index)) {
                Some(role) => queues.push((*role, q.queue)),
                None => tracing::warn!(
                    "balloon: the driver set up queue {} which its features do not use",
                    q.index
                ),
            }
        }
        for needed in [QueueRole::Inflate, QueueRole::Deflate] {
            if !queues.iter().any(|(r, _)| *r == needed) {
                return Err(ActivationError(format!("the {needed:?} queue is missing")));
            }
        }
        for (role, needed) in [
            (QueueRole::Stats, F_STATS_VQ),
            (QueueRole::Reporting, F_PAGE_REPORTING),
        ] {
            if activation.features & needed != 0 && !queues.iter().any(|(r, _)| *r == role) {
                tracing::warn!("balloon: {role:?} negotiated but its queue was not set up");
            }
        }
        self.pages.clear();
        self.active = Some(Active {
            mem: activation.mem,
            features: activation.features,
            interrupt: activation.interrupt,
            queues,
            stats_head: None,
        });
        if let Err(e) = self.arm_stats_timer() {
            tracing::warn!("balloon: {e}");
        }
        // Buffers queued before DRIVER_OK (Linux primes the statistics queue during probe)
        // were kicked while the device was inactive: pick them up now.
        for role in [
            QueueRole::Inflate,
            QueueRole::Deflate,
            QueueRole::Stats,
            QueueRole::Reporting,
        ] {
            self.process_role(role);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.actual = 0;
        self.poison_val = 0;
        self.pages.clear();
        let _ = self.stats_timer.clear();
    }

    fn process_queue(&mut self, index: u16) {
        let role = self
            .active
            .as_ref()
            .and_then(|a| queue_roles(a.features).get(usize::from(index)).copied());
        if let Some(role) = role {
            self.process_role(role);
        }
    }

    fn event_fds(&self) -> Vec<(RawFd, u32)> {
        if self.features & F_STATS_VQ != 0 {
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

impl Balloon {
    fn process_role(&mut self, role: QueueRole) {
        match role {
            QueueRole::Inflate | QueueRole::Deflate => self.process_inflate_or_deflate(role),
            QueueRole::Stats => self.process_stats(),
            QueueRole::Reporting => self.process_reporting(),
            QueueRole::FreePageHint => {}
        }
    }
}
