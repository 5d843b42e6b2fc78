//! Watching files L1 writes while it runs: its serial console (markers of the job's start
//! and exit, fatal errors of its init, lockups and stalls of its CPUs) and the job's
//! stdout (live progress).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A lockup or stall of L1 seen on its console: the attempt is killed when the job has
/// written nothing for this long since, and retried. (Seen: an L1 CPU that stopped
/// answering IPIs, with the other one stuck in smp_call_function_many_cond for good; and a
/// single "stuck for 110s" report, which is what a CPU that froze and came back leaves.)
pub const STALL_GRACE: Duration = Duration::from_secs(120);

const CONSOLE_START: &str = "EBB-TESTHOST scenario-start";
const CONSOLE_EXIT: &str = "EBB-TESTHOST scenario-exit";
pub const CONSOLE_FATAL: &str = "EBB-TESTHOST-FATAL";
const STALL_PATTERNS: &[&str] = &[
    "soft lockup",
    "hard LOCKUP",
    "self-detected stall",
    "detected stalls on CPU",
    "Kernel panic",
    "blocked for more than",
];

/// Reads a growing file incrementally, line by line.
pub struct Follow {
    path: PathBuf,
    file: Option<File>,
    data: Vec<u8>,
    /// Start of the first line not yet returned.
    line_start: usize,
}

impl Follow {
    pub fn new(path: PathBuf) -> Self {
        Follow {
            path,
            file: None,
            data: Vec::new(),
            line_start: 0,
        }
    }

    /// Reads what was appended and returns the lines completed since the last call.
    pub fn poll(&mut self) -> Vec<String> {
        if self.file.is_none() {
            self.file = File::open(&self.path).ok();
        }
        if let Some(f) = self.file.as_mut() {
            let _ = f.seek(SeekFrom::Start(self.data.len() as u64));
            let _ = f.read_to_end(&mut self.data);
        }
        let mut lines = Vec::new();
        while let Some(pos) = self.data[self.line_start..]
            .iter()
            .position(|&b| b == b'\n')
        {
            let end = self.line_start + pos;
            lines.push(String::from_utf8_lossy(&self.data[self.line_start..end]).into_owned());
            self.line_start = end + 1;
        }
        lines
    }

    /// Everything read so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// A stall report on the console, and how long the job has been quiet since.
struct Stall {
    line: String,
    quiet_since: Instant,
}

/// What L1's console said so far.
pub struct ConsoleWatch {
    follow: Follow,
    /// The job started (its marker arrived).
    pub started: Option<Instant>,
    /// The job exited (its marker arrived).
    pub exited: Option<Instant>,
    /// The first fatal error of L1's init.
    pub fatal: Option<String>,
    stall: Option<Stall>,
    /// Soft lockups reported so far: CPU -> seconds.
    lockups: HashMap<u32, u64>,
    /// A soft lockup reported again, longer: it lasts.
    persistent_lockup: bool,
}

impl ConsoleWatch {
    pub fn new(path: PathBuf) -> Self {
        ConsoleWatch {
            follow: Follow::new(path),
            started: None,
            exited: None,
            fatal: None,
            stall: None,
            lockups: HashMap::new(),
            persistent_lockup: false,
        }
    }

    /// Reads the new console lines.
    pub fn poll(&mut self) {
        for line in self.follow.poll() {
            let now = Instant::now();
            if self.started.is_none() && line.contains(CONSOLE_START) {
                self.started = Some(now);
            }
            if self.exited.is_none() && line.contains(CONSOLE_EXIT) {
                self.exited = Some(now);
            }
            if self.fatal.is_none() && line.contains(CONSOLE_FATAL) {
                self.fatal = Some(line.trim().to_string());
            }
            if lockup_persists(&mut self.lockups, &line) {
                self.persistent_lockup = true;
            }
            if self.stall.is_none() && is_stall_line(&line) {
                eprintln!(
                    "[testhost] L1 console: `{}`: giving up on this attempt if the job writes \
                     nothing for {STALL_GRACE:?}",
                    line.trim()
                );
                self.stall = Some(Stall {
                    line: line.trim().to_string(),
                    quiet_since: now,
                });
            }
        }
    }

    /// The job wrote something: a job that still writes is still running, L1 recovered.
    pub fn job_output(&mut self) {
        if let Some(s) = self.stall.as_mut() {
            s.quiet_since = Instant::now();
        }
    }

    /// The stall report, once L1 counts as stalled for good: a lockup reported again, or
    /// a stall after which the job stayed quiet for [`STALL_GRACE`].
    pub fn stalled(&self) -> Option<&str> {
        let s = self.stall.as_ref()?;
        (self.persistent_lockup || s.quiet_since.elapsed() > STALL_GRACE).then_some(&s.line)
    }

    /// The console so far.
    pub fn text(&self) -> String {
        self.follow.text()
    }
}

/// Whether an L1 console shows a lockup or stall report.
pub fn console_shows_stall(console: &str) -> bool {
    console.lines().any(is_stall_line)
}

fn is_stall_line(line: &str) -> bool {
    STALL_PATTERNS.iter().any(|p| line.contains(p))
}

/// Whether `line` reports a soft lockup that an earlier report (in `lockups`: CPU ->
/// seconds) already saw, now longer: the watchdog repeats itself while a lockup lasts.
/// One long report alone is a CPU that froze and came back.
fn lockup_persists(lockups: &mut HashMap<u32, u64>, line: &str) -> bool {
    soft_lockup(line).is_some_and(|(cpu, secs)| {
        lockups
            .insert(cpu, secs)
            .is_some_and(|before| before < secs)
    })
}

/// CPU and seconds of a soft lockup report (`... soft lockup - CPU#0 stuck for 52s! ...`).
fn soft_lockup(line: &str) -> Option<(u32, u64)> {
    let cpu = &line[line.find("soft lockup - CPU#")? + "soft lockup - CPU#".len()..];
    let cpu = cpu[..cpu.find(' ')?].parse().ok()?;
    let rest = &line[line.find("stuck for ")? + "stuck for ".len()..];
    Some((cpu, rest[..rest.find("s!")?].parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockup_reports_parse() {
        let l = "[  148.644770] watchdog: BUG: soft lockup - CPU#0 stuck for 52s! [qemu-system-x86:148]";
        assert_eq!(soft_lockup(l), Some((0, 52)));
        assert_eq!(soft_lockup("nothing"), None);
    }

    #[test]
    fn only_a_repeated_lockup_report_is_persistent() {
        let report = |cpu: u32, s: u64| {
            format!(
                "[  550.658926] watchdog: BUG: soft lockup - CPU#{cpu} stuck for {s}s! [vcpu0:185]"
            )
        };
        let mut seen = HashMap::new();
        // A CPU that froze for 110 s and came back reports once.
        assert!(!lockup_persists(&mut seen, &report(0, 110)));
        assert!(!lockup_persists(&mut seen, &report(1, 23)));
        assert!(!lockup_persists(&mut seen, "an ordinary line"));
        // Still stuck: the same CPU again, longer.
        assert!(lockup_persists(&mut seen, &report(1, 49)));
    }

    #[test]
    fn follow_returns_complete_lines() {
        let dir = std::env::temp_dir().join(format!("ebb-follow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let mut f = Follow::new(path.clone());
        assert!(f.poll().is_empty());
        std::fs::write(&path, "a\nb").unwrap();
        assert_eq!(f.poll(), vec!["a".to_string()]);
        std::fs::write(&path, "a\nbc\nd\n").unwrap();
        assert_eq!(f.poll(), vec!["bc".to_string(), "d".to_string()]);
        assert_eq!(f.text(), "a\nbc\nd\n");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_stall_report_then_the_console_watch_flags_it() {
        let dir = std::env::temp_dir().join(format!("ebb-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        std::fs::write(
            &path,
            "EBB-TESTHOST scenario-start\n\
             watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [x:1]\n",
        )
        .unwrap();
        let mut w = ConsoleWatch::new(path.clone());
        w.poll();
        assert!(w.started.is_some() && w.exited.is_none() && w.fatal.is_none());
        assert_eq!(w.stalled(), None, "one report: wait for the grace period");
        std::fs::write(
            &path,
            "EBB-TESTHOST scenario-start\n\
             watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [x:1]\n\
             watchdog: BUG: soft lockup - CPU#1 stuck for 49s! [x:1]\n",
        )
        .unwrap();
        w.poll();
        assert!(w.stalled().unwrap().contains("CPU#1 stuck for 23s"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
