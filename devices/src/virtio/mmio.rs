//! The virtio-mmio transport, version 2 (virtio 1.x, 4.2.2).
//!
//! Register accesses arrive from vCPU threads through the MMIO bus. Queue notifications
//! normally bypass this code: the VMM registers each queue's eventfd with KVM as an
//! ioeventfd on `QueueNotify`, so a kick wakes the event loop without a vCPU exit to
//! userspace. A QueueNotify write that does reach us is forwarded to the same eventfd.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{status, Activation, ActiveQueue, MmioInterrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::faults::{self, GuestFault};
use crate::ram::GuestRam;

/// "virt" in little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Transport version 2 (modern).
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("EBB").
pub const VENDOR_ID: u32 = 0x0042_4245;
/// Offset of the QueueNotify register (for ioeventfd registration).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Start of the device-specific configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;

const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_AVAIL_LOW: u64 = 0x090;
const QUEUE_AVAIL_HIGH: u64 = 0x094;
const QUEUE_USED_LOW: u64 = 0x0a0;
const QUEUE_USED_HIGH: u64 = 0x0a4;
const SHM_SEL: u64 = 0x0ac;
const SHM_LEN_LOW: u64 = 0x0b0;
const SHM_LEN_HIGH: u64 = 0x0b4;
const CONFIG_GENERATION: u64 = 0x0fc;

/// Guest mistakes the transport counted (and otherwise ignored).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TransportCounters {
    /// Register accesses with a bad width or offset, or at the wrong time.
    pub bad_accesses: u64,
    /// Feature sets refused at FEATURES_OK.
    pub refused_features: u64,
    /// Activations refused (invalid queues or device error).
    pub failed_activations: u64,
}

/// A virtio device behind virtio-mmio registers.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    ram: GuestRam,
    interrupt: Arc<MmioInterrupt>,
    notifiers: Vec<EventFd>,
    queues: Vec<Queue>,
    /// Queues given an invalid size or an unaligned ring address: `Queue` ignores such
    /// writes and keeps the old value, which would leave device and driver disagreeing
    /// about where the rings are. Activation fails instead.
    /// One bit per register ([`queue_register_bit`]) whose last write was invalid.
    bad_queue_config: Vec<u8>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    activated: bool,
    counters: TransportCounters,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`; `interrupt` is its interrupt line. Creates one notifier eventfd per
    /// queue the device may use.
    pub fn new(device: D, ram: GuestRam, interrupt: Arc<MmioInterrupt>) -> std::io::Result<Self> {
        let sizes = device.queue_max_sizes();
        let mut queues = Vec::with_capacity(sizes.len());
        let mut notifiers = Vec::with_capacity(sizes.len());
        for size in sizes {
            queues.push(new_queue(size)?);
            notifiers.push(crate::new_eventfd()?);
        }
        Ok(Self {
            device,
            ram,
            interrupt,
            notifiers,
            bad_queue_config: vec![0; queues.len()],
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            activated: false,
            counters: TransportCounters::default(),
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Per-queue notifier eventfds (index = queue index), to register as ioeventfds and
    /// to poll in the event loop.
    pub fn notifiers(&self) -> &[EventFd] {
        &self.notifiers
    }

    /// The interrupt line.
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// True once the driver set DRIVER_OK and the device accepted activation.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Counters of guest mistakes.
    pub fn counters(&self) -> TransportCounters {
        self.counters
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // A selector beyond the device's queues reads as "no queue" (QueueNumMax 0).
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    fn reset(&mut self) {
        if self.activated || self.status != 0 {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.reset();
        self.bad_queue_config.fill(0);
        for q in &mut self.queues {
            let max = q.max_size();
            // Queue::new only fails for sizes that are not powers of two, and `max` came
            // from a queue built with it.
            if let Ok(fresh) = new_queue(max) {
                *q = fresh;
            }
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self
                .selected_queue()
                .map(|q| q.max_size())
                .unwrap_or(0)
                .into(),
            QUEUE_READY => self
                .selected_queue()
                .map(|q| q.ready())
                .unwrap_or(false)
                .into(),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status,
            CONFIG_GENERATION => self.interrupt.config_generation(),
            // No shared memory regions: length all ones means "none".
            SHM_LEN_LOW | SHM_LEN_HIGH => u32::MAX,
            _ => {
                self.bad_access(offset);
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => {
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    self.bad_access(offset);
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => self.bad_access(offset),
                }
            }
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM | QUEUE_READY | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_AVAIL_LOW
            | QUEUE_AVAIL_HIGH | QUEUE_USED_LOW | QUEUE_USED_HIGH => {
                self.write_queue_register(offset, value)
            }
            QUEUE_NOTIFY_OFFSET => match self.notifiers.get(value as usize) {
                Some(evt) => {
                    let _ = evt.write(1);
                }
                None => self.bad_access(offset),
            },
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.write_status(value),
            SHM_SEL => {}
            _ => self.bad_access(offset),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_config_allowed() {
            self.bad_access(offset);
            return;
        }
        let index = self.queue_sel as usize;
        let Some(q) = self.queues.get_mut(index) else {
            self.bad_access(offset);
            return;
        };
        match offset {
            QUEUE_NUM => {
                let valid =
                    value != 0 && value <= u32::from(q.max_size()) && value.is_power_of_two();
                mark_queue_register(&mut self.bad_queue_config[index], offset, valid);
                if valid {
                    q.set_size(value as u16);
                } else {
                    faults::record(GuestFault::QueueSetup, || {
                        format!("virtio: queue {index} given size {value}")
                    });
                }
            }
            QUEUE_READY => q.set_ready(value == 1),
            QUEUE_DESC_LOW | QUEUE_AVAIL_LOW | QUEUE_USED_LOW => {
                let alignment = ring_alignment(offset);
                let aligned = value % alignment == 0;
                mark_queue_register(&mut self.bad_queue_config[index], offset, aligned);
                if !aligned {
                    faults::record(GuestFault::QueueSetup, || {
                        format!(
                            "virtio: queue {index} ring address {value:#x} is not {alignment}-byte aligned"
                        )
                    });
                    return;
                }
                match offset {
                    QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
                    QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(value), None),
                    _ => q.set_used_ring_address(Some(value), None),
                }
            }
            QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(value)),
            QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    /// Counts a register access of the wrong width, at an unknown offset or at the wrong
    /// time; the access itself is ignored (reads see 0).
    fn bad_access(&mut self, offset: u64) {
        self.counters.bad_accesses += 1;
        faults::record(GuestFault::RegisterAccess, || {
            format!(
                "virtio: bad access to register {offset:#x} in status {:#x}",
                self.status
            )
        });
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        if value & self.status != self.status {
            // Clearing bits other than by a full reset is not allowed.
            self.bad_access(STATUS);
            return;
        }
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let unknown = self.driver_features & !offered;
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                let accepted = self.driver_features;
                faults::record(GuestFault::Features, || {
                    format!("virtio: driver accepted features {accepted:#x} but the device offers {offered:#x}")
                });
                self.counters.refused_features += 1;
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                self.status = value & !status::FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if added & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mut active = Vec::new();
        for (index, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                continue;
            }
            if self.bad_queue_config[index] != 0 || !q.is_valid(self.ram.memory()) {
                faults::record(GuestFault::QueueSetup, || {
                    format!("virtio: queue {index} is set up outside guest RAM, badly sized or unaligned")
                });
                self.fail_activation();
                return;
            }
            let max = q.max_size();
            let taken = std::mem::replace(q, new_queue(max).unwrap_or_default());
            active.push(ActiveQueue {
                index: index as u16,
                queue: taken,
            });
        }
        let activation = Activation {
            ram: self.ram.clone(),
            features: self.driver_features,
            queues: active,
            interrupt: self.interrupt.clone(),
        };
        match self.device.activate(activation) {
            Ok(()) => {
                self.activated = true;
                // Buffers may have been queued before DRIVER_OK (Linux primes the balloon's
                // statistics queue during probe) and their kicks ignored: kick every queue
                // so the event loop, not this vCPU thread, picks them up.
                for notifier in &self.notifiers {
                    let _ = notifier.write(1);
                }
            }
            Err(e) => {
                faults::record(GuestFault::QueueSetup, || {
                    format!("virtio: device refused activation: {e}")
                });
                self.fail_activation();
            }
        }
    }

    fn fail_activation(&mut self) {
        self.counters.failed_activations += 1;
        self.status |= status::DEVICE_NEEDS_RESET;
        super::VirtioInterrupt::trigger(self.interrupt.as_ref(), super::InterruptKind::Config);
    }
}

/// The bit of `bad_queue_config` for a queue register whose writes are checked.
fn queue_register_bit(offset: u64) -> u8 {
    match offset {
        QUEUE_NUM => 1,
        QUEUE_DESC_LOW => 2,
        QUEUE_AVAIL_LOW => 4,
        _ => 8,
    }
}

/// Records whether the last write to the queue register at `offset` was valid.
fn mark_queue_register(bad: &mut u8, offset: u64, valid: bool) {
    let bit = queue_register_bit(offset);
    if valid {
        *bad &= !bit;
    } else {
        *bad |= bit;
    }
}

/// The alignment virtio 1.x requires of the ring whose low address register is `offset`.
fn ring_alignment(offset: u64) -> u32 {
    match offset {
        QUEUE_DESC_LOW => 16,
        QUEUE_AVAIL_LOW => 2,
        _ => 4,
    }
}

fn new_queue(max_size: u16) -> std::io::Result<Queue> {
    Queue::new(max_size).map_err(|e| std::io::Error::other(format!("virtio queue: {e:?}")))
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            data.fill(0);
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            self.bad_access(offset);
            data.fill(0);
            return;
        }
        let v = self.read_register(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            self.bad_access(offset);
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{InterruptKind, QueueWork, VirtioInterrupt, INT_CONFIG};
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    /// A device that records what the transport did to it.
    #[derive(Default)]
    struct Probe {
        config: [u8; 8],
        activated_with: Option<(u64, Vec<u16>)>,
        resets: u32,
        refuse: bool,
        processed: Arc<Mutex<Vec<u16>>>,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            5
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0b101
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16, 32]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            if o + data.len() <= self.config.len() {
                data.copy_from_slice(&self.config[o..o + data.len()]);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            if o + data.len() <= self.config.len() {
                self.config[o..o + data.len()].copy_from_slice(data);
            }
        }
        fn activate(&mut self, a: Activation) -> Result<(), super::super::ActivationError> {
            if self.refuse {
                return Err(super::super::ActivationError("no".into()));
            }
            self.activated_with = Some((a.features, a.queues.iter().map(|q| q.index).collect()));
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated_with = None;
        }
        fn process_queue(&mut self, index: u16) -> QueueWork {
            self.processed.lock().unwrap().push(index);
            QueueWork::Done
        }
    }

    fn transport(dev: Probe) -> MmioTransport<Probe> {
        let ram = GuestRam::new(&[(GuestAddress(0), 0x10_0000)], Default::default()).unwrap();
        let irq = Arc::new(MmioInterrupt::new(crate::new_eventfd().unwrap()));
        MmioTransport::new(dev, ram, irq).unwrap()
    }

    fn r(t: &mut MmioTransport<Probe>, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport<Probe>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport<Probe>, features: u64) {
        w(t, STATUS, status::ACKNOWLEDGE);
        w(t, STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, DRIVER_FEATURES_SEL, 0);
        w(t, DRIVER_FEATURES, features as u32);
        w(t, DRIVER_FEATURES_SEL, 1);
        w(t, DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport<Probe>, index: u32, base: u32, size: u32) {
        w(t, QUEUE_SEL, index);
        w(t, QUEUE_NUM, size);
        w(t, QUEUE_DESC_LOW, base);
        w(t, QUEUE_DESC_HIGH, 0);
        w(t, QUEUE_AVAIL_LOW, base + 0x1000);
        w(t, QUEUE_AVAIL_HIGH, 0);
        w(t, QUEUE_USED_LOW, base + 0x2000);
        w(t, QUEUE_USED_HIGH, 0);
        w(t, QUEUE_READY, 1);
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identification_registers() {
        let mut t = transport(Probe::default());
        assert_eq!(r(&mut t, MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(r(&mut t, VERSION), 2);
        assert_eq!(r(&mut t, DEVICE_ID), 5);
        assert_eq!(r(&mut t, VENDOR), VENDOR_ID);
        w(&mut t, DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, DEVICE_FEATURES), 0b101);
        w(&mut t, DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, DEVICE_FEATURES), 1);
        w(&mut t, DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, DEVICE_FEATURES), 0);
        w(&mut t, QUEUE_SEL, 2);
        assert_eq!(r(&mut t, QUEUE_NUM_MAX), 32);
        w(&mut t, QUEUE_SEL, 3);
        assert_eq!(r(&mut t, QUEUE_NUM_MAX), 0, "no such queue");
    }

    #[test]
    fn full_handshake_activates_with_ready_queues_only() {
        let mut t = transport(Probe::default());
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b100);
        assert_eq!(r(&mut t, STATUS) & status::FEATURES_OK, status::FEATURES_OK);
        setup_queue(&mut t, 0, 0x1_0000, 16);
        setup_queue(&mut t, 2, 0x2_0000, 32);
        w(&mut t, STATUS, ALL_OK);
        assert!(t.is_activated());
        assert_eq!(
            t.device().activated_with,
            Some((VIRTIO_F_VERSION_1 | 0b100, vec![0, 2]))
        );
        // Queue registers are frozen after DRIVER_OK.
        let before = t.counters().bad_accesses;
        w(&mut t, QUEUE_SEL, 1);
        w(&mut t, QUEUE_NUM, 8);
        assert_eq!(t.counters().bad_accesses, before + 1);
        // Reset returns everything to the start.
        w(&mut t, STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(t.device().resets, 1);
        assert_eq!(r(&mut t, STATUS), 0);
        w(&mut t, QUEUE_SEL, 0);
        assert_eq!(r(&mut t, QUEUE_READY), 0);
    }

    /// Work queued before DRIVER_OK is left to the event loop: the vCPU's register write
    /// only kicks every queue, the device processes nothing inside it.
    #[test]
    fn activation_kicks_every_queue_instead_of_processing_them() {
        let dev = Probe::default();
        let processed = dev.processed.clone();
        let mut t = transport(dev);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0x1_0000, 16);
        for n in t.notifiers() {
            assert!(n.read().is_err(), "no kick before DRIVER_OK");
        }
        w(&mut t, STATUS, ALL_OK);
        assert!(t.is_activated());
        assert!(processed.lock().unwrap().is_empty());
        for n in t.notifiers() {
            assert_eq!(n.read().unwrap(), 1, "every queue kicked once");
        }
    }

    #[test]
    fn unoffered_features_or_missing_version_1_are_refused() {
        let mut t = transport(Probe::default());
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 0b10);
        assert_eq!(r(&mut t, STATUS) & status::FEATURES_OK, 0);
        assert_eq!(t.counters().refused_features, 1);
        let mut t = transport(Probe::default());
        negotiate(&mut t, 0b1);
        assert_eq!(r(&mut t, STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn queues_outside_memory_fail_activation_and_raise_needs_reset() {
        let mut t = transport(Probe::default());
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0xfff_0000, 16);
        w(&mut t, STATUS, ALL_OK);
        assert!(!t.is_activated());
        assert_ne!(r(&mut t, STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, INTERRUPT_STATUS) & INT_CONFIG, 0);
        assert_eq!(t.counters().failed_activations, 1);
        // A bad size (not a power of two) leaves the queue invalid too.
        let mut t = transport(Probe::default());
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        w(&mut t, QUEUE_SEL, 0);
        w(&mut t, QUEUE_NUM, 17);
        setup_queue(&mut t, 1, 0x1_0000, 64);
        w(&mut t, STATUS, ALL_OK);
        assert!(!t.is_activated(), "queue 1 larger than its maximum");
    }

    /// `Queue` silently keeps the old address on an unaligned write; the transport must
    /// not activate with rings the driver did not ask for.
    #[test]
    fn unaligned_ring_addresses_fail_activation_unless_rewritten() {
        for (register, bad) in [
            (QUEUE_DESC_LOW, 0x1_0008),
            (QUEUE_AVAIL_LOW, 0x1_1001),
            (QUEUE_USED_LOW, 0x1_2002),
        ] {
            let mut t = transport(Probe::default());
            negotiate(&mut t, VIRTIO_F_VERSION_1);
            setup_queue(&mut t, 0, 0x1_0000, 16);
            w(&mut t, register, bad);
            w(&mut t, STATUS, ALL_OK);
            assert!(!t.is_activated(), "register {register:#x} = {bad:#x}");
            assert_ne!(r(&mut t, STATUS) & status::DEVICE_NEEDS_RESET, 0);

            // An aligned value written afterwards makes the queue good again.
            let mut t = transport(Probe::default());
            negotiate(&mut t, VIRTIO_F_VERSION_1);
            w(&mut t, QUEUE_SEL, 0);
            w(&mut t, register, bad);
            setup_queue(&mut t, 0, 0x1_0000, 16);
            w(&mut t, STATUS, ALL_OK);
            assert!(t.is_activated(), "register {register:#x} rewritten");
        }
    }

    #[test]
    fn device_refusal_is_reported() {
        let mut t = transport(Probe {
            refuse: true,
            ..Default::default()
        });
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        w(&mut t, STATUS, ALL_OK);
        assert!(!t.is_activated());
        assert_ne!(r(&mut t, STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn config_space_and_generation() {
        let mut t = transport(Probe::default());
        t.write(CONFIG_OFFSET + 4, &[1, 2]);
        let mut d = [0u8; 2];
        t.read(CONFIG_OFFSET + 4, &mut d);
        assert_eq!(d, [1, 2]);
        let g = r(&mut t, CONFIG_GENERATION);
        t.interrupt().trigger(InterruptKind::Config);
        assert_eq!(r(&mut t, CONFIG_GENERATION), g + 1);
        assert_eq!(r(&mut t, INTERRUPT_STATUS), INT_CONFIG);
        w(&mut t, INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(r(&mut t, INTERRUPT_STATUS), 0);
    }

    #[test]
    fn hostile_register_accesses_are_counted_and_ignored() {
        let mut t = transport(Probe::default());
        let mut byte = [0u8; 1];
        t.read(STATUS, &mut byte);
        t.write(STATUS, &[0xff]);
        t.write(0x0f0, &1u32.to_le_bytes());
        t.write(STATUS + 1, &1u32.to_le_bytes());
        // Features before DRIVER, queue setup before FEATURES_OK.
        w(&mut t, DRIVER_FEATURES, 1);
        w(&mut t, QUEUE_NUM, 8);
        w(&mut t, QUEUE_NOTIFY_OFFSET, 99);
        assert_eq!(t.counters().bad_accesses, 7);
        assert_eq!(r(&mut t, STATUS), 0);
        // Clearing status bits without a reset is refused.
        w(&mut t, STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, STATUS, status::ACKNOWLEDGE);
        assert_eq!(r(&mut t, STATUS), status::ACKNOWLEDGE | status::DRIVER);
    }

    #[test]
    fn notify_writes_reach_the_notifier() {
        let mut t = transport(Probe::default());
        w(&mut t, QUEUE_NOTIFY_OFFSET, 1);
        assert_eq!(t.notifiers()[1].read().unwrap(), 1);
    }
}
