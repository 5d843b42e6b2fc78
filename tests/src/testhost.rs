//! Runs a scenario command on a host that can boot stock Linux guests.
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
//! The mode is detected ([`HostMode::detect`]) and can be forced with
//! `EBB_TEST_HOST=direct|nested`. The scenario sees `EBB_SCENARIO_HOST=direct|nested`,
//! `EBB_CACHE_DIR` (absolute) and `EBB_TARGET_DIR`, and the same absolute paths as here.
//!
//! Only one L1 fits the machine (2 cores): nested runs are serialized across processes
//! with `flock` on `<target>/testhost/lock`. Batch scenarios into one run where possible.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::paths;
use crate::text::{indent, shell_quote, tail};

/// Environment variable that forces the mode: `direct` or `nested`.
pub const ENV_TEST_HOST: &str = "EBB_TEST_HOST";
/// Set for the scenario command: `direct` or `nested`.
pub const ENV_SCENARIO_HOST: &str = "EBB_SCENARIO_HOST";
/// Set for the scenario command: the cargo target directory.
pub const ENV_TARGET_DIR: &str = "EBB_TARGET_DIR";

/// A lockup or stall of L1 seen on its console: the attempt is killed when the scenario
/// has written nothing for this long since, and retried. (Seen: an L1 CPU that stopped
/// answering IPIs, with the other one stuck in smp_call_function_many_cond for good; and a
/// single "stuck for 110s" report, which is what a CPU that froze and came back leaves.)
const STALL_GRACE: Duration = Duration::from_secs(120);
/// Attempts of one nested run at most. Beyond the second, an attempt is only made while
/// each one gets further than the one before (see [`Scenario::resume`]).
const MAX_ATTEMPTS: u32 = 4;
/// How long L1 may take to power off after the scenario's status was written.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);
/// Run directories kept under `<target>/testhost/runs`.
const RUNS_KEPT: usize = 40;
/// Lines of each log in error messages.
const TAIL_LINES: usize = 40;

const CONSOLE_START: &str = "EBB-TESTHOST scenario-start";
const CONSOLE_EXIT: &str = "EBB-TESTHOST scenario-exit";
const CONSOLE_FATAL: &str = "EBB-TESTHOST-FATAL";
const STALL_PATTERNS: &[&str] = &[
    "soft lockup",
    "hard LOCKUP",
    "self-detected stall",
    "detected stalls on CPU",
    "Kernel panic",
    "blocked for more than",
];

/// Where scenarios run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostMode {
    /// On this machine (ordinary KVM).
    Direct,
    /// In the nested emulated test host (QEMU TCG + emulated SVM).
    Nested,
}

impl HostMode {
    pub fn as_str(self) -> &'static str {
        match self {
            HostMode::Direct => "direct",
            HostMode::Nested => "nested",
        }
    }

    /// The mode to use: `EBB_TEST_HOST` when set, else what [`HostMode::probe`] finds.
    pub fn detect() -> Result<HostMode, Error> {
        match std::env::var(ENV_TEST_HOST) {
            Ok(v) if !v.is_empty() => v.parse(),
            _ => Ok(Self::probe().0),
        }
    }

    /// What this machine needs, ignoring the override, with the reason.
    pub fn probe() -> (HostMode, String) {
        if Path::new("/sys/module/kvm_pvm").exists() {
            return (
                HostMode::Nested,
                "kvm_pvm is loaded: /dev/kvm is PVM and cannot boot a stock Linux kernel".into(),
            );
        }
        if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            return (HostMode::Nested, format!("/dev/kvm is not usable: {e}"));
        }
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let has_flag = |flag: &str| {
            cpuinfo
                .lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|w| w == flag))
        };
        if !has_flag("svm") && !has_flag("vmx") {
            return (
                HostMode::Nested,
                "/proc/cpuinfo has no svm/vmx flag: no hardware virtualization".into(),
            );
        }
        (
            HostMode::Direct,
            "/dev/kvm is usable and the CPU has hardware virtualization".into(),
        )
    }
}

impl fmt::Display for HostMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for HostMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "direct" => Ok(HostMode::Direct),
            "nested" => Ok(HostMode::Nested),
            other => Err(Error::Setup(format!(
                "{ENV_TEST_HOST}={other}: expected `direct` or `nested`"
            ))),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The command; `argv[0]` is an absolute path or a name found on `PATH`.
    pub argv: Vec<String>,
    /// Added to (and overriding) the environment the scenario gets.
    pub env: Vec<(String, String)>,
    /// Working directory; default: the repository root.
    pub cwd: Option<PathBuf>,
    /// Memory of the nested test host; size it for the guests the scenario runs
    /// (their sizes plus ~300 MiB for L1 itself).
    pub l1_memory_mib: u32,
    /// Limit for one attempt (boot, command, power-off). The run is killed after it.
    pub timeout: Duration,
    /// Forces the mode; `None`: [`HostMode::detect`].
    pub mode: Option<HostMode>,
    /// Nested mode: what the next attempt runs after L1 died or stalled, given this
    /// attempt's scenario and the stdout it left (e.g. a batch without the items that
    /// already reported). `None`: the same scenario again.
    pub resume: Option<Resume>,
}

/// See [`Scenario::resume`].
pub type Resume = fn(&Scenario, &str) -> Scenario;

impl Scenario {
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Scenario {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Scenario::default()
        }
    }
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            argv: Vec::new(),
            env: Vec::new(),
            cwd: None,
            l1_memory_mib: 2048,
            timeout: Duration::from_secs(600),
            mode: None,
            resume: None,
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
    /// L1 QEMU start until the scenario command started (nested, last attempt).
    pub l1_boot_to_scenario: Option<Duration>,
    /// The scenario command itself (nested: between the console markers).
    pub scenario: Option<Duration>,
    /// Scenario exit until L1 QEMU exited (nested).
    pub l1_shutdown: Option<Duration>,
    /// The whole call, all attempts included.
    pub total: Duration,
}

/// The result of a scenario that ran to completion (whatever its exit status).
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub mode: HostMode,
    /// Exit status: the exit code, or 128 + signal number when killed by a signal.
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    /// The L1 serial console (kernel log, init messages, the scenario's output): nested only.
    pub console_log: String,
    /// The run directory (scenario.sh, stdout, stderr, status, console.log).
    pub out_dir: PathBuf,
    /// 1, or more when attempts died without an exit status and were retried (their
    /// stdout comes first in `stdout`).
    pub attempts: u32,
    pub timings: RunTimings,
}

impl RunOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }

    /// `Ok` when the scenario exited 0, else an error with the output tails.
    pub fn ensure_success(&self) -> Result<(), Error> {
        if self.success() {
            return Ok(());
        }
        Err(Error::Failed(format!(
            "scenario exited with status {} ({} mode, run dir {})\n{}",
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
}

fn report(stdout: &str, stderr: &str, console: &str) -> String {
    let mut s = format!(
        "--- scenario stdout (tail) ---\n{}\n--- scenario stderr (tail) ---\n{}",
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
    #[error("scenario timed out: {0}")]
    Timeout(String),
    /// The run ended without an exit status (L1 crashed, stalled, ...), or the scenario
    /// failed ([`RunOutput::ensure_success`]).
    #[error("scenario failed: {0}")]
    Failed(String),
}

fn setup_err(context: impl fmt::Display) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::Setup(format!("{context}: {e}"))
}

/// Runs `scenario` in the mode detected for this machine (or the one it forces).
pub fn run(scenario: &Scenario) -> Result<RunOutput, Error> {
    let mode = match scenario.mode {
        Some(m) => m,
        None => HostMode::detect()?,
    };
    if scenario.argv.is_empty() {
        return Err(Error::Setup("empty argv".into()));
    }
    match mode {
        HostMode::Direct => run_direct(scenario),
        HostMode::Nested => run_nested(scenario),
    }
}

static RUN_SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under `<target>/testhost/runs/` (old ones are pruned).
fn new_run_dir(tag: &str) -> Result<PathBuf, Error> {
    let runs = paths::target_dir().join("testhost").join("runs");
    fs::create_dir_all(&runs).map_err(setup_err(format!("creating {}", runs.display())))?;
    prune_runs(&runs);
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let seq = RUN_SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = runs.join(format!("{stamp}-{}-{seq}-{tag}", std::process::id()));
    fs::create_dir(&dir).map_err(setup_err(format!("creating {}", dir.display())))?;
    Ok(dir)
}

fn prune_runs(runs: &Path) {
    let Ok(entries) = fs::read_dir(runs) else {
        return;
    };
    let mut dirs: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if dirs.len() <= RUNS_KEPT {
        return;
    }
    dirs.sort();
    let excess = dirs.len() - RUNS_KEPT;
    for (_, dir) in dirs.into_iter().take(excess) {
        let _ = fs::remove_dir_all(dir);
    }
}

/// The environment the scenario sees in nested mode: a curated set from this process
/// (the chroot is another machine's view of this root; most of our environment would be
/// meaningless or harmful there) plus the harness variables and the scenario's own.
fn nested_env(scenario: &Scenario) -> Vec<(String, String)> {
    const INHERITED: &[&str] = &[
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LC_ALL",
        "TZ",
        "RUST_BACKTRACE",
        "RUST_LOG",
        "CARGO_TARGET_DIR",
        "XDG_CACHE_HOME",
        "CI",
    ];
    let mut env: Vec<(String, String)> = Vec::new();
    for (k, v) in std::env::vars() {
        let keep = INHERITED.contains(&k.as_str()) || (k.starts_with("EBB_") && k != ENV_TEST_HOST);
        if keep {
            env.push((k, v));
        }
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push((
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ));
    }
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".into(), "/root".into()));
    }
    merge_env(&mut env, harness_env(HostMode::Nested));
    merge_env(&mut env, scenario.env.clone());
    env
}

fn harness_env(mode: HostMode) -> Vec<(String, String)> {
    vec![
        ("EBB_CACHE_DIR".into(), path_str(&paths::cache_dir())),
        (ENV_TARGET_DIR.into(), path_str(&paths::target_dir())),
        (ENV_SCENARIO_HOST.into(), mode.as_str().into()),
    ]
}

fn merge_env(env: &mut Vec<(String, String)>, extra: Vec<(String, String)>) {
    for (k, v) in extra {
        env.retain(|(ek, _)| *ek != k);
        env.push((k, v));
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn scenario_cwd(scenario: &Scenario) -> PathBuf {
    scenario.cwd.clone().unwrap_or_else(paths::repo_root)
}

/// The shell script L1's init runs in the chroot (with the outer /bin/sh).
fn scenario_script(scenario: &Scenario, env: &[(String, String)]) -> Result<String, Error> {
    let cwd = scenario_cwd(scenario);
    if scenario.argv[0].contains('=') {
        return Err(Error::Setup(format!(
            "argv[0] {:?} contains '=' (env(1) would take it for a variable)",
            scenario.argv[0]
        )));
    }
    let mut s =
        String::from("# Generated by ebb_tests::testhost; run by the L1 init in the chroot.\n");
    let cwd = path_str(&cwd);
    s.push_str(&format!(
        "cd {q} || {{ echo \"scenario: cannot cd to \"{q} >&2; exit 125; }}\n",
        q = shell_quote(&cwd)
    ));
    s.push_str("exec env -i");
    for (k, v) in env {
        if k.is_empty() || k.contains('=') {
            return Err(Error::Setup(format!("bad environment variable name {k:?}")));
        }
        s.push_str(" \\\n    ");
        s.push_str(&shell_quote(&format!("{k}={v}")));
    }
    for a in &scenario.argv {
        s.push_str(" \\\n    ");
        s.push_str(&shell_quote(a));
    }
    s.push('\n');
    Ok(s)
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn status_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Kills the child when this thread's process dies (QEMU must not outlive a test).
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------------------------
// Direct mode

fn run_direct(scenario: &Scenario) -> Result<RunOutput, Error> {
    let t0 = Instant::now();
    let dir = new_run_dir("direct")?;
    let mut cmd = Command::new(&scenario.argv[0]);
    cmd.args(&scenario.argv[1..])
        .current_dir(scenario_cwd(scenario))
        .envs(harness_env(HostMode::Direct))
        .envs(scenario.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(setup_err(format!("spawning {:?}", scenario.argv[0])))?;
    let out = copy_to_file(child.stdout.take(), dir.join("stdout"));
    let err = copy_to_file(child.stderr.take(), dir.join("stderr"));
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .map_err(setup_err("waiting for the scenario"))?
        {
            break Some(st);
        }
        if started.elapsed() > scenario.timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let Some(status) = status else {
        return Err(Error::Timeout(format!(
            "{:?} did not finish within {:?} (direct mode, run dir {})\n{}",
            scenario.argv,
            scenario.timeout,
            dir.display(),
            report(&stdout, &stderr, "")
        )));
    };
    let status = status_code(status);
    let _ = fs::write(dir.join("status"), format!("{status}\n"));
    Ok(RunOutput {
        mode: HostMode::Direct,
        status,
        stdout,
        stderr,
        console_log: String::new(),
        out_dir: dir,
        attempts: 1,
        timings: RunTimings {
            scenario: Some(started.elapsed()),
            total: t0.elapsed(),
            ..RunTimings::default()
        },
    })
}

fn copy_to_file<R: Read + Send + 'static>(
    src: Option<R>,
    path: PathBuf,
) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let Some(mut src) = src else {
            return String::new();
        };
        let mut file = File::create(&path).ok();
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    if let Some(f) = file.as_mut() {
                        let _ = f.write_all(&buf[..n]);
                    }
                }
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    })
}

// ---------------------------------------------------------------------------------------
// Nested mode

/// Holds the cross-process test host lock while alive.
struct HostLock {
    _file: File,
}

fn lock_test_host() -> Result<HostLock, Error> {
    let dir = paths::target_dir().join("testhost");
    fs::create_dir_all(&dir).map_err(setup_err(format!("creating {}", dir.display())))?;
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(setup_err(format!("opening {}", path.display())))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!(
            "[testhost] another process is using the test host; waiting for {}",
            path.display()
        );
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::Setup(format!(
                "flock {}: {}",
                path.display(),
                io::Error::last_os_error()
            )));
        }
    }
    Ok(HostLock { _file: file })
}

/// The L1 boot files made by resources/build-testhost.sh.
#[derive(Debug, Clone)]
pub struct TestHostFiles {
    pub dir: PathBuf,
    /// The kernel QEMU boots: the ELF vmlinux (PVH entry, no decompression under TCG)
    /// when present, else the bzImage.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The L1 kernel's full module tree (for `modprobe -d` inside L1), when known.
    pub modtree: Option<PathBuf>,
}

/// Builds (or finds up to date) the L1 boot files: runs resources/build-testhost.sh.
pub fn prepare_test_host_files() -> Result<TestHostFiles, Error> {
    let script = paths::resources_dir().join("build-testhost.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("EBB_CACHE_DIR", paths::cache_dir())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(setup_err(format!("running {}", script.display())))?;
    if !out.status.success() {
        return Err(Error::Setup(format!(
            "{} failed ({}); its messages are above",
            script.display(),
            out.status
        )));
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let initramfs = dir.join("initramfs.cpio.gz");
    let kernel = [dir.join("vmlinux"), dir.join("vmlinuz")]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Setup(format!("no vmlinux/vmlinuz in {}", dir.display())))?;
    if !initramfs.is_file() {
        return Err(Error::Setup(format!(
            "no initramfs.cpio.gz in {}",
            dir.display()
        )));
    }
    let modtree = fs::read_to_string(dir.join("modtree"))
        .ok()
        .map(|s| PathBuf::from(s.trim()))
        .filter(|p| p.is_dir());
    Ok(TestHostFiles {
        dir,
        kernel,
        initramfs,
        modtree,
    })
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Finds qemu-system-x86_64, installing Debian's qemu-system-x86 when missing.
pub fn ensure_qemu() -> Result<PathBuf, Error> {
    if let Some(p) = find_in_path("qemu-system-x86_64") {
        return Ok(p);
    }
    let common = paths::resources_dir().join("common.sh");
    eprintln!("[testhost] qemu-system-x86_64 not found: installing qemu-system-x86");
    let status = Command::new("bash")
        .arg("-c")
        .arg(r#". "$1" && ensure_packages qemu-system-x86"#)
        .arg("ensure-qemu")
        .arg(&common)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(setup_err("running ensure_packages qemu-system-x86"))?;
    if !status.success() {
        return Err(Error::Setup(format!(
            "could not install qemu-system-x86 ({status}); install it with \
             `apt-get install qemu-system-x86`"
        )));
    }
    find_in_path("qemu-system-x86_64").ok_or_else(|| {
        Error::Setup("qemu-system-x86 is installed but qemu-system-x86_64 is not on PATH".into())
    })
}

/// Directories L1's init covers with scratch tmpfs mounts of its own: outer paths under
/// them that a run needs are bound through (`ebbth.keep=`), see [`paths_to_keep`].
const SCRATCH_MOUNTS: &[&str] = &["/tmp", "/run", "/dev/shm"];
/// Directories L1 mounts its own kernel's views on: nothing of the outer machine there.
const L1_OWN_MOUNTS: &[&str] = &["/proc", "/sys", "/dev"];

/// Of the outer directories a run needs (`(what, path)`), those under L1's scratch
/// mounts, without the ones inside another: L1 binds each through from its view of the
/// outer root, so a checkout, target directory or cache under /tmp works as anywhere else.
fn paths_to_keep(needed: &[(&str, &Path)]) -> Result<Vec<PathBuf>, Error> {
    let mut keep: Vec<PathBuf> = Vec::new();
    for (what, p) in needed {
        let s = path_str(p);
        if !p.is_absolute() {
            return Err(Error::Setup(format!("{what} {s} is not absolute")));
        }
        if SCRATCH_MOUNTS.iter().any(|m| *p == Path::new(m)) {
            return Err(Error::Setup(format!(
                "{what} is {s} itself, which the test host replaces by a scratch tmpfs: use \
                 a directory below it or elsewhere"
            )));
        }
        if SCRATCH_MOUNTS.iter().any(|m| p.starts_with(m)) {
            if s.contains([',', ' ', '\t', '\n', '"']) {
                return Err(Error::Setup(format!(
                    "{what} {s} contains a comma, quote or white space (the test host's \
                     kernel command line cannot carry it)"
                )));
            }
            keep.push(p.to_path_buf());
        } else if let Some(m) = L1_OWN_MOUNTS.iter().find(|m| p.starts_with(m)) {
            return Err(Error::Setup(format!(
                "{what} {s} is under {m}, where the test host mounts its own kernel's view: \
                 use a directory elsewhere"
            )));
        }
    }
    keep.sort();
    keep.dedup();
    let all = keep.clone();
    keep.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q)));
    Ok(keep)
}

/// How one L1 attempt ended.
enum Attempt {
    /// The scenario ran and left its status.
    Done(RunOutput),
    /// Worth a retry (no status: crash, stall, L1 that never reached the scenario).
    Retry {
        why: String,
        /// What the scenario wrote to stdout before the attempt ended.
        stdout: String,
    },
    /// Final.
    Fail(Error),
}

fn run_nested(scenario: &Scenario) -> Result<RunOutput, Error> {
    let t0 = Instant::now();
    let target = paths::target_dir();
    let cache = paths::cache_dir();
    let cwd = scenario_cwd(scenario);
    let keep = paths_to_keep(&[
        ("the cargo target directory", &target),
        ("the Ebb cache directory (EBB_CACHE_DIR)", &cache),
        ("the working directory", &cwd),
    ])?;
    let lock = lock_test_host()?;
    let lock_wait = t0.elapsed();
    let t_prep = Instant::now();
    let qemu = ensure_qemu()?;
    let files = prepare_test_host_files()?;
    let prepare = t_prep.elapsed();

    let mut current = scenario.clone();
    let mut earlier_stdout = String::new();
    let mut failures: Vec<String> = Vec::new();
    let mut fruitless = 0;
    for attempt in 1..=MAX_ATTEMPTS {
        let script = scenario_script(&current, &nested_env(&current))?;
        let dir = new_run_dir(&format!("nested-a{attempt}"))?;
        match nested_attempt(&current, &qemu, &files, &keep, &dir, &script) {
            Attempt::Done(mut out) => {
                drop(lock);
                earlier_stdout.push_str(&out.stdout);
                out.stdout = earlier_stdout;
                out.attempts = attempt;
                out.timings.lock_wait = lock_wait;
                out.timings.prepare = prepare;
                out.timings.total = t0.elapsed();
                return Ok(out);
            }
            Attempt::Fail(e) => return Err(e),
            Attempt::Retry { why, stdout } => {
                let next = match scenario.resume {
                    Some(resume) => resume(&current, &stdout),
                    None => current.clone(),
                };
                fruitless = if next.argv != current.argv {
                    0
                } else {
                    fruitless + 1
                };
                earlier_stdout.push_str(&stdout);
                if !earlier_stdout.is_empty() && !earlier_stdout.ends_with('\n') {
                    earlier_stdout.push('\n');
                }
                failures.push(why);
                if fruitless >= 2 || attempt == MAX_ATTEMPTS {
                    return Err(Error::Failed(attempts_failed(&failures)));
                }
                eprintln!(
                    "[testhost] attempt {attempt} ended without an exit status; retrying{}. \
                     Reason:\n{}",
                    if next.argv != current.argv {
                        " with what had not finished"
                    } else {
                        ""
                    },
                    failures.last().map(String::as_str).unwrap_or_default()
                );
                current = next;
            }
        }
    }
    unreachable!("the last attempt returns")
}

/// The error for a run whose every attempt died: one line per attempt first (error
/// output gets cut short), then each attempt's details.
fn attempts_failed(failures: &[String]) -> String {
    let mut s = format!(
        "the test host died without an exit status {} times in a row:\n",
        failures.len()
    );
    for (i, why) in failures.iter().enumerate() {
        s.push_str(&format!(
            "  attempt {}: {}\n",
            i + 1,
            why.lines().next().unwrap_or_default()
        ));
    }
    for (i, why) in failures.iter().enumerate().rev() {
        s.push_str(&format!("== attempt {} ==\n{why}\n", i + 1));
    }
    s
}

/// Reads a growing file incrementally, line by line.
struct Follow {
    path: PathBuf,
    file: Option<File>,
    data: Vec<u8>,
    /// Start of the first line not yet returned.
    line_start: usize,
}

impl Follow {
    fn new(path: PathBuf) -> Self {
        Follow {
            path,
            file: None,
            data: Vec::new(),
            line_start: 0,
        }
    }

    /// Reads what was appended and returns the lines completed since the last call.
    fn poll(&mut self) -> Vec<String> {
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

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
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

fn l1_command(
    qemu: &Path,
    files: &TestHostFiles,
    scenario: &Scenario,
    keep: &[PathBuf],
    dir: &Path,
) -> Result<Command, Error> {
    let dir_s = path_str(dir);
    if dir_s.contains([',', ' ', '\t', '\n', '"']) {
        return Err(Error::Setup(format!(
            "run directory {dir_s} contains a comma, quote or white space (QEMU -virtfs and \
             the kernel command line cannot carry it)"
        )));
    }
    let mut append = vec![
        "console=ttyS0".to_string(),
        "panic=-1".into(),
        // TCG is slow enough without speculative-execution mitigations.
        "mitigations=off".into(),
        // Keep the TSC clocksource: the watchdog would otherwise switch to HPET, whose
        // emulated reads are slow, when TCG's TSC looks unstable.
        "tsc=reliable".into(),
        format!("ebbth.out={dir_s}"),
    ];
    if !keep.is_empty() {
        let keep: Vec<String> = keep.iter().map(|p| path_str(p)).collect();
        append.push(format!("ebbth.keep={}", keep.join(",")));
    }
    if let Some(m) = &files.modtree {
        let m = path_str(m);
        if !m.contains(char::is_whitespace) {
            append.push(format!("ebbth.modtree={m}"));
        }
    }
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"])
        .args(["-machine", "q35", "-m"])
        .arg(scenario.l1_memory_mib.to_string())
        .args(["-nographic", "-no-reboot", "-monitor", "none"])
        .arg("-kernel")
        .arg(&files.kernel)
        .arg("-initrd")
        .arg(&files.initramfs)
        .arg("-append")
        .arg(append.join(" "))
        .args([
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={dir_s},mount_tag=out,security_model=none,multidevs=remap"
        ))
        .arg("-serial")
        .arg(format!("file:{dir_s}/console.log"))
        .stdin(Stdio::null());
    let qout = File::create(dir.join("qemu.log"))
        .map_err(setup_err(format!("creating {}/qemu.log", dir.display())))?;
    let qerr = qout
        .try_clone()
        .map_err(setup_err("duplicating the qemu.log handle"))?;
    cmd.stdout(qout).stderr(qerr);
    die_with_parent(&mut cmd);
    Ok(cmd)
}

fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn nested_attempt(
    scenario: &Scenario,
    qemu: &Path,
    files: &TestHostFiles,
    keep: &[PathBuf],
    dir: &Path,
    script: &str,
) -> Attempt {
    if let Err(e) = fs::write(dir.join("scenario.sh"), script) {
        return Attempt::Fail(Error::Setup(format!("writing scenario.sh: {e}")));
    }
    let mut cmd = match l1_command(qemu, files, scenario, keep, dir) {
        Ok(c) => c,
        Err(e) => return Attempt::Fail(e),
    };
    let _ = fs::write(dir.join("qemu.cmdline"), format!("{cmd:?}\n"));
    let t_spawn = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Attempt::Fail(Error::Setup(format!("spawning {}: {e}", qemu.display()))),
    };
    let mut console = Follow::new(dir.join("console.log"));
    let status_path = dir.join("status");
    let mut t_start: Option<Instant> = None;
    let mut t_exit: Option<Instant> = None;
    let mut t_finished: Option<Instant> = None;
    let mut stall: Option<(Instant, String)> = None;
    // Soft lockups reported so far: CPU -> seconds.
    let mut lockups: HashMap<u32, u64> = HashMap::new();
    let mut output_len = 0;
    let mut fatal = false;
    let mut timed_out = false;
    let mut stalled = false;
    let mut persistent_stall = false;
    let qemu_status = loop {
        for line in console.poll() {
            if t_start.is_none() && line.contains(CONSOLE_START) {
                t_start = Some(Instant::now());
            }
            if t_exit.is_none() && line.contains(CONSOLE_EXIT) {
                t_exit = Some(Instant::now());
            }
            if line.contains(CONSOLE_FATAL) {
                fatal = true;
            }
            if lockup_persists(&mut lockups, &line) {
                persistent_stall = true;
            }
            if stall.is_none() && is_stall_line(&line) {
                eprintln!(
                    "[testhost] L1 console: `{}`: giving up on this attempt if the scenario \
                     writes nothing for {STALL_GRACE:?}",
                    line.trim()
                );
                stall = Some((Instant::now(), line.trim().to_string()));
            }
        }
        if let Some((since, _)) = stall.as_mut() {
            // A scenario that still writes is still running: L1 recovered.
            let len = file_len(&dir.join("stdout")) + file_len(&dir.join("stderr"));
            if len > output_len {
                output_len = len;
                *since = Instant::now();
            }
        }
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(e) => {
                kill_child(&mut child);
                return Attempt::Fail(Error::Setup(format!("waiting for QEMU: {e}")));
            }
        }
        let now = Instant::now();
        if t_finished.is_none() && (t_exit.is_some() || status_path.exists()) {
            t_finished = Some(now);
        }
        if let Some(since) = t_finished {
            if now.duration_since(since) > POWEROFF_GRACE {
                // The result is in; L1 just did not power off.
                kill_child(&mut child);
                break None;
            }
        } else if now.duration_since(t_spawn) > scenario.timeout {
            timed_out = true;
            kill_child(&mut child);
            break None;
        } else if let Some((since, _)) = &stall {
            if persistent_stall || now.duration_since(*since) > STALL_GRACE {
                stalled = true;
                kill_child(&mut child);
                break None;
            }
        }
        thread::sleep(Duration::from_millis(100));
    };
    let t_end = Instant::now();
    let _ = console.poll();
    let console_log = console.text();
    let stdout = read_lossy(&dir.join("stdout"));
    let stderr = read_lossy(&dir.join("stderr"));
    let status: Option<i32> = fs::read_to_string(&status_path)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let qemu_log = read_lossy(&dir.join("qemu.log"));
    let mut details = format!(
        "run dir {}; QEMU {}\n",
        dir.display(),
        match qemu_status {
            Some(st) => format!("exited with {st}"),
            None => "was killed".into(),
        }
    );
    if !qemu_log.trim().is_empty() {
        details.push_str(&format!(
            "--- QEMU output (tail) ---\n{}\n",
            indent(&tail(&qemu_log, 20))
        ));
    }
    details.push_str(&report(&stdout, &stderr, &console_log));

    if let Some(status) = status {
        return Attempt::Done(RunOutput {
            mode: HostMode::Nested,
            status,
            stdout,
            stderr,
            console_log,
            out_dir: dir.to_path_buf(),
            attempts: 1,
            timings: RunTimings {
                l1_boot_to_scenario: t_start.map(|t| t.duration_since(t_spawn)),
                scenario: match (t_start, t_exit) {
                    (Some(s), Some(e)) => Some(e.duration_since(s)),
                    _ => None,
                },
                l1_shutdown: t_exit.map(|e| t_end.duration_since(e)),
                ..RunTimings::default()
            },
        });
    }
    if fatal {
        let line = console_log
            .lines()
            .find(|l| l.contains(CONSOLE_FATAL))
            .unwrap_or_default()
            .to_string();
        return Attempt::Fail(Error::TestHost(format!("{line}\n{details}")));
    }
    if stalled {
        let what = stall.map(|s| s.1).unwrap_or_default();
        return Attempt::Retry {
            why: format!(
                "L1 stalled (`{what}` on its console) and the scenario did not finish; last \
                 scenario output: `{}`\n{details}",
                stderr.lines().last().unwrap_or_default().trim()
            ),
            stdout,
        };
    }
    if timed_out {
        if t_start.is_none() {
            return Attempt::Retry {
                why: format!(
                    "L1 did not reach the scenario within {:?}\n{details}",
                    scenario.timeout
                ),
                stdout,
            };
        }
        return Attempt::Fail(Error::Timeout(format!(
            "no exit status within {:?} (L1 boot and scenario; the limit is \
             Scenario::timeout)\n{details}",
            scenario.timeout
        )));
    }
    Attempt::Retry {
        why: format!(
            "L1 ended without writing the scenario's exit status; last scenario output: \
             `{}`\n{details}",
            stderr.lines().last().unwrap_or_default().trim()
        ),
        stdout,
    }
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_parses() {
        assert_eq!("nested".parse::<HostMode>().unwrap(), HostMode::Nested);
        assert_eq!("Direct".parse::<HostMode>().unwrap(), HostMode::Direct);
        assert!("both".parse::<HostMode>().is_err());
    }

    #[test]
    fn script_quotes_everything() {
        let s = Scenario {
            argv: vec!["/bin/echo".into(), "it's".into(), "a b".into()],
            cwd: Some("/work/x y".into()),
            ..Scenario::default()
        };
        let script = scenario_script(&s, &[("K".into(), "v'1".into())]).unwrap();
        assert!(script.contains(r"cd '/work/x y' ||"));
        assert!(script.contains(r"'K=v'\''1'"));
        assert!(script.contains(r"'/bin/echo' \"));
        assert!(script.contains(r"'it'\''s' \"));
        let bad = Scenario::new(["A=B"]);
        assert!(scenario_script(&bad, &[]).is_err());
    }

    #[test]
    fn script_runs_under_sh() {
        let s = Scenario {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo \"$K:$1\"; pwd".into(),
                "x".into(),
                "it's".into(),
            ],
            cwd: Some("/".into()),
            ..Scenario::default()
        };
        let script = scenario_script(&s, &[("K".into(), "v 1".into())]).unwrap();
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "v 1:it's\n/\n");
    }

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
        let dir = new_run_dir("unit-follow").unwrap();
        let path = dir.join("log");
        let mut f = Follow::new(path.clone());
        assert!(f.poll().is_empty());
        fs::write(&path, "a\nb").unwrap();
        assert_eq!(f.poll(), vec!["a".to_string()]);
        fs::write(&path, "a\nbc\nd\n").unwrap();
        assert_eq!(f.poll(), vec!["bc".to_string(), "d".to_string()]);
        assert_eq!(f.text(), "a\nbc\nd\n");
    }

    #[test]
    fn paths_under_scratch_mounts_are_kept() {
        let keep = |ps: &[&str]| {
            let v: Vec<(&str, &Path)> = ps.iter().map(|p| ("x", Path::new(*p))).collect();
            paths_to_keep(&v)
        };
        assert_eq!(
            keep(&["/tmp/c/target", "/work/cache", "/tmp/c", "/tmpfoo/a"]).unwrap(),
            vec![PathBuf::from("/tmp/c")]
        );
        assert_eq!(
            keep(&["/run/a", "/dev/shm/b"]).unwrap(),
            vec![PathBuf::from("/dev/shm/b"), PathBuf::from("/run/a")]
        );
        assert!(keep(&["rel"]).is_err());
        assert!(keep(&["/proc/1"]).is_err());
        assert!(keep(&["/tmp/a b"]).is_err());
    }

    #[test]
    fn direct_run_captures_output_and_status() {
        let s = Scenario {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo out; echo err >&2; echo $EBB_SCENARIO_HOST; exit 3".into(),
            ],
            mode: Some(HostMode::Direct),
            ..Scenario::default()
        };
        let out = run(&s).unwrap();
        assert_eq!(out.status, 3);
        assert_eq!(out.stdout, "out\ndirect\n");
        assert_eq!(out.stderr, "err\n");
        assert!(out.ensure_success().is_err());
        assert_eq!(
            fs::read_to_string(out.out_dir.join("status")).unwrap(),
            "3\n"
        );
    }

    #[test]
    fn direct_run_times_out() {
        let s = Scenario {
            argv: vec!["/bin/sleep".into(), "5".into()],
            mode: Some(HostMode::Direct),
            timeout: Duration::from_millis(200),
            ..Scenario::default()
        };
        assert!(matches!(run(&s), Err(Error::Timeout(_))));
    }
}
