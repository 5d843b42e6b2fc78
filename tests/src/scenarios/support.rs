//! Helpers shared by the scenario families.

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::guest::{
    BalloonConfig, GuestArtifacts, GuestConfig, GuestExit, GuestVm, KernelImage, VmmKind, VmmRef,
};

pub use crate::util::{median, mib, poll};

use super::{ms, progress};

/// Longest a guest may take from spawn to `EBB-READY` (the emulated test host is slow;
/// measured: 13-45 s).
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Default limit for one guest command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(120);
/// Limit for the VMM to exit after poweroff/reboot/a signal.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Turns any error into the scenario's `String` error.
pub trait OrStr<T> {
    fn s(self) -> Result<T, String>;
    /// With context.
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T, E: std::fmt::Display> OrStr<T> for Result<T, E> {
    fn s(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// Fails the scenario with `msg` unless `cond`.
pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

pub fn artifacts() -> Result<GuestArtifacts, String> {
    GuestArtifacts::locate().s()
}

pub fn ebb() -> Result<VmmRef, String> {
    VmmKind::Ebb.vmm().s()
}

pub fn qemu() -> Result<VmmRef, String> {
    VmmKind::Qemu.vmm().s()
}

pub fn ebb_binary() -> Result<PathBuf, String> {
    crate::guest::find_ebb_binary().s()
}

/// The kernel image named by a scenario argument (`bzimage` or `elf`).
pub fn kernel_arg(name: &str) -> Result<KernelImage, String> {
    match name {
        "bzimage" => Ok(KernelImage::BzImage),
        "elf" => Ok(KernelImage::Elf),
        other => Err(format!("kernel={other}: expected bzimage or elf")),
    }
}

/// A guest configuration for Ebb or QEMU with the usual defaults.
pub fn config(memory_mib: u64, cpus: u32, balloon: Option<BalloonConfig>) -> GuestConfig {
    GuestConfig {
        memory_mib,
        cpus,
        balloon,
        ..GuestConfig::default()
    }
}

/// Spawns the VMM and waits for `EBB-READY`.
pub fn boot(kind: &VmmRef, config: &GuestConfig) -> Result<(GuestVm, crate::guest::Ready), String> {
    let artifacts = artifacts()?;
    progress(&format!(
        "{}: booting {} MiB, {} vCPU, cmdline `{}`",
        kind.name(),
        config.memory_mib,
        config.cpus,
        config.cmdline()
    ));
    let mut vm = GuestVm::spawn_with(kind.clone(), config, &artifacts).s()?;
    let ready = vm.wait_ready(READY_TIMEOUT).s()?;
    progress(&format!(
        "{}: ready after {:.1} s: {}",
        kind.name(),
        ready.elapsed.as_secs_f64(),
        ready.line
    ));
    Ok((vm, ready))
}

/// A command that must succeed.
pub fn cmd(vm: &mut GuestVm, line: &str) -> Result<Value, String> {
    vm.command_ok(line, CMD_TIMEOUT).s()
}

/// A command that must succeed, with its own time limit.
pub fn cmd_within(vm: &mut GuestVm, line: &str, limit: Duration) -> Result<Value, String> {
    vm.command_ok(line, limit).s()
}

/// Runs `sh CMD` in the guest and returns its output (status must be 0).
pub fn sh(vm: &mut GuestVm, command: &str) -> Result<String, String> {
    let r = cmd(vm, &format!("sh {command}"))?;
    ensure(r["status"] == 0, || {
        format!("guest `sh {command}` failed: {r}")
    })?;
    Ok(r["output"].as_str().unwrap_or_default().to_string())
}

/// A counter of the guest's /proc/vmstat (0 when the kernel does not have it).
pub fn guest_vmstat(vm: &mut GuestVm, key: &str) -> Result<u64, String> {
    let out = sh(
        vm,
        &format!("grep '^{key} ' /proc/vmstat || echo '{key} 0'"),
    )?;
    out.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("/proc/vmstat {key}: {out:?}"))
}

/// A field of the guest's /proc/meminfo, in KiB.
pub fn guest_meminfo_kib(vm: &mut GuestVm, key: &str) -> Result<u64, String> {
    let out = sh(vm, &format!("grep '^{key}:' /proc/meminfo"))?;
    out.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("/proc/meminfo {key}: {out:?}"))
}

pub fn u64_field(v: &Value, key: &str) -> Result<u64, String> {
    v[key]
        .as_u64()
        .ok_or_else(|| format!("no numeric `{key}` in {v}"))
}

/// Guest RAM RSS of the VMM (KiB).
pub fn ram_rss(vm: &GuestVm) -> Result<u64, String> {
    vm.guest_ram_rss_kib().ctx("reading guest RAM RSS")
}

/// Feature bit `bit` of the guest's balloon (`balloon` command's sysfs feature string).
pub fn feature(balloon: &Value, bit: usize) -> Option<bool> {
    balloon["features"]
        .as_str()
        .and_then(|f| f.as_bytes().get(bit))
        .map(|&b| b == b'1')
}

/// Polls the guest's `balloon` command until `inflated_pages` satisfies `done`; returns
/// the last result and the time it took.
pub fn wait_balloon(
    vm: &mut GuestVm,
    limit: Duration,
    mut done: impl FnMut(u64) -> bool,
) -> Result<(Value, Duration), String> {
    let t0 = Instant::now();
    let mut last = Value::Null;
    let found = poll(limit, Duration::from_millis(500), || {
        let b = cmd(vm, "balloon")?;
        let pages = u64_field(&b, "inflated_pages")?;
        last = b.clone();
        Ok::<_, String>(done(pages).then_some(b))
    })?;
    match found {
        Some(b) => Ok((b, t0.elapsed())),
        None => Err(format!(
            "the balloon did not get there within {limit:?}; last `balloon`: {last}\n{}",
            vm.diagnostics()
        )),
    }
}

/// Guest RAM RSS samples over time.
#[derive(Debug, Default, Clone)]
pub struct RssTrace {
    /// (milliseconds since start, KiB)
    pub samples: Vec<(u64, u64)>,
}

impl RssTrace {
    pub fn last_kib(&self) -> u64 {
        self.samples.last().map(|s| s.1).unwrap_or(0)
    }

    pub fn max_kib(&self) -> u64 {
        self.samples.iter().map(|s| s.1).max().unwrap_or(0)
    }

    pub fn min_kib(&self) -> u64 {
        self.samples.iter().map(|s| s.1).min().unwrap_or(0)
    }

    /// Every `step`-th sample in MiB, for reports.
    pub fn to_json(&self) -> Value {
        let step = (self.samples.len() / 40).max(1);
        Value::Array(
            self.samples
                .iter()
                .step_by(step)
                .map(|(t, kib)| json!([t, mib(*kib)]))
                .collect(),
        )
    }
}

/// Samples guest RAM RSS every `every` until `stop(elapsed, rss_kib)` is true or `limit`
/// passes; returns the trace and whether `stop` fired.
pub fn watch_rss(
    vm: &GuestVm,
    limit: Duration,
    every: Duration,
    mut stop: impl FnMut(Duration, u64) -> bool,
) -> Result<(RssTrace, Option<Duration>), String> {
    let t0 = Instant::now();
    let mut trace = RssTrace::default();
    loop {
        let rss = ram_rss(vm)?;
        let el = t0.elapsed();
        trace.samples.push((ms(el), rss));
        if stop(el, rss) {
            return Ok((trace, Some(el)));
        }
        if el >= limit {
            return Ok((trace, None));
        }
        thread::sleep(every);
    }
}

/// Waits until guest RAM RSS changes by less than `band_kib` over `quiet` (or `limit`
/// passes) and returns the last value: a baseline not disturbed by the end of boot.
pub fn settled_rss(
    vm: &GuestVm,
    quiet: Duration,
    limit: Duration,
    band_kib: u64,
) -> Result<u64, String> {
    let t0 = Instant::now();
    let mut window: Vec<(Instant, u64)> = Vec::new();
    loop {
        let now = Instant::now();
        let rss = ram_rss(vm)?;
        window.push((now, rss));
        window.retain(|(t, _)| now.duration_since(*t) <= quiet);
        let span = now.duration_since(window[0].0);
        let lo = window.iter().map(|w| w.1).min().unwrap_or(rss);
        let hi = window.iter().map(|w| w.1).max().unwrap_or(rss);
        if (span + Duration::from_millis(600) >= quiet && hi - lo <= band_kib)
            || t0.elapsed() >= limit
        {
            return Ok(rss);
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// Checks how the VMM ended: exit status `code` and `message` as a line of its stderr.
pub fn expect_exit(exit: &GuestExit, code: i32, message: &str) -> Result<(), String> {
    ensure(exit.status.code() == Some(code), || {
        format!(
            "expected exit status {code}, got {}; stderr:\n{}",
            exit.status, exit.stderr
        )
    })?;
    ensure(exit.stderr.lines().any(|l| l.trim() == message), || {
        format!("expected `{message}` on stderr; stderr:\n{}", exit.stderr)
    })?;
    ensure(!exit.stderr.contains("panicked"), || {
        format!("the VMM panicked; stderr:\n{}", exit.stderr)
    })
}

/// Powers off and checks Ebb's clean exit.
pub fn poweroff_ebb(vm: &mut GuestVm) -> Result<GuestExit, String> {
    ensure(vm.kind() == VmmKind::Ebb, || "not an Ebb guest".into())?;
    poweroff_any(vm)
}

/// Powers off and checks the VMM's clean exit (its own idea of one: [`crate::vmm::Vmm`]).
pub fn poweroff_any(vm: &mut GuestVm) -> Result<GuestExit, String> {
    let exit = vm.poweroff(EXIT_TIMEOUT).s()?;
    vm.vmm().check_poweroff(&exit)?;
    Ok(exit)
}

/// The System RAM ranges of the guest's /proc/iomem, as (start, end inclusive).
pub fn guest_ram_ranges(vm: &mut GuestVm) -> Result<Vec<(u64, u64)>, String> {
    let text = sh(vm, "grep 'System RAM' /proc/iomem")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let range = line.split(':').next().unwrap_or("").trim();
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        // Nested entries (kernel code/data) are indented; top-level ones are not.
        if line.starts_with(' ') {
            continue;
        }
        let a = u64::from_str_radix(a, 16).map_err(|e| format!("{line}: {e}"))?;
        let b = u64::from_str_radix(b, 16).map_err(|e| format!("{line}: {e}"))?;
        out.push((a, b));
    }
    ensure(!out.is_empty(), || {
        format!("no System RAM in /proc/iomem: {text}")
    })?;
    Ok(out)
}

/// A command that ran to its end.
pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `argv` with stdin closed, collecting stdout and stderr; kills it and fails when it
/// is still running after `limit` (a hang is a failure, never a wait without end).
pub fn run_with_limit(argv: &[String], limit: Duration) -> Result<Finished, String> {
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    let f = crate::util::run_bounded(&mut cmd, limit, crate::util::Tee::default())
        .ctx(&format!("running {argv:?}"))?;
    let status = f
        .status
        .ok_or_else(|| format!("{argv:?} still running after {limit:?}: it hangs"))?;
    Ok(Finished {
        status,
        stdout: f.stdout,
        stderr: f.stderr,
        elapsed: f.elapsed,
    })
}

/// A fresh scratch directory on a filesystem the scenario may write (`/tmp` is a tmpfs
/// inside the test host).
pub fn scratch_dir(tag: &str) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("ebb-scenario-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).ctx(&format!("creating {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features() {
        let b = json!({"features": "0100011"});
        assert_eq!(feature(&b, 1), Some(true));
        assert_eq!(feature(&b, 0), Some(false));
        assert_eq!(feature(&b, 40), None);
    }
}
