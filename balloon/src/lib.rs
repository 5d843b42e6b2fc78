//! Ebb's virtio-balloon device: inflate and deflate, statistics, deflate-on-OOM, free
//! page reporting and page poisoning, independent of the virtio transport.
//!
//! A kick flows pop chain -> validate -> discard -> give back:
//! - [`protocol`]: feature bits, config space layout, queue numbering.
//! - [`device`]: the [`Balloon`]: config space, features, which queue is which.
//! - [`queues`]: one module per queue kind (inflate/deflate, statistics, reporting).
//! - [`pages`]: the one validation pass from guest page numbers and reported ranges to
//!   ranges of guest RAM, which [`ebb_devices::ram::GuestRam`] discards.
//! - [`stats`]: the statistics queue's wire format and the typed snapshot.
//! - [`counters`]: what the device did, for the API and metrics.
//! - [`policy`]: the automatic balloon policy, a target from each statistics report.

pub mod counters;
pub mod device;
pub mod pages;
pub mod policy;
pub mod protocol;
pub mod queues;
pub mod stats;

pub use device::{Balloon, BalloonOptions, SHORT_STATS_INTERVAL};
pub use queues::hinting::{HintControl, HintDiscard, HintState};
