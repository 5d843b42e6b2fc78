//! Spawns a VMM (Ebb, or QEMU as the peer) with the default guest and drives it over its
//! serial console, following resources/GUEST-PROTOCOL.md.
//!
//! Runs INSIDE a scenario: on a host with ordinary KVM, directly or in the nested test host
//! (see [`crate::testhost`]). The VMM's stdin/stdout are the guest's serial console; a
//! reader thread keeps the transcript and parses `EBB-READY`, `EBB-RESULT <json>` and
//! `EBB-EVENT <json>` lines.
//!
//! Set `EBB_GUEST_ECHO=1` to copy the console to stderr as it arrives (prefixed
//! `[guest] `), which shows a stuck guest live on the test host's console.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::paths;
use crate::procfs;
use crate::text::{indent, tail};
pub use crate::vmm::{Ebb, Qemu, Vmm, VmmKind, VmmRef};

/// The command line every guest gets before [`GuestConfig::cmdline_extra`].
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1";
/// Kernel parameters that skip slow boot-time probing of hardware these VMMs do not have
/// (measured in the nested test host, Debian 6.1 guest, QEMU microvm):
/// - `pci=noearly`: the early AGP/GART aperture search reads the config space of every
///   PCI bus/device/function through ports 0xcf8/0xcfc, twice: ~3 s each.
/// - `initcall_blacklist=cmos_init`: without an RTC described in ACPI the kernel still
///   registers a legacy CMOS RTC and its probe spins on port 0x70/0x71 for ~10 s.
pub const BOOT_SPEEDUPS: &str = "pci=noearly initcall_blacklist=cmos_init";

pub use crate::testhost::TRIPLE_FAULT_EXIT;
/// Lines of transcript/stderr in error messages.
const TAIL_LINES: usize = 40;

/// Failures to start or drive a guest. Every message says what happened and, for missing
/// pieces, how to get them.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Something needed is missing (artifact, binary, /dev/kvm).
    #[error("{0}")]
    Missing(String),
    /// The configuration asks for something this VMM kind cannot do (yet).
    #[error("{0}")]
    Unsupported(String),
    /// The VMM could not be started.
    #[error("{0}")]
    Spawn(String),
    /// The guest did not do what was expected in time.
    #[error("{0}")]
    Timeout(String),
    /// The VMM exited while something was expected from the guest.
    #[error("{0}")]
    Exited(String),
    /// The guest answered, but not as expected (a command with `ok: false`, ...).
    #[error("{0}")]
    Protocol(String),
    /// Talking to the VMM failed.
    #[error("{0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, GuestError>;

/// The default guest built by resources/build-guest.sh in `$EBB_CACHE_DIR/guest/`.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    pub dir: PathBuf,
    /// The stock Debian bzImage.
    pub vmlinuz: PathBuf,
    /// The ELF kernel (PVH entry), when present.
    pub vmlinux: Option<PathBuf>,
    pub initramfs: PathBuf,
    /// The kernel release, when recorded.
    pub kver: Option<String>,
}

impl GuestArtifacts {
    /// Finds the default guest; fails with instructions when it is not built.
    pub fn locate() -> Result<Self> {
        Self::in_dir(&paths::cache_dir().join("guest"))
    }

    pub fn in_dir(dir: &Path) -> Result<Self> {
        let how = "build it with `resources/build-guest.sh` on the outer machine (inside the \
                   nested test host the cache is a read-only view, so build before running \
                   scenarios there)";
        let vmlinuz = dir.join("vmlinuz");
        let initramfs = dir.join("initramfs.cpio.gz");
        for p in [&vmlinuz, &initramfs] {
            if !p.is_file() {
                return Err(GuestError::Missing(format!(
                    "the default guest is not built: {} is missing; {how}",
                    p.display()
                )));
            }
        }
        let vmlinux = Some(dir.join("vmlinux")).filter(|p| p.is_file());
        let kver = std::fs::read_to_string(dir.join("kver"))
            .ok()
            .map(|s| s.trim().to_string());
        Ok(GuestArtifacts {
            dir: dir.to_path_buf(),
            vmlinuz,
            vmlinux,
            initramfs,
            kver,
        })
    }
}

/// Builds the default guest with resources/build-guest.sh (a no-op when up to date) and
/// returns it. Call it on the outer machine before running scenarios: inside the nested
/// test host the cache is read-only, so there it only locates the artifacts.
pub fn build_default_guest() -> Result<GuestArtifacts> {
    if std::env::var(crate::testhost::ENV_SCENARIO_HOST).is_ok_and(|h| h == "nested") {
        return GuestArtifacts::locate();
    }
    let script = paths::resources_dir().join("build-guest.sh");
    if !script.is_file() {
        return Err(GuestError::Missing(format!(
            "{} is missing: the default guest cannot be built",
            script.display()
        )));
    }
    let out = Command::new("bash")
        .arg(&script)
        .env("EBB_CACHE_DIR", paths::cache_dir())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| GuestError::Spawn(format!("running {}: {e}", script.display())))?;
    if !out.status.success() {
        return Err(GuestError::Missing(format!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            indent(&tail(&String::from_utf8_lossy(&out.stderr), TAIL_LINES))
        )));
    }
    GuestArtifacts::in_dir(Path::new(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The guest kernel image to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelImage {
    /// The default guest's bzImage.
    BzImage,
    /// The default guest's ELF vmlinux (PVH entry: nothing to decompress, which saves
    /// ~10 s per boot in the emulated test host).
    Elf,
    /// A kernel of your own.
    Path(PathBuf),
}

/// The balloon device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Initial balloon target (MiB).
    pub size_mib: u64,
    pub deflate_on_oom: bool,
    pub free_page_reporting: bool,
    /// Seconds between statistics requests; 0: none.
    pub stats_interval: u32,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            size_mib: 0,
            deflate_on_oom: true,
            free_page_reporting: true,
            stats_interval: 0,
        }
    }
}

/// A guest to spawn.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub memory_mib: u64,
    pub cpus: u32,
    /// Appended to [`BASE_CMDLINE`] (after `quiet` and [`BOOT_SPEEDUPS`] when enabled).
    pub cmdline_extra: String,
    /// Adds `quiet` to the command line. Every console byte is a costly exit in the
    /// emulated test host (flushing the boot log took ~7 s there); the kernel still
    /// prints warnings and errors.
    pub quiet: bool,
    /// Adds [`BOOT_SPEEDUPS`]: boot-time probes that cost seconds in the emulated test
    /// host, where every port I/O exit of the guest is emulated twice over.
    pub boot_speedups: bool,
    pub balloon: Option<BalloonConfig>,
    /// Appended to the VMM's command line.
    pub extra_args: Vec<String>,
    /// `None`: the ELF kernel for QEMU (when built), the bzImage for Ebb.
    pub kernel: Option<KernelImage>,
    /// `None`: the default guest's initramfs.
    pub initramfs: Option<PathBuf>,
    /// Copy the console to stderr as it arrives. Default: `EBB_GUEST_ECHO` is set to
    /// something other than `0`.
    pub echo_console: bool,
    /// Ebb only: `--memory SIZE,thp=on|off` (`None`: the host's default).
    pub thp: Option<bool>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            memory_mib: 512,
            cpus: 1,
            cmdline_extra: String::new(),
            quiet: true,
            boot_speedups: true,
            balloon: None,
            extra_args: Vec::new(),
            kernel: None,
            initramfs: None,
            echo_console: std::env::var("EBB_GUEST_ECHO").is_ok_and(|v| !v.is_empty() && v != "0"),
            thp: None,
        }
    }
}

impl GuestConfig {
    /// The kernel command line this configuration gives the guest.
    pub fn cmdline(&self) -> String {
        let mut c = BASE_CMDLINE.to_string();
        if self.quiet {
            c.push_str(" quiet");
        }
        if self.boot_speedups {
            c.push(' ');
            c.push_str(BOOT_SPEEDUPS);
        }
        if !self.cmdline_extra.trim().is_empty() {
            c.push(' ');
            c.push_str(self.cmdline_extra.trim());
        }
        c
    }
}

/// Finds the Ebb binary: `EBB_BINARY` when set, else `ebb` next to the running executable
/// (`target/<profile>/ebb`).
pub fn find_ebb_binary() -> Result<PathBuf> {
    let path = match std::env::var_os("EBB_BINARY") {
        Some(p) => PathBuf::from(p),
        None => paths::profile_dir()
            .ok_or_else(|| GuestError::Missing("cannot locate the running executable".into()))?
            .join("ebb"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(GuestError::Missing(format!(
            "the ebb binary {} is missing: build it with `cargo build -p ebb-vmm --bin ebb` \
             (the same profile as this program), or point EBB_BINARY at it",
            path.display()
        )))
    }
}

/// Builds the Ebb binary with cargo (`cargo build -p ebb-vmm --bin ebb`, `--release` when
/// the running executable is a release build) and returns its path. For tests on the
/// outer machine; inside the nested test host use [`find_ebb_binary`].
pub fn build_ebb_binary() -> Result<PathBuf> {
    let release = paths::profile_dir()
        .and_then(|d| d.file_name().map(|n| n == "release"))
        .unwrap_or(false);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // ebb-ctl too: the API benchmark drives a running Ebb with it.
    cmd.args([
        "build", "--quiet", "-p", "ebb-vmm", "-p", "ebb-ctl", "--bin", "ebb", "--bin", "ebb-ctl",
    ])
    .current_dir(paths::repo_root())
    .env("CARGO_TARGET_DIR", paths::target_dir())
    .stdin(Stdio::null());
    if release {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .map_err(|e| GuestError::Spawn(format!("running cargo build for ebb: {e}")))?;
    if !out.status.success() {
        return Err(GuestError::Missing(format!(
            "cargo build -p ebb-vmm --bin ebb failed ({}):\n{}",
            out.status,
            indent(&tail(&String::from_utf8_lossy(&out.stderr), TAIL_LINES))
        )));
    }
    let path = paths::target_dir()
        .join(if release { "release" } else { "debug" })
        .join("ebb");
    if path.is_file() {
        Ok(path)
    } else {
        Err(GuestError::Missing(format!(
            "cargo built ebb but {} does not exist",
            path.display()
        )))
    }
}

/// Finds qemu-system-x86_64 on PATH.
pub fn find_qemu() -> Result<PathBuf> {
    crate::testhost::find_qemu().map_err(GuestError::Missing)
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

/// The full command (program and arguments) for `vmm` and `config`.
pub fn vmm_command(
    vmm: &dyn Vmm,
    config: &GuestConfig,
    artifacts: &GuestArtifacts,
) -> Result<Vec<String>> {
    let kernel = match config
        .kernel
        .clone()
        .unwrap_or_else(|| vmm.default_kernel(artifacts))
    {
        KernelImage::BzImage => artifacts.vmlinuz.clone(),
        KernelImage::Elf => artifacts.vmlinux.clone().ok_or_else(|| {
            GuestError::Missing(format!(
                "no vmlinux in {}: rebuild the guest with resources/build-guest.sh",
                artifacts.dir.display()
            ))
        })?,
        KernelImage::Path(p) => p,
    };
    let initramfs = config
        .initramfs
        .clone()
        .unwrap_or_else(|| artifacts.initramfs.clone());
    let mut argv = vmm.argv(config, &kernel, &initramfs)?;
    argv.extend(config.extra_args.iter().cloned());
    Ok(argv)
}

/// The `EBB-READY` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// From spawning the VMM to the line arriving.
    pub elapsed: Duration,
    pub line: String,
    pub kernel: String,
    pub cpus: u32,
    pub memtotal_kib: u64,
    pub balloon: bool,
}

impl Ready {
    fn parse(line: &str, elapsed: Duration) -> Ready {
        let mut r = Ready {
            elapsed,
            line: line.to_string(),
            kernel: String::new(),
            cpus: 0,
            memtotal_kib: 0,
            balloon: false,
        };
        for word in line.split_whitespace() {
            match word.split_once('=') {
                Some(("kernel", v)) => r.kernel = v.to_string(),
                Some(("cpus", v)) => r.cpus = v.parse().unwrap_or(0),
                Some(("memtotal_kib", v)) => r.memtotal_kib = v.parse().unwrap_or(0),
                Some(("balloon", v)) => r.balloon = v == "yes",
                _ => {}
            }
        }
        r
    }
}

/// How the VMM ended.
#[derive(Debug, Clone)]
pub struct GuestExit {
    pub status: ExitStatus,
    /// Everything the VMM wrote to stderr.
    pub stderr: String,
    /// From spawn to exit (as observed).
    pub elapsed: Duration,
}

/// A marker line received from the guest, with its arrival time.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub value: Value,
}

#[derive(Default)]
struct ConsoleState {
    transcript: String,
    partial: Vec<u8>,
    ready: Option<Ready>,
    results: Vec<Received>,
    events: Vec<Received>,
    malformed: Vec<String>,
    stdout_eof: bool,
    stderr: Vec<u8>,
    stderr_eof: bool,
}

type Shared = Arc<(Mutex<ConsoleState>, Condvar)>;

fn lock(shared: &Shared) -> MutexGuard<'_, ConsoleState> {
    shared.0.lock().unwrap_or_else(|e| e.into_inner())
}

fn handle_line(st: &mut ConsoleState, line: &str, spawned: Instant) {
    let now = Instant::now();
    if st.ready.is_none() {
        if let Some(i) = line.find("EBB-READY") {
            st.ready = Some(Ready::parse(&line[i..], now.duration_since(spawned)));
            return;
        }
    }
    for (marker, is_result) in [("EBB-RESULT ", true), ("EBB-EVENT ", false)] {
        if let Some(i) = line.find(marker) {
            let json = line[i + marker.len()..].trim();
            match serde_json::from_str::<Value>(json) {
                Ok(value) => {
                    let r = Received { at: now, value };
                    if is_result {
                        st.results.push(r);
                    } else {
                        st.events.push(r);
                    }
                }
                Err(_) => st.malformed.push(line.to_string()),
            }
            return;
        }
    }
}

fn console_reader(mut src: impl Read, shared: Shared, spawned: Instant, echo: bool) {
    let mut buf = [0u8; 4096];
    loop {
        let n = src.read(&mut buf).unwrap_or(0);
        let mut st = lock(&shared);
        if n == 0 {
            if !st.partial.is_empty() {
                // A line without its newline was cut off (the guest or the VMM died while
                // printing it): keep it in the transcript, but it is no marker. A cut
                // `EBB-READY` line would otherwise read as a guest without a balloon and
                // hide the crash.
                let rest = String::from_utf8_lossy(&std::mem::take(&mut st.partial)).into_owned();
                st.transcript.push_str(&rest);
            }
            st.stdout_eof = true;
            shared.1.notify_all();
            return;
        }
        st.partial.extend_from_slice(&buf[..n]);
        while let Some(pos) = st.partial.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = st.partial.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&raw);
            let line = text.trim_end_matches(['\n', '\r']).to_string();
            st.transcript.push_str(&line);
            st.transcript.push('\n');
            if echo {
                eprintln!("[guest] {line}");
            }
            handle_line(&mut st, &line, spawned);
        }
        shared.1.notify_all();
    }
}

fn stderr_reader(mut src: impl Read, shared: Shared) {
    let mut buf = [0u8; 4096];
    loop {
        let n = src.read(&mut buf).unwrap_or(0);
        let mut st = lock(&shared);
        if n == 0 {
            st.stderr_eof = true;
            shared.1.notify_all();
            return;
        }
        st.stderr.extend_from_slice(&buf[..n]);
    }
}

enum WaitEnd {
    Timeout,
    Eof,
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

    /// `EBB-RESULT` objects received so far.
    pub fn results(&self) -> Vec<Received> {
        lock(&self.shared).results.clone()
    }

    /// Marker lines whose JSON did not parse.
    pub fn malformed_lines(&self) -> Vec<String> {
        lock(&self.shared).malformed.clone()
    }

    /// A description of the VMM's state for error messages: exit status, console and
    /// stderr tails.
    pub fn diagnostics(&mut self) -> String {
        let status = match self.try_exit_status() {
            Some(st) => format!("exited with {st}"),
            None => "still running".into(),
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
                GuestError::Exited(format!(
                    "{what}: the VMM closed the console\n{}",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn artifacts() -> GuestArtifacts {
        GuestArtifacts {
            dir: "/c/guest".into(),
            vmlinuz: "/c/guest/vmlinuz".into(),
            vmlinux: Some("/c/guest/vmlinux".into()),
            initramfs: "/c/guest/initramfs.cpio.gz".into(),
            kver: None,
        }
    }

    #[test]
    fn parses_markers() {
        let mut st = ConsoleState::default();
        let t = Instant::now();
        handle_line(
            &mut st,
            "EBB-READY kernel=6.1.0-48-amd64 cpus=2 memtotal_kib=480000 balloon=yes",
            t,
        );
        handle_line(
            &mut st,
            r#"EBB-RESULT {"cmd":"meminfo","ok":true,"mem_total_kib":1}"#,
            t,
        );
        handle_line(
            &mut st,
            r#"[  1.0] noise EBB-EVENT {"event":"shutdown"}"#,
            t,
        );
        handle_line(&mut st, "EBB-RESULT {broken", t);
        let r = st.ready.unwrap();
        assert_eq!(r.kernel, "6.1.0-48-amd64");
        assert_eq!((r.cpus, r.memtotal_kib, r.balloon), (2, 480000, true));
        assert_eq!(st.results[0].value["cmd"], "meminfo");
        assert_eq!(st.events[0].value["event"], "shutdown");
        assert_eq!(st.malformed.len(), 1);
    }

    #[test]
    fn a_line_cut_off_by_the_end_of_output_is_no_marker() {
        let shared: Shared = Arc::default();
        let out = b"[ 1.2] boot\nEBB-RESULT {\"cmd\":\"x\"}\nEBB-READY kernel=6.1.0-48-a";
        console_reader(&out[..], shared.clone(), Instant::now(), false);
        let st = lock(&shared);
        assert!(st.ready.is_none(), "{:?}", st.ready);
        assert_eq!(st.results.len(), 1);
        assert!(st.stdout_eof);
        assert!(st.transcript.ends_with("EBB-READY kernel=6.1.0-48-a"));
    }

    #[test]
    fn ebb_command_line() {
        let cfg = GuestConfig {
            memory_mib: 1024,
            cpus: 2,
            cmdline_extra: "ebb.run=touch:8".into(),
            balloon: Some(BalloonConfig {
                size_mib: 64,
                deflate_on_oom: false,
                free_page_reporting: true,
                stats_interval: 2,
            }),
            ..GuestConfig::default()
        };
        let ebb = Ebb {
            binary: "/t/ebb".into(),
        };
        let argv = vmm_command(&ebb, &cfg, &artifacts()).unwrap();
        assert_eq!(argv[0], "/t/ebb");
        let joined = argv.join(" ");
        assert!(joined.contains("--kernel /c/guest/vmlinuz"));
        assert!(joined.contains("--memory 1024M --cpus 2 --serial stdio"));
        assert!(joined.contains(
            "--balloon size=64M,deflate_on_oom=off,free_page_reporting=on,stats_interval=2"
        ));
        let i = argv.iter().position(|a| a == "--cmdline").unwrap();
        assert_eq!(
            argv[i + 1],
            format!("console=ttyS0 panic=-1 quiet {BOOT_SPEEDUPS} ebb.run=touch:8")
        );
    }

    #[test]
    fn qemu_rejects_initial_balloon_size() {
        let cfg = GuestConfig {
            balloon: Some(BalloonConfig {
                size_mib: 64,
                ..BalloonConfig::default()
            }),
            ..GuestConfig::default()
        };
        let qemu = Qemu {
            binary: "/usr/bin/qemu-system-x86_64".into(),
        };
        assert!(matches!(
            vmm_command(&qemu, &cfg, &artifacts()),
            Err(GuestError::Unsupported(_))
        ));
    }

    #[test]
    fn missing_guest_says_how_to_build() {
        let e = GuestArtifacts::in_dir(Path::new("/nonexistent/guest")).unwrap_err();
        assert!(e.to_string().contains("build-guest.sh"), "{e}");
    }
}
