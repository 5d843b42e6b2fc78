//! A running guest: spawning its VMM, driving it over the console (commands, events),
//! waiting for its exit, signals, and memory readings from /proc.

use std::io::{self, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::protocol::{console_reader, lock, stderr_reader, ConsoleState, Shared};
use super::{
    vmm_command, GuestArtifacts, GuestConfig, GuestError, Ready, Received, Result, Vmm, VmmKind,
    VmmRef, TAIL_LINES,
};
use crate::procfs;
use crate::text::{indent, tail};

/// How the VMM ended.
#[derive(Debug, Clone)]
pub struct GuestExit {
    pub status: ExitStatus,
    /// Everything the VMM wrote to stderr.
    pub stderr: String,
    /// From spawn to exit (as observed).
    pub elapsed: Duration,
}

fn check_kvm() -> Result<()> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) => Err(GuestError::Missing(format!(
            "/dev/kvm is not usable ({e}): run this through ebb_tests::testhost, which uses \
             the nested test host on machines without hardware KVM"
        ))),
    }
}

enum WaitEnd {
    Timeout,
    Eof,
}

/// The guest's `EBB-EVENT`s, readable from another thread while a command runs.
#[derive(Clone)]
pub struct EventView(Shared);

impl EventView {
    /// `EBB-EVENT` objects received so far.
    pub fn events(&self) -> Vec<Received> {
        lock(&self.0).events.clone()
    }
}

/// A running VMM with the default guest.
pub struct GuestVm {
    vmm: VmmRef,
    config: GuestConfig,
    argv: Vec<String>,
    child: Child,
    stdin: Option<ChildStdin>,
    spawned: Instant,
    shared: Shared,
    exit: Option<(ExitStatus, Instant)>,
}

impl GuestVm {
    /// Starts the VMM; time to ready counts from here.
    pub fn spawn(vmm: VmmRef, config: &GuestConfig) -> Result<GuestVm> {
        let artifacts = GuestArtifacts::locate()?;
        Self::spawn_with(vmm, config, &artifacts)
    }

    /// Starts the VMM with explicit artifacts.
    pub fn spawn_with(
        vmm: VmmRef,
        config: &GuestConfig,
        artifacts: &GuestArtifacts,
    ) -> Result<GuestVm> {
        check_kvm()?;
        let argv = vmm_command(vmm.as_ref(), config, artifacts)?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| GuestError::Spawn(format!("spawning {argv:?}: {e}")))?;
        let shared: Shared = Arc::new((Mutex::new(ConsoleState::default()), Condvar::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let echo = config.echo_console;
        {
            let shared = shared.clone();
            thread::Builder::new()
                .name("guest-console".into())
                .spawn(move || console_reader(stdout, shared, spawned, echo))
                .map_err(|e| GuestError::Spawn(format!("console reader thread: {e}")))?;
        }
        {
            let shared = shared.clone();
            thread::Builder::new()
                .name("guest-stderr".into())
                .spawn(move || stderr_reader(stderr, shared))
                .map_err(|e| GuestError::Spawn(format!("stderr reader thread: {e}")))?;
        }
        let stdin = child.stdin.take();
        Ok(GuestVm {
            vmm,
            config: config.clone(),
            argv,
            child,
            stdin,
            spawned,
            shared,
            exit: None,
        })
    }

    /// The VMM running the guest.
    pub fn vmm(&self) -> &dyn Vmm {
        self.vmm.as_ref()
    }

    /// Which VMM runs the guest.
    pub fn kind(&self) -> VmmKind {
        self.vmm.kind()
    }

    pub fn config(&self) -> &GuestConfig {
        &self.config
    }

    /// The VMM's command line.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When the VMM was spawned.
    pub fn spawned_at(&self) -> Instant {
        self.spawned
    }

    /// Guest RAM size in bytes (the size of the VMM's guest RAM mapping).
    pub fn memory_bytes(&self) -> u64 {
        self.config.memory_mib << 20
    }

    fn wait_for<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&ConsoleState) -> Option<T>,
    ) -> std::result::Result<T, WaitEnd> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared);
        loop {
            if let Some(v) = f(&st) {
                return Ok(v);
            }
            if st.stdout_eof {
                return Err(WaitEnd::Eof);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitEnd::Timeout);
            }
            st = self
                .shared
                .1
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The console transcript so far (lines without `\r`).
    pub fn transcript(&self) -> String {
        lock(&self.shared).transcript.clone()
    }

    /// What the VMM wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.shared).stderr).into_owned()
    }

    /// `EBB-EVENT` objects received so far.
    pub fn events(&self) -> Vec<Received> {
        lock(&self.shared).events.clone()
    }

    /// A view of the events that another thread can read.
    pub fn event_view(&self) -> EventView {
        EventView(self.shared.clone())
    }

    /// `EBB-RESULT` objects received so far.
    pub fn results(&self) -> Vec<Received> {
        lock(&self.shared).results.clone()
    }

    /// Marker lines whose JSON did not parse.
    pub fn malformed_lines(&self) -> Vec<String> {
        lock(&self.shared).malformed.clone()
    }

    /// A description of the VMM's state for error messages: exit status, what its threads
    /// are doing if it still runs (a hang is otherwise lost with the test host), console
    /// and stderr tails.
    pub fn diagnostics(&mut self) -> String {
        let status = match self.try_exit_status() {
            Some(st) => format!("exited with {st}"),
            None => format!(
                "still running; its threads:\n{}",
                indent(&procfs::thread_report(self.pid()))
            ),
        };
        format!(
            "{} (pid {}) {status}, {:.1} s after spawn\ncommand: {}\n--- console (tail) ---\n{}\n--- {} stderr (tail) ---\n{}",
            self.vmm.name(),
            self.pid(),
            self.spawned.elapsed().as_secs_f64(),
            self.argv.join(" "),
            indent(&tail(&self.transcript(), TAIL_LINES)),
            self.vmm.name(),
            indent(&tail(&self.stderr_text(), TAIL_LINES)),
        )
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exit = Some((st, Instant::now()));
            }
        }
        self.exit.map(|e| e.0)
    }

    fn wait_error(&mut self, end: WaitEnd, what: &str, timeout: Duration) -> GuestError {
        match end {
            WaitEnd::Timeout => GuestError::Timeout(format!(
                "{what}: nothing within {timeout:?}\n{}",
                self.diagnostics()
            )),
            WaitEnd::Eof => {
                // Let the exit status settle so the message can show it.
                for _ in 0..50 {
                    if self.try_exit_status().is_some() {
                        break;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                // The first line is all a summary keeps: say there why the VMM went.
                let status = self
                    .try_exit_status()
                    .map_or("still running".to_string(), |st| st.to_string());
                let stderr = self.stderr_text();
                let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
                GuestError::Exited(format!(
                    "{what}: the VMM closed the console ({status}; last stderr line: {})\n{}",
                    last.unwrap_or("none"),
                    self.diagnostics()
                ))
            }
        }
    }

    /// Waits for `EBB-READY`.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Ready> {
        match self.wait_for(timeout, |st| st.ready.clone()) {
            Ok(r) => Ok(r),
            Err(end) => Err(self.wait_error(end, "waiting for EBB-READY", timeout)),
        }
    }

    /// Writes one line to the guest's console.
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| GuestError::Io("the console input is closed".into()))?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .map_err(|e| GuestError::Io(format!("writing {line:?} to the console: {e}")))
    }

    /// Sends a protocol command and returns its `EBB-RESULT` object (the first result
    /// with the same `cmd` after sending), whatever its `ok`.
    pub fn command(&mut self, line: &str, timeout: Duration) -> Result<Value> {
        let name = line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let base = lock(&self.shared).results.len();
        self.send_line(line)?;
        let found = self.wait_for(timeout, |st| {
            st.results[base..]
                .iter()
                .find(|r| r.value.get("cmd").and_then(Value::as_str) == Some(name.as_str()))
                .map(|r| r.value.clone())
        });
        match found {
            Ok(v) => Ok(v),
            Err(end) => Err(self.wait_error(end, &format!("command `{line}`"), timeout)),
        }
    }

    /// Like [`GuestVm::command`], but a result with `ok: false` is an error.
    pub fn command_ok(&mut self, line: &str, timeout: Duration) -> Result<Value> {
        let v = self.command(line, timeout)?;
        if v.get("ok").and_then(Value::as_bool) == Some(true) {
            Ok(v)
        } else {
            Err(GuestError::Protocol(format!(
                "command `{line}` failed: {v}\n{}",
                self.diagnostics()
            )))
        }
    }

    /// Waits for an `EBB-EVENT` whose `event` field is `name`, received at any time.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        let found = self.wait_for(timeout, |st| {
            st.events
                .iter()
                .find(|r| r.value.get("event").and_then(Value::as_str) == Some(name))
                .map(|r| r.value.clone())
        });
        match found {
            Ok(v) => Ok(v),
            Err(end) => Err(self.wait_error(end, &format!("event `{name}`"), timeout)),
        }
    }

    /// Waits for the VMM to exit (it does not kill it on timeout).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<GuestExit> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.try_exit_status().is_some() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(GuestError::Timeout(format!(
                    "waiting for the VMM to exit: still running after {timeout:?}\n{}",
                    self.diagnostics()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
        let (status, at) = self.exit.expect("exit recorded");
        // The pipes close with the process (unless it left children holding them).
        let _ = self.wait_for(Duration::from_secs(2), |st| {
            (st.stdout_eof && st.stderr_eof).then_some(())
        });
        Ok(GuestExit {
            status,
            stderr: self.stderr_text(),
            elapsed: at.duration_since(self.spawned),
        })
    }

    /// Sends `poweroff`, checks its result and waits for the VMM to exit.
    pub fn poweroff(&mut self, timeout: Duration) -> Result<GuestExit> {
        let t0 = Instant::now();
        self.command_ok("poweroff", timeout)?;
        self.wait_exit(timeout.saturating_sub(t0.elapsed()))
    }

    /// Kills the VMM (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if self.try_exit_status().is_none() {
            let _ = self.child.kill();
            if let Ok(st) = self.child.wait() {
                self.exit = Some((st, Instant::now()));
            }
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the VMM process.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: kill(2) on our own child's pid (not yet reaped: `Drop` reaps it).
        if unsafe { libc::kill(self.pid() as libc::pid_t, signal) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The guest RAM mapping of the VMM (see [`procfs::guest_ram_rss_kib`]).
    pub fn guest_ram_mapping(&self) -> io::Result<procfs::Mapping> {
        let maps = procfs::smaps(self.pid())?;
        procfs::find_guest_ram(&maps, self.memory_bytes())
            .cloned()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no guest RAM mapping in process {}", self.pid()),
                )
            })
    }

    /// VmRSS of the VMM process (KiB).
    pub fn process_rss_kib(&self) -> io::Result<u64> {
        procfs::process_rss_kib(self.pid())
    }

    /// RSS of the guest RAM mapping (KiB); see [`procfs::guest_ram_rss_kib`].
    pub fn guest_ram_rss_kib(&self) -> io::Result<u64> {
        procfs::guest_ram_rss_kib(self.pid(), self.memory_bytes())
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        self.kill();
    }
}
