//! Free page hinting: the host asks (a new command id in the config space), the guest
//! allocates its free memory in large blocks (4 MiB on x86) and hands them over on this
//! queue between its own START (the id) and STOP messages, and keeps them until the host
//! says DONE.
//!
//! The guest may take a block back before the host has looked at it (its shrinker frees
//! hinted blocks under memory pressure) and write to it. Ebb never loses such a write:
//! by default a block is discarded with [`GuestRam::discard_unwritten`], which drops only
//! pages that still hold the zeros the guest's allocator wrote (`init_on_alloc`, Debian's
//! default) while every writer is held off; a page with data is kept. [`HintDiscard::
//! Unchecked`] discards blocks as they come, as other VMMs do: it exists only so the
//! tests can show the race they catch.
//!
//! Every buffer goes back at once (the guest spins while the ring is full); a pass stops
//! after [`HINT_BUDGET_BYTES`] so a guest cannot hold the event loop.

use std::time::{Duration, Instant};

use ebb_devices::faults::{self, GuestFault};
use ebb_devices::ram::{GuestRam, RamRange};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::{discard, drain, Budget, Pass};
use crate::counters::{BalloonCounters, DiscardReason};
use crate::protocol::hint_cmd;

/// Hinted bytes one wake-up handles before it yields.
pub const HINT_BUDGET_BYTES: u64 = 256 << 20;
/// Largest block Ebb accepts (Linux on x86 hints 4 MiB blocks).
pub const MAX_HINT_BLOCK_BYTES: u64 = 64 << 20;
/// Descriptors read from one chain (Linux sends one).
const MAX_DESCRIPTORS_PER_CHAIN: usize = 4;

/// How hinted blocks are discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HintDiscard {
    /// Only pages that still hold zeros, under a write fence: no write is ever lost.
    #[default]
    Checked,
    /// Everything as it comes (loses writes the guest makes to a block it took back
    /// before the host got to it). For tests only.
    Unchecked,
}

/// Where a hinting run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HintState {
    /// No run asked for since the device started.
    #[default]
    Idle,
    /// The host wrote a command id; the guest has not started.
    Requested,
    /// The guest sent the command id and is handing over blocks.
    Running,
    /// The guest sent STOP; it holds its blocks until the host says DONE.
    Stopped,
    /// The host said DONE: the guest frees its blocks.
    Done,
}

impl HintState {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            HintState::Idle => "idle",
            HintState::Requested => "requested",
            HintState::Running => "running",
            HintState::Stopped => "stopped",
            HintState::Done => "done",
        }
    }
}

/// The current (or last) run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HintRun {
    /// Its command id.
    pub cmd_id: u32,
    /// Where it is.
    pub state: HintState,
    /// Say DONE as soon as the guest stops.
    pub acknowledge_on_stop: bool,
    /// When the host asked.
    pub started: Option<Instant>,
    /// From the host's request to the guest's STOP.
    pub duration: Option<Duration>,
    /// Blocks received.
    pub blocks: u64,
    /// Bytes in them.
    pub bytes: u64,
    /// Bytes discarded.
    pub discarded_bytes: u64,
    /// Bytes kept (written again by the guest, or a failed discard).
    pub kept_bytes: u64,
    /// Time the host spent checking and discarding this run's blocks.
    pub host_time: Duration,
}

/// The host's side of free page hinting: the command id in the config space, the last
/// id the guest sent, and the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HintControl {
    /// The value of `free_page_hint_cmd_id`.
    pub host_cmd: u32,
    /// The last command id the guest sent on the queue.
    pub guest_cmd: Option<u32>,
    /// The current or last run.
    pub run: HintRun,
}

/// What the device must do after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HintPass {
    /// The queue pass.
    pub pass: Pass,
    /// The host's command id changed (DONE after the guest's STOP): raise a config
    /// interrupt.
    pub config_changed: bool,
}

impl HintControl {
    /// Starts a run: a fresh command id (never STOP or DONE).
    pub fn start(&mut self, acknowledge_on_stop: bool, now: Instant) -> u32 {
        let id = match self.run.cmd_id.checked_add(1) {
            Some(id) if id >= hint_cmd::FIRST_RUN => id,
            _ => hint_cmd::FIRST_RUN,
        };
        self.host_cmd = id;
        self.run = HintRun {
            cmd_id: id,
            state: HintState::Requested,
            acknowledge_on_stop,
            started: Some(now),
            ..HintRun::default()
        };
        id
    }

    /// Tells the guest the host is done with its blocks (whatever the run's state).
    pub fn done(&mut self) {
        self.host_cmd = hint_cmd::DONE;
        if self.run.state != HintState::Idle {
            self.run.state = HintState::Done;
        }
    }

    /// Forgets the guest's side (device reset); the host's last id is kept so that the
    /// next run gets a new one.
    pub fn reset(&mut self) {
        self.host_cmd = hint_cmd::STOP;
        self.guest_cmd = None;
        if matches!(self.run.state, HintState::Requested | HintState::Running) {
            self.run.state = HintState::Done;
        }
    }

    /// Blocks arriving now belong to the current run.
    fn accepting(&self) -> bool {
        self.run.state == HintState::Running && self.guest_cmd == Some(self.host_cmd)
    }

    /// A command id from the guest. True when the host's id changed (DONE).
    fn guest_says(&mut self, id: u32, now: Instant, counters: &mut BalloonCounters) -> bool {
        self.guest_cmd = Some(id);
        if id == hint_cmd::STOP {
            if self.run.state != HintState::Running {
                return false;
            }
            self.run.state = HintState::Stopped;
            self.run.duration = self.run.started.map(|s| now.duration_since(s));
            counters.hint_runs += 1;
            if self.run.acknowledge_on_stop {
                self.done();
                return true;
            }
        } else if id == self.host_cmd && self.run.state == HintState::Requested {
            self.run.state = HintState::Running;
        } else {
            counters.hint_stale += 1;
        }
        false
    }
}

/// Takes the queue's buffers within [`HINT_BUDGET_BYTES`] and `time_limit`: command ids move the run on,
/// blocks of the current run are discarded (as `mode` says), the rest only counted.
pub fn process(
    ram: &GuestRam,
    queue: &mut Queue,
    control: &mut HintControl,
    mode: HintDiscard,
    counters: &mut BalloonCounters,
    time_limit: Duration,
) -> HintPass {
    let mut config_changed = false;
    let pass = drain(
        queue,
        ram.memory(),
        counters,
        Budget::new(HINT_BUDGET_BYTES, time_limit),
        |chain, counters, budget| {
            // Even an empty chain costs something: a ring of them must yield.
            budget.spend(4096);
            for (i, desc) in chain.enumerate() {
                if i >= MAX_DESCRIPTORS_PER_CHAIN {
                    counters.rejected_descriptors += 1;
                    break;
                }
                if desc.is_write_only() {
                    // A rejected block costs no more than the largest valid one.
                    budget.spend(u64::from(desc.len()).min(MAX_HINT_BLOCK_BYTES));
                    take_block(ram, &desc, control, mode, counters);
                } else if let Some(id) = read_cmd_id(ram, &desc, counters) {
                    config_changed |= control.guest_says(id, Instant::now(), counters);
                }
            }
        },
    );
    HintPass {
        pass,
        config_changed,
    }
}

/// The command id in a device-readable descriptor (4 bytes, little endian).
fn read_cmd_id(ram: &GuestRam, desc: &Descriptor, counters: &mut BalloonCounters) -> Option<u32> {
    let id = (desc.len() == 4)
        .then(|| {
            ram.memory()
                .read_obj::<u32>(GuestAddress(desc.addr().0))
                .ok()
        })
        .flatten();
    if id.is_none() {
        counters.rejected_descriptors += 1;
        faults::record(GuestFault::DescriptorChain, || {
            format!(
                "balloon: free page hint command of {} bytes at {:#x} (expected 4 in RAM)",
                desc.len(),
                desc.addr().0
            )
        });
    }
    id.map(u32::from_le)
}

/// The RAM range a device-writable descriptor names, if it is a usable block.
fn block_range(ram: &GuestRam, desc: &Descriptor) -> Option<RamRange> {
    let len = u64::from(desc.len());
    if len > MAX_HINT_BLOCK_BYTES {
        return None;
    }
    ram.range(desc.addr().0, len)
}

fn take_block(
    ram: &GuestRam,
    desc: &Descriptor,
    control: &mut HintControl,
    mode: HintDiscard,
    counters: &mut BalloonCounters,
) {
    let Some(range) = block_range(ram, desc) else {
        counters.rejected_ranges += 1;
        faults::record(GuestFault::ReportRange, || {
            format!(
                "balloon: hinted block {:#x}+{:#x} is not page aligned inside guest RAM \
                 (or is over {MAX_HINT_BLOCK_BYTES} bytes)",
                desc.addr().0,
                desc.len()
            )
        });
        return;
    };
    if !control.accepting() {
        counters.hint_stale += 1;
        return;
    }
    counters.hint_blocks += 1;
    counters.hint_bytes += range.len();
    control.run.blocks += 1;
    control.run.bytes += range.len();
    let started = Instant::now();
    let (discarded, kept) = match mode {
        HintDiscard::Unchecked => {
            let before = counters.hint_discarded_bytes;
            discard(ram, range, DiscardReason::Hint, counters);
            let discarded = counters.hint_discarded_bytes - before;
            (discarded, range.len() - discarded)
        }
        HintDiscard::Checked => match ram.discard_unwritten(range) {
            Ok(done) => {
                counters.count_discard(DiscardReason::Hint, done.discarded, true);
                counters.unaligned_kept_bytes += done.unaligned;
                (done.discarded, done.kept)
            }
            Err(e) => {
                tracing::warn!(
                    "balloon: hinted block {:#x}+{:#x}: {e}",
                    range.gpa(),
                    range.len()
                );
                counters.count_discard(DiscardReason::Hint, 0, false);
                (0, range.len())
            }
        },
    };
    let took = started.elapsed();
    counters.hint_host_us += took.as_micros() as u64;
    control.run.host_time += took;
    counters.hint_kept_bytes += kept;
    control.run.discarded_bytes += discarded;
    control.run.kept_bytes += kept;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::BalloonCounters;

    #[test]
    fn a_run_moves_from_request_to_done() {
        let mut c = HintControl::default();
        let mut counters = BalloonCounters::default();
        let t0 = Instant::now();
        assert_eq!(c.start(true, t0), hint_cmd::FIRST_RUN);
        assert_eq!(c.run.state, HintState::Requested);
        assert!(!c.accepting(), "no blocks before the guest's START");
        assert!(!c.guest_says(2, t0, &mut counters));
        assert!(c.accepting());
        assert_eq!(c.run.state, HintState::Running);
        assert!(c.guest_says(hint_cmd::STOP, t0, &mut counters), "DONE");
        assert_eq!(c.host_cmd, hint_cmd::DONE);
        assert_eq!(c.run.state, HintState::Done);
        assert_eq!(counters.hint_runs, 1);
        assert!(!c.accepting());
        // Without acknowledge_on_stop the guest keeps its blocks until done().
        assert_eq!(c.start(false, t0), 3);
        c.guest_says(3, t0, &mut counters);
        assert!(!c.guest_says(hint_cmd::STOP, t0, &mut counters));
        assert_eq!(c.run.state, HintState::Stopped);
        assert_eq!(c.host_cmd, 3);
        c.done();
        assert_eq!((c.host_cmd, c.run.state), (hint_cmd::DONE, HintState::Done));
    }

    #[test]
    fn stale_ids_are_counted_and_ids_never_take_stop_or_done() {
        let mut c = HintControl::default();
        let mut counters = BalloonCounters::default();
        let t0 = Instant::now();
        c.start(true, t0);
        c.guest_says(7, t0, &mut counters);
        assert_eq!(counters.hint_stale, 1);
        assert!(!c.accepting());
        assert_eq!(c.guest_cmd, Some(7));
        c.run.cmd_id = u32::MAX;
        assert_eq!(
            c.start(true, t0),
            hint_cmd::FIRST_RUN,
            "wraps past STOP and DONE"
        );
        c.reset();
        assert_eq!((c.host_cmd, c.guest_cmd), (hint_cmd::STOP, None));
        assert_eq!(c.start(true, t0), 3, "a reset keeps ids moving on");
    }
}
