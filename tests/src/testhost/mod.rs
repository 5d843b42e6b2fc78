//! The test host layer: runs a job (a command, or a batch of scenarios) on a host that
//! can boot stock Linux guests.
//!
//! - [`HostMode::Direct`]: this machine has ordinary KVM (svm/vmx, no PVM): the command
//!   runs here as a child process.
//! - [`HostMode::Nested`]: `/dev/kvm` is PVM (`kvm_pvm`), unusable, or the CPU has no
//!   svm/vmx. The command runs in a nested emulated test host ("L1"): QEMU in TCG mode with
//!   `-cpu max` (which emulates AMD SVM) boots the Debian kernel with the initramfs from
//!   `resources/build-testhost.sh`; its init loads kvm-amd, mounts this machine's root
//!   read-only over 9p, mounts a writable run directory at the same absolute path, chroots
//!   and runs the command. Real KVM guests (L2) then run inside L1.
//!
//! Modules: [`mode`] (which of the two), `l1` (boot files, QEMU, the lock, L1's command
//! line), `console` (the console watcher), `rundir` (run directories, the job's script and
//! environment), `attempt` (one run of the job: a nested boot of L1 as a small state
//! machine, or a direct child process), `runner` (the one job runner and its one retry
//! policy: resume after L1 died, rerun what the emulation crashed).
//!
//! The mode is detected ([`HostMode::detect`]) and can be forced with
//! `EBB_TEST_HOST=direct|nested`. The job sees `EBB_SCENARIO_HOST=direct|nested`,
//! `EBB_CACHE_DIR` (absolute), `EBB_TARGET_DIR`, `EBB_RUN_DIR` (its run directory, which
//! its result lines name, see [`crate::results`]) and the same absolute paths as here.
//!
//! Only one L1 fits the machine (2 cores): nested runs are serialized across processes
//! with `flock` on `<target>/testhost/lock`. Batch scenarios into one run where possible.

mod attempt;
mod console;
mod l1;
pub mod mode;
mod rundir;
mod runner;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::paths;
use crate::text::{indent, tail};

pub use console::console_shows_stall;
pub use l1::{ensure_qemu, find_qemu, prepare_test_host_files, TestHostFiles};
pub use mode::HostMode;
pub use runner::{attempt_summary, run};

/// Environment variable that forces the mode: `direct` or `nested`.
pub const ENV_TEST_HOST: &str = "EBB_TEST_HOST";
/// Set for the job: `direct` or `nested`.
pub const ENV_SCENARIO_HOST: &str = "EBB_SCENARIO_HOST";
/// Set for the job: the cargo target directory.
pub const ENV_TARGET_DIR: &str = "EBB_TARGET_DIR";
/// What Ebb says when its guest triple-faults. In the emulated test host this also
/// happens at random to healthy guests (QEMU's TCG emulation of SVM): the runner reruns
/// such scenarios in a fresh L1, and the density run relaunches such a guest once.
pub const TRIPLE_FAULT_EXIT: &str = "triple fault (KVM_EXIT_SHUTDOWN)";

/// Lines of each log in error messages.
const TAIL_LINES: usize = 40;

/// What to run.
#[derive(Debug, Clone)]
pub struct Job {
    /// The command; `argv[0]` is an absolute path or a name found on `PATH`.
    pub argv: Vec<String>,
    /// Batch items appended to `argv` (`name` or `name:key=value...`), each reporting
    /// one result line ([`crate::results`]). The runner resumes a batch from its first
    /// item without a result after L1 died, and reruns items the emulation crashed.
    pub items: Vec<String>,
    /// Added to (and overriding) the environment the job gets.
    pub env: Vec<(String, String)>,
    /// Working directory; default: the repository root.
    pub cwd: Option<PathBuf>,
    /// Memory of the nested test host; size it for the guests the job runs (their sizes
    /// plus ~300 MiB for L1 itself).
    pub l1_memory_mib: u32,
    /// Limit for one attempt (boot, command, power-off). The run is killed after it.
    pub timeout: Duration,
    /// Nested mode: the attempt is killed once the job has printed nothing (stdout or
    /// stderr) for this long after it started, and fails as timed out (a test host
    /// short of memory without swap can thrash for hours without a kernel message).
    /// `None`: only `timeout` applies.
    pub quiet_timeout: Option<Duration>,
    /// Forces the mode; `None`: [`HostMode::detect`].
    pub mode: Option<HostMode>,
    /// Parameters for L1's kvm-amd module (`npt=0`, ...); nested mode only.
    pub kvm_amd_params: Vec<String>,
    /// Called with each line of the job's stdout as it arrives (live progress).
    pub on_stdout_line: Option<fn(&str)>,
}

impl Job {
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Job {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Job::default()
        }
    }

    /// `argv` followed by the items.
    pub fn command_line(&self) -> Vec<String> {
        self.argv.iter().chain(&self.items).cloned().collect()
    }

    /// Where the job runs.
    pub fn working_dir(&self) -> PathBuf {
        self.cwd.clone().unwrap_or_else(paths::repo_root)
    }
}

impl Default for Job {
    fn default() -> Self {
        Job {
            argv: Vec::new(),
            items: Vec::new(),
            env: Vec::new(),
            cwd: None,
            l1_memory_mib: 2048,
            timeout: Duration::from_secs(600),
            quiet_timeout: None,
            mode: None,
            kvm_amd_params: Vec::new(),
            on_stdout_line: None,
        }
    }
}

/// Wall-clock timings of a run, measured on this machine.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunTimings {
    /// Waiting for the test host lock.
    pub lock_wait: Duration,
    /// Building/checking the L1 boot files and QEMU (nested).
    pub prepare: Duration,
    /// L1 QEMU start until the job started (nested, last attempt).
    pub l1_boot_to_scenario: Option<Duration>,
    /// The job itself (nested: between the console markers).
    pub scenario: Option<Duration>,
    /// Job exit until L1 QEMU exited (nested).
    pub l1_shutdown: Option<Duration>,
    /// The whole call, all attempts included.
    pub total: Duration,
}

/// The result of a job that ran to completion (whatever its exit status).
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub mode: HostMode,
    /// Exit status of the last attempt: the exit code, or 128 + signal number when killed
    /// by a signal (0 when reruns replaced every failure).
    pub status: i32,
    /// Every attempt's stdout, in order.
    pub stdout: String,
    pub stderr: String,
    /// The L1 serial console (kernel log, init messages, the job's output): nested only.
    pub console_log: String,
    /// The last attempt's run directory (scenario.sh, stdout, stderr, status, console.log).
    pub out_dir: PathBuf,
    /// L1 boots (or direct runs) the job took.
    pub attempts: u32,
    pub timings: RunTimings,
    /// The job's result lines ([`crate::results`]); for a batch, one per item that
    /// reported, a rerun's replacing the earlier one (kept in `earlier_attempts`).
    pub results: Vec<Value>,
}

impl RunOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }

    /// `Ok` when the job exited 0, else an error with the output tails.
    pub fn ensure_success(&self) -> Result<(), Error> {
        if self.success() {
            return Ok(());
        }
        Err(Error::Failed(format!(
            "job exited with status {} ({} mode, run dir {})\n{}",
            self.status,
            self.mode,
            self.out_dir.display(),
            self.report()
        )))
    }

    /// The tails of stdout, stderr and (nested) the L1 console, for messages.
    pub fn report(&self) -> String {
        report(&self.stdout, &self.stderr, &self.console_log)
    }

    /// The result line named `name` (a batch item's scenario).
    pub fn result(&self, name: &str) -> Option<&Value> {
        self.results.iter().find(|r| r["name"] == name)
    }

    /// A readable list of the items that failed or did not report, with their errors;
    /// empty when all of `expected` passed.
    pub fn failures(&self, expected: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for name in expected {
            match self.result(name) {
                None => out.push(format!("{name}: no result line (the runner died?)")),
                Some(r) if r["ok"] != true => {
                    let mut text = format!("{name}: FAILED: {}", error_text(r));
                    if let Some(e) = r["rerun_error"].as_str() {
                        text.push_str(&format!("\n(a rerun in a fresh test host failed: {e})"));
                    }
                    out.push(text)
                }
                Some(_) => {}
            }
        }
        out
    }
}

/// The error text of a result line.
pub fn error_text(result: &Value) -> &str {
    result["error"].as_str().unwrap_or("(no error text)")
}

fn report(stdout: &str, stderr: &str, console: &str) -> String {
    let mut s = format!(
        "--- job stdout (tail) ---\n{}\n--- job stderr (tail) ---\n{}",
        indent(&tail(stdout, TAIL_LINES)),
        indent(&tail(stderr, TAIL_LINES)),
    );
    if !console.is_empty() {
        s.push_str(&format!(
            "\n--- L1 console (tail) ---\n{}",
            indent(&tail(console, TAIL_LINES + 20))
        ));
    }
    s
}

/// Why a run did not produce an exit status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The harness could not prepare the run (bad input, missing tools, build failure).
    #[error("test host setup failed: {0}")]
    Setup(String),
    /// The test host itself is broken (its init reported a fatal error).
    #[error("test host failed: {0}")]
    TestHost(String),
    /// The attempt limit was reached.
    #[error("job timed out: {0}")]
    Timeout(String),
    /// The run ended without an exit status (L1 crashed, stalled, ...), or the job
    /// failed ([`RunOutput::ensure_success`]).
    #[error("job failed: {0}")]
    Failed(String),
}

fn setup_err(context: impl fmt::Display) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::Setup(format!("{context}: {e}"))
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
