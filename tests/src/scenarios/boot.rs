//! Booting stock Linux with Ebb: vCPUs, memory (below and above the 4 GiB hole), both
//! kernel formats (bzImage, ELF vmlinux through PVH), the console to a file, and every
//! way the VM ends (poweroff, reboot, SIGTERM).
//!
//! MemTotal calibration (Debian 6.1 guest, measured in the nested test host): the kernel
//! keeps about 46 MiB for itself (image, page tables, per-CPU areas; the boot log's
//! "reserved"), 1/64 of RAM for `struct page` (64 bytes per 4 KiB page), and 64 MiB of
//! swiotlb bounce buffers once RAM extends above 4 GiB. Measured MemTotal was within 0.3%
//! of `memory - that` for 512 MiB, 1 GiB and 5 GiB (483, 1196-3216 and 12720 KiB off), so
//! the check allows max(1.5% of RAM, 8 MiB): it still catches a guest that lost a few
//! percent of its RAM, and the exact RAM map is checked separately through /proc/iomem.

use std::time::Instant;

use serde_json::{json, Value};

use super::support::{
    boot, cmd, config, ebb, ensure, expect_exit, guest_ram_ranges, kernel_arg, mib, poweroff_ebb,
    ram_rss, scratch_dir, sh, u64_field, OrStr, EXIT_TIMEOUT, READY_TIMEOUT,
};
use super::{ms, progress, Args, Ctx, ScenarioDef};
use crate::guest::{vmm_command, GuestConfig, GuestVm, KernelImage, Ready};

/// The scenarios of this family.
pub const SCENARIOS: &[ScenarioDef] = &[
    ScenarioDef {
        name: "boot-basic",
        help: "Ebb boots the default guest to EBB-READY: vCPUs, MemTotal, RAM map, boot \
               protocol, lazily populated RAM, poweroff exits 0 with its message \
               (args: memory_mib=1024 cpus=1 kernel=bzimage|elf)",
        run: boot_basic,
    },
    ScenarioDef {
        name: "boot-smp-reboot",
        help: "2 vCPUs both online and running; guest `reboot` ends Ebb with status 0 and its \
               message (args: memory_mib=512 cpus=2 kernel=bzimage|elf)",
        run: boot_smp_reboot,
    },
    ScenarioDef {
        name: "boot-elf-serial-file",
        help: "the ELF vmlinux boots through PVH with --serial file=PATH: the console goes \
               to the file (not stdout), commands from ebb.run= run, poweroff exits 0 \
               (args: memory_mib=512)",
        run: boot_elf_serial_file,
    },
    ScenarioDef {
        name: "boot-5g-sigterm",
        help: "a 5 GiB guest: RAM above the 4 GiB hole in the RAM map and in MemTotal, \
               memory touched there reaches the host, RAM populated lazily; SIGTERM ends Ebb \
               with status 143 and a message (args: memory_mib=5120 kernel=bzimage|elf)",
        run: boot_5g_sigterm,
    },
    ScenarioDef {
        name: "boot-elf-long64",
        help: "the default vmlinux with its PVH note disabled boots through the ELF 64-bit \
               entry point (args: memory_mib=512)",
        run: boot_elf_long64,
    },
    ScenarioDef {
        name: "boot-triple-fault",
        help: "an ELF kernel that faults with no IDT (int3) ends Ebb with status 2 and the \
               exit reason, without hanging",
        run: boot_triple_fault,
    },
];

const GIB: u64 = 1 << 30;
/// Guest RAM below the 32-bit MMIO hole (Ebb's layout: the hole is 3-4 GiB).
const LOW_RAM_END: u64 = 3 * GIB;

/// The guest physical address one past the last byte of RAM.
pub fn ram_end(memory_bytes: u64) -> u64 {
    if memory_bytes <= LOW_RAM_END {
        memory_bytes
    } else {
        4 * GIB + (memory_bytes - LOW_RAM_END)
    }
}

/// What MemTotal should be for `memory_mib` of RAM (see the module doc), in KiB, and the
/// tolerance.
pub fn expected_memtotal_kib(memory_mib: u64) -> (u64, u64) {
    let kib = memory_mib * 1024;
    let mut reserved = 46 * 1024 + kib / 64;
    if memory_mib * (1 << 20) > LOW_RAM_END {
        reserved += 64 * 1024;
    }
    let tolerance = (kib * 15 / 1000).max(8 * 1024);
    (kib.saturating_sub(reserved), tolerance)
}

/// Checks MemTotal against the calibrated expectation.
pub fn check_memtotal(memory_mib: u64, mem_total_kib: u64) -> Result<Value, String> {
    let (expected, tolerance) = expected_memtotal_kib(memory_mib);
    let diff = mem_total_kib as i64 - expected as i64;
    ensure(diff.unsigned_abs() <= tolerance, || {
        format!(
            "MemTotal {mem_total_kib} KiB for {memory_mib} MiB of RAM: expected {expected} KiB \
             +/- {tolerance} KiB (RAM minus the kernel's reservations), off by {diff} KiB"
        )
    })?;
    Ok(json!({
        "mem_total_kib": mem_total_kib,
        "expected_kib": expected,
        "tolerance_kib": tolerance,
        "diff_kib": diff,
        "missing_pct": 100.0 * (memory_mib * 1024 - mem_total_kib) as f64 / (memory_mib * 1024) as f64,
    }))
}

/// Checks the guest's RAM map (/proc/iomem): RAM ends exactly where Ebb put it, nothing
/// inside the MMIO hole, and at most 1 MiB of RAM (first page, EBDA, legacy ROM area)
/// missing.
pub fn check_ram_map(vm: &mut GuestVm, memory_bytes: u64) -> Result<Value, String> {
    let ranges = guest_ram_ranges(vm)?;
    let total: u64 = ranges.iter().map(|(a, b)| b - a + 1).sum();
    let top = ranges.iter().map(|r| r.1).max().unwrap_or(0) + 1;
    let desc: Vec<String> = ranges
        .iter()
        .map(|(a, b)| format!("{a:#x}-{b:#x}"))
        .collect();
    ensure(top == ram_end(memory_bytes), || {
        format!(
            "guest RAM ends at {top:#x}, expected {:#x} for {} MiB: {desc:?}",
            ram_end(memory_bytes),
            memory_bytes >> 20
        )
    })?;
    ensure(
        total <= memory_bytes && memory_bytes - total <= 1 << 20,
        || format!("guest sees {total} bytes of RAM of {memory_bytes}: {desc:?}"),
    )?;
    ensure(
        !ranges
            .iter()
            .any(|(a, b)| *b >= LOW_RAM_END && *a < 4 * GIB),
        || format!("RAM inside the 3-4 GiB MMIO hole: {desc:?}"),
    )?;
    Ok(json!({ "ranges": desc, "total_bytes": total }))
}

fn boot_protocol_line(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .find(|l| l.contains("kernel entry:"))
        .map(|l| l[l.find("kernel entry:").unwrap_or(0)..].to_string())
}

fn check_protocol(stderr: &str, kernel: &KernelImage) -> Result<String, String> {
    let line = boot_protocol_line(stderr)
        .ok_or_else(|| format!("no `kernel entry:` line with --log-level info:\n{stderr}"))?;
    let want = match kernel {
        KernelImage::Elf => "Pvh",
        _ => "Long64",
    };
    ensure(line.contains(want), || {
        format!("expected a {want} entry for {kernel:?}, got `{line}`")
    })?;
    Ok(line)
}

fn info_config(memory_mib: u64, cpus: u32, kernel: KernelImage) -> GuestConfig {
    let mut c = config(memory_mib, cpus, None);
    c.kernel = Some(kernel);
    c.extra_args = vec!["--log-level".into(), "info".into()];
    c
}

/// The guest sees exactly `cpus` CPUs, online and possible (and said so when ready);
/// returns its `cpus` answer.
fn check_cpus(vm: &mut GuestVm, ready: &Ready, cpus: u32) -> Result<Value, String> {
    ensure(ready.cpus == cpus, || {
        format!("EBB-READY reports {} CPUs", ready.cpus)
    })?;
    let cpu = cmd(vm, "cpus")?;
    ensure(cpu["online"] == cpus && cpu["possible"] == cpus, || {
        format!("guest `cpus`: {cpu}, expected {cpus} online and possible")
    })?;
    Ok(cpu)
}

fn boot_basic(ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["memory_mib", "cpus", "kernel"])?;
    let memory_mib: u64 = args.get("memory_mib", 1024)?;
    let cpus: u32 = args.get("cpus", 1)?;
    let kernel_name: String = args.get("kernel", "bzimage".to_string())?;
    let kernel = kernel_arg(&kernel_name)?;
    let c = info_config(memory_mib, cpus, kernel.clone());
    let (mut vm, ready) = boot(&ebb()?, &c)?;

    let cpu = check_cpus(&mut vm, &ready, cpus)?;
    let meminfo = cmd(&mut vm, "meminfo")?;
    let mem_total = u64_field(&meminfo, "mem_total_kib")?;
    ensure(mem_total == ready.memtotal_kib, || {
        format!(
            "MemTotal changed after boot: {} -> {mem_total}",
            ready.memtotal_kib
        )
    })?;
    let memtotal = check_memtotal(memory_mib, mem_total)?;
    let ram_map = check_ram_map(&mut vm, memory_mib << 20)?;
    let protocol = check_protocol(&vm.stderr_text(), &kernel)?;
    // Guest RAM is populated lazily: a freshly booted guest has touched a fraction.
    let ram_rss = ram_rss(&vm)?;
    let proc_rss = vm.process_rss_kib().ctx("reading VmRSS")?;
    ensure(ram_rss > 1024 && ram_rss < memory_mib * 1024 / 2, || {
        format!("guest RAM RSS {ram_rss} KiB for a {memory_mib} MiB guest just booted")
    })?;
    ensure(proc_rss >= ram_rss, || {
        format!("VmRSS {proc_rss} KiB below guest RAM RSS {ram_rss} KiB")
    })?;
    let t_off = Instant::now();
    let exit = poweroff_ebb(&mut vm)?;
    ctx.note(
        &format!("memtotal_kib:{memory_mib}:{kernel_name}"),
        json!(mem_total),
    );
    Ok(json!({
        "argv": vm.argv(),
        "ready_ms": ms(ready.elapsed),
        "ready_line": ready.line,
        "cpus": cpu,
        "memtotal": memtotal,
        "ram_map": ram_map,
        "boot_protocol": protocol,
        "guest_ram_rss_mib": mib(ram_rss),
        "vmm_overhead_mib": mib(proc_rss - ram_rss),
        "poweroff_ms": ms(t_off.elapsed()),
        "exit_status": exit.status.code(),
    }))
}

fn boot_smp_reboot(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["memory_mib", "cpus", "kernel"])?;
    let memory_mib: u64 = args.get("memory_mib", 512)?;
    let cpus: u32 = args.get("cpus", 2)?;
    let kernel = kernel_arg(&args.get("kernel", "bzimage".to_string())?)?;
    ensure(cpus >= 2, || "boot-smp-reboot needs cpus >= 2".into())?;
    let c = info_config(memory_mib, cpus, kernel);
    let (mut vm, ready) = boot(&ebb()?, &c)?;
    let cpu = check_cpus(&mut vm, &ready, cpus)?;
    // Every vCPU has run: each has taken local timer interrupts.
    let stat = sh(&mut vm, "grep '^cpu[0-9]' /proc/stat")?;
    let busy: Vec<u64> = stat
        .lines()
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        })
        .collect();
    ensure(
        busy.len() == cpus as usize && busy.iter().all(|&t| t > 0),
        || format!("per-CPU times in /proc/stat: {stat}"),
    )?;
    // The last CPU runs work: a task pinned to it reports it as the CPU it ran on.
    let last = cpus - 1;
    let pinned = sh(
        &mut vm,
        &format!("taskset -c {last} cat /proc/self/stat | cut -d' ' -f39"),
    )?;
    ensure(pinned.trim() == last.to_string(), || {
        format!(
            "a task pinned to CPU {last} reported running on CPU `{}`",
            pinned.trim()
        )
    })?;
    let t0 = Instant::now();
    let r = cmd(&mut vm, "reboot")?;
    let exit = vm.wait_exit(EXIT_TIMEOUT).s()?;
    expect_exit(
        &exit,
        0,
        "ebb: guest rebooted; Ebb does not restart guests, exiting",
    )?;
    Ok(json!({
        "ready_ms": ms(ready.elapsed),
        "cpus": cpu,
        "cpu_times": busy,
        "reboot_result": r,
        "reboot_to_exit_ms": ms(t0.elapsed()),
        "exit_status": exit.status.code(),
    }))
}

fn boot_elf_serial_file(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["memory_mib"])?;
    let memory_mib: u64 = args.get("memory_mib", 512)?;
    let artifacts = super::support::artifacts()?;
    ensure(artifacts.vmlinux.is_some(), || {
        format!(
            "no ELF vmlinux in {}: rebuild the guest with resources/build-guest.sh",
            artifacts.dir.display()
        )
    })?;
    let dir = scratch_dir("serial")?;
    let console = dir.join("console.log");
    let mut c = info_config(memory_mib, 1, KernelImage::Elf);
    c.cmdline_extra = "ebb.run=cpus,meminfo,echo:serial-file-ok,poweroff".into();
    let kind = ebb()?;
    let mut argv = vmm_command(kind.as_ref(), &c, &artifacts).s()?;
    let i = argv
        .iter()
        .position(|a| a == "--serial")
        .ok_or("no --serial in the ebb command")?;
    argv[i + 1] = format!("file={}", console.display());
    progress(&format!(
        "ebb with the console in a file: {}",
        argv.join(" ")
    ));
    let limit = READY_TIMEOUT + EXIT_TIMEOUT;
    let super::support::Finished {
        status,
        stdout,
        stderr,
        elapsed,
    } = super::support::run_with_limit(&argv, limit).map_err(|e| {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        format!(
            "ebb did not power off: {e}; console file tail:\n{}",
            crate::text::tail(&text, 30)
        )
    })?;
    let text = std::fs::read_to_string(&console).ctx(&format!("reading {}", console.display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    let tail = crate::text::tail(&text, 30);
    ensure(status.code() == Some(0), || {
        format!("ebb exited with {status}; stderr:\n{stderr}\nconsole tail:\n{tail}")
    })?;
    ensure(
        stderr.lines().any(|l| l == "ebb: guest powered off"),
        || format!("no poweroff message on stderr:\n{stderr}"),
    )?;
    ensure(stdout.is_empty(), || {
        format!("with --serial file= nothing belongs on stdout, got:\n{stdout}")
    })?;
    let protocol = check_protocol(&stderr, &KernelImage::Elf)?;
    let results: Vec<Value> = text
        .lines()
        .filter_map(|l| l.find("EBB-RESULT ").map(|i| &l[i + 11..]))
        .filter_map(|j| serde_json::from_str(j.trim()).ok())
        .collect();
    let get = |name: &str| results.iter().find(|r| r["cmd"] == name).cloned();
    ensure(text.contains("EBB-READY "), || {
        format!("no EBB-READY in the console file:\n{tail}")
    })?;
    let cpus = get("cpus").ok_or_else(|| format!("no `cpus` result in the file:\n{tail}"))?;
    ensure(cpus["online"] == 1, || format!("cpus: {cpus}"))?;
    let meminfo = get("meminfo").ok_or_else(|| format!("no `meminfo` result:\n{tail}"))?;
    let memtotal = check_memtotal(memory_mib, u64_field(&meminfo, "mem_total_kib")?)?;
    let echo = get("echo").ok_or_else(|| format!("no `echo` result:\n{tail}"))?;
    ensure(echo["text"] == "serial-file-ok", || format!("echo: {echo}"))?;
    ensure(get("poweroff").is_some_and(|r| r["ok"] == true), || {
        format!("no successful `poweroff` result:\n{tail}")
    })?;
    Ok(json!({
        "argv": argv,
        "boot_protocol": protocol,
        "console_bytes": text.len(),
        "memtotal": memtotal,
        "total_ms": ms(elapsed),
    }))
}

fn boot_5g_sigterm(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["memory_mib", "kernel"])?;
    let memory_mib: u64 = args.get("memory_mib", 5120)?;
    let kernel = kernel_arg(&args.get("kernel", "bzimage".to_string())?)?;
    ensure(memory_mib * (1 << 20) > 4 * GIB, || {
        "boot-5g-sigterm is about RAM above 4 GiB: memory_mib must exceed 4096".into()
    })?;
    let c = info_config(memory_mib, 1, kernel.clone());
    let (mut vm, ready) = boot(&ebb()?, &c)?;
    let meminfo = cmd(&mut vm, "meminfo")?;
    let memtotal = check_memtotal(memory_mib, u64_field(&meminfo, "mem_total_kib")?)?;
    let ram_map = check_ram_map(&mut vm, memory_mib << 20)?;
    let protocol = check_protocol(&vm.stderr_text(), &kernel)?;
    // Lazily populated: the host has not committed the guest's 5 GiB.
    let rss_booted = ram_rss(&vm)?;
    ensure(rss_booted < 1024 * 1024, || {
        format!("guest RAM RSS {rss_booted} KiB right after boot: RAM is not populated lazily")
    })?;
    // User memory comes from ZONE_NORMAL first, which in this guest is the RAM above
    // 4 GiB: what the guest touches there must reach the host.
    let touch_mib = 512u64;
    let touched = cmd(&mut vm, &format!("touch {touch_mib}"))?;
    let rss_touched = ram_rss(&vm)?;
    ensure(
        rss_touched >= rss_booted + touch_mib * 1024 * 9 / 10,
        || {
            format!(
                "touching {touch_mib} MiB raised guest RAM RSS only from {rss_booted} to \
             {rss_touched} KiB"
            )
        },
    )?;
    let zones = sh(
        &mut vm,
        "grep -A2 'zone *Normal' /proc/zoneinfo | head -n 3",
    )?;
    cmd(&mut vm, "free")?;
    let t0 = Instant::now();
    vm.signal(libc::SIGTERM).ctx("sending SIGTERM")?;
    let exit = vm.wait_exit(EXIT_TIMEOUT).s()?;
    expect_exit(&exit, 128 + libc::SIGTERM, "ebb: stopped by SIGTERM")?;
    Ok(json!({
        "ready_ms": ms(ready.elapsed),
        "memtotal": memtotal,
        "ram_map": ram_map,
        "boot_protocol": protocol,
        "guest_ram_rss_booted_mib": mib(rss_booted),
        "guest_ram_rss_touched_mib": mib(rss_touched),
        "touch": touched,
        "normal_zone": zones.trim(),
        "sigterm_to_exit_ms": ms(t0.elapsed()),
        "exit_status": exit.status.code(),
        "stderr_last_line": exit.stderr.lines().last(),
    }))
}

/// Xen ELF note `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_NOTE: u32 = 4;

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Renames the PVH entry note of an ELF64 kernel to an unknown note type, so that a loader
/// falls back to the ELF entry point. Returns how many notes it changed.
pub fn disable_pvh_note(elf: &mut [u8]) -> Result<usize, String> {
    let bad = || "not a little-endian ELF64 file".to_string();
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Err(bad());
    }
    let phoff = le_u64(elf, 0x20).ok_or_else(bad)? as usize;
    let phentsize = le_u16(elf, 0x36).ok_or_else(bad)? as usize;
    let phnum = le_u16(elf, 0x38).ok_or_else(bad)? as usize;
    let mut changed = 0;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if le_u32(elf, ph).ok_or_else(bad)? != PT_NOTE {
            continue;
        }
        let start = le_u64(elf, ph + 8).ok_or_else(bad)? as usize;
        let end = start + le_u64(elf, ph + 32).ok_or_else(bad)? as usize;
        let mut at = start;
        while at + 12 <= end {
            let namesz = le_u32(elf, at).ok_or_else(bad)? as usize;
            let descsz = le_u32(elf, at + 4).ok_or_else(bad)? as usize;
            let kind = le_u32(elf, at + 8).ok_or_else(bad)?;
            let name = elf.get(at + 12..at + 12 + namesz).ok_or_else(bad)?;
            if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
                elf[at + 8..at + 12].copy_from_slice(&0x7ffu32.to_le_bytes());
                changed += 1;
            }
            at += 12 + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
        }
    }
    Ok(changed)
}

/// A minimal ELF64 "kernel": one page of `int3` at 2 MiB, entered in 64-bit mode with no
/// IDT, so its first instruction escalates to a triple fault.
pub fn triple_fault_elf() -> Vec<u8> {
    const LOAD: u64 = 0x20_0000;
    let mut f = vec![0u8; 0x1000];
    f[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
    f[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[0x12..0x14].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    f[0x18..0x20].copy_from_slice(&LOAD.to_le_bytes()); // entry
    f[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
    f[0x34..0x36].copy_from_slice(&0x40u16.to_le_bytes()); // ehsize
    f[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes()); // phentsize
    f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = 0x40;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
    f[ph + 16..ph + 24].copy_from_slice(&LOAD.to_le_bytes()); // vaddr
    f[ph + 24..ph + 32].copy_from_slice(&LOAD.to_le_bytes()); // paddr
    f[ph + 32..ph + 40].copy_from_slice(&0x10u64.to_le_bytes()); // filesz
    f[ph + 40..ph + 48].copy_from_slice(&0x10u64.to_le_bytes()); // memsz
    f[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes()); // align
    f.extend_from_slice(&[0xcc; 16]);
    f
}

fn boot_elf_long64(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["memory_mib"])?;
    let memory_mib: u64 = args.get("memory_mib", 512)?;
    let artifacts = super::support::artifacts()?;
    let vmlinux = artifacts.vmlinux.clone().ok_or_else(|| {
        format!(
            "no ELF vmlinux in {}: rebuild the guest with resources/build-guest.sh",
            artifacts.dir.display()
        )
    })?;
    let mut elf = std::fs::read(&vmlinux).ctx(&format!("reading {}", vmlinux.display()))?;
    let changed = disable_pvh_note(&mut elf)?;
    ensure(changed == 1, || {
        format!(
            "{} has {changed} PVH entry notes, expected 1",
            vmlinux.display()
        )
    })?;
    let dir = scratch_dir("long64")?;
    let kernel = dir.join("vmlinux-no-pvh");
    std::fs::write(&kernel, &elf).ctx(&format!("writing {}", kernel.display()))?;
    drop(elf);
    let c = info_config(memory_mib, 1, KernelImage::Path(kernel));
    let result = (|| {
        let (mut vm, ready) = boot(&ebb()?, &c)?;
        let protocol = check_protocol(&vm.stderr_text(), &KernelImage::BzImage)?;
        let meminfo = cmd(&mut vm, "meminfo")?;
        let memtotal = check_memtotal(memory_mib, u64_field(&meminfo, "mem_total_kib")?)?;
        let exit = poweroff_ebb(&mut vm)?;
        Ok(json!({
            "ready_ms": ms(ready.elapsed),
            "boot_protocol": protocol,
            "memtotal": memtotal,
            "exit_status": exit.status.code(),
        }))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn boot_triple_fault(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&[])?;
    let dir = scratch_dir("triple")?;
    let kernel = dir.join("triple-fault.elf");
    std::fs::write(&kernel, triple_fault_elf()).ctx("writing the test kernel")?;
    let argv = vec![
        super::support::ebb_binary()?.to_string_lossy().into_owned(),
        "--kernel".into(),
        kernel.to_string_lossy().into_owned(),
        "--memory".into(),
        "64M".into(),
        "--serial".into(),
        "off".into(),
    ];
    let finished = super::support::run_with_limit(&argv, EXIT_TIMEOUT);
    let _ = std::fs::remove_dir_all(&dir);
    let f = finished.map_err(|e| format!("after a triple fault: {e}"))?;
    let exit = crate::guest::GuestExit {
        status: f.status,
        stderr: f.stderr,
        elapsed: f.elapsed,
    };
    expect_exit(
        &exit,
        2,
        "ebb: guest stopped: vCPU 0: triple fault (KVM_EXIT_SHUTDOWN)",
    )?;
    Ok(json!({
        "argv": argv,
        "exit_status": exit.status.code(),
        "exit_ms": ms(exit.elapsed),
        "stderr_last_line": exit.stderr.lines().last(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crafted_elf_has_its_pvh_note_disabled() {
        // A note segment holding a non-Xen note and the PVH note.
        let mut elf = triple_fault_elf();
        let notes = elf.len();
        for (name, kind) in [(b"GNU\0", 3u32), (b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY)] {
            elf.extend_from_slice(&4u32.to_le_bytes());
            elf.extend_from_slice(&4u32.to_le_bytes());
            elf.extend_from_slice(&kind.to_le_bytes());
            elf.extend_from_slice(name);
            elf.extend_from_slice(&0x100_0000u32.to_le_bytes());
        }
        let size = (elf.len() - notes) as u64;
        // Turn the PT_LOAD into a PT_NOTE pointing at them.
        elf[0x40..0x44].copy_from_slice(&PT_NOTE.to_le_bytes());
        elf[0x48..0x50].copy_from_slice(&(notes as u64).to_le_bytes());
        elf[0x60..0x68].copy_from_slice(&size.to_le_bytes());
        assert_eq!(disable_pvh_note(&mut elf), Ok(1));
        assert_eq!(disable_pvh_note(&mut elf), Ok(0));
        assert_eq!(le_u32(&elf, notes + 8), Some(3));
        assert!(disable_pvh_note(&mut [0u8; 16]).is_err());
    }

    #[test]
    fn ram_end_skips_the_hole() {
        assert_eq!(ram_end(GIB), GIB);
        assert_eq!(ram_end(3 * GIB), 3 * GIB);
        assert_eq!(ram_end(5 * GIB), 6 * GIB);
    }

    #[test]
    fn memtotal_model_matches_calibration() {
        // Measured in the nested test host (Debian 6.1 guest).
        for (mem, measured) in [
            (512, 468_560),
            (1024, 983_892),
            (1024, 981_620),
            (5120, 5_035_600),
        ] {
            assert!(
                check_memtotal(mem, measured).is_ok(),
                "{mem} MiB: {measured}"
            );
        }
        // A guest missing 64 MiB of a GiB fails.
        assert!(check_memtotal(1024, 983_892 - 65_536).is_err());
        assert!(check_memtotal(1024, 1024 * 1024).is_err());
    }
}
