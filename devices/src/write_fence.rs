//! A write fence over guest RAM: userfaultfd write protection, so that Ebb can look at a
//! range and discard it while no one (a vCPU through KVM, or another Ebb thread) can
//! write to it.
//!
//! Free page hinting needs this: the guest may take a hinted block back and write to it
//! before the host has discarded it, and a discard after that write would lose the write.
//! Under the fence, a writer's fault waits in the kernel until the range is unprotected
//! (which wakes it); its write then lands after the discard, on a fresh page.
//!
//! The fence catches faults taken by the kernel on a vCPU's behalf (KVM resolving a guest
//! write), so the userfaultfd is opened without `UFFD_USER_MODE_ONLY`: that needs
//! `CAP_SYS_PTRACE`, root, `vm.unprivileged_userfaultfd=1`, or access to
//! `/dev/userfaultfd` (Linux 6.1+), which is tried second.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `UFFD_API`: the protocol version this code speaks.
const UFFD_API: u64 = 0xAA;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
/// `_IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
pub const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;
/// `_IO(0xAA, 0x00)` on `/dev/userfaultfd`: a new userfaultfd.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
/// Register for write-protect faults.
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// Protect (without it: unprotect and wake the waiting writers).
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// Bit of `_UFFDIO_WRITEPROTECT` in the ioctls a registration allows.
const UFFDIO_WRITEPROTECT_BIT: u64 = 1 << 0x06;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (Linux 5.19+): write protection of shared memory
/// (memfd, tmpfs) and hugetlbfs, including pages not mapped yet (the kernel leaves a
/// marker in the empty entry, so their first write waits too).
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// A userfaultfd registered for write protection over one host mapping.
#[derive(Debug)]
pub struct WriteFence {
    fd: OwnedFd,
    start: usize,
    len: usize,
}

fn open_userfaultfd() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: the userfaultfd system call takes only flags and returns a new descriptor
    // or -1; nothing of ours is touched.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let syscall_err = io::Error::last_os_error();
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|dev_err| {
            io::Error::new(
                syscall_err.kind(),
                format!(
                    "userfaultfd: {syscall_err}; /dev/userfaultfd: {dev_err} (free page \
                     hinting needs userfaultfd for kernel faults: run Ebb as root or with \
                     CAP_SYS_PTRACE, or set vm.unprivileged_userfaultfd=1, or give it \
                     access to /dev/userfaultfd)"
                ),
            )
        })?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument and returns a new
    // descriptor or -1.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What kind of memory a fence covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FencedMemory {
    /// A private anonymous mapping: only pages already mapped can be protected.
    Anonymous,
    /// A shared mapping of a memfd (shmem) or of hugetlbfs: needs
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`; empty entries are protected too.
    Shared,
}

fn shared_wp_missing(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "this host kernel cannot write-protect shared or hugetlb memory with userfaultfd \
             ({why}; UFFD_FEATURE_WP_HUGETLBFS_SHMEM needs Linux 5.19 or later): use \
             backing=anon, or turn free page hinting off"
        ),
    )
}

impl WriteFence {
    /// A fence over `[start, start + len)`, a page-aligned mapping of this process (of
    /// the kind `memory` says; huge-page aligned for hugetlbfs) that lives as long as the
    /// fence.
    pub fn new(start: usize, len: usize, memory: FencedMemory) -> io::Result<Self> {
        let fd = open_userfaultfd()?;
        let features = match memory {
            FencedMemory::Anonymous => 0,
            FencedMemory::Shared => UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes the struct passed, which lives on our stack.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) } != 0 {
            let e = io::Error::last_os_error();
            if memory == FencedMemory::Shared && e.raw_os_error() == Some(libc::EINVAL) {
                return Err(shared_wp_missing("the feature is unknown to it"));
            }
            return Err(e);
        }
        // The kernel answers with what it can do: a kernel built without PTE markers
        // accepts the request but cannot honour it.
        if api.features & features != features {
            return Err(shared_wp_missing("the kernel does not offer it"));
        }
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes the struct passed; it changes only how
        // faults in our own mapping are handled, not its contents.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } != 0 {
            let e = io::Error::last_os_error();
            if memory == FencedMemory::Shared && e.raw_os_error() == Some(libc::EINVAL) {
                return Err(shared_wp_missing("registering guest RAM was refused"));
            }
            return Err(io::Error::new(
                e.kind(),
                format!("registering guest RAM for write protection: {e}"),
            ));
        }
        if reg.ioctls & UFFDIO_WRITEPROTECT_BIT == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                match memory {
                    FencedMemory::Anonymous => {
                        "the host kernel cannot write-protect anonymous memory with userfaultfd"
                    }
                    FencedMemory::Shared => {
                        "the host kernel cannot write-protect shared memory with userfaultfd"
                    }
                },
            ));
        }
        Ok(Self { fd, start, len })
    }

    /// The userfaultfd (for the seccomp filter's tests and diagnostics).
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    fn write_protect(&self, start: usize, len: usize, protect: bool) -> io::Result<()> {
        let end = start.checked_add(len);
        if len == 0 || start < self.start || end.is_none_or(|e| e > self.start + self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range outside the fenced mapping",
            ));
        }
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads the struct passed and changes the protection
        // of a range checked above to lie inside the registered mapping.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Write-protects `[start, start + len)`: from now on a write there waits.
    pub fn protect(&self, start: usize, len: usize) -> io::Result<()> {
        self.write_protect(start, len, true)
    }

    /// Lifts the protection and wakes the writers that waited.
    pub fn unprotect(&self, start: usize, len: usize) -> io::Result<()> {
        self.write_protect(start, len, false)
    }
}
