//! System call filters: each of Ebb's threads may make only the system calls its job
//! needs, so that a guest that gained control of a device model (or an API client that
//! gained control of the server) can do little with the process.
//!
//! Five kinds of thread, five allow-lists ([`ThreadKind`]). Each thread installs its own
//! filter once its setup is done ([`install`]): the API, console and disk I/O threads when
//! they start, each vCPU thread before its first KVM_RUN, the main thread (the event loop)
//! once it has built the VM and started the others. A forbidden call raises SIGSYS, whose
//! handler names the call on stderr and ends the process with [`EXIT_SECCOMP`];
//! `--seccomp off` runs without filters, for debugging.
//!
//! The lists come from tracing full runs (boot, balloon, reporting, disks, API, power off)
//! in the test host, plus the calls of error and exit paths. Only the disk I/O threads
//! may move disk data (`preadv`/`pwritev` between images and guest RAM, `fdatasync`,
//! `fallocate`; images are opened and locked before any filter is installed), except
//! that the event loop may read what the host has cached: `preadv2` with `RWF_NOWAIT`
//! and no other flag, which never waits for a device.

use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit status when a thread made a forbidden system call.
pub const EXIT_SECCOMP: i32 = 3;

/// Whether to filter system calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Every thread runs under its allow-list (the default).
    #[default]
    On,
    /// No filters (for debugging a forbidden call).
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(format!("'{other}': expected on or off")),
        }
    }
}

/// The kinds of thread, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the VM is built: the event loop (devices, API requests,
    /// signals), then the shutdown.
    EventLoop,
    /// A vCPU thread: KVM_RUN and the device accesses that exit to it.
    Vcpu,
    /// The REST API server (a single-threaded async runtime on a Unix socket).
    Api,
    /// Writes the guest's console output to stdout or a file.
    Console,
    /// A disk's I/O thread: moves data between an image (opened before) and guest RAM.
    DiskIo,
}

/// A failure to build or install a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter did not compile (a bug in the lists).
    #[error("seccomp filter for {0:?}: {1}")]
    Build(ThreadKind, String),
    /// The kernel refused it.
    #[error("installing the seccomp filter for {0:?}: {1}")]
    Install(ThreadKind, String),
}

// KVM ioctl request numbers (from linux/kvm.h) the threads use after setup.
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_GET_SREGS: u64 = 0x8138_ae83;
// Terminal ioctls: restoring the console mode at exit.
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;
const TCSETSW: u64 = 0x5403;
// Non-blocking mode on a socket (the async runtime).
const FIONBIO: u64 = 0x5421;
// Write-protecting hinted blocks while they are checked and discarded.
const UFFDIO_WRITEPROTECT: u64 = ebb_devices::write_fence::UFFDIO_WRITEPROTECT;

/// Calls every thread needs: memory management for the allocator, locks, time, signals,
/// reading and writing its descriptors (eventfds, the log), and ending.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The extra calls of each kind of thread.
fn extra_calls(kind: ThreadKind) -> &'static [i64] {
    match kind {
        // Polling the devices' eventfds, timers (balloon statistics), signals; reading
        // /proc for memory figures; guest RAM given back (holes punched in a memfd, which
        // huge pages are present: a pread of /proc/self/pagemap); removing the API socket
        // and joining threads at exit. Disk requests are the I/O threads' (DiskIo).
        ThreadKind::EventLoop => &[
            libc::SYS_pread64,
            libc::SYS_fallocate,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_fsync,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
        ],
        // Device accesses that exit to the vCPU: eventfd writes (COMMON), the balloon
        // arming its statistics timer when the driver activates it.
        ThreadKind::Vcpu => &[libc::SYS_timerfd_settime, libc::SYS_fsync],
        // Writing (COMMON) is all it does.
        ThreadKind::Console => &[libc::SYS_fsync],
        // Disk requests: reads and writes straight between the image and guest RAM,
        // flushes, discards and write-zeroes; waking the event loop (an eventfd write,
        // COMMON).
        ThreadKind::DiskIo => &[
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
        ],
        ThreadKind::Api => &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_fcntl,
            libc::SYS_eventfd2,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
        ],
    }
}

/// The ioctl requests each kind may make.
fn ioctl_requests(kind: ThreadKind) -> &'static [u64] {
    match kind {
        ThreadKind::EventLoop => &[TCGETS, TCSETS, TCSETSW, UFFDIO_WRITEPROTECT],
        ThreadKind::Vcpu => &[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS],
        ThreadKind::Api => &[FIONBIO],
        ThreadKind::Console | ThreadKind::DiskIo => &[],
    }
}

fn rule(conditions: Vec<SeccompCondition>, kind: ThreadKind) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(|e| SeccompError::Build(kind, e.to_string()))
}

fn condition(
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
    kind: ThreadKind,
) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| SeccompError::Build(kind, e.to_string()))
}

/// The compiled filter of `kind`.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let mut rules = std::collections::BTreeMap::new();
    for &call in COMMON.iter().chain(extra_calls(kind)) {
        rules.insert(call, Vec::new());
    }
    let ioctls = ioctl_requests(kind)
        .iter()
        .map(|&request| rule(vec![condition(1, SeccompCmpOp::Eq, request, kind)?], kind))
        .collect::<Result<Vec<_>, _>>()?;
    // An empty rule list would allow every ioctl: only add it with requests to match.
    if !ioctls.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctls);
    }
    // Opening for reading only: the event loop reads /proc for the memory figures, and
    // glibc's malloc reads /proc/sys/vm/overcommit_memory the first time it shrinks a
    // thread's heap, on whichever thread that happens.
    let write_or_create = (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT) as u64;
    let read_only = condition(2, SeccompCmpOp::MaskedEq(write_or_create), 0, kind)?;
    rules.insert(libc::SYS_openat, vec![rule(vec![read_only], kind)?]);
    if kind == ThreadKind::EventLoop {
        // Small reads the host has cached (ebb_block::queue::CACHED_READ_MAX): flags,
        // the sixth argument, exactly RWF_NOWAIT.
        let nowait = condition(5, SeccompCmpOp::Eq, libc::RWF_NOWAIT as u64, kind)?;
        rules.insert(libc::SYS_preadv2, vec![rule(vec![nowait], kind)?]);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(kind, e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(kind, e.to_string()))
}

static HANDLER_INSTALLED: AtomicBool = AtomicBool::new(false);

/// Installs the filter of `kind` on the calling thread (and sets no_new_privs), unless
/// `mode` is off.
pub fn install(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    let program = filter(kind)?;
    install_sigsys_handler();
    seccompiler::apply_filter(&program).map_err(|e| SeccompError::Install(kind, e.to_string()))
}

/// Reports a forbidden call: which one, on stderr, then ends the process. Only
/// async-signal-safe calls, all of them allowed by every filter.
extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The SIGSYS part of siginfo_t (x86_64): the faulting call's address at offset 16,
    // its number at offset 24.
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; for SIGSYS
    // from seccomp these fields are set.
    let number = unsafe { std::ptr::read_unaligned((info as *const u8).add(24) as *const i32) };
    const PREFIX: &[u8] = b"ebb: error: seccomp: forbidden system call ";
    const SUFFIX: &[u8] = b" (run with --seccomp off to debug)\n";
    let mut message = [0u8; PREFIX.len() + 11 + SUFFIX.len()];
    message[..PREFIX.len()].copy_from_slice(PREFIX);
    let digits = format_decimal(number, &mut message[PREFIX.len()..]);
    let end = PREFIX.len() + digits;
    message[end..end + SUFFIX.len()].copy_from_slice(SUFFIX);
    let message = &message[..end + SUFFIX.len()];
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(2, message.as_ptr().cast(), message.len());
        libc::_exit(EXIT_SECCOMP);
    }
}

/// Writes `n` in decimal at the start of `out`; returns the bytes written.
fn format_decimal(n: i32, out: &mut [u8]) -> usize {
    let mut digits = [0u8; 11];
    let mut len = 0;
    let negative = n < 0;
    let mut v = i64::from(n).unsigned_abs();
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if negative {
        digits[len] = b'-';
        len += 1;
    }
    let len = len.min(out.len());
    for (i, slot) in out.iter_mut().take(len).enumerate() {
        *slot = digits[len - 1 - i];
    }
    len
}

fn install_sigsys_handler() {
    if HANDLER_INSTALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    // SAFETY: a zeroed sigaction is a valid starting point; the handler only makes
    // async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_modes_parse() {
        for kind in [
            ThreadKind::EventLoop,
            ThreadKind::Vcpu,
            ThreadKind::Api,
            ThreadKind::Console,
            ThreadKind::DiskIo,
        ] {
            assert!(!filter(kind).unwrap().is_empty());
        }
        assert_eq!("on".parse(), Ok(SeccompMode::On));
        assert_eq!("off".parse(), Ok(SeccompMode::Off));
        assert!("yes".parse::<SeccompMode>().is_err());
    }

    #[test]
    fn decimal_formatting() {
        let mut out = [b' '; 11];
        assert_eq!(format_decimal(41, &mut out), 2);
        assert_eq!(&out[..3], b"41 ");
        assert_eq!(format_decimal(i32::MIN, &mut out), 11);
        assert_eq!(&out, b"-2147483648");
        let mut out = [b' '; 11];
        format_decimal(-7, &mut out);
        assert_eq!(&out[..2], b"-7");
        let mut out = [b' '; 11];
        format_decimal(0, &mut out);
        assert_eq!(out[0], b'0');
    }

    /// Runs `body` in a forked child under the filter of `kind`; returns the child's exit
    /// status and what it wrote to stderr.
    fn run_filtered(kind: ThreadKind, body: fn()) -> (libc::c_int, String) {
        let program = filter(kind).unwrap();
        let mut pipe = [0; 2];
        // SAFETY: creating a pipe into a two-int array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child only makes plain system calls (dup2, sigaction, prctl,
        // seccomp, and what `body` makes) before it ends with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: as above, in the forked child.
            unsafe {
                libc::dup2(pipe[1], 2);
                install_sigsys_handler();
                if seccompiler::apply_filter(&program).is_err() {
                    libc::_exit(100);
                }
                body();
                libc::_exit(0);
            }
        }
        // SAFETY: closing our copy of the write end.
        unsafe { libc::close(pipe[1]) };
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let mut out = vec![0u8; 4096];
        // SAFETY: reading into our buffer from the pipe's read end, then closing it.
        let n = unsafe { libc::read(pipe[0], out.as_mut_ptr().cast(), out.len()) };
        // SAFETY: closing the read end.
        unsafe { libc::close(pipe[0]) };
        let text = String::from_utf8_lossy(&out[..n.max(0) as usize]).into_owned();
        assert!(libc::WIFEXITED(status), "status {status:#x}: {text}");
        (libc::WEXITSTATUS(status), text)
    }

    fn say(text: &[u8]) {
        // SAFETY: writing our own buffer to stderr.
        unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
    }

    /// A vCPU thread may write but not open a socket: the forbidden call ends the process
    /// with EXIT_SECCOMP and a message naming it.
    #[test]
    fn a_forbidden_call_ends_the_process_with_a_message() {
        let (status, text) = run_filtered(ThreadKind::Vcpu, || {
            say(b"allowed\n");
            // SAFETY: a plain system call.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        });
        assert_eq!(status, EXIT_SECCOMP, "{text}");
        assert!(text.starts_with("allowed\n"), "{text}");
        let expected = format!("forbidden system call {} (run", libc::SYS_socket);
        assert!(text.contains(&expected), "{text}");
    }

    /// A disk I/O thread serves disks: vectored reads and writes at an offset, fdatasync
    /// and fallocate on an image opened before the filter; the event loop and a vCPU
    /// thread may do none of them.
    #[test]
    fn only_disk_io_threads_may_do_disk_io() {
        const FD: libc::c_int = 200;
        let path = std::env::temp_dir().join(format!("ebb-seccomp-disk-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        // SAFETY: duplicating our own descriptor onto a number the children know.
        assert_eq!(
            unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&file), FD) },
            FD
        );
        fn disk_io() {
            let mut buf = [7u8; 512];
            let iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: vectored I/O on descriptor FD with our own buffer; fdatasync and
            // fallocate on it.
            let ok = unsafe {
                libc::pwritev(FD, &iov, 1, 4096) == 512
                    && libc::preadv(FD, &iov, 1, 0) == 512
                    && libc::fdatasync(FD) == 0
                    && libc::fallocate(
                        FD,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        0,
                        8192,
                    ) == 0
            };
            if ok {
                say(b"disk io worked\n");
            }
        }
        let (status, text) = run_filtered(ThreadKind::DiskIo, disk_io);
        assert_eq!((status, text.as_str()), (0, "disk io worked\n"));
        for kind in [ThreadKind::EventLoop, ThreadKind::Vcpu] {
            let (status, text) = run_filtered(kind, disk_io);
            assert_eq!(status, EXIT_SECCOMP, "{kind:?}: {text}");
        }
        // The event loop reads only what is cached: preadv2 with RWF_NOWAIT alone.
        fn cached_read() {
            let mut buf = [0u8; 512];
            let iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: reads from descriptor FD into our own buffer: a plain one (the
            // event loop's pread64) brings the block into the page cache.
            let n = unsafe {
                libc::pread(FD, buf.as_mut_ptr().cast(), buf.len(), 4096);
                libc::preadv2(FD, &iov, 1, 4096, libc::RWF_NOWAIT)
            };
            if n == 512 {
                say(b"cached read worked\n");
            }
            // SAFETY: as above, with flags the filter does not allow.
            unsafe { libc::preadv2(FD, &iov, 1, 4096, libc::RWF_NOWAIT | libc::RWF_HIPRI) };
        }
        let (status, text) = run_filtered(ThreadKind::EventLoop, cached_read);
        assert_eq!(status, EXIT_SECCOMP, "{text}");
        assert!(text.starts_with("cached read worked\n"), "{text}");
        let (status, _) = run_filtered(ThreadKind::Vcpu, cached_read);
        assert_eq!(status, EXIT_SECCOMP);
        // SAFETY: closing the duplicate made above.
        unsafe { libc::close(FD) };
        let _ = std::fs::remove_file(path);
    }

    /// A kind with no ioctl requests may make none (an empty rule list would allow all).
    #[test]
    fn the_console_thread_may_not_ioctl() {
        let (status, text) = run_filtered(ThreadKind::Console, || {
            say(b"writing works\n");
            let mut size = [0u16; 4];
            // SAFETY: TIOCGWINSZ into our own buffer.
            unsafe { libc::ioctl(2, libc::TIOCGWINSZ, size.as_mut_ptr()) };
        });
        assert_eq!(status, EXIT_SECCOMP, "{text}");
        assert!(text.starts_with("writing works\n"), "{text}");
        assert!(
            text.contains(&format!("system call {} ", libc::SYS_ioctl)),
            "{text}"
        );
    }

    /// Files open for reading only: a read-only open works, one that could write or
    /// create is refused.
    #[test]
    fn files_open_for_reading_only() {
        let (status, text) = run_filtered(ThreadKind::EventLoop, || {
            // SAFETY: opening a NUL-terminated path read-only.
            let fd = unsafe { libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) };
            if fd >= 0 {
                say(b"read-only open worked\n");
            }
            // SAFETY: as above, asking to create.
            unsafe {
                libc::open(
                    c"/tmp/ebb-seccomp-test".as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT,
                    0o600,
                )
            };
        });
        assert_eq!(status, EXIT_SECCOMP, "{text}");
        assert!(text.starts_with("read-only open worked\n"), "{text}");
        assert!(
            text.contains(&format!("system call {} ", libc::SYS_openat)),
            "{text}"
        );
    }
}
