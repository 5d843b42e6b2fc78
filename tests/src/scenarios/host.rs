//! Scenarios about the test host itself and the QEMU peer: `smoke-shell` (KVM/CPU facts),
//! `qemu-boot`/`ebb-boot` (the default guest boots, answers, powers off; timed) and
//! `qemu-cycle` (repeated QEMU boots: reliability of the test host); `testhost-note-boot`
//! and `testhost-crash-once` (a batch goes on in a fresh test host after L1 died),
//! `testhost-guest-crash-once` (a scenario whose guest crashed is rerun in a fresh one).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{ms, progress, Args, Ctx, ScenarioDef};
use crate::guest::{
    find_ebb_binary, BalloonConfig, Ebb, GuestArtifacts, GuestConfig, GuestVm, VmmRef,
};
use crate::{paths, procfs};
use std::sync::Arc;

/// The scenarios of this family.
pub const SCENARIOS: &[ScenarioDef] = &[
    ScenarioDef {
        name: "smoke-shell",
        help: "KVM and CPU facts of the host the scenarios run on (proves the test host works)",
        run: smoke_shell,
    },
    ScenarioDef {
        name: "qemu-boot",
        help: "boots the default guest under QEMU/KVM, waits for EBB-READY, runs meminfo and \
               balloon, powers off; timed (args: memory_mib=512 cpus=1 ready_timeout_s=300)",
        run: qemu_boot,
    },
    ScenarioDef {
        name: "ebb-boot",
        help:
            "qemu-boot with Ebb as the VMM (target/<profile>/ebb or EBB_BINARY; args as qemu-boot)",
        run: ebb_boot,
    },
    ScenarioDef {
        name: "qemu-cycle",
        help: "qemu-boot COUNT times in a row (reliability of VM start/stop; args: count=5 and \
               those of qemu-boot)",
        run: qemu_cycle,
    },
    ScenarioDef {
        name: "testhost-note-boot",
        help: "notes this test host's boot id for testhost-crash-once",
        run: testhost_note_boot,
    },
    ScenarioDef {
        name: "testhost-crash-once",
        help: "nested test host only: crashes L1's kernel (sysrq) when it still runs in the \
               L1 that testhost-note-boot noted; passes in any other, i.e. when the harness \
               resumed the batch in a fresh test host with the notes of its first part",
        run: testhost_crash_once,
    },
    ScenarioDef {
        name: "testhost-guest-crash-once",
        help: "fails as if its guest had triple-faulted when it runs in the test host that \
               testhost-note-boot noted; passes in any other, i.e. when the harness reran it \
               in a fresh test host with the batch's notes",
        run: testhost_guest_crash_once,
    },
];

// ---------------------------------------------------------------------------------------
// testhost-note-boot, testhost-crash-once

const NOTE_BOOT_ID: &str = "testhost_boot_id";

fn boot_id() -> Result<String, String> {
    read_trim("/proc/sys/kernel/random/boot_id")
        .ok_or_else(|| "cannot read /proc/sys/kernel/random/boot_id".to_string())
}

fn testhost_note_boot(ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&[])?;
    let id = boot_id()?;
    ctx.note(NOTE_BOOT_ID, json!(id));
    Ok(json!({ "boot_id": id }))
}

fn testhost_guest_crash_once(ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&[])?;
    let noted = noted_boot_id(ctx)?;
    let id = boot_id()?;
    if id == noted {
        return Err(format!(
            "(simulated) ebb: guest stopped: vCPU 0: {}",
            crate::guest::TRIPLE_FAULT_EXIT
        ));
    }
    Ok(json!({ "noted_boot_id": noted, "boot_id": id }))
}

fn noted_boot_id(ctx: &Ctx) -> Result<String, String> {
    ctx.recall(NOTE_BOOT_ID)
        .and_then(|v| v.as_str().map(String::from))
        .ok_or_else(|| "no boot id noted: run testhost-note-boot earlier in the batch".into())
}

fn testhost_crash_once(ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&[])?;
    if ctx.host != "nested" {
        return Err(format!(
            "runs only in the nested test host (it crashes the kernel it runs on); host: {}",
            ctx.host
        ));
    }
    let noted = noted_boot_id(ctx)?;
    let id = boot_id()?;
    if id != noted {
        return Ok(json!({ "noted_boot_id": noted, "boot_id": id }));
    }
    progress("crashing this test host's kernel (sysrq c)");
    std::fs::write("/proc/sys/kernel/sysrq", "1")
        .and_then(|_| std::fs::write("/proc/sysrq-trigger", "c"))
        .map_err(|e| format!("cannot crash L1 through /proc/sysrq-trigger: {e}"))?;
    std::thread::sleep(Duration::from_secs(30));
    Err("L1 is still up 30 s after sysrq c".into())
}

// ---------------------------------------------------------------------------------------
// smoke-shell

const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

fn kvm_api_version() -> Result<i32, String> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("open /dev/kvm: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a value.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if v < 0 {
        return Err(format!(
            "KVM_GET_API_VERSION: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(v)
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn smoke_shell(ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&[])?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").map_err(|e| e.to_string())?;
    let count_flag = |flag: &str| {
        cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .filter(|l| l.split_whitespace().any(|w| w == flag))
            .count()
    };
    let svm = count_flag("svm");
    let vmx = count_flag("vmx");
    let kvm_modules: Vec<String> = ["kvm", "kvm_amd", "kvm_intel", "kvm_pvm"]
        .iter()
        .filter(|m| Path::new(&format!("/sys/module/{m}")).exists())
        .map(|m| m.to_string())
        .collect();
    let pvm = kvm_modules.iter().any(|m| m == "kvm_pvm");
    let dev_kvm = Path::new("/dev/kvm").exists();
    let api = kvm_api_version();
    let npt = read_trim("/sys/module/kvm_amd/parameters/npt")
        .or_else(|| read_trim("/sys/module/kvm_intel/parameters/ept"));
    let cache = paths::cache_dir();
    let tmp_writable = tempfile_probe();
    let online = read_trim("/sys/devices/system/cpu/online");
    let data = json!({
        "host": ctx.host,
        "kernel": read_trim("/proc/sys/kernel/osrelease"),
        "dev_kvm": dev_kvm,
        "kvm_api_version": api.as_ref().ok(),
        "kvm_api_error": api.as_ref().err(),
        "cpu_svm": svm,
        "cpu_vmx": vmx,
        "kvm_modules": kvm_modules,
        "kvm_pvm": pvm,
        "npt_or_ept": npt,
        "cpus_online": online,
        "mem_total_kib": procfs::meminfo_kib("MemTotal").ok(),
        "mem_available_kib": procfs::host_mem_available_kib().ok(),
        "uptime_s": read_trim("/proc/uptime")
            .and_then(|u| u.split_whitespace().next().and_then(|v| v.parse::<f64>().ok())),
        "cache_dir": cache,
        "cache_dir_exists": cache.is_dir(),
        "guest_built": GuestArtifacts::locate().is_ok(),
        "tmp_writable": tmp_writable,
    });
    let mut problems = Vec::new();
    if !dev_kvm {
        problems.push("/dev/kvm absent".to_string());
    }
    if let Err(e) = &api {
        problems.push(e.clone());
    } else if api != Ok(12) {
        problems.push(format!("unexpected KVM API version {api:?}"));
    }
    if svm == 0 && vmx == 0 {
        problems.push("no svm/vmx in /proc/cpuinfo".into());
    }
    if pvm {
        problems.push("kvm_pvm is loaded: this /dev/kvm cannot boot stock Linux guests".into());
    }
    if !tmp_writable {
        problems.push("/tmp is not writable".into());
    }
    if problems.is_empty() {
        Ok(data)
    } else {
        Err(format!("{} (facts: {data})", problems.join("; ")))
    }
}

fn tempfile_probe() -> bool {
    let p = std::env::temp_dir().join(format!("ebb-scenario-probe-{}", std::process::id()));
    let ok = std::fs::write(&p, b"x").is_ok();
    let _ = std::fs::remove_file(&p);
    ok
}

// ---------------------------------------------------------------------------------------
// qemu-boot

fn qemu_boot(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["memory_mib", "cpus", "ready_timeout_s"])?;
    let artifacts = GuestArtifacts::locate().map_err(|e| e.to_string())?;
    boot_once(&super::support::qemu()?, &artifacts, args)
}

fn ebb_boot(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["memory_mib", "cpus", "ready_timeout_s"])?;
    let binary = find_ebb_binary().map_err(|e| e.to_string())?;
    let artifacts = GuestArtifacts::locate().map_err(|e| e.to_string())?;
    boot_once(&(Arc::new(Ebb { binary }) as VmmRef), &artifacts, args)
}

fn qemu_cycle(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["memory_mib", "cpus", "ready_timeout_s", "count"])?;
    let count: u32 = args.get("count", 5)?;
    let artifacts = GuestArtifacts::locate().map_err(|e| e.to_string())?;
    let mut ready = Vec::new();
    let mut total = Vec::new();
    for i in 0..count {
        let r = boot_once(&super::support::qemu()?, &artifacts, args)
            .map_err(|e| format!("boot {}: {e}", i + 1))?;
        ready.push(r["ready_ms"].clone());
        total.push(r["total_ms"].clone());
    }
    Ok(json!({ "count": count, "ready_ms": ready, "total_ms": total }))
}

/// Boots the default guest once: ready, meminfo, balloon, RSS, poweroff.
fn boot_once(kind: &VmmRef, artifacts: &GuestArtifacts, args: &Args) -> Result<Value, String> {
    let memory_mib: u64 = args.get("memory_mib", 512)?;
    let cpus: u32 = args.get("cpus", 1)?;
    let ready_timeout = Duration::from_secs(args.get("ready_timeout_s", 300)?);
    let cmd_timeout = Duration::from_secs(120);
    let config = GuestConfig {
        memory_mib,
        cpus,
        balloon: Some(BalloonConfig {
            size_mib: 0,
            deflate_on_oom: true,
            free_page_reporting: true,
            stats_interval: 0,
            free_page_hinting: false,
            deflate_prefault: true,
        }),
        ..GuestConfig::default()
    };
    let t0 = Instant::now();
    let vmm = kind.name();
    progress(&format!(
        "boot: starting {vmm} ({memory_mib} MiB, {cpus} vCPU)"
    ));
    let mut vm =
        GuestVm::spawn_with(kind.clone(), &config, artifacts).map_err(|e| e.to_string())?;
    let ready = vm.wait_ready(ready_timeout).map_err(|e| e.to_string())?;
    progress(&format!(
        "boot: {vmm}: EBB-READY after {:.1} s: {}",
        ready.elapsed.as_secs_f64(),
        ready.line
    ));
    let t_cmd = Instant::now();
    let meminfo = vm
        .command_ok("meminfo", cmd_timeout)
        .map_err(|e| e.to_string())?;
    let meminfo_ms = ms(t_cmd.elapsed());
    let balloon = vm
        .command_ok("balloon", cmd_timeout)
        .map_err(|e| e.to_string())?;
    let ram_rss = vm.guest_ram_rss_kib().map_err(|e| {
        format!(
            "reading the guest RAM mapping of {vmm}: {e}\n{}",
            vm.diagnostics()
        )
    })?;
    let proc_rss = vm.process_rss_kib().map_err(|e| e.to_string())?;
    let t_off = Instant::now();
    let exit = vm.poweroff(cmd_timeout).map_err(|e| e.to_string())?;
    let poweroff_ms = ms(t_off.elapsed());
    if !exit.status.success() {
        return Err(format!(
            "{vmm} exited with {} after poweroff\n{}",
            exit.status,
            vm.diagnostics()
        ));
    }
    let mem_total_kib = meminfo["mem_total_kib"].as_u64().unwrap_or(0);
    // The kernel keeps some memory for itself: MemTotal is below the RAM size but not by
    // much for a small guest.
    let ram_kib = memory_mib * 1024;
    if mem_total_kib == 0 || mem_total_kib > ram_kib || mem_total_kib < ram_kib * 7 / 10 {
        return Err(format!(
            "MemTotal {mem_total_kib} KiB is not plausible for {memory_mib} MiB of RAM: {meminfo}"
        ));
    }
    Ok(json!({
        "vmm": vmm,
        "argv": vm.argv(),
        "kernel": ready.kernel,
        "ready_ms": ms(ready.elapsed),
        "ready_line": ready.line,
        "cpus": ready.cpus,
        "memtotal_kib_ready": ready.memtotal_kib,
        "balloon_ready": ready.balloon,
        "meminfo": meminfo,
        "meminfo_ms": meminfo_ms,
        "balloon": balloon,
        "guest_ram_rss_kib": ram_rss,
        "process_rss_kib": proc_rss,
        "poweroff_ms": poweroff_ms,
        "exit_status": exit.status.code(),
        "total_ms": ms(t0.elapsed()),
        "malformed_lines": vm.malformed_lines(),
    }))
}
