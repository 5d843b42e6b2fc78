//! The memory worker: a forked child that allocates and holds anonymous memory, so that the
//! server stays small and an OOM kill hits the worker, not the server.
//!
//! Server -> worker: `touch MIB\n` on a pipe. Worker -> server: `ok MICROS\n` or
//! `err MESSAGE\n`. `free` is SIGKILL + waitpid.

use crate::sys::{self, Exit, Fork};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

pub const PAGE: usize = 4096;
pub const MIB: usize = 1 << 20;

/// Maps `mib` MiB of anonymous memory and writes one non-zero byte to every 4 KiB page.
/// Returns the mapping (address, length).
fn map_and_touch(mib: u64) -> Result<(*mut u8, usize), String> {
    let len = usize::try_from(mib)
        .ok()
        .and_then(|m| m.checked_mul(MIB))
        .ok_or_else(|| format!("{mib} MiB does not fit the address space"))?;
    // SAFETY: a new private anonymous mapping at an address the kernel picks; it does not
    // alias any Rust object.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap {mib} MiB: {}", io::Error::last_os_error()));
    }
    let base = p.cast::<u8>();
    for (i, off) in (0..len).step_by(PAGE).enumerate() {
        // SAFETY: `off < len`, so the byte lies inside the writable mapping made above;
        // volatile so that the store (which populates the page) is never optimised away.
        unsafe { base.add(off).write_volatile((i as u8) | 1) };
    }
    Ok((base, len))
}

fn unmap(base: *mut u8, len: usize) {
    // SAFETY: (base, len) is a mapping made by map_and_touch and not used afterwards.
    unsafe { libc::munmap(base.cast(), len) };
}

fn reply(fd: RawFd, r: Result<Duration, String>) {
    let line = match r {
        Ok(d) => format!("ok {}\n", d.as_micros()),
        Err(e) => format!("err {}\n", e.replace('\n', " ")),
    };
    let _ = sys::write_all_fd(fd, line.as_bytes());
}

/// Reads one `\n`-terminated line from `fd`; None at end of file (the peer died).
fn read_line(fd: RawFd) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if sys::read_fd(fd, &mut byte)? == 0 {
            return Ok(None);
        }
        if byte[0] == b'\n' {
            return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
        }
        line.push(byte[0]);
    }
}

fn parse_reply(line: &str) -> Result<Duration, String> {
    if let Some(us) = line.strip_prefix("ok ") {
        us.trim()
            .parse::<u64>()
            .map(Duration::from_micros)
            .map_err(|_| format!("bad worker reply {line:?}"))
    } else if let Some(e) = line.strip_prefix("err ") {
        Err(e.to_string())
    } else {
        Err(format!("bad worker reply {line:?}"))
    }
}

/// The body of the worker child: serve `touch` requests until the pipe closes.
fn worker_main(cmd: OwnedFd, rep: OwnedFd) -> ! {
    let _ = sys::set_oom_score_adj(0);
    let mut held: Vec<(*mut u8, usize)> = Vec::new();
    while let Ok(Some(line)) = read_line(cmd.as_raw_fd()) {
        let r = match line.strip_prefix("touch ").map(|n| n.trim().parse::<u64>()) {
            Some(Ok(mib)) => {
                let start = Instant::now();
                map_and_touch(mib).map(|m| {
                    held.push(m);
                    start.elapsed()
                })
            }
            _ => Err(format!("unknown worker request {line:?}")),
        };
        reply(rep.as_raw_fd(), r);
    }
    sys::exit_now(0)
}

/// Why a worker request failed.
#[derive(Debug)]
pub enum WorkerError {
    /// The worker died (e.g. the OOM killer); everything it held is gone.
    Died(Exit),
    /// The worker reported an error (e.g. mmap failed); it still holds its memory.
    Failed(String),
    Io(io::Error),
}

impl WorkerError {
    pub fn message(&self) -> String {
        match self {
            WorkerError::Died(Exit::Signal(s)) => {
                format!("worker killed by signal {s} ({})", sys::signal_name(*s))
            }
            WorkerError::Died(Exit::Code(c)) => format!("worker exited with status {c}"),
            WorkerError::Failed(e) => e.clone(),
            WorkerError::Io(e) => format!("worker i/o: {e}"),
        }
    }

    pub fn signal(&self) -> Option<i32> {
        match self {
            WorkerError::Died(Exit::Signal(s)) => Some(*s),
            _ => None,
        }
    }
}

/// A running memory worker and what it holds.
pub struct Worker {
    pid: libc::pid_t,
    cmd: OwnedFd,
    rep: OwnedFd,
    held_mib: u64,
}

impl Worker {
    /// Forks a new, empty worker.
    pub fn spawn() -> io::Result<Worker> {
        let (cmd_r, cmd_w) = sys::pipe()?;
        let (rep_r, rep_w) = sys::pipe()?;
        // SAFETY: the server is single-threaded; the child leaves through exit_now.
        match unsafe { sys::fork() }? {
            Fork::Child => {
                drop(cmd_w);
                drop(rep_r);
                worker_main(cmd_r, rep_w)
            }
            Fork::Parent(pid) => Ok(Worker {
                pid,
                cmd: cmd_w,
                rep: rep_r,
                held_mib: 0,
            }),
        }
    }

    pub fn held_mib(&self) -> u64 {
        self.held_mib
    }

    /// The descriptor that becomes readable (end of file) when the worker dies.
    pub fn death_fd(&self) -> RawFd {
        self.rep.as_raw_fd()
    }

    /// Asks the worker to touch `mib` more MiB; returns the time the worker measured.
    /// On `Died` the worker has been reaped and must be dropped.
    pub fn touch(&mut self, mib: u64) -> Result<Duration, WorkerError> {
        let req = format!("touch {mib}\n");
        if let Err(e) = sys::write_all_fd(self.cmd.as_raw_fd(), req.as_bytes()) {
            if e.raw_os_error() == Some(libc::EPIPE) {
                return Err(self.reap());
            }
            return Err(WorkerError::Io(e));
        }
        match read_line(self.rep.as_raw_fd()) {
            Ok(Some(line)) => match parse_reply(&line) {
                Ok(d) => {
                    self.held_mib += mib;
                    Ok(d)
                }
                Err(e) => Err(WorkerError::Failed(e)),
            },
            Ok(None) => Err(self.reap()),
            Err(e) => Err(WorkerError::Io(e)),
        }
    }

    fn reap(&mut self) -> WorkerError {
        self.held_mib = 0;
        match sys::wait_pid(self.pid) {
            Ok(exit) => WorkerError::Died(exit),
            Err(e) => WorkerError::Io(e),
        }
    }

    /// Called when `death_fd` polled readable while no request was pending: the worker died
    /// on its own (e.g. a later OOM kill). Returns how it ended.
    pub fn collect_death(mut self) -> WorkerError {
        self.reap()
    }

    /// Kills the worker and waits until it is gone (its memory freed). Returns the MiB it
    /// held and how long that took.
    pub fn kill(mut self) -> (u64, Duration) {
        let held = self.held_mib;
        let start = Instant::now();
        let _ = sys::kill(self.pid, libc::SIGKILL);
        let _ = self.reap();
        (held, start.elapsed())
    }
}

/// `alloc`: allocates and touches `mib` MiB in a short-lived child, then releases it.
/// Returns the child's measurement (allocate + touch + release).
pub fn alloc_once(mib: u64) -> Result<Duration, WorkerError> {
    let (rep_r, rep_w) = sys::pipe().map_err(WorkerError::Io)?;
    // SAFETY: the server is single-threaded; the child leaves through exit_now.
    match unsafe { sys::fork() }.map_err(WorkerError::Io)? {
        Fork::Child => {
            drop(rep_r);
            let _ = sys::set_oom_score_adj(0);
            let start = Instant::now();
            let r = map_and_touch(mib).map(|(base, len)| {
                unmap(base, len);
                start.elapsed()
            });
            reply(rep_w.as_raw_fd(), r);
            sys::exit_now(0)
        }
        Fork::Parent(pid) => {
            drop(rep_w);
            let line = read_line(rep_r.as_raw_fd());
            let exit = sys::wait_pid(pid).map_err(WorkerError::Io)?;
            match line {
                Ok(Some(line)) => parse_reply(&line).map_err(WorkerError::Failed),
                Ok(None) => Err(WorkerError::Died(exit)),
                Err(e) => Err(WorkerError::Io(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies() {
        assert_eq!(parse_reply("ok 1500"), Ok(Duration::from_micros(1500)));
        assert_eq!(parse_reply("err mmap: no"), Err("mmap: no".to_string()));
        assert!(parse_reply("ok x").is_err());
        assert!(parse_reply("").is_err());
    }
}
