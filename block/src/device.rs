//! The virtio-blk device: features, configuration space, and the request queue (decided
//! once, when the driver activates the device). The queue's work lives in
//! [`crate::queue`].
//!
//! The device's state sits behind its own lock, apart from the transport's: the event
//! loop processes the queue through [`QueueWorker`] without the transport's lock, so a
//! vCPU reading the interrupt status (every completion interrupt does) never waits for
//! disk I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ebb_devices::faults::{self, GuestFault};
use ebb_devices::ram::GuestRam;
use ebb_devices::virtio::{
    Activation, ActivationError, QueueWork, QueueWorker, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};

use crate::counters::BlockCounters;
use crate::image::DiskImage;
use crate::protocol::{self, config_space, features, ID_BYTES, QUEUE_SIZE};
use crate::queue::{Disk, RequestQueue};
use crate::request::DiskShape;

/// The device once the driver is ready.
struct Active {
    ram: GuestRam,
    negotiated: u64,
    interrupt: Arc<dyn VirtioInterrupt>,
    queue: RequestQueue,
}

/// What changes as the device runs.
#[derive(Default)]
struct State {
    active: Option<Active>,
    counters: BlockCounters,
}

/// The image and the state, shared by the device (under the transport's lock) and the
/// queue worker (not).
struct Engine {
    image: DiskImage,
    id: [u8; ID_BYTES],
    state: Mutex<State>,
    /// Outside the state's lock: a vCPU counting one never waits for a pass.
    rejected_config_writes: AtomicU64,
}

impl Engine {
    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl QueueWorker for Engine {
    fn process_queue(&self, index: u16) -> QueueWork {
        let mut state = self.state();
        let State { active, counters } = &mut *state;
        let Some(active) = active.as_mut() else {
            return QueueWork::Done;
        };
        if index != 0 {
            return QueueWork::Done;
        }
        let disk = Disk {
            file: self.image.file(),
            shape: DiskShape {
                size: self.image.size(),
                readonly: self.image.readonly(),
                negotiated: active.negotiated,
            },
            id: self.id,
        };
        active
            .queue
            .process(&active.ram, &disk, active.interrupt.as_ref(), counters)
            .work
    }
}

/// A virtio-blk device over one image.
pub struct Block {
    engine: Arc<Engine>,
    id: String,
    offered: u64,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("path", &self.engine.image.path())
            .field("id", &self.id)
            .field("readonly", &self.engine.image.readonly())
            .finish()
    }
}

impl Block {
    /// A disk over `image` (opened and locked) whose GET_ID answers `id` (at most 20
    /// bytes are used).
    pub fn new(image: DiskImage, id: &str) -> Self {
        let mut offered = VIRTIO_F_VERSION_1
            | features::SIZE_MAX
            | features::SEG_MAX
            | features::BLK_SIZE
            | features::FLUSH;
        if image.readonly() {
            offered |= features::RO;
        } else {
            offered |= features::DISCARD | features::WRITE_ZEROES;
        }
        let mut raw = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        raw[..n].copy_from_slice(&id.as_bytes()[..n]);
        Self {
            engine: Arc::new(Engine {
                image,
                id: raw,
                state: Mutex::new(State::default()),
                rejected_config_writes: AtomicU64::new(0),
            }),
            id: id.to_string(),
            offered,
        }
    }

    /// The image's path.
    pub fn path(&self) -> &std::path::Path {
        self.engine.image.path()
    }

    /// The disk's ID (GET_ID, the API's and the metrics' name for it).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The disk is read-only.
    pub fn readonly(&self) -> bool {
        self.engine.image.readonly()
    }

    /// Size in bytes.
    pub fn capacity(&self) -> u64 {
        self.engine.image.size()
    }

    /// What the device has done so far.
    pub fn counters(&self) -> BlockCounters {
        self.engine.state().counters
    }

    /// Guest writes to the (read-only) configuration space.
    pub fn rejected_config_writes(&self) -> u64 {
        self.engine.rejected_config_writes.load(Ordering::Relaxed)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        protocol::VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = config_space(self.engine.image.sectors(), self.offered);
        match offset.checked_add(data.len() as u64) {
            Some(end) if end <= bytes.len() as u64 => {
                data.copy_from_slice(&bytes[offset as usize..end as usize]);
            }
            _ => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Nothing is writable: `writeback` needs CONFIG_WCE, which is not offered.
        self.engine
            .rejected_config_writes
            .fetch_add(1, Ordering::Relaxed);
        faults::record(GuestFault::ConfigWrite, || {
            format!("disk {}: write to configuration offset {offset}", self.id)
        });
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivationError> {
        let mut queue = None;
        for q in activation.queues {
            if q.index == 0 {
                queue = Some(q.queue);
            } else {
                faults::record(GuestFault::QueueSetup, || {
                    format!("disk {}: queue {} does not exist", self.id, q.index)
                });
            }
        }
        let queue = queue.ok_or_else(|| ActivationError("the request queue is missing".into()))?;
        self.engine.state().active = Some(Active {
            ram: activation.ram,
            negotiated: activation.features,
            interrupt: activation.interrupt,
            queue: RequestQueue::new(queue),
        });
        // Requests queued before DRIVER_OK wait for the transport's kick: this runs on
        // the vCPU thread that wrote DRIVER_OK, where I/O does not belong.
        Ok(())
    }

    fn reset(&mut self) {
        // Waits for a pass in progress: no request of the old queue runs after this.
        self.engine.state().active = None;
    }

    fn process_queue(&mut self, index: u16) -> QueueWork {
        self.engine.process_queue(index)
    }

    fn queue_worker(&self) -> Option<Arc<dyn QueueWorker>> {
        Some(self.engine.clone())
    }
}
