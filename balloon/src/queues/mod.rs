//! One module per queue kind, and what they share: taking chains off the available ring,
//! handling each completely, then giving it back.
//!
//! Each chain is handled to the end (validated, its pages discarded) before its used entry
//! is written: a guest that polls the used ring must never see a buffer done whose pages
//! the host still holds.

pub mod hinting;
pub mod inflate;
pub mod reporting;
pub mod statistics;

use std::time::{Duration, Instant};

use ebb_devices::faults::{self, GuestFault};
use ebb_devices::ram::{GuestRam, RamRange};
use ebb_devices::virtio::chains::uses_indirect_table;
use ebb_devices::virtio::{InterruptKind, QueueWork, VirtioInterrupt};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::counters::{BalloonCounters, DiscardReason};

/// A descriptor chain in guest memory.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// The next available chain; `None` when the ring is empty, or unusable (an index that
/// jumped past the ring: counted, and nothing is safe to do until the driver resets).
///
/// Chains that use an indirect table (never offered) are counted and given back unread;
/// after a ring's worth of them this returns `None` too, so a ring refilled with nothing
/// else cannot hold the pass: the rest wait for the guest's next kick.
pub fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    counters: &mut BalloonCounters,
) -> Option<Chain<'m>> {
    for _ in 0..queue.size() {
        let chain = match queue.iter(mem) {
            Ok(mut available) => available.next()?,
            Err(e) => {
                counters.rejected_descriptors += 1;
                faults::record(GuestFault::AvailRing, || {
                    format!("balloon: queue unusable: {e}")
                });
                return None;
            }
        };
        let head = chain.head_index();
        if !uses_indirect_table(mem, queue, head) {
            return Some(chain);
        }
        counters.rejected_descriptors += 1;
        faults::record(GuestFault::DescriptorChain, || {
            format!("balloon: chain {head} uses an indirect table, which was not offered")
        });
        give_back(queue, mem, head, counters);
    }
    None
}

/// Returns the chain at `head` to the guest (nothing written into it). False, counted,
/// when the used ring cannot be written.
pub fn give_back(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    counters: &mut BalloonCounters,
) -> bool {
    let ok = queue.add_used(mem, head, 0).is_ok();
    if !ok {
        counters.rejected_descriptors += 1;
    }
    ok
}

/// How long one wake-up may work on one queue before it yields, whatever its budget of
/// units has left: the API and signals are served on the same loop, and a unit's cost
/// (a `madvise` of one page, say) varies a hundredfold between hosts.
pub const PASS_TIME_LIMIT: Duration = Duration::from_millis(5);

/// How much work one wake-up may do on one queue before it yields to the event loop, in
/// units each queue kind defines (page numbers read, bytes discarded, ...), and within
/// [`PASS_TIME_LIMIT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    left: u64,
    spent_any: bool,
    deadline: Instant,
}

impl Budget {
    /// A budget of `units`, to be spent within `limit` from now.
    pub fn new(units: u64, limit: Duration) -> Self {
        Self {
            left: units,
            spent_any: false,
            deadline: Instant::now() + limit,
        }
    }

    /// Takes `units` off what is left.
    pub fn spend(&mut self, units: u64) {
        self.left = self.left.saturating_sub(units);
        self.spent_any = true;
    }

    /// Units left.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// True when no units are left, or the time is up. The clock only counts once some
    /// work was done, so every pass makes progress however late it starts.
    pub fn is_spent(&self) -> bool {
        self.left == 0 || (self.spent_any && Instant::now() >= self.deadline)
    }
}

/// What one pass over a queue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// At least one buffer went back to the guest (it wants an interrupt).
    pub gave_back: bool,
    /// Whether buffers may be left.
    pub work: QueueWork,
}

/// Handles available chains with `handle`, each given back once handled, until the queue
/// is empty or `budget` is spent (`handle` spends it).
pub fn drain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    counters: &mut BalloonCounters,
    mut budget: Budget,
    mut handle: impl FnMut(Chain<'m>, &mut BalloonCounters, &mut Budget),
) -> Pass {
    let mut gave_back = false;
    while !budget.is_spent() {
        let Some(chain) = next_chain(queue, mem, counters) else {
            return Pass {
                gave_back,
                work: QueueWork::Done,
            };
        };
        let head = chain.head_index();
        handle(chain, counters, &mut budget);
        gave_back |= give_back(queue, mem, head, counters);
    }
    Pass {
        gave_back,
        work: QueueWork::Yielded,
    }
}

/// Interrupts the guest about used buffers, unless it asked not to be.
pub fn notify(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &dyn VirtioInterrupt) {
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.trigger(InterruptKind::Queue);
    }
}

/// Gives `range` back to the host and counts it: what guest RAM gave back, and what it
/// kept because it does not cover a whole page of the backing (a partial huge page). A
/// failure is logged, not returned: the guest's buffer goes back either way (the memory
/// just stays with the host).
pub fn discard(
    ram: &GuestRam,
    range: RamRange,
    reason: DiscardReason,
    counters: &mut BalloonCounters,
) {
    match ram.discard(range) {
        Ok(bytes) => {
            if bytes > 0 {
                counters.count_discard(reason, bytes, true);
            }
            counters.unaligned_kept_bytes += range.len() - bytes;
        }
        Err(e) => {
            tracing::warn!(
                "balloon: discarding {reason:?} range {:#x}+{:#x}: {e}",
                range.gpa(),
                range.len()
            );
            counters.count_discard(reason, range.len(), false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pass whose time is up before it started still does one piece of work.
    #[test]
    fn a_late_pass_still_makes_progress_then_stops() {
        let mut budget = Budget::new(1000, Duration::ZERO);
        assert!(!budget.is_spent(), "nothing done yet");
        budget.spend(1);
        assert!(budget.is_spent(), "the time is up once work was done");
        assert_eq!(budget.left(), 999);
    }

    /// Within its time a budget lasts until its units are gone.
    #[test]
    fn a_budget_within_its_time_ends_with_its_units() {
        let mut budget = Budget::new(3, Duration::from_secs(3600));
        budget.spend(2);
        assert!(!budget.is_spent());
        budget.spend(5);
        assert!(budget.is_spent());
        assert_eq!(budget.left(), 0);
    }
}
