//! The main job: boot the default guest (stock Debian kernel) with Ebb, a virtio-balloon
//! and free page reporting, and show guest memory going back to the host; then boot the
//! Debian root file system guest from a virtio-blk disk and show a file written, synced
//! and read back from the disk.
//!
//! ```text
//! ebb-demo            run the demo (directly on a KVM host, else in the nested test host)
//! ebb-demo --inside   the demo itself (what the test host runs)
//! ```
//! Prints a narrative with the measured figures; exits 0 when every step worked.

use std::process::ExitCode;
use std::thread::sleep;
use std::time::{Duration, Instant};

use ebb_tests::guest::{BalloonConfig, DiskSpec, GuestConfig, GuestVm, VmmKind};
use ebb_tests::results;
use ebb_tests::testhost::{self, HostMode, Job};
use ebb_tests::util::{mib, poll};
use serde_json::json;

const MEMORY_MIB: u64 = 1024;
const BALLOON_MIB: u64 = 256;
const TOUCH_MIB: u64 = 512;
const TIMEOUT: Duration = Duration::from_secs(300);
const DISK_GUEST_MIB: u64 = 512;
const FILE_MIB: u64 = 32;

fn step(text: &str) {
    println!("\n== {text}");
}

fn inside() -> Result<(), String> {
    let ebb = VmmKind::Ebb.vmm().map_err(|e| e.to_string())?;
    let config = GuestConfig {
        memory_mib: MEMORY_MIB,
        cpus: 2,
        balloon: Some(BalloonConfig {
            size_mib: BALLOON_MIB,
            // Off, so the ballooned pages visibly leave the guest's MemTotal.
            deflate_on_oom: false,
            free_page_reporting: true,
            stats_interval: 1,
            free_page_hinting: false,
            deflate_prefault: true,
        }),
        ..GuestConfig::default()
    };
    step(&format!(
        "Booting the default guest: {MEMORY_MIB} MiB, 2 vCPUs, balloon target {BALLOON_MIB} MiB, \
         free page reporting on"
    ));
    let mut vm = GuestVm::spawn(ebb, &config).map_err(|e| e.to_string())?;
    println!("   {}", vm.argv().join(" "));
    let ready = vm.wait_ready(TIMEOUT).map_err(|e| e.to_string())?;
    println!(
        "   guest ready after {:.1} s: Linux {}, {} CPUs, MemTotal {:.0} MiB",
        ready.elapsed.as_secs_f64(),
        ready.kernel,
        ready.cpus,
        mib(ready.memtotal_kib)
    );

    step("The balloon inflates to its target");
    let target_pages = BALLOON_MIB * 256;
    let t0 = Instant::now();
    let balloon = poll(TIMEOUT, Duration::from_millis(500), || {
        let b = vm
            .command_ok("balloon", TIMEOUT)
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((b["inflated_pages"].as_u64() >= Some(target_pages)).then_some(b))
    })?
    .ok_or("the balloon did not reach its target")?;
    let meminfo = vm
        .command_ok("meminfo", TIMEOUT)
        .map_err(|e| e.to_string())?;
    let features = balloon["features"].as_str().unwrap_or("");
    let bit = |n: usize| features.as_bytes().get(n) == Some(&b'1');
    println!(
        "   guest balloon holds {} MiB ({:.1} s); negotiated: stats={} deflate_on_oom={} \
         free_page_reporting={} page_poison={}",
        balloon["inflated_pages"].as_u64().unwrap_or(0) / 256,
        t0.elapsed().as_secs_f64(),
        bit(1),
        bit(2),
        bit(5),
        bit(4)
    );
    println!(
        "   guest MemTotal now {:.0} MiB (was {:.0}): the ballooned pages left the guest",
        mib(meminfo["mem_total_kib"].as_u64().unwrap_or(0)),
        mib(ready.memtotal_kib)
    );
    let idle_rss = vm.guest_ram_rss_kib().map_err(|e| e.to_string())?;
    println!("   host RSS of guest RAM: {:.0} MiB", mib(idle_rss));

    step(&format!("The guest touches {TOUCH_MIB} MiB, then frees it"));
    let touch = vm
        .command_ok(&format!("touch {TOUCH_MIB}"), TIMEOUT)
        .map_err(|e| e.to_string())?;
    let peak = vm.guest_ram_rss_kib().map_err(|e| e.to_string())?;
    println!(
        "   touched in {} ms; host RSS of guest RAM: {:.0} MiB",
        touch["ms"],
        mib(peak)
    );
    vm.command_ok("free", TIMEOUT).map_err(|e| e.to_string())?;
    let freed_at = Instant::now();
    println!("   freed; free page reporting hands the pages back:");
    let goal = idle_rss + (peak.saturating_sub(idle_rss)) / 10;
    // A reading every 2 s from 2 s after the free, until 60 s after it.
    let every = Duration::from_secs(2);
    sleep(every);
    let settled = poll(Duration::from_secs(60) - every, every, || {
        let rss = vm.guest_ram_rss_kib().map_err(|e| e.to_string())?;
        println!(
            "   +{:>4.1} s  host RSS of guest RAM {:>6.0} MiB",
            freed_at.elapsed().as_secs_f64(),
            mib(rss)
        );
        Ok::<_, String>((rss <= goal).then(|| (freed_at.elapsed(), rss)))
    })?;
    let (took, rss) = settled.ok_or_else(|| {
        format!(
            "guest RAM RSS did not fall back towards {:.0} MiB within 60 s",
            mib(idle_rss)
        )
    })?;
    println!(
        "   {:.0} of {:.0} MiB returned to the host in {:.1} s",
        mib(peak - rss),
        mib(peak - idle_rss),
        took.as_secs_f64()
    );

    step("Powering off");
    let exit = vm.poweroff(TIMEOUT).map_err(|e| e.to_string())?;
    println!("   ebb exited with {}: {}", exit.status, exit.stderr.trim());
    if !exit.status.success() {
        return Err("ebb did not exit cleanly".into());
    }
    disk_guest()?;
    println!("\nDemo complete.");
    Ok(())
}

/// Runs `command` in the guest's shell; its output, or why it failed.
fn sh(vm: &mut GuestVm, command: &str) -> Result<String, String> {
    let r = vm
        .command_ok(&format!("sh {command}"), TIMEOUT)
        .map_err(|e| e.to_string())?;
    if r["status"] != 0 {
        return Err(format!("guest `{command}` failed: {r}"));
    }
    Ok(r["output"].as_str().unwrap_or_default().trim().to_string())
}

/// The Debian root file system guest: root on /dev/vda, a file written, synced, dropped
/// from the page cache and read back from the disk.
fn disk_guest() -> Result<(), String> {
    use ebb_tests::scenarios::{disk, support};
    let ebb = VmmKind::Ebb.vmm().map_err(|e| e.to_string())?;
    let dir = support::scratch_dir("demo-disk")?;
    let image = dir.join("root.ext4");
    disk::copy_image(&image)?;
    let config = GuestConfig {
        memory_mib: DISK_GUEST_MIB,
        cpus: 2,
        initramfs: Some(disk::rootfs_dir().join("initramfs.cpio.gz")),
        cmdline_extra: "root=/dev/vda".into(),
        disks: vec![DiskSpec {
            path: image.clone(),
            readonly: false,
            id: "root".into(),
        }],
        ..GuestConfig::default()
    };
    step(&format!(
        "Booting the Debian root file system guest from a virtio-blk disk: \
         {DISK_GUEST_MIB} MiB, root=/dev/vda"
    ));
    let mut vm = GuestVm::spawn(ebb, &config).map_err(|e| e.to_string())?;
    println!("   {}", vm.argv().join(" "));
    let ready = vm.wait_ready(TIMEOUT).map_err(|e| e.to_string())?;
    let os = sh(&mut vm, ". /etc/os-release && echo $PRETTY_NAME")?;
    let root = sh(&mut vm, "grep ' / ' /proc/mounts")?;
    let serial = sh(&mut vm, "cat /sys/block/vda/serial")?;
    println!(
        "   guest ready after {:.1} s: {os}, Linux {}",
        ready.elapsed.as_secs_f64(),
        ready.kernel
    );
    println!("   root file system: {root} (disk serial '{serial}')");
    if !root.starts_with("/dev/vda ") {
        return Err(format!("the guest's root is not /dev/vda: {root}"));
    }

    step(&format!(
        "The guest writes a {FILE_MIB} MiB file, syncs it, and reads it back from the disk"
    ));
    let t = Instant::now();
    let written = sh(
        &mut vm,
        &format!(
            "dd if=/dev/urandom of=/root/demo.bin bs=1M count={FILE_MIB} 2>/dev/null && sync \
             && md5sum /root/demo.bin"
        ),
    )?;
    println!(
        "   written and synced in {:.1} s: {written}",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let read = sh(
        &mut vm,
        "echo 3 > /proc/sys/vm/drop_caches && md5sum /root/demo.bin",
    )?;
    println!(
        "   page cache dropped, read back in {:.1} s: {read}",
        t.elapsed().as_secs_f64()
    );
    if read.split_whitespace().next() != written.split_whitespace().next() {
        return Err(format!("read back {read:?}, wrote {written:?}"));
    }
    let exit = vm.poweroff(TIMEOUT).map_err(|e| e.to_string())?;
    println!("   ebb exited with {}: {}", exit.status, exit.stderr.trim());
    if !exit.status.success() {
        return Err("ebb did not exit cleanly".into());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--inside") {
        let result = inside();
        if let Err(e) = &result {
            println!("\ndemo failed: {e}");
        }
        results::emit(
            "demo",
            "demo",
            result.is_ok(),
            json!({ "error": result.as_ref().err() }),
        );
        return if result.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ebb-demo: cannot find myself: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mode = match HostMode::detect() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("ebb-demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    if mode == HostMode::Nested {
        eprintln!(
            "ebb-demo: this host's KVM cannot boot stock Linux guests; running the demo in the \
             nested test host (QEMU TCG + kvm-amd). Its output appears when it finishes (~2 min)."
        );
    }
    let mut scenario = Job::new([me.to_string_lossy().into_owned(), "--inside".into()]);
    scenario.mode = Some(mode);
    // As a one-item batch, so the runner's policy applies: the emulated test host now and
    // then triple-faults an L2 guest (QEMU's as well), and such a run is repeated in a
    // fresh test host instead of failing the demo.
    scenario.items = vec!["demo".into()];
    scenario.l1_memory_mib = (MEMORY_MIB + 600) as u32;
    scenario.timeout = Duration::from_secs(900);
    match testhost::run(&scenario) {
        Ok(out) => {
            for line in out.stdout.lines().filter(|l| !results::is_result(l)) {
                println!("{line}");
            }
            let passed = out
                .results
                .iter()
                .any(|r| r["job"] == "demo" && r["ok"] == true);
            if !out.success() || !passed {
                eprint!("{}", out.stderr);
                eprintln!(
                    "ebb-demo: failed (status {}, no passing result line); run dir {}",
                    out.status,
                    out.out_dir.display()
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ebb-demo: {e}");
            ExitCode::FAILURE
        }
    }
}
