//! Ebb's virtio-balloon device: inflate and deflate, statistics, deflate-on-OOM, free
//! page reporting and page poisoning, independent of the virtio transport.
//!
//! - [`protocol`]: feature bits, config space layout, queue numbering.
//! - [`pages`]: turning guest page numbers and reported ranges into validated host ranges.
//! - [`discard`]: giving memory back to the host (`madvise(MADV_DONTNEED)`).
//! - [`stats`]: the statistics queue's wire format and the typed snapshot.
//! - [`counters`]: what the device did, for the API and metrics.
//! - [`device`]: the [`Balloon`] itself.

pub mod counters;
pub mod device;
pub mod discard;
pub mod pages;
pub mod protocol;
pub mod stats;

pub use device::{Balloon, BalloonOptions};
