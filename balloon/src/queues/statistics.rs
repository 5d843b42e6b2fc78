//! The statistics queue. The guest fills a buffer with `{tag, value}` entries and hands it
//! over; Ebb keeps it until it wants fresh numbers, then gives it back for a refill.

use std::time::SystemTime;

use ebb_devices::virtio::QueueWork;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{give_back, next_chain, Chain, Pass};
use crate::counters::BalloonCounters;
use crate::stats::{GuestStats, MAX_STATS_BYTES};

/// Descriptors Ebb reads from one statistics chain.
const MAX_STATS_DESCRIPTORS: usize = 4;
/// Statistics buffers one wake-up reads (Linux has one in flight).
pub const STATS_BUDGET: usize = 16;

/// The statistics queue and the one buffer Ebb holds.
#[derive(Debug)]
pub struct StatsQueue {
    queue: Queue,
    held: Option<u16>,
}

impl StatsQueue {
    /// The queue as the driver set it up, holding nothing yet.
    pub fn new(queue: Queue) -> Self {
        Self { queue, held: None }
    }

    /// The queue, to notify on.
    pub fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// Reads the buffers the guest filled into `latest`, keeps the newest and gives any
    /// older one back (a confused guest sending several), at most [`STATS_BUDGET`] per
    /// wake-up.
    pub fn take_reports(
        &mut self,
        mem: &GuestMemoryMmap,
        latest: &mut Option<GuestStats>,
        counters: &mut BalloonCounters,
    ) -> Pass {
        let mut gave_back = false;
        for _ in 0..STATS_BUDGET {
            let Some(chain) = next_chain(&mut self.queue, mem, counters) else {
                return Pass {
                    gave_back,
                    work: QueueWork::Done,
                };
            };
            let head = chain.head_index();
            match read_stats(chain, mem) {
                Some(buf) => {
                    *latest = Some(GuestStats::parse(&buf, SystemTime::now()));
                    counters.stats_updates += 1;
                }
                None => counters.rejected_descriptors += 1,
            }
            if let Some(previous) = self.held.replace(head) {
                gave_back |= give_back(&mut self.queue, mem, previous, counters);
            }
        }
        Pass {
            gave_back,
            work: QueueWork::Yielded,
        }
    }

    /// Gives the held buffer back so the guest refills it. True when one went back.
    pub fn request(&mut self, mem: &GuestMemoryMmap, counters: &mut BalloonCounters) -> bool {
        match self.held.take() {
            Some(head) => give_back(&mut self.queue, mem, head, counters),
            None => false,
        }
    }
}

/// The bytes of a statistics chain; `None` when it is device-writable, too long, empty
/// or outside guest RAM.
fn read_stats(chain: Chain<'_>, mem: &GuestMemoryMmap) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    for (i, desc) in chain.enumerate() {
        if i >= MAX_STATS_DESCRIPTORS
            || desc.is_write_only()
            || buf.len() + desc.len() as usize > MAX_STATS_BYTES
        {
            return None;
        }
        let start = buf.len();
        buf.resize(start + desc.len() as usize, 0);
        mem.read_slice(&mut buf[start..], desc.addr()).ok()?;
    }
    (!buf.is_empty()).then_some(buf)
}
