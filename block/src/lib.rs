//! Ebb's virtio-blk device: a disk backed by a raw image file (or block device),
//! independent of the virtio transport.
//!
//! A kick flows pop chain -> validate -> execute -> status -> give back:
//! - [`protocol`]: feature bits, request types, status values, the configuration space
//!   layout and the limits Ebb advertises.
//! - [`image`]: opening, checking and locking images before the guest starts.
//! - [`device`]: the [`Block`] device: features, configuration space, activation.
//! - [`queue`]: the request queue: takes chains off the ring, answers them, bounds what is
//!   in flight, orders flushes after the writes before them.
//! - [`request`]: the one validation pass from a descriptor chain to a [`request::Request`]
//!   (or the status that refuses it).
//! - [`pool`]: the disk's I/O threads.
//! - [`io`]: the host calls: `preadv`/`pwritev` into guest RAM, `fdatasync`, `fallocate`.
//! - [`counters`]: what the device did, for the API and metrics.
//!
//! # Where the I/O runs
//!
//! On a small pool of I/O threads per disk ([`pool::IO_THREADS`]), never on a vCPU thread.
//! A kick (an ioeventfd) wakes the event loop, which takes chains off the ring, checks
//! each, answers refused ones and GET_ID at once (and, where turned on, small reads the
//! host has cached: below), and hands the rest to the pool as [`queue::Slot`]s; the threads `preadv`/`pwritev` straight between the
//! image and guest RAM (no bounce buffer, no copy) and queue the slot back, waking the
//! loop through an eventfd; the loop, the one owner of the rings, writes the status and
//! the used entry and interrupts the guest once per batch. Requests complete out of order.
//! With `VIRTIO_RING_F_EVENT_IDX` the guest neither kicks while the device is behind nor
//! takes an interrupt per completion.
//!
//! Bounds whatever the guest does: [`queue::MAX_IN_FLIGHT`] slots per activation, their
//! buffers allocated once (nothing is sized by the guest); with all of them out, chains
//! stay on the ring until a completion frees one. A flush waits, off the threads, for
//! every write taken off the ring before it, then runs `fdatasync`. A reset (or a driver's
//! re-init) waits for the requests on the threads to finish (their data may still be
//! landing in guest RAM until then) and drops them unanswered: nothing is written to guest
//! RAM after it returns. The threads run under their own seccomp filter (the VMM's
//! `DiskIo`: `preadv`, `pwritev`, `fdatasync`, `fallocate`, and the common calls).
//!
//! Why threads and not io_uring on the loop (reasoned, not measured: io_uring was not
//! built): with images in the host's page cache (the common case, and the benchmark's), a
//! buffered io_uring read that hits the cache completes inline in the submitting thread,
//! so the loop would still copy every request itself, one after another, as before; only
//! misses go to the kernel's io-wq workers. io_uring's operations also pass under seccomp
//! (a ring can open files unless restricted) and need a new dependency. Threads give
//! parallel copies on any file system with plain system calls.
//!
//! What decided it, `ebb-bench disk` in the nested test host (fio in the guest, O_DIRECT:
//! 1 MiB sequential write and read at depth 16, 4 KiB random read at depth 8; MiB/s,
//! MiB/s, IOPS), all rows of one test-host run (2 L1 CPUs, one guest vCPU) on 2026-12-02:
//!
//! | setup                                 | write | read | 4K IOPS |
//! |---------------------------------------|------:|-----:|--------:|
//! | 1 I/O thread                          |   299 |  143 |   1,143 |
//! | 2 I/O threads                         |   142 |  261 |   1,312 |
//! | 4 I/O threads                         |   147 |  495 |   1,029 |
//! | 8 I/O threads, first pass             |   279 |  542 |   1,101 |
//! | QEMU microvm (thread pool), first     |   113 |  504 |   1,137 |
//! | 8 I/O threads, second pass            |   155 |  472 |   1,108 |
//! | QEMU microvm, second                  |   353 |  530 |   1,218 |
//!
//! Before the threads (requests one at a time on the loop, an earlier run): 204, 333,
//! 1,250 against QEMU's 34, 351, 1,696. Two later `ebb-bench disk` runs (8 threads): Ebb 269, 543, 1,096 against QEMU 96, 510,
//! 1,166; Ebb 104, 327, 1,461 against QEMU 31, 510, 1,179.
//!
//! Sequential reads scale with threads up to 4 (1 MiB requests are copies the threads do
//! side by side); 4 KiB random reads sit at 1,000-1,300 IOPS whatever the setup, QEMU's
//! included: there the guest's exits (kick, interrupt) cost more than the copy. Writes go
//! from 30 to 350 MiB/s between passes for both VMMs (the test host's page cache
//! writeback). 8 threads, as many as the requests a guest keeps in flight here, keep the
//! read figure and leave room on hosts with more cores.
//!
//! `examples/io_mechanisms.rs` measures the hand-off's own cost on a warm image (`cargo
//! run --release -p ebb-block --example io_mechanisms`): on the project machine a request
//! handed to a thread took 8-15 us more than one run inline (median, one at a time).
//!
//! # Small cached reads on the event loop
//!
//! With [`pool::IoOptions::cached_reads`] (`EBB_DISK_CACHED_READS=1`), a read of at
//! most [`queue::CACHED_READ_MAX`] is first tried on the event loop with
//! `preadv2(RWF_NOWAIT)`, which copies from the host's page cache or gives up at once
//! (it never waits for a device): all of it there, the request is answered in the same
//! pass; anything less, it goes to the threads, which read it all. A pass copies at most
//! [`queue::CACHED_PASS_BYTES`] this way, and a file system that refuses `RWF_NOWAIT`
//! (tmpfs before Linux 6.6) turns the attempt off for the activation. The event loop's
//! system call filter allows `preadv2` with that flag alone.
//!
//! It is off by default because it measured slower where it could be measured:
//! `ebb-bench disk` with the data image behind a loop device in the nested test host
//! (2026-12-03, three passes) did 857, 928 and 1,030 random 4 KiB reads a second with it
//! against 1,066, 1,235 and 1,403 without, though the loop answered every read itself (no
//! I/O thread woke). Under emulation the event loop copying
//! eight requests one after another loses to eight threads copying side by side on the
//! test host's two CPUs; on a real host, where a copy takes microseconds and a hand-off
//! 8-15 us, it may well win: measure there before turning it on.

pub mod counters;
pub mod device;
pub mod image;
pub mod io;
pub mod pool;
pub mod protocol;
pub mod queue;
pub mod request;

pub use device::Block;
pub use image::{open_images, DiskImage, ImageError};
pub use pool::IoOptions;
