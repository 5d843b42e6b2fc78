//! Host signals (SIGINT, SIGTERM, SIGHUP) as events in the VMM's event loop.
//!
//! The signals are blocked in every thread (the mask is set before any thread starts and
//! is inherited) and read from a signalfd, so a signal becomes an ordinary stop request
//! and the terminal is restored on the way out.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use ebb_devices::exit::{ExitSignal, VmExit};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn stop_set() -> libc::sigset_t {
    // SAFETY: zeroed sigset_t is valid input for sigemptyset, which initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in STOP_SIGNALS {
        // SAFETY: `set` is initialised and `s` a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Blocks the stop signals in the calling thread (call before spawning threads) and
/// returns a signalfd that reports them.
pub fn block_stop_signals() -> io::Result<OwnedFd> {
    let set = stop_set();
    // SAFETY: `set` is a valid, initialised sigset_t.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: creating a new signalfd for `set`.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Signal number to name, for messages.
pub fn signal_name(sig: u32) -> String {
    match sig as libc::c_int {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

/// Turns stop signals into `VmExit::Stopped`.
pub struct SignalWatcher {
    fd: OwnedFd,
    exit: Arc<ExitSignal>,
}

impl SignalWatcher {
    /// Watches `fd` (from [`block_stop_signals`]).
    pub fn new(fd: OwnedFd, exit: Arc<ExitSignal>) -> Self {
        Self { fd, exit }
    }
}

impl MutEventSubscriber for SignalWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            tracing::warn!("cannot watch signals: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // SAFETY: zeroed siginfo is a valid buffer for read to fill.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading at most `size` bytes into `info`.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n as usize == size {
            self.exit
                .request(VmExit::Stopped(signal_name(info.ssi_signo)));
        }
    }
}

/// Signal number for a `VmExit::Stopped` reason naming a signal, for the exit status.
pub fn signal_number(name: &str) -> Option<i32> {
    match name {
        "SIGINT" => Some(libc::SIGINT),
        "SIGTERM" => Some(libc::SIGTERM),
        "SIGHUP" => Some(libc::SIGHUP),
        _ => None,
    }
}
