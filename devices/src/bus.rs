//! Address-range dispatch of guest port I/O and MMIO accesses to devices.

use std::fmt;
use std::sync::{Arc, Mutex};

/// A device reachable through guest port I/O or MMIO.
///
/// `offset` is relative to the start of the range the device was inserted at; `data.len()`
/// is the access width (1, 2, 4 or 8 bytes; port string I/O may pass more).
pub trait BusDevice: Send {
    /// Fills `data` for a guest read.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shareable device handle.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange { base: u64, len: u64 },
}

struct BusRange {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// An immutable-after-setup map from address ranges to devices. Lookups take no lock; each
/// device has its own mutex, so vCPUs touching different devices never contend.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<BusRange>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for r in &self.ranges {
            list.entry(&format_args!("{:#x}+{:#x}", r.base, r.len));
        }
        list.finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let end = base + len;
        if self
            .ranges
            .iter()
            .any(|r| base < r.base + r.len && r.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let pos = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(pos, BusRange { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&BusRange, u64)> {
        let idx = self.ranges.partition_point(|r| r.base <= addr);
        let range = self.ranges.get(idx.checked_sub(1)?)?;
        let offset = addr - range.base;
        (offset < range.len).then_some((range, offset))
    }

    /// Dispatches a read. Returns false (and leaves `data` untouched) when no device
    /// claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((range, offset)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((range, offset)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned mutex: a panic in one access must not take
/// every later access (and so the whole VM) down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(b.clone(), 0x3f8, 8).unwrap();
        bus.insert(a.clone(), 0x60, 1).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data[0], 2);
        assert!(bus.write(0x60, &[7]));
        assert_eq!(a.lock().unwrap().last_write, Some((0, vec![7])));
        assert!(!bus.read(0x3f7, &mut data));
        assert!(!bus.read(0x400, &mut data));
        assert!(!bus.write(0x61, &[1]));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let d = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(d.clone(), 0x1000, 0x100).unwrap();
        assert!(matches!(
            bus.insert(d.clone(), 0x10ff, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d.clone(), 0xf00, 0x101),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(d.clone(), 0x1100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(d.clone(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(d, 0, 0),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
