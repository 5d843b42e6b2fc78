//! Guest RAM: how it is backed in the host, and how parts of it go back to the host.
//!
//! All of guest RAM lives in one mapping whose size equals the guest's memory, fenced by
//! inaccessible guard pages so the host kernel never merges it with a neighbour: "the RSS
//! of guest RAM" is one entry in `/proc/PID/smaps`. The guest's regions (below and above
//! the 32-bit MMIO hole) are consecutive slices of it, populated lazily by the host kernel.
//! What the mapping is depends on the [`Backing`]:
//!
//! - [`Backing::Anon`]: private anonymous memory; `madvise(MADV_DONTNEED)` frees a page.
//! - [`Backing::Memfd`]: a shared mapping of a memfd (shmem), as vhost-user back ends and
//!   snapshots need. `MADV_DONTNEED` only unmaps shared pages, the file keeps them, so a
//!   discard punches a hole in the file (`fallocate(PUNCH_HOLE)`).
//! - [`Backing::Hugetlb`]: a memfd of 2 MiB huge pages. Only whole huge pages can be
//!   given back (a hole punched in a huge page frees nothing); a discard frees the whole
//!   huge pages inside its range and keeps the rest.
//!
//! Devices never compute host addresses themselves: they ask [`GuestRam::range`] (or
//! [`GuestRam::split`]) for a [`RamRange`], which only exists inside one region, and give
//! it back with [`GuestRam::discard`], which knows what frees memory of this backing and
//! at what granularity ([`GuestRam::discard_granule`]). Devices that move data in place
//! between a host file and a guest buffer (block I/O) ask [`GuestRam::buffer`] for a
//! [`RamBuffer`], byte-granular and inside one region too.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use crate::write_fence::{FencedMemory, WriteFence};

/// Smallest unit guest RAM is mapped and discarded in.
pub const HOST_PAGE_SIZE: u64 = 4096;
/// Huge page size on x86_64 (transparent huge pages and the hugetlb backing).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;
const HUGE_PAGE: usize = HUGE_PAGE_SIZE as usize;

/// What holds guest RAM in the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory.
    #[default]
    Anon,
    /// A shared mapping of a memfd (shmem).
    Memfd,
    /// A shared mapping of a memfd of 2 MiB huge pages (hugetlbfs).
    Hugetlb,
}

impl Backing {
    /// The name the command line uses.
    pub fn name(self) -> &'static str {
        match self {
            Backing::Anon => "anon",
            Backing::Memfd => "memfd",
            Backing::Hugetlb => "hugetlb",
        }
    }

    /// The smallest unit of this backing that can be given back to the host.
    pub fn page_size(self) -> u64 {
        match self {
            Backing::Anon | Backing::Memfd => HOST_PAGE_SIZE,
            Backing::Hugetlb => HUGE_PAGE_SIZE,
        }
    }

    /// Whether guest RAM is a file (a memfd) mapped shared.
    pub fn is_file(self) -> bool {
        self != Backing::Anon
    }
}

/// How guest RAM is set up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RamOptions {
    /// `Some(true)` asks for transparent huge pages (`MADV_HUGEPAGE`), `Some(false)`
    /// refuses them, `None` leaves the host's policy. Not for [`Backing::Hugetlb`].
    pub thp: Option<bool>,
    /// Register guest RAM for userfaultfd write protection, which
    /// [`GuestRam::discard_unwritten`] needs (free page hinting).
    pub write_fence: bool,
    /// Offer guest RAM to the host's same-page merging (KSM, `MADV_MERGEABLE`).
    pub merge: bool,
    /// What holds guest RAM.
    pub backing: Backing,
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
    /// The memfd behind guest RAM could not be made.
    #[error("cannot create the {backing} backing of guest RAM: {what}: {source}")]
    Backing {
        /// The backing's name.
        backing: &'static str,
        /// The step that failed.
        what: &'static str,
        /// Its error.
        source: io::Error,
    },
}

/// What [`GuestRam::discard_unwritten`] did with a range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FencedDiscard {
    /// Bytes of pages that held only zeros (or that the host did not hold), discarded.
    pub discarded: u64,
    /// Bytes kept: pages with data, and the parts of the range that do not cover a whole
    /// page of the backing.
    pub kept: u64,
    /// Of `kept`, the bytes kept because they do not cover a whole page of the backing.
    pub unaligned: u64,
}

/// The free and reserved 2 MiB huge pages of the host's pool, from
/// `/sys/kernel/mm/hugepages/hugepages-2048kB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugePagePool {
    /// Pages in the pool (`nr_hugepages`).
    pub total: u64,
    /// Pages not in use (`free_hugepages`), reserved ones included.
    pub free: u64,
    /// Free pages already promised to mappings (`resv_hugepages`).
    pub reserved: u64,
}

impl HugePagePool {
    /// The host's pool of 2 MiB huge pages.
    pub fn read() -> io::Result<Self> {
        let dir = "/sys/kernel/mm/hugepages/hugepages-2048kB";
        let read = |name: &str| -> io::Result<u64> {
            let path = format!("{dir}/{name}");
            let text = std::fs::read_to_string(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
            text.trim().parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{path}: '{}'", text.trim()),
                )
            })
        };
        Ok(Self {
            total: read("nr_hugepages")?,
            free: read("free_hugepages")?,
            reserved: read("resv_hugepages")?,
        })
    }

    /// Pages a new mapping can still reserve.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }
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
    backing: Backing,
    /// The memfd behind guest RAM (file backings).
    file: Option<Arc<File>>,
    /// This process's page map (hugetlb with a write fence: which huge pages are
    /// present, so a check never faults one in).
    pagemap: Option<Arc<File>>,
    write_fence: Option<Arc<WriteFence>>,
}

/// A new memfd of `size` bytes for `backing`, its size sealed.
fn create_memfd(backing: Backing, size: u64) -> Result<File, RamError> {
    let fail = |what, source| RamError::Backing {
        backing: backing.name(),
        what,
        source,
    };
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if backing == Backing::Hugetlb {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new descriptor or
    // -1; nothing of ours is touched.
    let fd = unsafe { libc::memfd_create(c"ebb-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(fail("memfd_create", io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size)
        .map_err(|e| fail("setting its size", e))?;
    // Guest RAM never changes size: a file that could shrink would turn guest accesses
    // into SIGBUS.
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS takes an integer and changes only what the file allows.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(fail("sealing its size", io::Error::last_os_error()));
    }
    Ok(file)
}

impl GuestRam {
    /// Reserves and maps guest RAM for `regions` (guest physical start, length), in
    /// ascending order and aligned to the backing's page size. Nothing is touched: pages
    /// appear on first access by the guest (or by the loader).
    pub fn new(regions: &[(GuestAddress, u64)], options: RamOptions) -> Result<Self, RamError> {
        let backing = options.backing;
        let granule = backing.page_size();
        let size = regions
            .iter()
            .try_fold(0u64, |sum, &(_, len)| sum.checked_add(len))
            .ok_or_else(|| RamError::Layout("regions overflow".into()))?;
        if regions
            .iter()
            .any(|&(gpa, len)| len == 0 || gpa.0 % granule != 0 || len % granule != 0)
        {
            return Err(RamError::Layout(format!(
                "every region must be non-empty and aligned to {} KiB pages ({} backing)",
                granule >> 10,
                backing.name()
            )));
        }
        if backing == Backing::Hugetlb && options.thp.is_some() {
            return Err(RamError::Layout(
                "transparent huge page advice does not apply to hugetlb memory".into(),
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
        // huge pages and a 2 MiB report frees a whole host huge page.
        let total = size_usize
            .checked_add(2 * guard + HUGE_PAGE)
            .ok_or_else(|| reserve_err(enomem()))?;
        let file = if backing.is_file() {
            Some(create_memfd(backing, size)?)
        } else {
            None
        };

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
        let undo = |e| {
            // SAFETY: unmapping exactly the reservation made above (and whatever was
            // mapped over part of it), which nothing else uses yet.
            unsafe { libc::munmap(base, total) };
            e
        };
        let flags = match &file {
            None => {
                // SAFETY: `ram..ram+size` lies inside the reservation just made, which
                // nothing else uses. MAP_NORESERVE keeps the host from committing swap for
                // untouched memory.
                let ret =
                    unsafe { libc::mprotect(ram, size_usize, libc::PROT_READ | libc::PROT_WRITE) };
                if ret != 0 {
                    return Err(undo(reserve_err(io::Error::last_os_error())));
                }
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE
            }
            Some(file) => {
                // Hugetlb pages are reserved for the whole mapping now (a short pool
                // fails here, not with a SIGBUS when the guest touches its memory).
                // SAFETY: MAP_FIXED over `ram..ram+size`, inside the reservation just
                // made, which nothing else uses; the file is `size` bytes, sealed.
                let mapped = unsafe {
                    libc::mmap(
                        ram,
                        size_usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED | libc::MAP_FIXED,
                        file.as_raw_fd(),
                        0,
                    )
                };
                if mapped == libc::MAP_FAILED {
                    return Err(undo(RamError::Backing {
                        backing: backing.name(),
                        what: "mapping it",
                        source: io::Error::last_os_error(),
                    }));
                }
                libc::MAP_SHARED
            }
        };
        // A core dump of Ebb must not contain the guest's memory (its secrets, and
        // gigabytes of it).
        // SAFETY: advising on our own RAM mapping; it changes no contents.
        if unsafe { libc::madvise(ram, size_usize, libc::MADV_DONTDUMP) } != 0 {
            return Err(undo(reserve_err(io::Error::last_os_error())));
        }
        if options.merge {
            // SAFETY: advising on our own RAM mapping; KSM may share identical pages
            // copy-on-write, which changes no contents the guest sees.
            if unsafe { libc::madvise(ram, size_usize, libc::MADV_MERGEABLE) } != 0 {
                return Err(undo(RamError::Merge(io::Error::last_os_error())));
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
                    flags,
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
        let (write_fence, pagemap) = if options.write_fence {
            let kind = if backing.is_file() {
                FencedMemory::Shared
            } else {
                FencedMemory::Anonymous
            };
            let fence =
                WriteFence::new(ram as usize, size_usize, kind).map_err(RamError::WriteFence)?;
            let pagemap = if backing == Backing::Hugetlb {
                Some(Arc::new(
                    File::open("/proc/self/pagemap").map_err(RamError::WriteFence)?,
                ))
            } else {
                None
            };
            (Some(Arc::new(fence)), pagemap)
        } else {
            (None, None)
        };
        Ok(Self {
            memory,
            host_start: ram as usize,
            size,
            backing,
            file: file.map(Arc::new),
            pagemap,
            write_fence,
        })
    }

    /// What holds guest RAM.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The smallest unit [`GuestRam::discard`] gives back: 4 KiB, or 2 MiB for hugetlb.
    /// Parts of a range that do not cover a whole unit are kept.
    pub fn discard_granule(&self) -> u64 {
        self.backing.page_size()
    }

    /// Bytes the file behind guest RAM holds (its allocated blocks), for file backings:
    /// what the host really holds for the guest, hugetlb pages included (which the RSS of
    /// a process leaves out).
    pub fn allocated_bytes(&self) -> Option<u64> {
        let meta = self.file.as_ref()?.metadata().ok()?;
        Some(meta.blocks() * 512)
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

    /// The whole units of [`GuestRam::discard_granule`] inside `range`, if any.
    fn whole_granules(&self, range: RamRange) -> Option<RamRange> {
        let g = self.discard_granule();
        // Host addresses and guest physical addresses share their alignment to 2 MiB:
        // guest RAM starts 2 MiB aligned and its regions are multiples of the granule.
        let start = (range.host as u64).next_multiple_of(g);
        let end = (range.host as u64 + range.len) / g * g;
        (start < end).then(|| RamRange {
            gpa: range.gpa + (start - range.host as u64),
            len: end - start,
            host: start as usize,
        })
    }

    /// Gives the memory behind `range` back to the host, in whole units of
    /// [`GuestRam::discard_granule`]; returns the bytes given back (the rest of the range,
    /// a partial huge page, is kept as it is). The guest reads zeros where memory was
    /// given back.
    ///
    /// Anonymous memory: `MADV_DONTNEED` frees the pages at once. A memfd: a hole punched
    /// in the file (`MADV_DONTNEED` would only unmap pages the file keeps); every mapping
    /// of the file, KVM's included, loses them too.
    pub fn discard(&self, range: RamRange) -> io::Result<u64> {
        let Some(whole) = self.whole_granules(range) else {
            return Ok(0);
        };
        let rc = match &self.file {
            None => {
                // SAFETY: a `RamRange` is only built by this type, inside one region of
                // this mapping (which is never unmapped); the caller gave these pages up,
                // so zeroing them is the intent.
                unsafe {
                    libc::madvise(
                        whole.host as *mut libc::c_void,
                        whole.len as usize,
                        libc::MADV_DONTNEED,
                    )
                }
            }
            Some(file) => {
                let offset = (whole.host - self.host_start) as libc::off_t;
                // SAFETY: fallocate on our own memfd, inside its (sealed) size: the range
                // maps guest RAM the caller gave up, so zeroing it is the intent.
                unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        whole.len as libc::off_t,
                    )
                }
            }
        };
        if rc == 0 {
            Ok(whole.len)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Backs `range` with host memory now, as the guest's first write to each page
    /// would (`MADV_POPULATE_WRITE`, Linux 5.14+; the contents stay as they are): one
    /// call instead of a host fault per page, each a VM exit. With huge pages, the
    /// whole huge pages `range` touches. Returns the bytes backed.
    pub fn populate(&self, range: RamRange) -> io::Result<u64> {
        // Huge pages are backed whole: widen the range to them. Regions are whole units
        // (see `whole_granules`), so the widened range stays inside this one.
        let g = self.discard_granule() as usize;
        let start = range.host / g * g;
        let end = (range.host + range.len as usize).next_multiple_of(g);
        // SAFETY: `[start, end)` lies inside one region of this mapping (never unmapped);
        // populating changes no contents, it only allocates what a write would.
        let rc = unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc == 0 {
            Ok((end - start) as u64)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Whether guest RAM was registered for write protection.
    pub fn has_write_fence(&self) -> bool {
        self.write_fence.is_some()
    }

    /// Discards the units of `range` (pages of the backing) that hold only zeros, and
    /// keeps the others, with every writer held off while it looks and discards: a page
    /// discarded reads back as the zeros it held, so no write, however it races with
    /// this, is ever lost. Parts of the range that do not cover a whole unit are kept.
    ///
    /// Order matters: every page must be write-protected before it is looked at. An
    /// anonymous page that is not mapped cannot be protected (its first write would slip
    /// past the fence), so anonymous memory is mapped first (a read maps the zero page).
    /// Shared and hugetlb memory needs no such step: protecting an empty entry leaves a
    /// marker in it. The range is then protected, checked, discarded and unprotected,
    /// which wakes the writers that waited.
    pub fn discard_unwritten(&self, range: RamRange) -> io::Result<FencedDiscard> {
        let fence = self.write_fence.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "guest RAM has no write fence (RamOptions::write_fence)",
            )
        })?;
        let mut done = FencedDiscard::default();
        let Some(whole) = self.whole_granules(range) else {
            done.kept = range.len;
            done.unaligned = range.len;
            return Ok(done);
        };
        done.unaligned = range.len - whole.len;
        done.kept = done.unaligned;
        if self.backing == Backing::Anon {
            map_every_page(whole);
        }
        let unit = self.discard_granule() as usize;
        let len = whole.len as usize;
        fence.protect(whole.host, len)?;
        // Hugetlb: a huge page that is not there holds nothing to look at, and reading it
        // would take a page from the pool (or SIGBUS when the pool is empty).
        let present = match self.present_units(whole) {
            Ok(p) => p,
            Err(e) => {
                let unprotected = fence.unprotect(whole.host, len);
                unprotected?;
                return Err(e);
            }
        };
        let mut result = Ok(());
        // Discards the zero units [start, end) of the range: no one can write them while
        // the fence is up, so discarding changes nothing anyone can observe.
        let mut discard_zeros = |start: usize, end: usize, done: &mut FencedDiscard| {
            let zeros = whole.slice(start as u64, (end - start) as u64);
            match zeros.map(|z| self.discard(z)) {
                Some(Ok(bytes)) => {
                    done.discarded += bytes;
                    done.kept += (end - start) as u64 - bytes;
                }
                Some(Err(e)) => {
                    done.kept += (end - start) as u64;
                    result = Err(e);
                }
                None => done.kept += (end - start) as u64,
            }
        };
        let mut zero_run: Option<usize> = None;
        for (i, offset) in (0..len).step_by(unit).enumerate() {
            let zero = match present.as_ref().map(|p| p[i]) {
                Some(false) => true,
                // SAFETY: one unit inside the range, mapped and write-protected: no one
                // writes it while this slice lives. u64 alignment holds (page aligned).
                _ => unsafe { is_zero((whole.host + offset) as *const u64, unit / 8) },
            };
            match (zero, zero_run) {
                (true, None) => zero_run = Some(offset),
                (false, Some(start)) => {
                    discard_zeros(start, offset, &mut done);
                    zero_run = None;
                }
                _ => {}
            }
            if !zero {
                done.kept += unit as u64;
            }
        }
        if let Some(start) = zero_run {
            discard_zeros(start, len, &mut done);
        }
        // Unprotect whatever happened above: a writer must never wait for good.
        let unprotected = fence.unprotect(whole.host, len);
        result?;
        unprotected?;
        Ok(done)
    }

    /// For hugetlb memory: whether each huge page of `range` is mapped (from
    /// `/proc/self/pagemap`, bit 63 of the entry of its first 4 KiB page). `None` for the
    /// other backings, whose every page is looked at.
    ///
    /// A hugetlb page can only be in the file while it is mapped here: Ebb is the only
    /// process that maps it, never unmaps it without punching it out of the file, and
    /// hugetlb pages are never swapped.
    fn present_units(&self, range: RamRange) -> io::Result<Option<Vec<bool>>> {
        let Some(pagemap) = &self.pagemap else {
            return Ok(None);
        };
        let pages = (range.len / HOST_PAGE_SIZE) as usize;
        let mut raw = vec![0u8; pages * 8];
        pagemap.read_exact_at(&mut raw, range.host as u64 / HOST_PAGE_SIZE * 8)?;
        let per_unit = (self.discard_granule() / HOST_PAGE_SIZE) as usize;
        Ok(Some(
            raw.chunks_exact(8 * per_unit)
                .map(|unit| {
                    let entry = u64::from_le_bytes(unit[..8].try_into().unwrap_or([0; 8]));
                    entry & (1 << 63) != 0
                })
                .collect(),
        ))
    }
}

/// Whether the `words` 64-bit words at `p` are all zero.
///
/// # Safety
/// `p..p + words` must be readable memory no one writes while this runs.
unsafe fn is_zero(p: *const u64, words: usize) -> bool {
    // SAFETY: the caller's promise.
    let words = unsafe { std::slice::from_raw_parts(p, words) };
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { all_zero_avx2(words) };
    }
    all_zero(words)
}

fn all_zero(words: &[u64]) -> bool {
    words.iter().fold(0, |acc, w| acc | w) == 0
}

/// [`all_zero`] compiled for 32-byte loads: the zero check is most of the host's share
/// of a hinting run, and in the emulated test host half as many loads read a page in
/// ~30% less time (`hint_check_cost` example; natively both are memory bound).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn all_zero_avx2(words: &[u64]) -> bool {
    all_zero(words)
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

/// For tests: holds the host's pool of 2 MiB huge pages at `pages` available or more
/// while it lives, raising `nr_hugepages` if it must (root only) and putting it back when
/// dropped. One lease at a time in a process.
#[doc(hidden)]
pub struct HugePageLease {
    restore: Option<u64>,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

impl HugePageLease {
    /// A lease, or `None` when the pool cannot be raised to `pages` available.
    pub fn take(pages: u64) -> Option<Self> {
        static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let guard = ONE.lock().unwrap_or_else(|e| e.into_inner());
        let pool = HugePagePool::read().ok()?;
        let mut lease = Self {
            restore: None,
            _one_at_a_time: guard,
        };
        if pool.available() >= pages {
            return Some(lease);
        }
        let want = pool.total + (pages - pool.available());
        std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string()).ok()?;
        lease.restore = Some(pool.total);
        let after = HugePagePool::read().ok()?;
        (after.available() >= pages).then_some(lease)
    }
}

impl Drop for HugePageLease {
    fn drop(&mut self) {
        if let Some(total) = self.restore {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", total.to_string());
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
                    ..RamOptions::default()
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
        assert!(err.to_string().contains("aligned to 4 KiB pages"), "{err}");
        let hugetlb = RamOptions {
            backing: Backing::Hugetlb,
            ..RamOptions::default()
        };
        let err = GuestRam::new(&[(GuestAddress(0), MIB)], hugetlb).unwrap_err();
        assert!(
            err.to_string().contains("aligned to 2048 KiB pages"),
            "{err}"
        );
        let thp = RamOptions {
            thp: Some(true),
            ..hugetlb
        };
        let err = GuestRam::new(&[(GuestAddress(0), 2 * MIB)], thp).unwrap_err();
        assert!(err.to_string().contains("does not apply"), "{err}");
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
                ..RamOptions::default()
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
        racing_writes_survive(&fenced_ram());
    }

    /// One racing test at a time: each keeps both sides busy, and a writer that shares
    /// the machine's cores with other racing tests gets too few writes in.
    fn racing_writes_survive(m: &GuestRam) {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
        let range = m.range(0, 2 * MIB).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let writer = {
            let (m, stop, writes) = (m.clone(), stop.clone(), writes.clone());
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
                    writes.store(i, Ordering::Relaxed);
                    i += 1;
                }
                (lost, i)
            })
        };
        // At least 2 s and 1,000 writes: on a loaded machine the writer may get few turns,
        // so the race runs longer (up to 60 s) rather than proving nothing.
        let start = std::time::Instant::now();
        let mut passes = 0;
        while start.elapsed() < std::time::Duration::from_secs(2)
            || (writes.load(Ordering::Relaxed) < 1000
                && start.elapsed() < std::time::Duration::from_secs(60))
        {
            m.discard_unwritten(range).unwrap();
            passes += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let (lost, writes) = writer.join().unwrap();
        assert!(
            passes > 10 && writes > 100,
            "{passes} passes, {writes} writes"
        );
        assert_eq!(lost, 0, "{lost} of {writes} writes lost in {passes} passes");
    }

    #[test]
    fn the_zero_check_sees_one_set_bit_anywhere_in_a_page() {
        let mut page = vec![0u64; 512];
        // SAFETY: `page` is 512 words nobody else writes.
        let check = |page: &[u64]| unsafe { is_zero(page.as_ptr(), page.len()) };
        assert!(check(&page) && all_zero(&page));
        // Every word, each bit position over the page: a vector unit that dropped a lane
        // (an emulator's, say) would call a written page zero and lose it.
        for i in 0..page.len() {
            page[i] = 1 << ((i * 7) % 64);
            assert!(!check(&page) && !all_zero(&page), "word {i}");
            page[i] = 0;
        }
    }

    #[test]
    fn populate_backs_discarded_pages_and_keeps_contents() {
        for backing in [Backing::Anon, Backing::Memfd] {
            let m = backed(backing, false);
            let all = m.range(0, 2 * MIB).unwrap();
            fill(&m, 0, 2 * MIB, 7);
            m.discard(m.range(0, MIB).unwrap()).unwrap();
            assert_eq!(resident_pages(&m, all), 256, "{}", backing.name());
            assert_eq!(m.populate(all).unwrap(), 2 * MIB);
            assert_eq!(resident_pages(&m, all), 512, "{}", backing.name());
            assert_eq!(m.memory().read_obj::<u8>(GuestAddress(0)).unwrap(), 0);
            assert_eq!(m.memory().read_obj::<u8>(GuestAddress(MIB)).unwrap(), 7);
        }
    }

    fn backed(backing: Backing, write_fence: bool) -> GuestRam {
        GuestRam::new(
            &[
                (GuestAddress(0), 8 * MIB),
                (GuestAddress(16 * MIB), 8 * MIB),
            ],
            RamOptions {
                backing,
                write_fence,
                ..RamOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("{} guest RAM: {e}", backing.name()))
    }

    fn fill(m: &GuestRam, gpa: u64, len: u64, byte: u8) {
        m.memory()
            .write_slice(&vec![byte; len as usize], GuestAddress(gpa))
            .unwrap();
    }

    #[test]
    fn memfd_ram_is_one_shared_sealed_mapping() {
        let m = backed(Backing::Memfd, false);
        assert_eq!(smaps_entry_size_kib(m.host_start()), Some(16 * 1024));
        let flags = smaps_field(m.host_start(), "VmFlags:").unwrap();
        assert!(flags.split_whitespace().any(|f| f == "sh"), "{flags}");
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
        let file = m.file.as_ref().unwrap();
        // SAFETY: F_GET_SEALS only reads the file's seals.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want);
        assert!(file.set_len(4096).is_err(), "its size is sealed");
        assert_eq!(m.allocated_bytes(), Some(0));
        assert_eq!(m.discard_granule(), 4096);
    }

    /// MADV_DONTNEED frees nothing on shared memory (the file keeps the pages): the
    /// memfd backing punches holes, and both RSS and the file's blocks fall.
    #[test]
    fn memfd_discard_punches_holes() {
        let m = backed(Backing::Memfd, false);
        fill(&m, 16 * MIB, 4 * MIB, 0xa5);
        let all = m.range(16 * MIB, 4 * MIB).unwrap();
        assert_eq!(resident_pages(&m, all), 1024);
        assert_eq!(m.allocated_bytes(), Some(4 * MIB));
        assert_eq!(
            m.discard(m.range(16 * MIB, 2 * MIB).unwrap()).unwrap(),
            2 * MIB
        );
        assert_eq!(m.discard(m.range(19 * MIB, 4096).unwrap()).unwrap(), 4096);
        assert_eq!(resident_pages(&m, all), 511);
        assert_eq!(m.allocated_bytes(), Some(2 * MIB - 4096));
        let read = |gpa| m.memory().read_obj::<u8>(GuestAddress(gpa)).unwrap();
        assert_eq!((read(16 * MIB + 4096), read(19 * MIB)), (0, 0));
        assert_eq!(read(19 * MIB + 4096), 0xa5);
        // What MADV_DONTNEED would have done: the pages come straight back.
        let host = m.range(19 * MIB + 4096, 4096).unwrap().host;
        // SAFETY: zapping one page of our shared guest RAM mapping; the file keeps it.
        unsafe { libc::madvise(host as *mut libc::c_void, 4096, libc::MADV_DONTNEED) };
        assert_eq!(read(19 * MIB + 4096), 0xa5, "the file kept it");
        // Reading a hole of shared memory allocates a page (the two reads of zeros).
        assert_eq!(m.allocated_bytes(), Some(2 * MIB + 4096));
    }

    #[test]
    fn memfd_fenced_discard_drops_zero_pages_and_keeps_written_ones() {
        let m = backed(Backing::Memfd, true);
        fill(&m, 0, 2 * MIB, 0);
        for page in [3u64, 100, 511] {
            m.memory()
                .write_obj(0x5au8, GuestAddress(page * 4096 + 17))
                .unwrap();
        }
        assert_eq!(m.allocated_bytes(), Some(2 * MIB));
        // 2 MiB written (zeros and three pages of data), 2 MiB never touched.
        let done = m.discard_unwritten(m.range(0, 4 * MIB).unwrap()).unwrap();
        assert_eq!((done.kept, done.unaligned), (3 * 4096, 0));
        assert_eq!(done.discarded, 4 * MIB - 3 * 4096);
        assert_eq!(m.allocated_bytes(), Some(3 * 4096));
        for page in [3u64, 100, 511] {
            let v: u8 = m.memory().read_obj(GuestAddress(page * 4096 + 17)).unwrap();
            assert_eq!(v, 0x5a);
        }
        m.memory().write_obj(7u8, GuestAddress(8192)).unwrap();
        assert_eq!(m.allocated_bytes(), Some(4 * 4096), "writable again");
    }

    #[test]
    fn memfd_fenced_discard_never_loses_a_racing_write() {
        racing_writes_survive(&backed(Backing::Memfd, true));
    }

    fn hugetlb_or_skip(pages: u64) -> Option<HugePageLease> {
        let lease = HugePageLease::take(pages);
        if lease.is_none() {
            eprintln!("SKIPPED: {pages} free 2 MiB huge pages are needed (run as root)");
        }
        lease
    }

    /// Hugetlb: guest RAM is never unmapped, so its huge pages stay taken until the
    /// process ends; one test, one mapping, one lease of the pool (put back as it was).
    #[test]
    fn hugetlb_gives_back_whole_huge_pages_only() {
        let Some(_lease) = hugetlb_or_skip(8) else {
            return;
        };
        let m = backed(Backing::Hugetlb, true);
        assert_eq!(m.discard_granule(), 2 * MIB);
        assert_eq!(m.allocated_bytes(), Some(0));
        hugetlb_discards_whole_huge_pages(&m);
        hugetlb_fenced_discard_checks_huge_pages_without_faulting_holes_in(&m);
        racing_writes_survive(&m);
    }

    fn hugetlb_discards_whole_huge_pages(m: &GuestRam) {
        fill(m, 16 * MIB, 8 * MIB, 0xa5);
        assert_eq!(m.allocated_bytes(), Some(8 * MIB));
        let free_before = HugePagePool::read().unwrap().free;
        // A 4 KiB page, or 2 MiB across two huge pages: nothing whole, nothing freed.
        assert_eq!(m.discard(m.range(16 * MIB, 4096).unwrap()).unwrap(), 0);
        assert_eq!(m.discard(m.range(17 * MIB, 2 * MIB).unwrap()).unwrap(), 0);
        assert_eq!(m.allocated_bytes(), Some(8 * MIB));
        // 1..6 MiB: the two whole huge pages inside (2..6 MiB) go.
        assert_eq!(
            m.discard(m.range(17 * MIB, 5 * MIB).unwrap()).unwrap(),
            4 * MIB
        );
        assert_eq!(m.allocated_bytes(), Some(4 * MIB));
        assert_eq!(HugePagePool::read().unwrap().free, free_before + 2);
        let read = |gpa| m.memory().read_obj::<u8>(GuestAddress(gpa)).unwrap();
        assert_eq!(read(17 * MIB), 0xa5);
        assert_eq!(read(22 * MIB), 0xa5);
        // Reading a hole takes a huge page from the pool again.
        assert_eq!((read(18 * MIB), read(21 * MIB)), (0, 0));
        assert_eq!(m.allocated_bytes(), Some(8 * MIB));
    }

    fn hugetlb_fenced_discard_checks_huge_pages_without_faulting_holes_in(m: &GuestRam) {
        // Huge page 0 zeroed, 1 with one byte of data, 2 and 3 never touched.
        fill(m, 0, 4 * MIB, 0);
        m.memory()
            .write_obj(1u8, GuestAddress(2 * MIB + 12345))
            .unwrap();
        assert_eq!(m.allocated_bytes(), Some(12 * MIB));
        let free_before = HugePagePool::read().unwrap().free;
        // From 1 MiB to 4 KiB short of 8 MiB: huge pages 0 and 3 are not whole.
        let done = m
            .discard_unwritten(m.range(MIB, 7 * MIB - 4096).unwrap())
            .unwrap();
        assert_eq!(done.unaligned, MIB + 2 * MIB - 4096);
        assert_eq!(done.kept, done.unaligned + 2 * MIB, "huge page 1 has data");
        assert_eq!(done.discarded, 2 * MIB, "huge page 2 was never there");
        assert_eq!(m.allocated_bytes(), Some(12 * MIB), "nothing faulted in");
        assert_eq!(HugePagePool::read().unwrap().free, free_before);
        let done = m.discard_unwritten(m.range(0, 8 * MIB).unwrap()).unwrap();
        assert_eq!((done.discarded, done.kept), (6 * MIB, 2 * MIB));
        assert_eq!(m.allocated_bytes(), Some(10 * MIB));
        assert_eq!(HugePagePool::read().unwrap().free, free_before + 1);
        let v: u8 = m.memory().read_obj(GuestAddress(2 * MIB + 12345)).unwrap();
        assert_eq!(v, 1);
        m.memory().write_obj(0u8, GuestAddress(0)).unwrap();
    }
}
