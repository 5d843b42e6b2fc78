//! An ACPI Generic Event Device (`ACPI0013`): how the host tells a hardware-reduced ACPI
//! guest that something happened (here: the power button was pressed).
//!
//! The device is one 32-bit MMIO event register and one interrupt line. The host sets
//! event bits and raises the interrupt; the guest's GED driver runs the DSDT's `_EVT`
//! method, which reads the register (reading clears it) and turns each set bit into an
//! ACPI notification, e.g. `Notify (PWRB, 0x80)` for the power button device
//! (`PNP0C0C`), which Linux's `button` driver reports as `KEY_POWER`.

use std::io;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Bytes of the event register the DSDT's operation region covers.
pub const GED_REGISTER_LEN: u64 = 4;
/// Offset of the event register in the device's window.
pub const GED_EVENT_OFFSET: u64 = 0;
/// Event bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u32 = 1 << 0;

/// The Generic Event Device.
#[derive(Debug)]
pub struct Ged {
    pending: u32,
    irq: EventFd,
    raised: u64,
    delivered: u64,
}

impl Ged {
    /// A device that raises its interrupt by writing to `irq` (an irqfd).
    pub fn new(irq: EventFd) -> Self {
        Self {
            pending: 0,
            irq,
            raised: 0,
            delivered: 0,
        }
    }

    /// Latches `events` and raises the interrupt.
    pub fn notify(&mut self, events: u32) -> io::Result<()> {
        if events == 0 {
            return Ok(());
        }
        self.pending |= events;
        self.raised += 1;
        self.irq.write(1)
    }

    /// Events latched but not yet read by the guest.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// Interrupts raised so far.
    pub fn raised(&self) -> u64 {
        self.raised
    }

    /// Reads of a non-empty event register by the guest (events it picked up).
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The interrupt eventfd.
    pub fn irq(&self) -> &EventFd {
        &self.irq
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset != GED_EVENT_OFFSET || data.len() > GED_REGISTER_LEN as usize {
            return;
        }
        // Read-to-clear: the guest sees every event once.
        let value = std::mem::take(&mut self.pending);
        if value != 0 {
            self.delivered += 1;
        }
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {
        // The register is read-only; the DSDT declares the field WriteAsZeros.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn ged() -> Ged {
        Ged::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn notify_latches_and_raises_the_interrupt() {
        let mut g = ged();
        assert!(g.irq().read().is_err(), "no interrupt before an event");
        g.notify(GED_EVENT_POWER_BUTTON).unwrap();
        assert_eq!(g.irq().read().unwrap(), 1);
        assert_eq!(g.pending(), GED_EVENT_POWER_BUTTON);
        // Nothing to do for an empty event set.
        g.notify(0).unwrap();
        assert!(g.irq().read().is_err());
        assert_eq!(g.raised(), 1);
    }

    #[test]
    fn reading_the_register_clears_it() {
        let mut g = ged();
        g.notify(GED_EVENT_POWER_BUTTON).unwrap();
        g.notify(1 << 3).unwrap();
        let mut data = [0xffu8; 4];
        g.read(GED_EVENT_OFFSET, &mut data);
        assert_eq!(u32::from_le_bytes(data), GED_EVENT_POWER_BUTTON | 1 << 3);
        g.read(GED_EVENT_OFFSET, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0, "read-to-clear");
        assert_eq!(g.delivered(), 1);
    }

    #[test]
    fn narrow_odd_and_wide_accesses_are_safe() {
        let mut g = ged();
        g.notify(GED_EVENT_POWER_BUTTON).unwrap();
        // A read elsewhere in the window neither shows nor clears events.
        let mut data = [0xffu8; 4];
        g.read(8, &mut data);
        assert_eq!(data, [0; 4]);
        // An 8-byte read is not a register access.
        let mut wide = [0xffu8; 8];
        g.read(GED_EVENT_OFFSET, &mut wide);
        assert_eq!(wide, [0; 8]);
        assert_eq!(g.pending(), GED_EVENT_POWER_BUTTON);
        // Writes are ignored.
        g.write(GED_EVENT_OFFSET, &[0, 0, 0, 0]);
        assert_eq!(g.pending(), GED_EVENT_POWER_BUTTON);
        // A byte read returns the low byte and clears the register.
        let mut byte = [0u8; 1];
        g.read(GED_EVENT_OFFSET, &mut byte);
        assert_eq!(byte[0], 1);
        assert_eq!(g.pending(), 0);
    }
}
