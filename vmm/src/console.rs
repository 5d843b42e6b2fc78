//! The host side of the serial console: stdin feeding the guest's UART, and the terminal
//! mode while the guest owns it.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex};

use ebb_devices::bus::lock;
use ebb_devices::serial::SerialDevice;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Input waiting for room in the UART's FIFO is capped: past this, stdin is not read
/// until the guest catches up, so nothing is dropped and memory stays bounded.
const MAX_PENDING: usize = 64 * 1024;

/// Moves stdin bytes into the guest UART as fast as the guest drains its FIFO.
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    drained: EventFd,
    stdin: Option<File>,
    stdin_registered: bool,
    pending: VecDeque<u8>,
}

impl ConsoleInput {
    /// Feeds `serial` from the process's stdin; `drained` fires when the guest empties the
    /// receive FIFO.
    pub fn new(serial: Arc<Mutex<SerialDevice>>, drained: EventFd) -> Self {
        // SAFETY: fd 0 is the process's stdin; we duplicate it so the File owns its own fd.
        let dup = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 0) };
        let stdin = (dup >= 0).then(|| {
            // SAFETY: `dup` is a fresh fd we own.
            unsafe { File::from_raw_fd(dup) }
        });
        Self {
            serial,
            drained,
            stdin,
            stdin_registered: false,
            pending: VecDeque::new(),
        }
    }

    fn deliver(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let (front, _) = self.pending.as_slices();
        let n = lock(&self.serial).enqueue_input(front);
        self.pending.drain(..n);
    }

    fn read_stdin(&mut self, ops: &mut EventOps) {
        let Some(stdin) = self.stdin.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        match stdin.read(&mut buf) {
            Ok(0) => {
                // EOF: the guest keeps running; there is just no more input.
                let fd = stdin.as_raw_fd();
                if self.stdin_registered {
                    let _ = ops.remove(Events::empty_raw(fd));
                    self.stdin_registered = false;
                }
                self.stdin = None;
            }
            Ok(n) => self.pending.extend(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!("console input: {e}; ignoring further input");
                if let Some(stdin) = self.stdin.take() {
                    let _ = ops.remove(Events::empty_raw(stdin.as_raw_fd()));
                }
                self.stdin_registered = false;
            }
        }
    }

    fn update_interest(&mut self, ops: &mut EventOps) {
        let Some(stdin) = self.stdin.as_ref() else {
            return;
        };
        let fd = stdin.as_raw_fd();
        let want = self.pending.len() < MAX_PENDING;
        if want && !self.stdin_registered {
            match ops.add(Events::new_raw(fd, EventSet::IN)) {
                Ok(()) => self.stdin_registered = true,
                Err(e) => {
                    // Regular files cannot be polled; they are always readable.
                    tracing::debug!("stdin not pollable ({e:?}); reading it directly");
                    self.fill_from_unpollable();
                }
            }
        } else if !want && self.stdin_registered {
            let _ = ops.remove(Events::empty_raw(fd));
            self.stdin_registered = false;
        }
    }

    /// For stdin that epoll refuses (a regular file): read while there is room.
    fn fill_from_unpollable(&mut self) {
        let Some(stdin) = self.stdin.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        while self.pending.len() < MAX_PENDING {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    self.stdin = None;
                    break;
                }
                Ok(n) => self.pending.extend(&buf[..n]),
            }
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            tracing::warn!("console input disabled: {e:?}");
            return;
        }
        self.update_interest(ops);
        self.deliver();
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
            if self.stdin.is_some() && !self.stdin_registered && self.pending.is_empty() {
                self.fill_from_unpollable();
            }
        } else if events
            .event_set()
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
        {
            self.read_stdin(ops);
        }
        self.deliver();
        self.update_interest(ops);
    }
}

/// Puts the terminal on stdin into raw mode (keeping Ctrl-C as a signal, so the host can
/// always stop Ebb) and restores it when dropped or when `restore` is called.
pub struct RawTerminal {
    fd: RawFd,
    saved: Option<libc::termios>,
}

impl RawTerminal {
    /// Enters raw mode if stdin is a terminal; does nothing otherwise.
    pub fn enter() -> Self {
        let fd = 0;
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return Self { fd, saved: None };
        }
        // SAFETY: zeroed termios is a valid buffer for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and `saved` a valid termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Self { fd, saved: None };
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_lflag |= libc::ISIG;
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: applying a termios derived from the terminal's own.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Self { fd, saved: None };
        }
        Self {
            fd,
            saved: Some(saved),
        }
    }

    /// Restores the saved mode (idempotent).
    pub fn restore(&mut self) {
        if let Some(saved) = self.saved.take() {
            // SAFETY: restoring the attributes read from this terminal.
            unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &saved) };
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        self.restore();
    }
}
