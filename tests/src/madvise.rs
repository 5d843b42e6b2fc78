//! Counting and timing a VMM's `madvise(MADV_DONTNEED)` calls from the host with `perf`
//! (the `syscalls:sys_enter_madvise` tracepoint, filtered in the kernel to
//! `behavior == MADV_DONTNEED`): no ptrace stops, so the VMM runs at full speed.
//!
//! Used by the benchmarks to compare how Ebb and QEMU give balloon pages back. Needs
//! `perf` and a tracefs (mounted here when missing; root).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

/// `MADV_DONTNEED`.
const MADV_DONTNEED: u32 = 4;

/// A running `perf record` on one process.
pub struct MadviseTrace {
    child: Child,
    data: PathBuf,
}

/// One traced call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Call {
    /// perf timestamp (seconds, monotonic).
    pub time_s: f64,
    pub start: u64,
    pub len: u64,
}

/// What the calls inside one address range add up to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub calls: u64,
    pub bytes: u64,
    /// From the first call to the last (seconds).
    pub span_s: f64,
    pub first_s: Option<f64>,
    pub last_s: Option<f64>,
    /// Calls outside the range (other memory the VMM gave back).
    pub other_calls: u64,
}

fn find_perf() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("perf"))
        .find(|p| p.is_file())
        .ok_or_else(|| "perf is not installed (Debian package linux-perf)".to_string())
}

/// Mounts tracefs on /sys/kernel/tracing when it is not there (the nested test host
/// mounts a bare sysfs).
fn ensure_tracefs() -> Result<(), String> {
    let events = Path::new("/sys/kernel/tracing/events/syscalls/sys_enter_madvise");
    if events.exists() || Path::new("/sys/kernel/debug/tracing/events/syscalls").exists() {
        return Ok(());
    }
    let st = Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("mount tracefs: {e}"))?;
    if !st.success() || !events.exists() {
        return Err(format!(
            "no syscall tracepoints ({} missing after mounting tracefs: {st})",
            events.display()
        ));
    }
    Ok(())
}

impl MadviseTrace {
    /// Starts tracing `pid` into `data` and gives perf a moment to attach.
    pub fn start(pid: u32, data: &Path) -> Result<MadviseTrace, String> {
        let perf = find_perf()?;
        ensure_tracefs()?;
        let _ = fs::remove_file(data);
        let child = Command::new(perf)
            .args([
                "record",
                "-q",
                "-e",
                "syscalls:sys_enter_madvise",
                "--filter",
            ])
            .arg(format!("behavior == {MADV_DONTNEED}"))
            .arg("-p")
            .arg(pid.to_string())
            .arg("-o")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting perf record: {e}"))?;
        let mut t = MadviseTrace {
            child,
            data: data.to_path_buf(),
        };
        // perf writes its header once attached.
        for _ in 0..100 {
            if fs::metadata(data).is_ok_and(|m| m.len() > 0) {
                break;
            }
            if let Ok(Some(st)) = t.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = t.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Err(format!("perf record exited at once ({st}): {}", err.trim()));
            }
            thread::sleep(Duration::from_millis(50));
        }
        thread::sleep(Duration::from_millis(300));
        Ok(t)
    }

    /// Stops perf and returns the calls in time order.
    pub fn stop(mut self) -> Result<Vec<Call>, String> {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let perf = find_perf()?;
        let out = Command::new(perf)
            .args(["script", "-F", "time,trace", "-i"])
            .arg(&self.data)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("perf script: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "perf script failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let _ = fs::remove_file(&self.data);
        Ok(parse_script(&String::from_utf8_lossy(&out.stdout)))
    }
}

impl Drop for MadviseTrace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hex_field(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let rest = rest.trim_start().strip_prefix("0x")?;
    let end = rest
        .find(|c: char| !c.is_ascii_hexdigit())
        .unwrap_or(rest.len());
    u64::from_str_radix(&rest[..end], 16).ok()
}

/// Parses `perf script -F time,trace` output for sys_enter_madvise.
pub fn parse_script(text: &str) -> Vec<Call> {
    let mut calls: Vec<Call> = text
        .lines()
        .filter_map(|line| {
            let (time, rest) = line.trim().split_once(':')?;
            let time_s: f64 = time.trim().parse().ok()?;
            Some(Call {
                time_s,
                start: hex_field(rest, "start:")?,
                len: hex_field(rest, "len_in:")?,
            })
        })
        .collect();
    calls.sort_by(|a, b| a.time_s.total_cmp(&b.time_s));
    calls
}

/// Sums the calls that fall inside `[start, start + len)` (guest RAM).
pub fn summarize(calls: &[Call], start: u64, len: u64) -> Summary {
    let mut s = Summary::default();
    for c in calls {
        if c.start >= start && c.start < start + len {
            s.calls += 1;
            s.bytes += c.len;
            s.first_s.get_or_insert(c.time_s);
            s.last_s = Some(c.time_s);
        } else {
            s.other_calls += 1;
        }
    }
    if let (Some(a), Some(b)) = (s.first_s, s.last_s) {
        s.span_s = b - a;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_perf_script_lines() {
        let text = "\
   123.500000: start: 0x7f0000001000, len_in: 0x00001000, behavior: 0x00000004
   123.250000:  start: 0x7f0000000000, len_in: 0x00100000, behavior: 0x00000004
garbage
   124.000000: start: 0x00001000, len_in: 0x00002000, behavior: 0x00000004
";
        let calls = parse_script(text);
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[0].time_s, 123.25);
        assert_eq!(calls[0].len, 0x100000);
        let s = summarize(&calls, 0x7f00_0000_0000, 1 << 30);
        assert_eq!((s.calls, s.bytes, s.other_calls), (2, 0x101000, 1));
        assert!((s.span_s - 0.25).abs() < 1e-9);
    }
}
