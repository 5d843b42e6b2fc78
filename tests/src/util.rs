//! Helpers every layer uses, each written once: figures (median, MiB), polling until a
//! condition or a time limit, and running a process with a time limit.

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Median of `v` (sorted copy); `None` for an empty slice.
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// KiB to MiB, rounded to 0.1 MiB (for reports and JSON results).
pub fn mib(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

/// Milliseconds of `d`, for JSON results.
pub fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Calls `f` every `every` until it returns `Some` (returned) or `limit` passes (`None`);
/// an error from `f` ends the polling.
pub fn poll<T, E>(
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(Some(v));
        }
        if start.elapsed() >= limit {
            return Ok(None);
        }
        thread::sleep(every);
    }
}

/// The exit code, or 128 + the signal number for a process killed by a signal.
pub fn status_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Kills the child when this thread's process dies (a VMM or L1 must not outlive a test).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Receives complete lines of output as they arrive.
pub type LineSink = Box<dyn FnMut(&str) + Send>;

/// Where a bounded process's output goes besides the returned strings.
#[derive(Default)]
pub struct Tee {
    /// Copies of stdout and stderr.
    pub stdout_file: Option<PathBuf>,
    pub stderr_file: Option<PathBuf>,
    /// Called with each complete stdout line as it arrives.
    pub on_stdout_line: Option<LineSink>,
}

/// A process that ran under [`run_bounded`].
#[derive(Debug)]
pub struct Finished {
    /// `None`: still running at the limit, killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `cmd` with stdin closed and stdout/stderr collected (and teed), killing it when it
/// is still running after `limit`: a hang ends, never a wait without end.
pub fn run_bounded(cmd: &mut Command, limit: Duration, tee: Tee) -> io::Result<Finished> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(cmd);
    let mut child = cmd.spawn()?;
    let out = collect(child.stdout.take(), tee.stdout_file, tee.on_stdout_line);
    let err = collect(child.stderr.take(), tee.stderr_file, None);
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    Ok(Finished {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: t0.elapsed(),
    })
}

/// Reads `src` to its end on a thread, copying to `path` and handing complete lines to
/// `on_line`; returns everything read.
fn collect<R: Read + Send + 'static>(
    src: Option<R>,
    path: Option<PathBuf>,
    mut on_line: Option<LineSink>,
) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let Some(mut src) = src else {
            return String::new();
        };
        let mut file = path.and_then(|p| std::fs::File::create(p).ok());
        let mut all = Vec::new();
        let mut line_start = 0;
        let mut buf = [0u8; 8192];
        loop {
            match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    if let Some(f) = file.as_mut() {
                        let _ = f.write_all(&buf[..n]);
                    }
                    if let Some(cb) = on_line.as_mut() {
                        while let Some(p) = all[line_start..].iter().position(|&b| b == b'\n') {
                            cb(&String::from_utf8_lossy(&all[line_start..line_start + p]));
                            line_start += p + 1;
                        }
                    }
                }
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    })
}

/// `name` on `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn median_and_mib() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(mib(1536), 1.5);
        assert_eq!(mib(1000), 1.0);
    }

    #[test]
    fn poll_stops() {
        let mut n = 0;
        let r: Result<_, ()> = poll(Duration::from_secs(5), Duration::from_millis(1), || {
            n += 1;
            Ok((n == 3).then_some(n))
        });
        assert_eq!(r, Ok(Some(3)));
        let none: Result<Option<()>, ()> =
            poll(Duration::from_millis(20), Duration::from_millis(5), || {
                Ok(None)
            });
        assert_eq!(none, Ok(None));
    }

    #[test]
    fn bounded_process_output_status_and_limit() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = lines.clone();
        let f = run_bounded(
            Command::new("/bin/sh").args(["-c", "echo a; echo b >&2; echo c; exit 3"]),
            Duration::from_secs(10),
            Tee {
                on_stdout_line: Some(Box::new(move |l| seen.lock().unwrap().push(l.to_string()))),
                ..Tee::default()
            },
        )
        .unwrap();
        assert_eq!(f.status.map(status_code), Some(3));
        assert_eq!((f.stdout.as_str(), f.stderr.as_str()), ("a\nc\n", "b\n"));
        assert_eq!(*lines.lock().unwrap(), ["a", "c"]);
        let hung = run_bounded(
            Command::new("/bin/sleep").arg("5"),
            Duration::from_millis(100),
            Tee::default(),
        )
        .unwrap();
        assert!(hung.status.is_none());
    }
}
