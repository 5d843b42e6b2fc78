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

/// How much work one wake-up may do on one queue before it yields to the event loop, in
/// units each queue kind defines (page numbers read, bytes discarded, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    left: u64,
}

impl Budget {
    /// A budget of `units`.
    pub fn new(units: u64) -> Self {
        Self { left: units }
    }

    /// Takes `units` off what is left.
    pub fn spend(&mut self, units: u64) {
        self.left = self.left.saturating_sub(units);
    }

    /// Units left.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// True when nothing is left.
    pub fn is_spent(&self) -> bool {
        self.left == 0
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

/// Gives `range` back to the host and counts it. A failure is logged, not returned: the
/// guest's buffer goes back either way (the memory just stays with the host).
pub fn discard(
    ram: &GuestRam,
    range: RamRange,
    reason: DiscardReason,
    counters: &mut BalloonCounters,
) {
    let result = ram.discard(range);
    if let Err(e) = &result {
        tracing::warn!(
            "balloon: discarding {reason:?} range {:#x}+{:#x}: {e}",
            range.gpa(),
            range.len()
        );
    }
    counters.count_discard(reason, range.len(), result.is_ok());
}
