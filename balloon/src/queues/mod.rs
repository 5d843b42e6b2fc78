//! One module per queue kind, and what they share: taking chains off the available ring,
//! handling each completely, then giving it back.
//!
//! Each chain is handled to the end (validated, its pages discarded) before its used entry
//! is written: a guest that polls the used ring must never see a buffer done whose pages
//! the host still holds.

pub mod inflate;
pub mod reporting;
pub mod statistics;

use ebb_devices::ram::{GuestRam, RamRange};
use ebb_devices::virtio::{InterruptKind, VirtioInterrupt};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::counters::{BalloonCounters, DiscardReason};

/// A descriptor chain in guest memory.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// The next available chain; `None` when the ring is empty, or unusable (an index that
/// jumped past the ring: counted, and nothing is safe to do until the driver resets).
pub fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    counters: &mut BalloonCounters,
) -> Option<Chain<'m>> {
    match queue.iter(mem) {
        Ok(mut available) => available.next(),
        Err(e) => {
            counters.rejected_descriptors += 1;
            tracing::warn!("balloon: queue unusable: {e}");
            None
        }
    }
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

/// Handles every available chain with `handle`, each given back once handled. True when
/// at least one went back.
pub fn drain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    counters: &mut BalloonCounters,
    mut handle: impl FnMut(Chain<'m>, &mut BalloonCounters),
) -> bool {
    let mut gave_back = false;
    while let Some(chain) = next_chain(queue, mem, counters) {
        let head = chain.head_index();
        handle(chain, counters);
        gave_back |= give_back(queue, mem, head, counters);
    }
    gave_back
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
