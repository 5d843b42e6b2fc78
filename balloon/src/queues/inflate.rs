//! The inflate and deflate queues: arrays of 4 KiB page numbers the guest gives to the
//! host or takes back.

use ebb_devices::ram::GuestRam;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{discard, drain, Chain};
use crate::counters::{BalloonCounters, DiscardReason};
use crate::pages::{check_pfns, CheckedPfns, PageSet};

/// Descriptors Ebb reads from one inflate or deflate chain (Linux sends one).
pub const MAX_PFN_CHAIN_DESCRIPTORS: usize = 16;
/// Largest PFN array Ebb reads from one descriptor (Linux sends at most 256 PFNs).
pub const MAX_PFN_BYTES: u32 = 4096;

/// Takes every inflate buffer: its valid pages join the balloon and are discarded before
/// the buffer goes back. True when a buffer went back.
pub fn inflate(
    ram: &GuestRam,
    queue: &mut Queue,
    balloon: &mut PageSet,
    counters: &mut BalloonCounters,
) -> bool {
    drain_pfn_buffers(ram, queue, counters, |checked, counters| {
        counters.inflated_pages += checked.valid_entries;
        counters.repeated_inflates += checked.repeats;
        for pfn in checked.pages() {
            if !balloon.insert(pfn) {
                counters.repeated_inflates += 1;
            }
        }
        for range in checked.ranges {
            discard(ram, range, DiscardReason::Inflate, counters);
        }
    })
}

/// Takes every deflate buffer: its valid pages leave the balloon (the guest may use them
/// again; they come back as zero pages on first touch). True when a buffer went back.
pub fn deflate(
    ram: &GuestRam,
    queue: &mut Queue,
    balloon: &mut PageSet,
    counters: &mut BalloonCounters,
) -> bool {
    drain_pfn_buffers(ram, queue, counters, |checked, counters| {
        counters.deflated_pages += checked.valid_entries;
        counters.unknown_deflates += checked.repeats;
        for pfn in checked.pages() {
            if !balloon.remove(pfn) {
                counters.unknown_deflates += 1;
            }
        }
    })
}

/// Drains PFN buffers: each one read and checked against guest RAM (rejects counted),
/// then handed to `handle` before it goes back.
fn drain_pfn_buffers(
    ram: &GuestRam,
    queue: &mut Queue,
    counters: &mut BalloonCounters,
    mut handle: impl FnMut(CheckedPfns, &mut BalloonCounters),
) -> bool {
    drain(queue, ram.memory(), counters, |chain, counters| {
        if let Some(pfns) = read_pfns(chain, ram.memory(), counters) {
            let checked = check_pfns(ram, pfns);
            counters.rejected_pfns += checked.rejected;
            handle(checked, counters);
        }
    })
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
