//! Runs a virtio device's work on the VMM's event loop: queue kicks (ioeventfds) and the
//! device's own timers, never on a vCPU thread. A device with a
//! [`QueueWorker`] has its queues processed outside the transport's lock, so vCPUs that
//! access its registers meanwhile do not wait for that work.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use super::{QueueWork, QueueWorker, VirtioDevice};
use crate::bus::lock;

/// Event data values at or above this mark a device event rather than a queue.
const DEVICE_EVENT_BASE: u32 = 1 << 16;
/// Event data values at or above this mark a queue worker's event.
const WORKER_EVENT_BASE: u32 = 1 << 17;

/// The event-loop side of one virtio-mmio device.
pub struct VirtioHandler<D: VirtioDevice> {
    transport: Arc<Mutex<MmioTransport<D>>>,
    notifiers: Vec<EventFd>,
    device_fds: Vec<(RawFd, u32)>,
    worker: Option<Arc<dyn QueueWorker>>,
    worker_fds: Vec<(RawFd, u32)>,
}

impl<D: VirtioDevice> VirtioHandler<D> {
    /// A handler for `transport`'s queues and device events.
    pub fn new(transport: Arc<Mutex<MmioTransport<D>>>) -> std::io::Result<Self> {
        let (notifiers, device_fds, worker) = {
            let t = lock(&transport);
            let notifiers = t
                .notifiers()
                .iter()
                .map(EventFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()?;
            (notifiers, t.device().event_fds(), t.device().queue_worker())
        };
        let worker_fds = worker.as_ref().map_or_else(Vec::new, |w| w.event_fds());
        Ok(Self {
            transport,
            notifiers,
            device_fds,
            worker,
            worker_fds,
        })
    }
}

impl<D: VirtioDevice> MutEventSubscriber for VirtioHandler<D> {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, evt) in self.notifiers.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, index as u32, EventSet::IN)) {
                tracing::error!("virtio: cannot poll queue {index}: {e:?}");
            }
        }
        for &(fd, id) in &self.device_fds {
            if let Err(e) = ops.add(Events::with_data_raw(
                fd,
                DEVICE_EVENT_BASE + id,
                EventSet::IN,
            )) {
                tracing::error!("virtio: cannot poll device event {id}: {e:?}");
            }
        }
        for &(fd, id) in &self.worker_fds {
            if let Err(e) = ops.add(Events::with_data_raw(
                fd,
                WORKER_EVENT_BASE + id,
                EventSet::IN,
            )) {
                tracing::error!("virtio: cannot poll worker event {id}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        if data >= WORKER_EVENT_BASE {
            // Without the transport's lock, as the worker's queue work.
            if let Some(worker) = &self.worker {
                worker.process_event(data - WORKER_EVENT_BASE);
            }
            return;
        }
        if data >= DEVICE_EVENT_BASE {
            lock(&self.transport)
                .device_mut()
                .process_event(data - DEVICE_EVENT_BASE);
            return;
        }
        let Some(evt) = self.notifiers.get(data as usize) else {
            return;
        };
        // Drain the kick counter; several kicks are one pass over the queue.
        let _ = evt.read();
        let work = {
            let mut t = lock(&self.transport);
            if !t.is_activated() {
                return;
            }
            match &self.worker {
                // The worker checks for itself that the device is still active: a reset
                // between here and there leaves it nothing to do, and an activation
                // after the check above kicks every queue again.
                Some(worker) => {
                    drop(t);
                    worker.process_queue(data as u16)
                }
                None => t.device_mut().process_queue(data as u16),
            }
        };
        if work == QueueWork::Yielded {
            // Kick ourselves: epoll reports it again after the events already waiting.
            let _ = evt.write(1);
        }
    }
}

impl<D: VirtioDevice> std::fmt::Debug for VirtioHandler<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioHandler")
            .field(
                "notifiers",
                &self
                    .notifiers
                    .iter()
                    .map(|e| e.as_raw_fd())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::ram::GuestRam;
    use crate::virtio::MmioInterrupt;
    use crate::virtio::{Activation, ActivationError, QueueWorker};
    use event_manager::{EventManager, SubscriberOps};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// Logs which event each pass served, shared by the device and a bystander.
    type Passes = Arc<Mutex<Vec<&'static str>>>;

    /// A device with `yields` passes of work on queue 0.
    struct Busy {
        yields: u32,
        passes: Passes,
    }

    impl VirtioDevice for Busy {
        fn device_type(&self) -> u32 {
            5
        }
        fn features(&self) -> u64 {
            crate::virtio::VIRTIO_F_VERSION_1
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16]
        }
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, _: Activation) -> Result<(), ActivationError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn process_queue(&mut self, _: u16) -> QueueWork {
            self.passes.lock().unwrap().push("device");
            if self.yields == 0 {
                return QueueWork::Done;
            }
            self.yields -= 1;
            QueueWork::Yielded
        }
    }

    /// A device whose queue work runs in a worker: the worker records whether the
    /// transport's lock was free while it ran.
    struct Slow {
        worker: Arc<SlowWorker>,
    }

    struct SlowWorker {
        transport: Mutex<Option<Arc<Mutex<MmioTransport<Slow>>>>>,
        lock_was_free: Mutex<Vec<bool>>,
        /// Its own event (I/O completions, say), and the ids it was called with.
        evt: EventFd,
        events: Mutex<Vec<(u32, bool)>>,
    }

    impl SlowWorker {
        fn lock_is_free(&self) -> bool {
            let t = self.transport.lock().unwrap().clone().unwrap();
            let free = t.try_lock().is_ok();
            free
        }
    }

    impl QueueWorker for SlowWorker {
        fn process_queue(&self, _: u16) -> QueueWork {
            let free = self.lock_is_free();
            self.lock_was_free.lock().unwrap().push(free);
            QueueWork::Done
        }

        fn event_fds(&self) -> Vec<(RawFd, u32)> {
            vec![(self.evt.as_raw_fd(), 7)]
        }

        fn process_event(&self, id: u32) {
            let _ = self.evt.read();
            let free = self.lock_is_free();
            self.events.lock().unwrap().push((id, free));
        }
    }

    impl VirtioDevice for Slow {
        fn device_type(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            crate::virtio::VIRTIO_F_VERSION_1
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16]
        }
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, _: Activation) -> Result<(), ActivationError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn process_queue(&mut self, _: u16) -> QueueWork {
            panic!("a device with a worker is processed through it");
        }
        fn queue_worker(&self) -> Option<Arc<dyn QueueWorker>> {
            Some(self.worker.clone())
        }
    }

    /// A worker runs without the transport's lock, so vCPUs can reach the registers; so
    /// do its own events.
    #[test]
    fn a_queue_worker_runs_outside_the_transport_lock() {
        let worker = Arc::new(SlowWorker {
            transport: Mutex::new(None),
            lock_was_free: Mutex::new(Vec::new()),
            evt: EventFd::new(EFD_NONBLOCK).unwrap(),
            events: Mutex::new(Vec::new()),
        });
        let ram = GuestRam::new(&[(GuestAddress(0), 1 << 20)], Default::default()).unwrap();
        let irq = Arc::new(MmioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let device = Slow {
            worker: worker.clone(),
        };
        let transport = Arc::new(Mutex::new(MmioTransport::new(device, ram, irq).unwrap()));
        *worker.transport.lock().unwrap() = Some(transport.clone());
        let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().unwrap();
        em.add_subscriber(Box::new(VirtioHandler::new(transport.clone()).unwrap()));
        // A kick before the driver is ready does nothing.
        lock(&transport).write(0x50, &0u32.to_le_bytes());
        em.run_with_timeout(0).unwrap();
        assert!(worker.lock_was_free.lock().unwrap().is_empty());
        {
            let mut t = lock(&transport);
            for (offset, value) in [
                (0x70, 1u32),
                (0x70, 3),
                (0x24, 1),
                (0x20, 1),
                (0x70, 11),
                (0x70, 15),
            ] {
                t.write(offset, &value.to_le_bytes());
            }
            assert!(t.is_activated());
        }
        em.run_with_timeout(0).unwrap();
        assert_eq!(*worker.lock_was_free.lock().unwrap(), [true]);
        // The worker's own events reach it with its id, outside the lock too.
        worker.evt.write(1).unwrap();
        em.run_with_timeout(0).unwrap();
        assert_eq!(*worker.events.lock().unwrap(), [(7, true)]);
    }

    /// Another subscriber, standing for the API or the signal handler.
    struct Bystander {
        evt: EventFd,
        passes: Passes,
    }

    impl MutEventSubscriber for Bystander {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.evt.read();
            self.passes.lock().unwrap().push("bystander");
        }
    }

    /// A device that yields is called again, and what else is waiting is served between
    /// its passes rather than after all of them.
    #[test]
    fn a_yielding_device_is_called_again_after_other_events() {
        let passes = Passes::default();
        let ram = GuestRam::new(&[(GuestAddress(0), 1 << 20)], Default::default()).unwrap();
        let irq = Arc::new(MmioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let device = Busy {
            yields: 3,
            passes: passes.clone(),
        };
        let mut transport = MmioTransport::new(device, ram, irq).unwrap();
        // The driver's handshake (status 0x70, features 0x20/0x24); DRIVER_OK kicks the
        // queue.
        for (offset, value) in [
            (0x70, 1u32),
            (0x70, 3),
            (0x24, 1),
            (0x20, 1),
            (0x70, 11),
            (0x70, 15),
        ] {
            transport.write(offset, &value.to_le_bytes());
        }
        assert!(transport.is_activated());
        let transport = Arc::new(Mutex::new(transport));
        let bystander = Bystander {
            evt: EventFd::new(EFD_NONBLOCK).unwrap(),
            passes: passes.clone(),
        };
        let poke = bystander.evt.try_clone().unwrap();

        let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().unwrap();
        em.add_subscriber(Box::new(VirtioHandler::new(transport).unwrap()));
        em.add_subscriber(Box::new(bystander));
        em.run_with_timeout(0).unwrap();
        poke.write(1).unwrap();
        for _ in 0..5 {
            em.run_with_timeout(0).unwrap();
        }
        let passes = passes.lock().unwrap();
        let device_passes = passes.iter().filter(|p| **p == "device").count();
        assert_eq!(device_passes, 4, "three yields, then done: {passes:?}");
        let bystander = passes.iter().position(|p| *p == "bystander").unwrap();
        assert!(
            bystander < 3,
            "served between the device's passes: {passes:?}"
        );
    }
}
