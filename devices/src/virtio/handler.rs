//! Runs a virtio device's work on the VMM's event loop: queue kicks (ioeventfds) and the
//! device's own timers, never on a vCPU thread.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use super::VirtioDevice;
use crate::bus::lock;

/// Event data values at or above this mark a device event rather than a queue.
const DEVICE_EVENT_BASE: u32 = 1 << 16;

/// The event-loop side of one virtio-mmio device.
pub struct VirtioHandler<D: VirtioDevice> {
    transport: Arc<Mutex<MmioTransport<D>>>,
    notifiers: Vec<EventFd>,
    device_fds: Vec<(RawFd, u32)>,
}

impl<D: VirtioDevice> VirtioHandler<D> {
    /// A handler for `transport`'s queues and device events.
    pub fn new(transport: Arc<Mutex<MmioTransport<D>>>) -> std::io::Result<Self> {
        let (notifiers, device_fds) = {
            let t = lock(&transport);
            let notifiers = t
                .notifiers()
                .iter()
                .map(EventFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()?;
            (notifiers, t.device().event_fds())
        };
        Ok(Self {
            transport,
            notifiers,
            device_fds,
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
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
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
        let mut t = lock(&self.transport);
        if t.is_activated() {
            t.device_mut().process_queue(data as u16);
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
