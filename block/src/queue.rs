//! The request queue: take chains off the available ring, check each ([`crate::request`]),
//! execute it against the image ([`crate::io`]), write its status, give it back; within a
//! budget per wake-up, then yield so the event loop serves everything else first.
//!
//! Each request is finished (data moved, status written) before its used entry is
//! written. Requests run in ring order, one at a time: a later write never overtakes an
//! earlier one, and a flush covers every write completed before it.

use std::fs::File;

use ebb_devices::faults::{self, GuestFault};
use ebb_devices::ram::GuestRam;
use ebb_devices::virtio::chains::uses_indirect_table;
use ebb_devices::virtio::{InterruptKind, QueueWork, VirtioInterrupt};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::counters::{BlockCounters, Op, Reject};
use crate::io::{self, Discarded};
use crate::protocol::{features, status, ID_BYTES};
use crate::request::{parse, DiskShape, Parsed, Request, Scratch};

/// Bytes of work one wake-up does before it yields. Reads and writes cost their length;
/// see [`MIN_REQUEST_COST`], [`FLUSH_COST`] and [`RANGE_COST`] for the rest. A request is never split: the pass that starts one
/// finishes it (at most 8 MiB of data), then checks the budget.
pub const PASS_BUDGET_BYTES: u64 = 8 << 20;
/// What any request costs at least, so a ring refilled with tiny or refused requests
/// yields too (at most 2,048 requests a pass).
pub const MIN_REQUEST_COST: u64 = 4 << 10;
/// What a flush costs: `fdatasync` may wait for the host's disk (at most 8 a pass).
pub const FLUSH_COST: u64 = 1 << 20;
/// What one discard or write-zeroes range costs when the file system does it
/// (`fallocate` changes metadata, it moves no data).
pub const RANGE_COST: u64 = 64 << 10;

/// The disk a queue works on.
#[derive(Debug)]
pub struct Disk<'a> {
    /// The image.
    pub file: &'a File,
    /// Size, read-only, negotiated features.
    pub shape: DiskShape,
    /// What GET_ID returns (NUL-padded).
    pub id: [u8; ID_BYTES],
}

/// What one pass over the queue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// At least one request went back to the guest (it wants an interrupt).
    pub gave_back: bool,
    /// Whether requests may be left.
    pub work: QueueWork,
}

/// The request queue as the driver set it up, and the reusable request buffers.
#[derive(Debug)]
pub struct RequestQueue {
    queue: Queue,
    scratch: Scratch,
}

type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

impl RequestQueue {
    /// The queue the driver made ready.
    pub fn new(queue: Queue) -> Self {
        Self {
            queue,
            scratch: Scratch::default(),
        }
    }

    /// Works through requests within [`PASS_BUDGET_BYTES`], then interrupts the guest
    /// once if any went back.
    pub fn process(
        &mut self,
        ram: &GuestRam,
        disk: &Disk<'_>,
        interrupt: &dyn VirtioInterrupt,
        counters: &mut BlockCounters,
    ) -> Pass {
        let mem = ram.memory();
        let mut left = PASS_BUDGET_BYTES;
        let mut gave_back = false;
        let work = loop {
            if left == 0 {
                break QueueWork::Yielded;
            }
            let Some(chain) = next_chain(&mut self.queue, mem, counters) else {
                break QueueWork::Done;
            };
            let head = chain.head_index();
            let (used, spent) = self.handle(chain, ram, disk, counters);
            left = left.saturating_sub(spent.max(MIN_REQUEST_COST));
            gave_back |= give_back(&mut self.queue, mem, head, used, counters);
        };
        if gave_back && self.queue.needs_notification(mem).unwrap_or(true) {
            interrupt.trigger(InterruptKind::Queue);
        }
        Pass { gave_back, work }
    }

    /// Checks, executes and answers one request; returns the used length (bytes written
    /// into the guest's buffers, the status byte included) and the request's cost.
    fn handle(
        &mut self,
        chain: Chain<'_>,
        ram: &GuestRam,
        disk: &Disk<'_>,
        counters: &mut BlockCounters,
    ) -> (u32, u64) {
        let head = chain.head_index();
        match parse(chain, ram, &disk.shape, &mut self.scratch) {
            Parsed::NoStatus => {
                refused(counters, Reject::NoStatus, head);
                (0, 0)
            }
            Parsed::Refused {
                status_at,
                status,
                reason,
            } => {
                refused(counters, reason, head);
                (answer(ram, status_at, status), 0)
            }
            Parsed::Ready { status_at, request } => {
                let (result, cost) = execute(&request, &self.scratch, ram, disk);
                let (code, written) = match result {
                    Ok(written) => {
                        counters.count_completed(request.op);
                        count_bytes(counters, &request);
                        (status::OK, written)
                    }
                    Err(e) => {
                        counters.io_errors += 1;
                        // Host failures are not the guest's doing: log them, a few.
                        if counters.io_errors.is_power_of_two() {
                            tracing::warn!(
                                "disk: {} of {} bytes at {} failed: {e} ({} I/O errors so far)",
                                request.op.name(),
                                request.len,
                                request.offset,
                                counters.io_errors
                            );
                        }
                        (status::IOERR, 0)
                    }
                };
                (answer(ram, status_at, code) + written, cost)
            }
        }
    }
}

/// Writes the status byte; returns the bytes written (1, or 0 if it could not be).
fn answer(ram: &GuestRam, at: GuestAddress, code: u8) -> u32 {
    // The parse checked the byte is in guest RAM.
    u32::from(ram.memory().write_obj(code, at).is_ok())
}

fn refused(counters: &mut BlockCounters, reason: Reject, head: u16) {
    counters.count_rejected(reason);
    let kind = match reason {
        Reject::NoStatus | Reject::Chain | Reject::Direction | Reject::Buffer => {
            GuestFault::DescriptorChain
        }
        _ => GuestFault::BlockRequest,
    };
    faults::record(kind, || {
        format!("disk: request {head} refused: {}", reason.name())
    });
}

fn count_bytes(counters: &mut BlockCounters, request: &Request) {
    let len = request.len;
    match request.op {
        Op::Read => counters.read_bytes += len,
        Op::Write => counters.written_bytes += len,
        Op::Discard => counters.discarded_bytes += len,
        Op::WriteZeroes => counters.zeroed_bytes += len,
        Op::Flush | Op::GetId => {}
    }
}

/// Runs a checked request. Returns the bytes written into guest buffers (reads and
/// GET_ID) or the error, and what the request cost.
fn execute(
    request: &Request,
    scratch: &Scratch,
    ram: &GuestRam,
    disk: &Disk<'_>,
) -> (std::io::Result<u32>, u64) {
    let file = disk.file;
    match request.op {
        Op::Read => {
            let r = io::read_into(file, &scratch.buffers, request.offset);
            // At most SEG_MAX * SIZE_MAX bytes: fits.
            (r.map(|()| request.len as u32), request.len)
        }
        Op::Write => {
            let mut r = io::write_from(file, &scratch.buffers, request.offset);
            // Without FLUSH negotiated the driver expects every write to be stable when
            // it completes (write-through).
            if r.is_ok() && disk.shape.negotiated & features::FLUSH == 0 {
                r = io::flush(file);
            }
            (r.map(|()| 0), request.len)
        }
        Op::Flush => {
            let r = if disk.shape.readonly {
                Ok(())
            } else {
                io::flush(file)
            };
            (r.map(|()| 0), FLUSH_COST)
        }
        Op::GetId => (Ok(write_id(ram, scratch, &disk.id)), 0),
        Op::Discard | Op::WriteZeroes => {
            let mut cost = 0;
            for range in scratch.ranges.iter().filter(|r| r.len > 0) {
                let result = if request.op == Op::Discard {
                    // A file system that cannot punch holes ignores the hint.
                    io::discard(file, range.offset, range.len).map(|_: Discarded| RANGE_COST)
                } else {
                    io::write_zeroes(file, range.offset, range.len, range.unmap).map(
                        |how| match how {
                            io::Zeroed::Written => range.len,
                            _ => RANGE_COST,
                        },
                    )
                };
                match result {
                    Ok(c) => cost += c,
                    Err(e) => return (Err(e), cost),
                }
            }
            (Ok(0), cost)
        }
    }
}

/// Writes the ID string across GET_ID's buffers, as much of it as they hold.
fn write_id(ram: &GuestRam, scratch: &Scratch, id: &[u8; ID_BYTES]) -> u32 {
    let mut rest: &[u8] = id;
    let mut written = 0;
    for buffer in &scratch.buffers {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(buffer.len());
        if ram
            .memory()
            .write_slice(&rest[..n], GuestAddress(buffer.gpa()))
            .is_err()
        {
            break;
        }
        rest = &rest[n..];
        written += n as u32;
    }
    written
}

/// The next available chain; `None` when the ring is empty or unusable (counted).
/// Chains through an indirect table (never offered) are refused and given back unread;
/// after a ring's worth of them this returns `None` too, so they cannot hold the pass.
fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    counters: &mut BlockCounters,
) -> Option<Chain<'m>> {
    for _ in 0..queue.size() {
        let chain = match queue.iter(mem) {
            Ok(mut available) => available.next()?,
            Err(e) => {
                counters.count_rejected(Reject::Chain);
                faults::record(GuestFault::AvailRing, || {
                    format!("disk: queue unusable: {e}")
                });
                return None;
            }
        };
        let head = chain.head_index();
        if !uses_indirect_table(mem, queue, head) {
            return Some(chain);
        }
        refused(counters, Reject::Chain, head);
        give_back(queue, mem, head, 0, counters);
    }
    None
}

/// Returns the chain at `head` with `used` bytes written. False, counted, when the used
/// ring cannot be written.
fn give_back(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    used: u32,
    counters: &mut BlockCounters,
) -> bool {
    let ok = queue.add_used(mem, head, used).is_ok();
    if !ok {
        counters.count_rejected(Reject::Chain);
    }
    ok
}
