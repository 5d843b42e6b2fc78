//! The virtio-blk device: features, configuration space, and the request queue (decided
//! once, when the driver activates the device). The queue's work lives in
//! [`crate::queue`], the I/O in [`crate::pool`]'s threads.
//!
//! The device's state sits behind its own lock, apart from the transport's: the event
//! loop takes requests off the ring and answers completions through [`QueueWorker`]
//! without the transport's lock, so a vCPU reading the interrupt status (every completion
//! interrupt does) never waits for the ring's owner.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ebb_devices::faults::{self, GuestFault};
use ebb_devices::ram::GuestRam;
use ebb_devices::virtio::{
    Activation, ActivationError, QueueWork, QueueWorker, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::QueueT;

use crate::counters::BlockCounters;
use crate::image::DiskImage;
use crate::pool::{IoOptions, Pool};
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
    /// Activations so far: tags each activation's slots.
    generation: u64,
    counters: BlockCounters,
}

/// The image and the state, shared by the device (under the transport's lock) and the
/// event loop (not).
struct Engine {
    image: DiskImage,
    id: [u8; ID_BYTES],
    state: Mutex<State>,
    pool: Pool,
    /// Whether each activation's queue tries small reads from the page cache.
    cached_reads: bool,
    /// Outside the state's lock: a vCPU counting one never waits for a pass.
    rejected_config_writes: AtomicU64,
}

/// The one event the engine polls: completions.
const COMPLETIONS: u32 = 0;

impl Engine {
    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn disk(&self, negotiated: u64) -> Disk {
        Disk {
            shape: DiskShape {
                size: self.image.size(),
                readonly: self.image.readonly(),
                negotiated,
            },
            id: self.id,
        }
    }

    /// Stops the activation: waits for the requests on the I/O threads (their data may
    /// still land in guest RAM until they finish), then forgets them unanswered. Nothing
    /// of the old activation touches guest RAM after this returns.
    fn deactivate(&self, state: &mut State) {
        state.active = None;
        self.pool.abandon_all();
    }

    /// Answers what the I/O threads finished, and takes more requests off the ring.
    fn complete(&self) {
        let _ = self.pool.done_evt().read();
        let mut state = self.state();
        let State {
            active, counters, ..
        } = &mut *state;
        let Some(active) = active.as_mut() else {
            // Reset already dropped what was in flight; anything left is not ours.
            while self.pool.next_done().is_some() {}
            return;
        };
        let disk = self.disk(active.negotiated);
        let pass = active.queue.complete(
            &mut || self.pool.next_done(),
            &active.ram,
            &disk,
            self.image.file(),
            active.interrupt.as_ref(),
            counters,
            &mut |slot| self.pool.submit(slot),
        );
        if pass.work == QueueWork::Yielded {
            self.pool.wake();
        }
    }
}

impl QueueWorker for Engine {
    fn process_queue(&self, index: u16) -> QueueWork {
        let mut state = self.state();
        let State {
            active, counters, ..
        } = &mut *state;
        let Some(active) = active.as_mut() else {
            return QueueWork::Done;
        };
        if index != 0 {
            return QueueWork::Done;
        }
        let disk = self.disk(active.negotiated);
        active
            .queue
            .process(
                &active.ram,
                &disk,
                self.image.file(),
                active.interrupt.as_ref(),
                counters,
                &mut |slot| self.pool.submit(slot),
            )
            .work
    }

    fn event_fds(&self) -> Vec<(RawFd, u32)> {
        vec![(self.pool.done_evt().as_raw_fd(), COMPLETIONS)]
    }

    fn process_event(&self, id: u32) {
        if id == COMPLETIONS {
            self.complete();
        }
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
    /// bytes are used), with its I/O threads started as `io` says.
    pub fn new(image: DiskImage, id: &str, io: &IoOptions) -> std::io::Result<Self> {
        let mut offered = VIRTIO_F_VERSION_1
            | features::SIZE_MAX
            | features::SEG_MAX
            | features::BLK_SIZE
            | features::FLUSH
            | features::EVENT_IDX;
        if image.readonly() {
            offered |= features::RO;
        } else {
            offered |= features::DISCARD | features::WRITE_ZEROES;
        }
        let mut raw = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        raw[..n].copy_from_slice(&id.as_bytes()[..n]);
        // The threads' own descriptor for the same open file (and its lock).
        let file = Arc::new(image.file().try_clone()?);
        let pool = Pool::new(file, "disk-io", io)?;
        Ok(Self {
            engine: Arc::new(Engine {
                image,
                id: raw,
                state: Mutex::new(State::default()),
                pool,
                cached_reads: io.cached_reads,
                rejected_config_writes: AtomicU64::new(0),
            }),
            id: id.to_string(),
            offered,
        })
    }

    /// Answers the requests the I/O threads finished (what the event loop does when
    /// they signal). For tests and callers without an event loop.
    pub fn complete(&self) {
        self.engine.complete();
    }

    /// Waits until every request handed to the I/O threads is back and answered, and
    /// the ring holds nothing more to take. For tests and callers without an event loop.
    pub fn settle(&mut self) {
        loop {
            self.engine.complete();
            let work = self.engine.process_queue(0);
            let in_flight = self
                .engine
                .state()
                .active
                .as_ref()
                .map_or(0, |a| a.queue.in_flight());
            if in_flight == 0 && work == QueueWork::Done {
                return;
            }
            if in_flight > 0 {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
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
        let mut queue =
            queue.ok_or_else(|| ActivationError("the request queue is missing".into()))?;
        queue.set_event_idx(activation.features & features::EVENT_IDX != 0);
        let mut state = self.engine.state();
        if state.active.is_some() {
            self.engine.deactivate(&mut state);
        }
        state.generation += 1;
        let mut queue = RequestQueue::new(queue, &activation.ram, state.generation);
        queue.set_cached_reads(self.engine.cached_reads);
        state.active = Some(Active {
            ram: activation.ram,
            negotiated: activation.features,
            interrupt: activation.interrupt,
            queue,
        });
        // Requests queued before DRIVER_OK wait for the transport's kick: this runs on
        // the vCPU thread that wrote DRIVER_OK, where I/O does not belong.
        Ok(())
    }

    fn reset(&mut self) {
        // Waits for a pass in progress and for the requests out on the I/O threads:
        // nothing of the old queue is written to guest RAM after this.
        let mut state = self.engine.state();
        self.engine.deactivate(&mut state);
    }

    fn process_queue(&mut self, index: u16) -> QueueWork {
        self.engine.process_queue(index)
    }

    fn queue_worker(&self) -> Option<Arc<dyn QueueWorker>> {
        Some(self.engine.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::open_images;
    use crate::protocol::{request_type, status};
    use ebb_devices::ram::RamOptions;
    use ebb_devices::virtio::{ActiveQueue, InterruptKind};
    use std::os::unix::fs::FileExt;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    struct NoIrq;
    impl VirtioInterrupt for NoIrq {
        fn trigger(&self, _: InterruptKind) {}
    }

    /// A reset with reads out on the I/O threads waits for them, and nothing of theirs
    /// (status, used entry) reaches the guest after it; the next activation starts clean.
    #[test]
    fn reset_waits_for_requests_in_flight_and_answers_none() {
        let path = std::env::temp_dir().join(format!("ebb-block-reset-{}.img", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        f.write_all_at(&[0x5a; 1 << 20], 0).unwrap();
        drop(f);
        let image = open_images(&[(path.clone(), false)])
            .unwrap()
            .pop()
            .unwrap();
        // Every read goes to the (held) threads (cached reads are off by default).
        let mut block = Block::new(image, "d", &IoOptions::default()).unwrap();
        let ram = GuestRam::new(&[(GuestAddress(0), 16 << 20)], RamOptions::default()).unwrap();
        let mem = ram.memory();
        let mock = MockSplitQueue::create(mem, GuestAddress(0x1_0000), QUEUE_SIZE);
        // Four reads of 4 KiB: header, data, status.
        let mut descs = Vec::new();
        for i in 0..4u64 {
            let header = 0x10_0000 + i * 16;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&request_type::IN.to_le_bytes());
            h[8..16].copy_from_slice(&(i * 8).to_le_bytes());
            mem.write_slice(&h, GuestAddress(header)).unwrap();
            mem.write_obj(0xffu8, GuestAddress(0x20_0000 + i)).unwrap();
            let n = (i * 3) as u16;
            let next = VRING_DESC_F_NEXT as u16;
            let write = VRING_DESC_F_WRITE as u16;
            descs.push(RawDescriptor::from(Descriptor::new(
                header,
                16,
                next,
                n + 1,
            )));
            descs.push(RawDescriptor::from(Descriptor::new(
                0x40_0000 + i * 4096,
                4096,
                next | write,
                n + 2,
            )));
            descs.push(RawDescriptor::from(Descriptor::new(
                0x20_0000 + i,
                1,
                write,
                0,
            )));
        }
        mock.add_desc_chains(&descs, 0).unwrap();
        let activate = |block: &mut Block| {
            block
                .activate(Activation {
                    ram: ram.clone(),
                    features: VIRTIO_F_VERSION_1 | features::FLUSH,
                    queues: vec![ActiveQueue {
                        index: 0,
                        queue: mock.create_queue::<virtio_queue::Queue>().unwrap(),
                    }],
                    interrupt: Arc::new(NoIrq),
                })
                .unwrap()
        };
        activate(&mut block);
        block.engine.pool.hold(true);
        assert_eq!(block.process_queue(0), QueueWork::Done);
        let in_flight = || {
            let state = block.engine.state();
            state.active.as_ref().map_or(0, |a| a.queue.in_flight())
        };
        assert_eq!(in_flight(), 4);
        let engine = block.engine.clone();
        let released = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let resetter = s.spawn(|| {
                let mut state = engine.state();
                engine.deactivate(&mut state);
                // The reads had finished before the reset returned.
                assert!(released.load(Ordering::SeqCst), "reset returned early");
            });
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert!(!resetter.is_finished(), "reset waits for the I/O threads");
            released.store(true, Ordering::SeqCst);
            engine.pool.hold(false);
            resetter.join().unwrap();
        });
        // Their completions arrive after the reset: dropped, nothing answered.
        block.complete();
        assert_eq!(mock.used().idx().load(), 0, "no used entry after reset");
        for i in 0..4u64 {
            let st: u8 = mem.read_obj(GuestAddress(0x20_0000 + i)).unwrap();
            assert_eq!(st, 0xff, "no status after reset");
        }
        assert_eq!(block.counters().completed(crate::counters::Op::Read), 0);
        // A new activation (the driver's re-init) works from a fresh ring.
        let mock = MockSplitQueue::create(mem, GuestAddress(0x1_0000), QUEUE_SIZE);
        mock.add_desc_chains(&descs, 0).unwrap();
        block
            .activate(Activation {
                ram: ram.clone(),
                features: VIRTIO_F_VERSION_1 | features::FLUSH,
                queues: vec![ActiveQueue {
                    index: 0,
                    queue: mock.create_queue::<virtio_queue::Queue>().unwrap(),
                }],
                interrupt: Arc::new(NoIrq),
            })
            .unwrap();
        block.settle();
        assert_eq!(mock.used().idx().load(), 4);
        for i in 0..4u64 {
            let st: u8 = mem.read_obj(GuestAddress(0x20_0000 + i)).unwrap();
            assert_eq!(st, status::OK);
        }
        let _ = std::fs::remove_file(path);
    }
}
