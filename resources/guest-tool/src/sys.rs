//! Thin wrappers around the system calls the tool needs. Every `unsafe` block is here or
//! carries its own `// SAFETY:` comment.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Writes all of `buf` to `fd`, retrying on EINTR and short writes.
pub fn write_all_fd(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live slice, valid for reads of `buf.len()` bytes; the kernel
        // checks `fd`.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Reads into `buf` from `fd`, retrying on EINTR. Ok(0) is end of file.
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a live, exclusively borrowed slice, valid for writes of
        // `buf.len()` bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Prints one console line (adds the newline) with a single write(2), so that lines from
/// the supervisor, the server and its children never interleave.
pub fn emit(line: &str) {
    let mut s = String::with_capacity(line.len() + 1);
    s.push_str(line);
    s.push('\n');
    let _ = write_all_fd(libc::STDOUT_FILENO, s.as_bytes());
}

/// A pipe with both ends close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Puts a terminal in a mode for a line protocol: no echo, no line editing, no signal or
/// flow-control characters, and no CR/LF translation on input (both end a line). Output
/// processing (LF -> CRLF) is left as it is.
pub fn console_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: termios is plain old data; all-zero is a valid value and tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to write to.
    check(unsafe { libc::tcgetattr(fd, &mut t) })?;
    t.c_lflag &= !(libc::ECHO
        | libc::ECHOE
        | libc::ECHOK
        | libc::ECHONL
        | libc::ICANON
        | libc::ISIG
        | libc::IEXTEN);
    t.c_iflag &= !(libc::IXON
        | libc::IXOFF
        | libc::ICRNL
        | libc::INLCR
        | libc::IGNCR
        | libc::ISTRIP
        | libc::BRKINT);
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: `t` is a fully initialised termios read from the same terminal.
    check(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) })?;
    Ok(())
}

pub fn set_oom_score_adj(v: i32) -> io::Result<()> {
    std::fs::write("/proc/self/oom_score_adj", format!("{v}\n"))
}

pub enum Fork {
    Child,
    Parent(libc::pid_t),
}

/// fork(2).
///
/// # Safety
/// The calling process must be single-threaded (the server is), so that the child may
/// allocate and use std freely; the child must leave through `exit_now`.
pub unsafe fn fork() -> io::Result<Fork> {
    // SAFETY: forwarded to the caller (single-threaded process).
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Fork::Child),
        pid => Ok(Fork::Parent(pid)),
    }
}

/// Ends a forked child at once, without running the parent's exit handlers.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit only ends the calling process.
    unsafe { libc::_exit(code) }
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    fn from_status(status: libc::c_int) -> Exit {
        if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        }
    }
}

/// Waits for `pid` (blocking, retrying on EINTR).
pub fn wait_pid(pid: libc::pid_t) -> io::Result<Exit> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid int to write to.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(Exit::from_status(status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reaps one exited child of any kind without blocking.
pub fn reap_any() -> Option<(libc::pid_t, Exit)> {
    let mut status = 0;
    // SAFETY: `status` is a valid int to write to.
    let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    (r > 0).then(|| (r, Exit::from_status(status)))
}

pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    check(unsafe { libc::kill(pid, sig) }).map(|_| ())
}

/// poll(2) on `fds`; `timeout` None blocks. EINTR counts as a timeout.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = match timeout {
        None => -1,
        Some(d) => d.as_millis().min(i32::MAX as u128) as libc::c_int,
    };
    // SAFETY: `fds` is a live, exclusively borrowed slice of pollfd of the given length.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(r as usize)
}

pub fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Flushes file systems, then powers the machine off (or restarts it). Returns only on
/// failure.
pub fn power_off(restart: bool) -> io::Error {
    // The kernel's own "reboot: Power down" line goes straight to the console: let the
    // UART send our last line first, or the two interleave and the host loses our result.
    // SAFETY: tcdrain only waits on a descriptor (ENOTTY when stdout is not a terminal).
    unsafe { libc::tcdrain(libc::STDOUT_FILENO) };
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let cmd = if restart {
        libc::RB_AUTOBOOT
    } else {
        libc::RB_POWER_OFF
    };
    // SAFETY: reboot with a valid command; it returns only on failure.
    unsafe { libc::reboot(cmd) };
    io::Error::last_os_error()
}

/// Makes Ctrl-Alt-Del send SIGINT to PID 1 instead of restarting at once.
pub fn disable_cad() -> io::Result<()> {
    // SAFETY: reboot with a valid command that only changes a kernel flag.
    check(unsafe { libc::reboot(libc::RB_DISABLE_CAD) }).map(|_| ())
}

/// Makes this process the reaper of its orphaned descendants (for running the supervisor
/// outside PID 1, e.g. in tests).
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with an integer argument; no pointers involved.
    check(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) }).map(|_| ())
}

/// Blocks `signals` for this thread and returns a signalfd that reports them.
pub fn block_signals_fd(signals: &[libc::c_int]) -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in signals {
        // SAFETY: `set` is an initialised sigset_t.
        check(unsafe { libc::sigaddset(&mut set, s) })?;
    }
    // SAFETY: `set` is initialised; the old mask is not wanted.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: `set` is initialised; -1 asks for a new descriptor.
    let fd = check(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
    // SAFETY: signalfd returned a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads pending signal numbers from a non-blocking signalfd.
pub fn read_signals(fd: RawFd) -> Vec<u32> {
    let mut out = Vec::new();
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    let mut buf = vec![0u8; size * 8];
    while let Ok(n) = read_fd(fd, &mut buf) {
        if n < size {
            break;
        }
        for chunk in buf[..n].chunks_exact(size) {
            // ssi_signo is the first field (u32) of struct signalfd_siginfo.
            out.push(u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]));
        }
    }
    out
}

/// The name of a signal, for messages.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}
