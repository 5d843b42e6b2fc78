//! virtio: the device-side contract ([`VirtioDevice`]), interrupts, and the virtio-mmio
//! transport ([`mmio::MmioTransport`]) that drives a device without knowing what it is.

pub mod chains;
pub mod handler;
pub mod mmio;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::ram::GuestRam;

/// VIRTIO_F_VERSION_1: the modern (1.x) interface; required by virtio-mmio version 2.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// What an interrupt says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// A used ring was updated.
    Queue,
    /// The configuration space changed.
    Config,
}

/// How a device raises interrupts, whatever the transport.
pub trait VirtioInterrupt: Send + Sync {
    /// Raises `kind`.
    fn trigger(&self, kind: InterruptKind);
}

/// The virtio-mmio interrupt: InterruptStatus bits, the config generation counter, and
/// an eventfd registered with KVM as an irqfd.
#[derive(Debug)]
pub struct MmioInterrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    irq: EventFd,
}

/// InterruptStatus bit for used-ring updates.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit for configuration changes.
pub const INT_CONFIG: u32 = 2;

impl MmioInterrupt {
    /// An interrupt line signalled through `irq`.
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            irq,
        }
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears all state (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The configuration generation, bumped on every config change.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// The eventfd behind the line.
    pub fn irq(&self) -> &EventFd {
        &self.irq
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) {
        let bit = match kind {
            InterruptKind::Queue => INT_VRING,
            InterruptKind::Config => {
                self.config_generation.fetch_add(1, Ordering::SeqCst);
                INT_CONFIG
            }
        };
        // Status first, then the edge: the guest's handler reads the status.
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            tracing::warn!("virtio interrupt: {e}");
        }
    }
}

/// A queue handed to the device at activation.
#[derive(Debug)]
pub struct ActiveQueue {
    /// Queue index.
    pub index: u16,
    /// The queue, as the driver configured it.
    pub queue: Queue,
}

/// Everything a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest RAM: queues live in it, and devices give parts of it back through it.
    pub ram: GuestRam,
    /// Features the driver accepted.
    pub features: u64,
    /// The queues the driver made ready (others are absent).
    pub queues: Vec<ActiveQueue>,
    /// The device's interrupt.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

/// Why a device refused activation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ActivationError(pub String);

/// What a pass over a queue left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueWork {
    /// The queue is empty (or unusable until reset).
    Done,
    /// The device stopped at its budget with buffers left: it wants another pass once the
    /// event loop has served whatever else is waiting (API requests, signals, timers).
    Yielded,
}

/// Queue work a device does without its transport's lock (see
/// [`VirtioDevice::queue_worker`]).
pub trait QueueWorker: Send + Sync {
    /// As [`VirtioDevice::process_queue`]: a bounded amount of work on queue `index`.
    /// Does nothing (and says [`QueueWork::Done`]) when the device is not active.
    fn process_queue(&self, index: u16) -> QueueWork;
    /// File descriptors of the worker's own (I/O completions and the like), with ids
    /// passed back to [`QueueWorker::process_event`], which also runs without the
    /// transport's lock.
    fn event_fds(&self) -> Vec<(std::os::fd::RawFd, u32)> {
        Vec::new()
    }
    /// Handles an event on one of [`QueueWorker::event_fds`]; a bounded amount of work.
    fn process_event(&self, _id: u32) {}
}

/// A virtio device, independent of its transport. The transport negotiates features,
/// configures queues and forwards config accesses; the device does the work.
pub trait VirtioDevice: Send {
    /// The virtio device ID.
    fn device_type(&self) -> u32;
    /// Features the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Maximum size of each queue the device can have, by index. The driver may set up
    /// fewer (virtio-balloon numbers only the queues its negotiated features need).
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the negotiated features and ready queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivationError>;
    /// Returns to the pre-activation state (driver reset).
    fn reset(&mut self);
    /// Processes queue `index` after the driver kicked it, doing a bounded amount of work
    /// (no guest can hold the caller for long) and saying whether work is left.
    fn process_queue(&mut self, index: u16) -> QueueWork;
    /// For devices whose queue work blocks (disk I/O): a handle the event loop calls
    /// instead of [`VirtioDevice::process_queue`], without holding the transport's lock,
    /// so that a vCPU reading or acknowledging this device's registers (every interrupt
    /// does) never waits for that work. `None` (the default): `process_queue` runs under
    /// the lock.
    fn queue_worker(&self) -> Option<Arc<dyn QueueWorker>> {
        None
    }
    /// Extra file descriptors the device wants polled (timers and the like), with ids
    /// passed back to [`VirtioDevice::process_event`].
    fn event_fds(&self) -> Vec<(std::os::fd::RawFd, u32)> {
        Vec::new()
    }
    /// Handles an event on one of [`VirtioDevice::event_fds`].
    fn process_event(&mut self, _id: u32) {}
}
