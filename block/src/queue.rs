//! The request queue: take chains off the available ring, check each ([`crate::request`]),
//! hand the ones that touch the image to the disk's I/O threads ([`crate::pool`]) as
//! [`Slot`]s, and give each back to the guest when its slot comes back.
//!
//! One owner (the event loop, under the device's lock) takes chains off the ring and
//! writes every status byte and used entry; the I/O threads only move data between the
//! image and the request's buffers. Requests complete in any order, as virtio allows.
//!
//! Bounds, whatever the guest does: at most [`MAX_IN_FLIGHT`] requests are off the ring
//! and unanswered (their slots, allocated once at activation, are all there is; with none
//! free the ring waits, and a completion resumes it), and a pass takes at most
//! [`PASS_CHAINS`] chains before it yields to the rest of the event loop.
//!
//! A flush completes only after every write (or discard, or write-zeroes) taken off the
//! ring before it has completed: it waits, out of the I/O threads, until the last of those
//! comes back, then runs `fdatasync`. Later requests do not wait for it.

use std::collections::VecDeque;
use std::fs::File;

use ebb_devices::faults::{self, GuestFault};
use ebb_devices::ram::GuestRam;
use ebb_devices::virtio::chains::uses_indirect_table;
use ebb_devices::virtio::{InterruptKind, QueueWork, VirtioInterrupt};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::counters::{BlockCounters, Op, Reject};
use crate::io::{self, CachedRead, Discarded};
use crate::protocol::{features, status, ID_BYTES, QUEUE_SIZE};
use crate::request::{parse, DiskShape, Parsed, Request, Scratch};

/// Most requests off the ring and not yet answered, per disk.
pub const MAX_IN_FLIGHT: usize = 32;
/// Most chains one pass takes off the ring (answered at once or handed out) before it
/// yields.
pub const PASS_CHAINS: usize = QUEUE_SIZE as usize;
/// Largest read the event loop answers itself from the host's page cache: a hand-off to
/// an I/O thread and back costs more than copying a few pages (see [`crate`]).
pub const CACHED_READ_MAX: u64 = 32 << 10;
/// Most bytes one pass copies on the event loop: the rest go to the I/O threads.
pub const CACHED_PASS_BYTES: u64 = 256 << 10;

/// What the event loop checks requests against and answers GET_ID with.
#[derive(Debug, Clone, Copy)]
pub struct Disk {
    /// Size, read-only, negotiated features.
    pub shape: DiskShape,
    /// What GET_ID returns (NUL-padded).
    pub id: [u8; ID_BYTES],
}

/// One request between the ring and the used ring: checked, its buffers in guest RAM,
/// where its status goes. Allocated at activation with buffers of fixed capacity; moved
/// (never copied, never reallocated) to an I/O thread and back.
#[derive(Debug)]
pub struct Slot {
    head: u16,
    status_at: GuestAddress,
    request: Request,
    shape: DiskShape,
    scratch: Scratch,
    /// Order in which requests were taken off the ring.
    seq: u64,
    /// The activation the slot belongs to.
    generation: u64,
    /// Bytes written into guest buffers, or the host's error; `None` until executed.
    result: Option<std::io::Result<u32>>,
    /// Keeps guest RAM mapped for as long as a request may point into it.
    _ram: GuestRam,
}

impl Slot {
    fn new(ram: &GuestRam, generation: u64) -> Self {
        Self {
            head: 0,
            status_at: GuestAddress(0),
            request: Request {
                op: Op::Flush,
                offset: 0,
                len: 0,
            },
            shape: DiskShape {
                size: 0,
                readonly: true,
                negotiated: 0,
            },
            scratch: Scratch::default(),
            seq: 0,
            generation,
            result: None,
            _ram: ram.clone(),
        }
    }

    /// The activation this slot belongs to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The request.
    pub fn request(&self) -> Request {
        self.request
    }

    /// Runs the request against `file` (on an I/O thread): moves its data between the
    /// image and guest RAM, or flushes, discards, zeroes.
    pub fn execute(&mut self, file: &File) {
        self.result = Some(execute(&self.request, &self.scratch, &self.shape, file));
    }
}

/// What one pass over the queue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// At least one request went back to the guest (it wants an interrupt).
    pub gave_back: bool,
    /// Whether requests may be left that only another pass takes (not those that wait
    /// for a free slot: a completion resumes those).
    pub work: QueueWork,
}

/// The request queue as the driver set it up, the slots, and what is in flight.
#[derive(Debug)]
pub struct RequestQueue {
    queue: Queue,
    generation: u64,
    free: Vec<Slot>,
    /// Flushes waiting for earlier writes to complete, in ring order.
    flushes: VecDeque<Slot>,
    /// Sequence numbers of the writes out on the I/O threads.
    writes: Vec<u64>,
    next_seq: u64,
    /// Small reads are tried from the host's page cache on the event loop (until the
    /// file system refuses reads that may not wait).
    cached_reads: bool,
}

type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

impl RequestQueue {
    /// The queue the driver made ready, with [`MAX_IN_FLIGHT`] slots tagged `generation`.
    pub fn new(queue: Queue, ram: &GuestRam, generation: u64) -> Self {
        Self {
            queue,
            generation,
            free: (0..MAX_IN_FLIGHT)
                .map(|_| Slot::new(ram, generation))
                .collect(),
            flushes: VecDeque::with_capacity(MAX_IN_FLIGHT),
            writes: Vec::with_capacity(MAX_IN_FLIGHT),
            next_seq: 0,
            cached_reads: false,
        }
    }

    /// Whether small reads are still tried from the host's page cache on the event loop.
    pub fn tries_cached_reads(&self) -> bool {
        self.cached_reads
    }

    /// Turns trying small reads from the page cache on, or off (the default, as
    /// [`crate::pool::IoOptions::cached_reads`]: every request goes to the I/O threads).
    pub fn set_cached_reads(&mut self, on: bool) {
        self.cached_reads = on;
    }

    /// Requests off the ring and not yet given back.
    pub fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT - self.free.len()
    }

    /// Takes chains off the ring while slots are free, within [`PASS_CHAINS`]: answers
    /// refused requests, GET_ID and small reads the host has cached in `file` at once,
    /// hands the rest to `submit`. Interrupts the guest once if any went back.
    pub fn process(
        &mut self,
        ram: &GuestRam,
        disk: &Disk,
        file: &File,
        interrupt: &dyn VirtioInterrupt,
        counters: &mut BlockCounters,
        submit: &mut dyn FnMut(Slot),
    ) -> Pass {
        let pass = self.take(ram, disk, file, counters, submit);
        self.notify(ram, pass.gave_back, interrupt);
        pass
    }

    fn take(
        &mut self,
        ram: &GuestRam,
        disk: &Disk,
        file: &File,
        counters: &mut BlockCounters,
        submit: &mut dyn FnMut(Slot),
    ) -> Pass {
        let mem = ram.memory();
        let mut gave_back = false;
        let mut cached_budget = CACHED_PASS_BYTES;
        for _ in 0..PASS_CHAINS {
            let Some(mut slot) = self.free.pop() else {
                return Pass {
                    gave_back,
                    work: QueueWork::Done,
                };
            };
            let chain = match next_chain(&mut self.queue, mem, counters) {
                Next::Chain(chain) => chain,
                Next::Refused { gave_back: g } => {
                    self.free.push(slot);
                    gave_back |= g;
                    continue;
                }
                Next::Empty => {
                    self.free.push(slot);
                    // Drained: ask for a kick at the next request (with EVENT_IDX, the
                    // driver does not kick while the device is behind); look again if
                    // one came in meanwhile.
                    if self.queue.enable_notification(mem).unwrap_or(false) {
                        continue;
                    }
                    return Pass {
                        gave_back,
                        work: QueueWork::Done,
                    };
                }
                Next::Broken => {
                    self.free.push(slot);
                    return Pass {
                        gave_back,
                        work: QueueWork::Done,
                    };
                }
            };
            let head = chain.head_index();
            let answered = match self.check(chain, ram, disk, counters, &mut slot) {
                Some(used) => Some(used),
                None => self.read_cached(&mut slot, ram, file, counters, &mut cached_budget),
            };
            match answered {
                Some(used) => {
                    self.free.push(slot);
                    gave_back |= give_back(&mut self.queue, mem, head, used, counters);
                }
                None => self.dispatch(slot, submit),
            }
        }
        Pass {
            gave_back,
            work: QueueWork::Yielded,
        }
    }

    /// Checks one chain into `slot`. Returns the used length if it was answered at once
    /// (refused, or GET_ID), `None` if the slot now holds a request to run.
    fn check(
        &mut self,
        chain: Chain<'_>,
        ram: &GuestRam,
        disk: &Disk,
        counters: &mut BlockCounters,
        slot: &mut Slot,
    ) -> Option<u32> {
        let head = chain.head_index();
        match parse(chain, ram, &disk.shape, &mut slot.scratch) {
            Parsed::NoStatus => {
                refused(counters, Reject::NoStatus, head);
                Some(0)
            }
            Parsed::Refused {
                status_at,
                status,
                reason,
            } => {
                refused(counters, reason, head);
                Some(answer(ram, status_at, status))
            }
            Parsed::Ready { status_at, request } if request.op == Op::GetId => {
                // A copy of 20 bytes: not worth a hand-off.
                let written = write_id(ram, &slot.scratch, &disk.id);
                counters.count_completed(Op::GetId);
                Some(answer(ram, status_at, status::OK) + written)
            }
            Parsed::Ready { status_at, request } => {
                slot.head = head;
                slot.status_at = status_at;
                slot.request = request;
                slot.shape = disk.shape;
                slot.seq = self.next_seq;
                slot.result = None;
                self.next_seq += 1;
                None
            }
        }
    }

    /// Answers a small read from the host's page cache, within `budget` bytes for the
    /// pass; returns the used length, or `None` to hand it to the I/O threads (not all
    /// cached, too large, budget spent, or the file system cannot say).
    fn read_cached(
        &mut self,
        slot: &mut Slot,
        ram: &GuestRam,
        file: &File,
        counters: &mut BlockCounters,
        budget: &mut u64,
    ) -> Option<u32> {
        let len = slot.request.len;
        if !self.cached_reads
            || slot.request.op != Op::Read
            || len > CACHED_READ_MAX
            || len > *budget
        {
            return None;
        }
        match io::read_cached(file, &slot.scratch.buffers, slot.request.offset) {
            CachedRead::Done => {
                *budget -= len;
                counters.cached_reads += 1;
                slot.result = Some(Ok(len as u32));
                Some(finish(slot, ram, counters))
            }
            CachedRead::Wait => None,
            CachedRead::Unsupported => {
                self.cached_reads = false;
                None
            }
        }
    }

    /// Hands a checked request out, or holds a flush until the writes before it are done.
    fn dispatch(&mut self, slot: Slot, submit: &mut dyn FnMut(Slot)) {
        let op = slot.request.op;
        if op == Op::Flush && self.writes.iter().any(|&w| w < slot.seq) {
            self.flushes.push_back(slot);
            return;
        }
        if op.writes() {
            // At most MAX_IN_FLIGHT slots exist: within the capacity.
            self.writes.push(slot.seq);
        }
        submit(slot);
    }

    /// Gives back requests the I/O threads finished (slots of another activation are
    /// dropped unanswered), releases the flushes they held, and takes more chains off
    /// the ring now that slots are free. Interrupts the guest once if any went back.
    #[allow(clippy::too_many_arguments)]
    pub fn complete(
        &mut self,
        done: &mut dyn FnMut() -> Option<Slot>,
        ram: &GuestRam,
        disk: &Disk,
        file: &File,
        interrupt: &dyn VirtioInterrupt,
        counters: &mut BlockCounters,
        submit: &mut dyn FnMut(Slot),
    ) -> Pass {
        let mem = ram.memory();
        let mut gave_back = false;
        while let Some(mut slot) = done() {
            if slot.generation != self.generation {
                continue;
            }
            if slot.request.op.writes() {
                if let Some(i) = self.writes.iter().position(|&w| w == slot.seq) {
                    self.writes.swap_remove(i);
                }
            }
            let used = finish(&mut slot, ram, counters);
            gave_back |= give_back(&mut self.queue, mem, slot.head, used, counters);
            self.free.push(slot);
        }
        // Flushes whose earlier writes are all done, in order.
        while let Some(flush) = self.flushes.front() {
            let seq = flush.seq;
            if self.writes.iter().any(|&w| w < seq) {
                break;
            }
            if let Some(flush) = self.flushes.pop_front() {
                submit(flush);
            }
        }
        let pass = self.take(ram, disk, file, counters, submit);
        let gave_back = gave_back || pass.gave_back;
        self.notify(ram, gave_back, interrupt);
        Pass {
            gave_back,
            work: pass.work,
        }
    }

    fn notify(&mut self, ram: &GuestRam, gave_back: bool, interrupt: &dyn VirtioInterrupt) {
        if gave_back && self.queue.needs_notification(ram.memory()).unwrap_or(true) {
            interrupt.trigger(InterruptKind::Queue);
        }
    }
}

/// Counts an executed request and writes its status; returns the used length.
fn finish(slot: &mut Slot, ram: &GuestRam, counters: &mut BlockCounters) -> u32 {
    let request = slot.request;
    let result = slot
        .result
        .take()
        .unwrap_or_else(|| Err(std::io::Error::other("the request was not run")));
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
    answer(ram, slot.status_at, code) + written
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

/// Runs a checked request. Returns the bytes written into guest buffers (reads) or the
/// error.
fn execute(
    request: &Request,
    scratch: &Scratch,
    shape: &DiskShape,
    file: &File,
) -> std::io::Result<u32> {
    match request.op {
        Op::Read => {
            io::read_into(file, &scratch.buffers, request.offset)?;
            // At most SEG_MAX * SIZE_MAX bytes: fits.
            Ok(request.len as u32)
        }
        Op::Write => {
            io::write_from(file, &scratch.buffers, request.offset)?;
            // Without FLUSH negotiated the driver expects every write to be stable when
            // it completes (write-through).
            if shape.negotiated & features::FLUSH == 0 {
                io::flush(file)?;
            }
            Ok(0)
        }
        Op::Flush => {
            if !shape.readonly {
                io::flush(file)?;
            }
            Ok(0)
        }
        // Answered on the event loop; never handed out.
        Op::GetId => Ok(0),
        Op::Discard | Op::WriteZeroes => {
            for range in scratch.ranges.iter().filter(|r| r.len > 0) {
                if request.op == Op::Discard {
                    // A file system that cannot punch holes ignores the hint.
                    let _: Discarded = io::discard(file, range.offset, range.len)?;
                } else {
                    io::write_zeroes(file, range.offset, range.len, range.unmap)?;
                }
            }
            Ok(0)
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

/// What the available ring holds next.
enum Next<'m> {
    Chain(Chain<'m>),
    /// A chain through an indirect table (never offered): refused, given back unread.
    Refused {
        gave_back: bool,
    },
    /// Nothing (for now).
    Empty,
    /// The ring is unusable (counted) until the driver resets the device.
    Broken,
}

/// The next available chain.
fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    counters: &mut BlockCounters,
) -> Next<'m> {
    let chain = match queue.iter(mem) {
        Ok(mut available) => match available.next() {
            Some(chain) => chain,
            None => return Next::Empty,
        },
        Err(e) => {
            counters.count_rejected(Reject::Chain);
            faults::record(GuestFault::AvailRing, || {
                format!("disk: queue unusable: {e}")
            });
            return Next::Broken;
        }
    };
    let head = chain.head_index();
    if !uses_indirect_table(mem, queue, head) {
        return Next::Chain(chain);
    }
    refused(counters, Reject::Chain, head);
    Next::Refused {
        gave_back: give_back(queue, mem, head, 0, counters),
    }
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
