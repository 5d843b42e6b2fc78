//! Giving guest pages back to the host.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::pages::HostRange;

/// Why a range is discarded (for the counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardReason {
    /// The guest put the pages in the balloon.
    Inflate,
    /// The guest reported the pages free.
    Report,
}

/// madvise calls and their results.
#[derive(Debug, Default)]
pub struct DiscardTally {
    calls: AtomicU64,
    failures: AtomicU64,
    inflate_bytes: AtomicU64,
    reported_bytes: AtomicU64,
}

/// A snapshot of a [`DiscardTally`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiscardCounts {
    /// madvise calls made.
    pub calls: u64,
    /// madvise calls that failed.
    pub failures: u64,
    /// Bytes discarded for inflated pages.
    pub inflate_bytes: u64,
    /// Bytes discarded for reported pages.
    pub reported_bytes: u64,
}

impl DiscardTally {
    /// Discards `range` and counts the outcome; failures are logged, not returned, since
    /// the guest's buffer is handled either way (the memory just stays with the host).
    pub fn discard(&self, range: HostRange, reason: DiscardReason) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match discard(range) {
            Ok(()) => {
                let bytes = match reason {
                    DiscardReason::Inflate => &self.inflate_bytes,
                    DiscardReason::Report => &self.reported_bytes,
                };
                bytes.fetch_add(range.len as u64, Ordering::Relaxed);
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "balloon: discarding {reason:?} range {:#x}+{:#x}: {e}",
                    range.gpa,
                    range.len
                );
            }
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> DiscardCounts {
        DiscardCounts {
            calls: self.calls.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            inflate_bytes: self.inflate_bytes.load(Ordering::Relaxed),
            reported_bytes: self.reported_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Drops the host pages behind `range` with `madvise(MADV_DONTNEED)`: guest RAM is a
/// private anonymous mapping, so the pages are freed at once and read back as zeros.
pub fn discard(range: HostRange) -> io::Result<()> {
    // SAFETY: `range` was built by `pages::host_range`, which only returns ranges inside
    // a guest RAM region; the guest gave these pages up, so zeroing them is the intent.
    let rc = unsafe {
        libc::madvise(
            range.host as *mut libc::c_void,
            range.len,
            libc::MADV_DONTNEED,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Pages of `[addr, addr + len)` resident in this process (for tests and checks).
pub fn resident_pages(addr: usize, len: usize) -> io::Result<usize> {
    let page = 4096usize;
    let start = addr & !(page - 1);
    let pages = (addr + len - start).div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the queried range, as mincore requires.
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, pages * page, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.iter().filter(|b| **b & 1 != 0).count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pages::host_range;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn discarded_pages_leave_the_host_and_read_as_zero() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        for page in 0..1024u64 {
            mem.write_obj(0xa5u8, GuestAddress(page * 4096)).unwrap();
        }
        let all = host_range(&mem, 0, 4 << 20).unwrap();
        assert_eq!(resident_pages(all.host, all.len).unwrap(), 1024);
        let half = host_range(&mem, 0, 2 << 20).unwrap();
        discard(half).unwrap();
        assert_eq!(resident_pages(all.host, all.len).unwrap(), 512);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4096)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(3 << 20)).unwrap(), 0xa5);
    }
}
