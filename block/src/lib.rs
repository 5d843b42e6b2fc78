//! Ebb's virtio-blk device: a disk backed by a raw image file (or block device),
//! independent of the virtio transport.
//!
//! A kick flows pop chain -> validate -> execute -> status -> give back:
//! - [`protocol`]: feature bits, request types, status values, the configuration space
//!   layout and the limits Ebb advertises.
//! - [`image`]: opening, checking and locking images before the guest starts.
//! - [`device`]: the [`Block`] device: features, configuration space, activation.
//! - [`queue`]: the request queue: the budgeted pass over the ring.
//! - [`request`]: the one validation pass from a descriptor chain to a [`request::Request`]
//!   (or the status that refuses it).
//! - [`io`]: the host calls: `preadv`/`pwritev` into guest RAM, `fdatasync`, `fallocate`.
//! - [`counters`]: what the device did, for the API and metrics.
//!
//! # Where the I/O runs
//!
//! On the VMM's event loop, synchronously, never on a vCPU thread: a kick (an ioeventfd)
//! wakes the loop, which runs one pass over the queue with `preadv`/`pwritev` straight
//! between the image and guest RAM (no bounce buffer, no copy), within a budget of
//! [`queue::PASS_BUDGET_BYTES`], then yields and kicks itself so signals, the API and the
//! other devices are served between passes. The pass holds the device's own lock, not
//! the transport's, so a vCPU taking a completion interrupt does not wait for it.
//!
//! A worker thread with a bounded channel would let I/O overlap the loop's other work,
//! at the price of a second owner of the queue (completions written from another thread,
//! a reset that must wait for requests in flight), a thread with its own seccomp filter,
//! and a hand-off per request. With one request queue and images that mostly live in the
//! host's page cache, a request is a memory copy the kernel does; the budget bounds how
//! long the loop is away (8 MiB of data, or 8 flushes, per pass). If disks slower than
//! the page cache matter, the next step is a worker per disk that owns the queue
//! outright, or io_uring on the loop itself.
//!
//! `examples/io_mechanisms.rs` measures both on a warm image (`cargo run --release -p
//! ebb-block --example io_mechanisms`). On the project machine (2 vCPUs; two runs), the
//! inline path did 0.58-0.86 M 4 KiB reads/s against 0.29-0.42 M through a worker, 99-245 k
//! against 68-82 k at 64 KiB, 17.6-19.0 k against 12.6-14.1 k at 1 MiB; the hand-off
//! alone added 8-15 us to each request (median, one at a time).

pub mod counters;
pub mod device;
pub mod image;
pub mod io;
pub mod protocol;
pub mod queue;
pub mod request;

pub use device::Block;
pub use image::{open_images, DiskImage, ImageError};
