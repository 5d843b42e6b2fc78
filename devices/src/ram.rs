//! Guest RAM: how it is backed in the host, and how parts of it go back to the host.
//!
//! All of guest RAM lives in one anonymous private mapping whose size equals the guest's
//! memory, fenced by inaccessible guard pages so the host kernel never merges it with a
//! neighbour: "the RSS of guest RAM" is one entry in `/proc/PID/smaps`. The guest's
//! regions (below and above the 32-bit MMIO hole) are consecutive slices of it, populated
//! lazily by the host kernel.
//!
//! Devices never compute host addresses themselves: they ask [`GuestRam::range`] (or
//! [`GuestRam::split`]) for a [`RamRange`], which only exists inside one region, and give
//! it back with [`GuestRam::discard`], which knows what frees memory of this backing.
//! Devices that move data in place between a host file and a guest buffer (block I/O)
//! ask [`GuestRam::buffer`] for a [`RamBuffer`], byte-granular and inside one region too.

use std::io;
use std::sync::Arc;

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use crate::write_fence::WriteFence;

/// Smallest unit guest RAM is mapped and discarded in.
pub const HOST_PAGE_SIZE: u64 = 4096;
/// Transparent huge page size on x86_64.
const HUGE_PAGE: usize = 2 << 20;

/// How guest RAM is set up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RamOptions {
    /// `Some(true)` asks for transparent huge pages (`MADV_HUGEPAGE`), `Some(false)`
    /// refuses them, `None` leaves the host's policy.
    pub thp: Option<bool>,
    /// Register guest RAM for userfaultfd write protection, which
    /// [`GuestRam::discard_unwritten`] needs (free page hinting).
    pub write_fence: bool,
    /// Offer guest RAM to the host's same-page merging (KSM, `MADV_MERGEABLE`).
    pub merge: bool,
}

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// The host refused to reserve address space.
    #[error("cannot reserve {bytes} bytes of host address space for guest RAM: {source}")]
    Reserve {
        /// Bytes asked for.
        bytes: u64,
        /// The mmap error.
        source: io::Error,
    },
    /// The regions do not describe a usable guest physical layout.
    #[error("cannot describe guest RAM: {0}")]
    Layout(String),
    /// The write fence could not be set up.
    #[error("cannot write-protect guest RAM: {0}")]
    WriteFence(io::Error),
    /// The host refused same-page merging.
    #[error(
        "cannot offer guest RAM to same-page merging (is the host kernel built with KSM?): {0}"
    )]
    Merge(io::Error),
}

/// What [`GuestRam::discard_unwritten`] did with a range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FencedDiscard {
    /// Bytes of pages that held only zeros, discarded.
    pub discarded: u64,
    /// Bytes of pages with data, kept.
    pub kept: u64,
}

/// A slice of guest RAM inside one region, page aligned: the only thing
/// [`GuestRam::discard`] accepts. Built only by [`GuestRam`], so its host address is
/// known to be inside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    gpa: u64,
    len: u64,
    host: usize,
}

impl RamRange {
    /// Guest physical start.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: empty ranges are not built.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Guest physical end (exclusive).
    pub fn end(&self) -> u64 {
        self.gpa + self.len
    }

    /// The part `[gpa + offset, gpa + offset + len)`, if it is non-empty, page aligned
    /// and inside this range.
    pub fn slice(&self, offset: u64, len: u64) -> Option<RamRange> {
        let end = offset.checked_add(len)?;
        if len == 0 || offset % HOST_PAGE_SIZE != 0 || len % HOST_PAGE_SIZE != 0 || end > self.len {
            return None;
        }
        Some(RamRange {
            gpa: self.gpa + offset,
            len,
            host: self.host + offset as usize,
        })
    }
}

/// Bytes of guest RAM inside one region, at any alignment: a guest buffer a device reads
/// or writes in place with vectored host I/O (`preadv`/`pwritev`). Built only by
/// [`GuestRam::buffer`], so it lies inside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamBuffer {
    gpa: u64,
    len: usize,
    host: usize,
}

impl RamBuffer {
    /// Guest physical start.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: empty buffers are not built.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer as an `iovec` for vectored host I/O. Guest RAM is never unmapped, so
    /// the address stays valid for the life of the process. The guest may change these
    /// bytes at any time (as with DMA): they are only ever handed to the kernel, never
    /// read as Rust values.
    pub fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.host as *mut libc::c_void,
            iov_len: self.len,
        }
    }
}

/// What [`GuestRam::split`] found in a guest physical range.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    /// The parts inside guest RAM, one per region touched, in address order.
    pub inside: Vec<RamRange>,
    /// Bytes of the range outside guest RAM (in the MMIO hole or past the end).
    pub outside_bytes: u64,
}

/// Guest RAM. Cloning is cheap and shares the same memory.
#[derive(Debug, Clone)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    host_start: usize,
    size: u64,
    write_fence: Option<Arc<WriteFence>>,
}

impl GuestRam {
    /// Reserves and maps guest RAM for `regions` (guest physical start, length), in
    /// ascending order and page aligned. Nothing is touched: pages appear on first access
    /// by the guest (or by the loader).
    pub fn new(regions: &[(GuestAddress, u64)], options: RamOptions) -> Result<Self, RamError> {
        let size = regions
            .iter()
            .try_fold(0u64, |sum, &(_, len)| sum.checked_add(len))
            .ok_or_else(|| RamError::Layout("regions overflow".into()))?;
        if regions
            .iter()
            .any(|&(gpa, len)| len == 0 || gpa.0 % HOST_PAGE_SIZE != 0 || len % HOST_PAGE_SIZE != 0)
        {
            return Err(RamError::Layout(
                "every region must be non-empty and page aligned".into(),
            ));
        }
        let reserve_err = |source| RamError::Reserve {
            bytes: size,
            source,
        };
        let enomem = || io::Error::from_raw_os_error(libc::ENOMEM);
        let size_usize = usize::try_from(size).map_err(|_| reserve_err(enomem()))?;
        let guard = HOST_PAGE_SIZE as usize;
        // Room to start RAM on a 2 MiB boundary, so guest huge pages line up with host
        // transparent huge pages and a 2 MiB report frees a whole host huge page.
        let total = size_usize
            .checked_add(2 * guard + HUGE_PAGE)
            .ok_or_else(|| reserve_err(enomem()))?;

        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; no
        // existing memory is affected. The result is checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(reserve_err(io::Error::last_os_error()));
        }
        let ram = (base as usize + guard).next_multiple_of(HUGE_PAGE) as *mut libc::c_void;
        // SAFETY: `ram..ram+size` lies inside the reservation just made, which nothing else
        // uses. MAP_NORESERVE keeps the host from committing swap for untouched memory.
        let ret = unsafe { libc::mprotect(ram, size_usize, libc::PROT_READ | libc::PROT_WRITE) };
        if ret != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: unmapping exactly the reservation made above.
            unsafe { libc::munmap(base, total) };
            return Err(reserve_err(e));
        }
        // A core dump of Ebb must not contain the guest's memory (its secrets, and
        // gigabytes of it).
        // SAFETY: advising on our own RAM mapping; it changes no contents.
        if unsafe { libc::madvise(ram, size_usize, libc::MADV_DONTDUMP) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: unmapping exactly the reservation made above.
            unsafe { libc::munmap(base, total) };
            return Err(reserve_err(e));
        }
        if options.merge {
            // SAFETY: advising on our own RAM mapping; KSM may share identical pages
            // copy-on-write, which changes no contents the guest sees.
            if unsafe { libc::madvise(ram, size_usize, libc::MADV_MERGEABLE) } != 0 {
                let e = io::Error::last_os_error();
                // SAFETY: unmapping exactly the reservation made above.
                unsafe { libc::munmap(base, total) };
                return Err(RamError::Merge(e));
            }
        }
        if let Some(huge) = options.thp {
            let advice = if huge {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            };
            // SAFETY: advising on our own RAM mapping; it changes no contents.
            if unsafe { libc::madvise(ram, size_usize, advice) } != 0 {
                tracing::warn!(
                    "transparent huge page advice on guest RAM failed: {}",
                    io::Error::last_os_error()
                );
            }
        }

        let mut mapped = Vec::with_capacity(regions.len());
        let mut offset = 0usize;
        for &(gpa, len) in regions {
            let len = len as usize;
            // SAFETY: the slice [ram+offset, ram+offset+len) is inside the RW mapping above,
            // which stays mapped for the life of the process (it is never unmapped: guest
            // RAM lives as long as the VMM).
            let region = unsafe {
                MmapRegion::build_raw(
                    (ram as usize + offset) as *mut u8,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                )
            }
            .map_err(|e| RamError::Layout(e.to_string()))?;
            let region = GuestRegionMmap::new(region, gpa)
                .ok_or_else(|| RamError::Layout(format!("region at {:#x} overflows", gpa.0)))?;
            mapped.push(region);
            offset += len;
        }
        let memory =
            GuestMemoryMmap::from_regions(mapped).map_err(|e| RamError::Layout(e.to_string()))?;
        let write_fence = if options.write_fence {
            let fence = WriteFence::new(ram as usize, size_usize).map_err(RamError::WriteFence)?;
            Some(Arc::new(fence))
        } else {
            None
        };
        Ok(Self {
            memory,
            host_start: ram as usize,
            size,
            write_fence,
        })
    }

    /// The vm-memory view of guest RAM (for queues and loaders).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Host virtual address of the first byte of guest RAM (its smaps entry starts here).
    pub fn host_start(&self) -> usize {
        self.host_start
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Each region as (guest physical start, length, host address), for KVM memory slots.
    pub fn slots(&self) -> Vec<(GuestAddress, u64, u64)> {
        self.memory
            .iter()
            .map(|r| {
                let host = r.as_ptr() as u64;
                (r.start_addr(), r.len(), host)
            })
            .collect()
    }

    /// The RAM range `[gpa, gpa + len)` if it is non-empty, page aligned and lies entirely
    /// in one region.
    pub fn range(&self, gpa: u64, len: u64) -> Option<RamRange> {
        if len == 0 || gpa % HOST_PAGE_SIZE != 0 || len % HOST_PAGE_SIZE != 0 {
            return None;
        }
        let end = gpa.checked_add(len)?;
        let region = self.memory.find_region(GuestAddress(gpa))?;
        let start = region.start_addr().0;
        if end > start + region.len() {
            return None;
        }
        Some(RamRange {
            gpa,
            len,
            host: region.as_ptr() as usize + (gpa - start) as usize,
        })
    }

    /// The bytes `[gpa, gpa + len)` if they are non-empty and lie entirely in one region
    /// (any alignment).
    pub fn buffer(&self, gpa: u64, len: u64) -> Option<RamBuffer> {
        if len == 0 {
            return None;
        }
        let end = gpa.checked_add(len)?;
        let region = self.memory.find_region(GuestAddress(gpa))?;
        let start = region.start_addr().0;
        if end > start + region.len() {
            return None;
        }
        Some(RamBuffer {
            gpa,
            len: usize::try_from(len).ok()?,
            host: region.as_ptr() as usize + (gpa - start) as usize,
        })
    }

    /// Splits the page-aligned range `[gpa, gpa + len)` at region boundaries: the parts
    /// in guest RAM, and how many bytes are outside it.
    pub fn split(&self, gpa: u64, len: u64) -> Split {
        let mut split = Split::default();
        let Some(end) = gpa.checked_add(len) else {
            split.outside_bytes = len;
            return split;
        };
        if gpa % HOST_PAGE_SIZE != 0 || len % HOST_PAGE_SIZE != 0 {
            split.outside_bytes = len;
            return split;
        }
        let mut inside = 0;
        for region in self.memory.iter() {
            let r_start = region.start_addr().0;
            let r_end = r_start + region.len();
            let (s, e) = (gpa.max(r_start), end.min(r_end));
            if s < e {
                split.inside.push(RamRange {
                    gpa: s,
                    len: e - s,
                    host: region.as_ptr() as usize + (s - r_start) as usize,
                });
                inside += e - s;
            }
        }
        split.outside_bytes = len - inside;
        split
    }

    /// Gives the memory behind `range` back to the host; the guest reads zeros there
    /// afterwards. Guest RAM is private anonymous memory, so `MADV_DONTNEED` frees the
    /// pages at once.
    pub fn discard(&self, range: RamRange) -> io::Result<()> {
        // SAFETY: a `RamRange` is only built by this type, inside one region of this
        // mapping (which is never unmapped); the caller gave these pages up, so zeroing
        // them is the intent.
        let rc = unsafe {
            libc::madvise(
                range.host as *mut libc::c_void,
                range.len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Whether guest RAM was registered for write protection.
    pub fn has_write_fence(&self) -> bool {
        self.write_fence.is_some()
    }

    /// Discards the pages of `range` that hold only zeros, and keeps the others, with
    /// every writer held off while it looks and discards: a page discarded reads back as
    /// the zeros it held, so no write, however it races with this, is ever lost.
    ///
    /// Order matters: every page is mapped first (a read maps the zero page where there
    /// is none: an unmapped page cannot be write-protected and its first write would slip
    /// past the fence), then the range is protected, checked, discarded and unprotected,
    /// which wakes the writers that waited.
    pub fn discard_unwritten(&self, range: RamRange) -> io::Result<FencedDiscard> {
        let fence = self.write_fence.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "guest RAM has no write fence (RamOptions::write_fence)",
            )
        })?;
        map_every_page(range);
        let page = HOST_PAGE_SIZE as usize;
        let len = range.len as usize;
        fence.protect(range.host, len)?;
        let mut done = FencedDiscard::default();
        let mut result = Ok(());
        // Discards the zero pages [start, end) of the range: no one can write them while
        // the fence is up, so discarding changes nothing anyone can observe.
        let mut discard_zeros = |start: usize, end: usize, done: &mut FencedDiscard| {
            let zeros = range.slice(start as u64, (end - start) as u64);
            match zeros.map(|z| self.discard(z)) {
                Some(Ok(())) => done.discarded += (end - start) as u64,
                Some(Err(e)) => {
                    done.kept += (end - start) as u64;
                    result = Err(e);
                }
                None => done.kept += (end - start) as u64,
            }
        };
        let mut zero_run: Option<usize> = None;
        for offset in (0..len).step_by(page) {
            // SAFETY: one page inside the range, mapped and write-protected: no one
            // writes it while this slice lives. u64 alignment holds (page aligned).
            let words = unsafe {
                std::slice::from_raw_parts((range.host + offset) as *const u64, page / 8)
            };
            let zero = words.iter().fold(0, |acc, w| acc | w) == 0;
            match (zero, zero_run) {
                (true, None) => zero_run = Some(offset),
                (false, Some(start)) => {
                    discard_zeros(start, offset, &mut done);
                    zero_run = None;
                }
                _ => {}
            }
            if !zero {
                done.kept += HOST_PAGE_SIZE;
            }
        }
        if let Some(start) = zero_run {
            discard_zeros(start, len, &mut done);
        }
        // Unprotect whatever happened above: a writer must never wait for good.
        let unprotected = fence.unprotect(range.host, len);
        result?;
        unprotected?;
        Ok(done)
    }
}

/// Maps every page of `range` (the zero page where there is none) without writing: one
/// `MADV_POPULATE_READ` (Linux 5.14+), else a read of each page.
fn map_every_page(range: RamRange) {
    // SAFETY: advising on a range a `RamRange` guarantees is mapped guest RAM; populating
    // for reading changes no contents.
    let rc = unsafe {
        libc::madvise(
            range.host as *mut libc::c_void,
            range.len as usize,
            libc::MADV_POPULATE_READ,
        )
    };
    if rc != 0 {
        for offset in (0..range.len as usize).step_by(HOST_PAGE_SIZE as usize) {
            // SAFETY: inside the range (see above); a volatile read of one byte changes
            // nothing.
            unsafe { std::ptr::read_volatile((range.host + offset) as *const u8) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    /// Pages of `range` resident in this process.
    fn resident_pages(ram: &GuestRam, range: RamRange) -> usize {
        let pages = (range.len / HOST_PAGE_SIZE) as usize;
        let mut vec = vec![0u8; pages];
        let host = ram
            .memory()
            .get_host_address(GuestAddress(range.gpa))
            .unwrap();
        // SAFETY: `vec` has one byte per page of the queried range, which is mapped.
        let rc = unsafe {
            libc::mincore(
                host as *mut libc::c_void,
                range.len as usize,
                vec.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        vec.iter().filter(|b| **b & 1 != 0).count()
    }

    /// The value of `field` (e.g. "Size:", "VmFlags:") in the smaps entry starting at
    /// `start`.
    fn smaps_field(start: usize, field: &str) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut in_entry = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((s, _)) = range.split_once('-') {
                    if let Ok(s) = usize::from_str_radix(s, 16) {
                        in_entry = s == start;
                        continue;
                    }
                }
            }
            if in_entry {
                if let Some(v) = line.strip_prefix(field) {
                    return Some(v.trim().to_string());
                }
            }
        }
        None
    }

    fn smaps_entry_size_kib(start: usize) -> Option<u64> {
        smaps_field(start, "Size:")?
            .trim_end_matches(" kB")
            .parse()
            .ok()
    }

    /// Two regions with a hole between them, like guest RAM around the MMIO hole.
    fn ram() -> GuestRam {
        GuestRam::new(
            &[
                (GuestAddress(0), 8 * MIB),
                (GuestAddress(16 * MIB), 8 * MIB),
            ],
            RamOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn ram_is_one_mapping_and_regions_are_consecutive_slices() {
        let ram = ram();
        assert_eq!(smaps_entry_size_kib(ram.host_start()), Some(16 * 1024));
        assert_eq!(ram.host_start() % (2 << 20), 0, "2 MiB aligned for THP");
        let slots = ram.slots();
        assert_eq!(slots.len(), 2);
        assert_eq!(
            slots[0],
            (GuestAddress(0), 8 * MIB, ram.host_start() as u64)
        );
        assert_eq!(
            slots[1],
            (
                GuestAddress(16 * MIB),
                8 * MIB,
                ram.host_start() as u64 + 8 * MIB
            )
        );
        assert_eq!(ram.size(), 16 * MIB);
        assert!(ram.memory().read_obj::<u8>(GuestAddress(12 * MIB)).is_err());
    }

    #[test]
    fn guest_ram_is_left_out_of_core_dumps() {
        let ram = ram();
        let flags = smaps_field(ram.host_start(), "VmFlags:").unwrap();
        assert!(
            flags.split_whitespace().any(|f| f == "dd"),
            "VmFlags: {flags}"
        );
    }

    #[test]
    fn thp_advice_keeps_one_mapping() {
        for thp in [Some(true), Some(false)] {
            let ram = GuestRam::new(
                &[(GuestAddress(0), 64 * MIB)],
                RamOptions {
                    thp,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(smaps_entry_size_kib(ram.host_start()), Some(64 * 1024));
        }
    }

    #[test]
    fn impossible_layouts_fail_cleanly() {
        let err = GuestRam::new(&[(GuestAddress(0), 1 << 62)], RamOptions::default()).unwrap_err();
        assert!(err.to_string().contains("cannot reserve"), "{err}");
        let err = GuestRam::new(&[(GuestAddress(0), 4097)], RamOptions::default()).unwrap_err();
        assert!(err.to_string().contains("page aligned"), "{err}");
    }

    #[test]
    fn range_checks_alignment_bounds_and_overflow() {
        let m = ram();
        assert!(m.range(0, 8 * MIB).is_some());
        assert!(m.range(0, 8 * MIB + 4096).is_none(), "into the hole");
        assert!(m.range(7 * MIB, 2 * MIB).is_none());
        assert!(m.range(12 * MIB, 4096).is_none(), "in the hole");
        assert!(m.range(24 * MIB - 4096, 4096).is_some());
        assert!(m.range(24 * MIB, 4096).is_none(), "past the end");
        assert!(m.range(u64::MAX - 4095, 4096).is_none(), "overflow");
        assert!(m.range(0, 0).is_none(), "empty");
        assert!(m.range(100, 4096).is_none(), "unaligned start");
        assert!(m.range(0, 100).is_none(), "unaligned length");
    }

    #[test]
    fn buffers_are_byte_granular_inside_one_region() {
        let m = ram();
        let b = m.buffer(16 * MIB + 3, 509).unwrap();
        assert_eq!((b.gpa(), b.len()), (16 * MIB + 3, 509));
        let iov = b.iovec();
        let host = m
            .memory()
            .get_host_address(GuestAddress(16 * MIB + 3))
            .unwrap();
        assert_eq!(iov.iov_base as usize, host as usize);
        assert_eq!(iov.iov_len, 509);
        assert!(m.buffer(8 * MIB - 1, 1).is_some(), "last byte of A");
        assert!(m.buffer(8 * MIB - 1, 2).is_none(), "into the hole");
        assert!(m.buffer(12 * MIB, 1).is_none(), "in the hole");
        assert!(m.buffer(24 * MIB, 1).is_none(), "past the end");
        assert!(m.buffer(0, 0).is_none(), "empty");
        assert!(m.buffer(u64::MAX, 2).is_none(), "overflow");
        // Regions that touch in guest physical space are separate buffers.
        let t = GuestRam::new(
            &[(GuestAddress(0), MIB), (GuestAddress(MIB), MIB)],
            RamOptions::default(),
        )
        .unwrap();
        assert!(t.buffer(MIB - 8, 16).is_none());
        assert!(t.buffer(MIB - 8, 8).is_some());
    }

    #[test]
    fn slices_stay_inside_their_range() {
        let m = ram();
        let r = m.range(16 * MIB, 2 * MIB).unwrap();
        let s = r.slice(MIB, MIB).unwrap();
        assert_eq!((s.gpa(), s.len()), (17 * MIB, MIB));
        assert_eq!(s.host - r.host, MIB as usize);
        assert!(r.slice(MIB, MIB + 4096).is_none(), "past the end");
        assert!(r.slice(0, 0).is_none(), "empty");
        assert!(r.slice(100, 4096).is_none(), "unaligned");
        assert!(r.slice(u64::MAX - 4095, 4096).is_none(), "overflow");
    }

    #[test]
    fn split_cuts_at_regions_and_counts_the_rest() {
        let m = ram();
        let s = m.split(6 * MIB, 12 * MIB); // 6..18 MiB: 2 in A, 8 of hole, 2 in B
        assert_eq!(s.inside.len(), 2);
        assert_eq!((s.inside[0].gpa(), s.inside[0].len()), (6 * MIB, 2 * MIB));
        assert_eq!((s.inside[1].gpa(), s.inside[1].len()), (16 * MIB, 2 * MIB));
        assert_eq!(s.outside_bytes, 8 * MIB);
        assert_eq!(s.inside[1].host - s.inside[0].host, 2 * MIB as usize);
        let s = m.split(23 * MIB, 4 * MIB);
        assert_eq!(s.inside.len(), 1);
        assert_eq!(s.outside_bytes, 3 * MIB);
        let s = m.split(u64::MAX - 4095, 8192);
        assert!(s.inside.is_empty());
        assert_eq!(s.outside_bytes, 8192);
    }

    #[test]
    fn discarded_pages_leave_the_host_and_read_as_zero() {
        let m = ram();
        for page in 0..1024u64 {
            m.memory()
                .write_obj(0xa5u8, GuestAddress(16 * MIB + page * 4096))
                .unwrap();
        }
        let all = m.range(16 * MIB, 4 * MIB).unwrap();
        assert_eq!(resident_pages(&m, all), 1024);
        m.discard(m.range(16 * MIB, 2 * MIB).unwrap()).unwrap();
        assert_eq!(resident_pages(&m, all), 512);
        assert_eq!(
            m.memory()
                .read_obj::<u8>(GuestAddress(16 * MIB + 4096))
                .unwrap(),
            0
        );
        assert_eq!(
            m.memory().read_obj::<u8>(GuestAddress(19 * MIB)).unwrap(),
            0xa5
        );
    }

    fn fenced_ram() -> GuestRam {
        GuestRam::new(
            &[(GuestAddress(0), 8 * MIB)],
            RamOptions {
                write_fence: true,
                ..Default::default()
            },
        )
        .expect("userfaultfd write protection (run the tests as root or with vm.unprivileged_userfaultfd=1)")
    }

    #[test]
    fn fenced_discard_drops_zero_pages_and_keeps_written_ones() {
        let m = fenced_ram();
        let all = m.range(0, 4 * MIB).unwrap();
        // Pages 0..512 zeroed by a write (as the guest's init_on_alloc does), 512..1024
        // left unmapped, and a few with data among the zeroed ones.
        for page in 0..512u64 {
            m.memory()
                .write_obj(0u8, GuestAddress(page * 4096))
                .unwrap();
        }
        for page in [3u64, 4, 100, 511] {
            m.memory()
                .write_obj(0x5au8, GuestAddress(page * 4096 + 17))
                .unwrap();
        }
        assert_eq!(resident_pages(&m, all), 512);
        let done = m.discard_unwritten(all).unwrap();
        assert_eq!(done.kept, 4 * 4096);
        assert_eq!(done.discarded, 4 * MIB - 4 * 4096);
        assert_eq!(resident_pages(&m, all), 4);
        for page in [3u64, 4, 100, 511] {
            let v: u8 = m.memory().read_obj(GuestAddress(page * 4096 + 17)).unwrap();
            assert_eq!(v, 0x5a);
        }
        // Writable again afterwards.
        m.memory().write_obj(7u8, GuestAddress(8192)).unwrap();
        assert!(
            GuestRam::new(&[(GuestAddress(0), MIB)], RamOptions::default())
                .unwrap()
                .discard_unwritten(m.range(0, 4096).unwrap())
                .is_err()
        );
    }

    /// A writer that keeps writing and reading back a page while the range is discarded
    /// over and over never reads back anything but its last write.
    #[test]
    fn fenced_discard_never_loses_a_racing_write() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let m = fenced_ram();
        let range = m.range(0, 2 * MIB).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (m, stop) = (m.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut lost = 0u64;
                let mut i = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    let gpa = GuestAddress((i % 512) * 4096 + 8);
                    m.memory().write_obj(i, gpa).unwrap();
                    std::thread::yield_now();
                    if m.memory().read_obj::<u64>(gpa).unwrap() != i {
                        lost += 1;
                    }
                    m.memory().write_obj(0u64, gpa).unwrap();
                    i += 1;
                }
                (lost, i)
            })
        };
        let start = std::time::Instant::now();
        let mut passes = 0;
        while start.elapsed() < std::time::Duration::from_secs(2) {
            m.discard_unwritten(range).unwrap();
            passes += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let (lost, writes) = writer.join().unwrap();
        assert!(
            passes > 10 && writes > 1000,
            "{passes} passes, {writes} writes"
        );
        assert_eq!(lost, 0, "{lost} of {writes} writes lost in {passes} passes");
    }
}
