//! Guests with a disk: the Debian root file system (resources/build-rootfs.sh) on
//! virtio-blk. `disk-persist` checks that nothing is lost: a file written and synced is
//! there after a power-off and after `SIGKILL` of Ebb, a read-only disk is read-only in the
//! guest and refuses writes, and discarding frees the image file's blocks.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use super::support::{boot, config, ebb, ensure, poweroff_ebb, scratch_dir, sh};
use super::{progress, Args, Ctx, ScenarioDef};
use crate::guest::GuestVm;

/// The scenarios of this family.
pub const SCENARIOS: &[ScenarioDef] = &[
    ScenarioDef {
        name: "disk-persist",
        help: "the Debian root file system on virtio-blk: a synced file survives power-off \
               and SIGKILL of Ebb, a read-only second disk is read-only in the guest and \
               refuses writes, fstrim makes the image's allocated blocks fall (args: \
               memory_mib=1024)",
        run: disk_persist,
    },
    ScenarioDef {
        name: "bench-disk",
        help: "Ebb vs QEMU microvm (virtio-blk-device, cache=writeback) on the same Debian \
               guest: fio in the guest on a second raw disk, O_DIRECT: sequential write and \
               read MiB/s (1 MiB blocks, depth 16) and 4 KiB random read IOPS (depth 8) \
               (args: memory_mib=1024 size_mib=512 runtime_s=10 io_threads=0 (Ebb's I/O \
               threads per disk; 0: its default) vmms=ebb+qemu (also ebb-cached: Ebb \
               with EBB_DISK_CACHED_READS=1) data_on=file|loop (loop: the data image \
               through a loop device, a block device whose page cache reads without \
               waiting, as ext4 or xfs would; tmpfs before Linux 6.6 cannot))",
        run: bench_disk,
    },
];

/// The root file system's build output.
pub fn rootfs_dir() -> PathBuf {
    crate::paths::cache_dir().join("rootfs")
}

/// Copies the root file system image to `to` (sparse).
pub fn copy_image(to: &Path) -> Result<(), String> {
    let from = rootfs_dir().join("rootfs.ext4");
    ensure(from.exists(), || {
        format!(
            "{} is missing: build it with resources/build-rootfs.sh (ci/setup.sh does)",
            from.display()
        )
    })?;
    let ok = Command::new("cp")
        .arg("--sparse=always")
        .arg(&from)
        .arg(to)
        .status()
        .map_err(|e| format!("cp: {e}"))?
        .success();
    ensure(ok, || format!("copying {} failed", from.display()))
}

/// Boots `vmm` from the root file system image with `disks` (the first must be it).
fn boot_rootfs(
    vmm: &crate::guest::VmmRef,
    memory_mib: u64,
    disks: Vec<crate::guest::DiskSpec>,
) -> Result<GuestVm, String> {
    let mut c = config(memory_mib, 1, None);
    c.initramfs = Some(rootfs_dir().join("initramfs.cpio.gz"));
    c.cmdline_extra = "root=/dev/vda".into();
    c.disks = disks;
    let (mut vm, _) = boot(vmm, &c)?;
    let root = sh(
        &mut vm,
        "grep ' / ' /proc/mounts; cat /sys/block/vdb/serial",
    )?;
    ensure(
        root.starts_with("/dev/vda ") && root.contains("data"),
        || format!("the guest's root is not /dev/vda or vdb is not the data disk: {root}"),
    )?;
    Ok(vm)
}

/// Runs one fio job in the guest and returns its JSON output's first job.
fn fio(vm: &mut GuestVm, args: &str, runtime_s: u64) -> Result<Value, String> {
    let line = format!(
        "sh fio --output-format=json --filename=/dev/vdb --direct=1 --ioengine=libaio \
         --runtime={runtime_s} --time_based=1 --group_reporting=1 {args}"
    );
    let r = vm
        .command_ok(&line, Duration::from_secs(runtime_s + 120))
        .map_err(|e| e.to_string())?;
    let out = r["output"].as_str().unwrap_or_default();
    let start = out
        .find('{')
        .ok_or_else(|| format!("fio printed no JSON: {out}"))?;
    let v: Value =
        serde_json::from_str(&out[start..]).map_err(|e| format!("fio JSON: {e}: {out}"))?;
    Ok(v["jobs"][0].clone())
}

fn bench_disk(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&[
        "memory_mib",
        "size_mib",
        "runtime_s",
        "io_threads",
        "vmms",
        "data_on",
    ])?;
    let memory_mib: u64 = args.get("memory_mib", 1024)?;
    let size_mib: u64 = args.get("size_mib", 512)?;
    let runtime_s: u64 = args.get("runtime_s", 10)?;
    let io_threads: u64 = args.get("io_threads", 0)?;
    let which: String = args.get("vmms", "ebb+qemu".to_string())?;
    let data_on: String = args.get("data_on", "file".to_string())?;
    ensure(data_on == "file" || data_on == "loop", || {
        format!("data_on={data_on}: expected file or loop")
    })?;
    if io_threads > 0 {
        // Ebb's I/O threads per disk (its measuring knob); 0: Ebb's default.
        std::env::set_var("EBB_DISK_IO_THREADS", io_threads.to_string());
    }
    let dir = scratch_dir("bench-disk")?;
    let mut rows = Vec::new();
    let mut vmms = Vec::new();
    for name in which.split('+') {
        let (vmm, cached_reads) = match name {
            "ebb" => (ebb()?, false),
            "ebb-cached" => (ebb()?, true),
            "qemu" => (super::support::qemu()?, false),
            other => return Err(format!("vmms: unknown VMM {other} (ebb, ebb-cached, qemu)")),
        };
        vmms.push((name, vmm, cached_reads));
    }
    for (label, vmm, cached_reads) in vmms {
        // Ebb's knob for measuring; the other VMMs ignore it.
        std::env::set_var(
            "EBB_DISK_CACHED_READS",
            if cached_reads { "1" } else { "0" },
        );
        let root = dir.join("root.ext4");
        let file = dir.join("data.img");
        copy_image(&root)?;
        std::fs::File::create(&file)
            .and_then(|f| f.set_len((size_mib + 64) << 20))
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let looped = (data_on == "loop")
            .then(|| LoopDevice::attach(&file))
            .transpose()?;
        let data = looped.as_ref().map_or(file.clone(), |l| l.path.clone());
        let disks = vec![
            crate::guest::DiskSpec {
                path: root.clone(),
                readonly: false,
                id: "root".into(),
            },
            crate::guest::DiskSpec {
                path: data.clone(),
                readonly: false,
                id: "data".into(),
            },
        ];
        let mut vm = boot_rootfs(&vmm, memory_mib, disks)?;
        let size = format!("--size={size_mib}M");
        let write = fio(
            &mut vm,
            &format!("--name=w --rw=write --bs=1M --iodepth=16 {size}"),
            runtime_s,
        )?;
        let read = fio(
            &mut vm,
            &format!("--name=r --rw=read --bs=1M --iodepth=16 {size}"),
            runtime_s,
        )?;
        let wakeups_before = crate::procfs::thread_switches(vm.pid(), "disk-io");
        let rand = fio(
            &mut vm,
            &format!("--name=rr --rw=randread --bs=4k --iodepth=8 {size}"),
            runtime_s,
        )?;
        // How often Ebb's I/O threads woke per random read: about one per request when
        // they serve every read, near none when the event loop answers them.
        let reads = rand["read"]["total_ios"].as_f64().unwrap_or(0.0);
        let io_thread_wakeups_per_read = (vmm.kind() == crate::guest::VmmKind::Ebb && reads > 0.0)
            .then(|| {
                let after = crate::procfs::thread_switches(vm.pid(), "disk-io");
                after.saturating_sub(wakeups_before) as f64 / reads
            });
        super::support::poweroff_any(&mut vm)?;
        let mibs = |j: &Value, dir: &str| j[dir]["bw_bytes"].as_f64().unwrap_or(0.0) / 1048576.0;
        let row = json!({
            "vmm": label,
            "data_on": data_on,
            "io_threads": io_threads,
            "seq_write_mib_s": mibs(&write, "write"),
            "seq_read_mib_s": mibs(&read, "read"),
            "rand_read_4k_iops": rand["read"]["iops"].as_f64().unwrap_or(0.0),
            "rand_read_lat_us_p50": rand["read"]["clat_ns"]["percentile"]["50.000000"].as_f64().unwrap_or(0.0) / 1000.0,
            "io_thread_wakeups_per_read": io_thread_wakeups_per_read,
        });
        progress(&format!("bench-disk: {row}"));
        rows.push(row);
        drop(looped);
        let _ = std::fs::remove_file(&root);
        let _ = std::fs::remove_file(&file);
    }
    Ok(json!({
        "rows": rows,
        "params": {
            "memory_mib": memory_mib,
            "size_mib": size_mib,
            "runtime_s": runtime_s,
            "data_on": data_on,
        },
    }))
}

/// A file attached to a loop device (`losetup`), detached when dropped.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(file: &Path) -> Result<Self, String> {
        // The test host loads the driver at boot; elsewhere it may be a module.
        let modprobe = Command::new("modprobe").arg("loop").output();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup (util-linux's mount package): {e}"))?;
        ensure(out.status.success(), || {
            let modprobe = match &modprobe {
                Ok(m) if m.status.success() => "ok".to_string(),
                Ok(m) => String::from_utf8_lossy(&m.stderr).trim().to_string(),
                Err(e) => e.to_string(),
            };
            format!(
                "losetup --find --show {}: {} (modprobe loop: {modprobe})",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(Self { path })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// The table `ebb-bench disk` prints.
pub fn table(d: &Value) -> String {
    let mut s = format!(
        "disk: fio in the guest on a raw second disk ({}), O_DIRECT, libaio, {} s per job, \
         {} MiB\n\
         {:<13} {:>16} {:>16} {:>18} {:>14} {:>16}\n",
        d["params"]["data_on"].as_str().unwrap_or("file"),
        d["params"]["runtime_s"],
        d["params"]["size_mib"],
        "vmm",
        "seq write MiB/s",
        "seq read MiB/s",
        "4K randread IOPS",
        "p50 lat us",
        "I/O wakeups/read"
    );
    for r in d["rows"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "{:<13} {:>16.1} {:>16.1} {:>18.0} {:>14.0} {:>16}\n",
            match r["io_threads"].as_u64() {
                Some(n) if n > 0 && r["vmm"] == "ebb" => format!("ebb/{n}"),
                _ => r["vmm"].as_str().unwrap_or("?").to_string(),
            },
            r["seq_write_mib_s"].as_f64().unwrap_or(f64::NAN),
            r["seq_read_mib_s"].as_f64().unwrap_or(f64::NAN),
            r["rand_read_4k_iops"].as_f64().unwrap_or(f64::NAN),
            r["rand_read_lat_us_p50"].as_f64().unwrap_or(f64::NAN),
            r["io_thread_wakeups_per_read"]
                .as_f64()
                .map_or("-".to_string(), |w| format!("{w:.2}")),
        ));
    }
    s
}

fn boot_disk(memory_mib: u64, disks: &[String]) -> Result<GuestVm, String> {
    let mut c = config(memory_mib, 1, None);
    c.initramfs = Some(rootfs_dir().join("initramfs.cpio.gz"));
    c.cmdline_extra = "root=/dev/vda".into();
    for d in disks {
        c.extra_args.push("--disk".into());
        c.extra_args.push(d.clone());
    }
    let (mut vm, _) = boot(&ebb()?, &c)?;
    let root = sh(&mut vm, "grep ' / ' /proc/mounts")?;
    ensure(root.starts_with("/dev/vda "), || {
        format!("the guest's root is not /dev/vda: {root}")
    })?;
    Ok(vm)
}

fn allocated_kib(path: &Path) -> Result<u64, String> {
    Ok(std::fs::metadata(path).map_err(|e| e.to_string())?.blocks() / 2)
}

fn disk_persist(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&["memory_mib"])?;
    let memory_mib: u64 = args.get("memory_mib", 1024)?;
    let dir = scratch_dir("disk")?;
    let image = dir.join("root.ext4");
    let spare = dir.join("spare.ext4");
    copy_image(&image)?;
    copy_image(&spare)?;
    let root = format!("path={}", image.display());

    // Power-off: a synced file and a 16 MiB blob are there on the next boot.
    let mut vm = boot_disk(memory_mib, std::slice::from_ref(&root))?;
    let sum = sh(
        &mut vm,
        "dd if=/dev/urandom of=/root/blob bs=1M count=16 2>/dev/null && echo kept > /root/note \
         && sync && md5sum /root/blob",
    )?;
    poweroff_ebb(&mut vm)?;
    let mut vm = boot_disk(memory_mib, std::slice::from_ref(&root))?;
    let again = sh(&mut vm, "cat /root/note && md5sum /root/blob")?;
    ensure(
        again.contains("kept") && again.contains(sum.split_whitespace().next().unwrap_or("?")),
        || format!("after power-off the guest reads {again:?}, wrote {sum:?}"),
    )?;
    progress("disk: a synced file survived power-off");

    // Discard: removing the blob and trimming gives its blocks back in the image file.
    let before_trim = allocated_kib(&image)?;
    let trim = sh(&mut vm, "rm /root/blob && sync && fstrim -v /")?;
    let after_trim = allocated_kib(&image)?;
    ensure(after_trim + 12 * 1024 <= before_trim, || {
        format!(
            "fstrim ({}) left the image at {after_trim} KiB allocated (was {before_trim})",
            trim.trim()
        )
    })?;

    // SIGKILL: what the guest synced is in the image.
    sh(&mut vm, "echo after-kill > /root/kill-note && sync")?;
    vm.kill();
    let mut vm = boot_disk(
        memory_mib,
        &[
            root.clone(),
            format!("path={},readonly=on", spare.display()),
        ],
    )?;
    let note = sh(&mut vm, "cat /root/kill-note")?;
    ensure(note.trim() == "after-kill", || {
        format!("after SIGKILL the guest reads {note:?}")
    })?;

    // Read-only: the guest sees it so and cannot write it.
    let ro = sh(&mut vm, "cat /sys/block/vdb/ro")?;
    ensure(ro.trim() == "1", || format!("/sys/block/vdb/ro is {ro:?}"))?;
    let spare_before = std::fs::read(&spare).map_err(|e| e.to_string())?.len();
    let write = vm
        .command_ok(
            "sh dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>&1; echo rc=$?",
            Duration::from_secs(60),
        )
        .map_err(|e| e.to_string())?;
    let out = write["output"].as_str().unwrap_or_default().to_string();
    ensure(!out.contains("rc=0"), || {
        format!("writing the read-only disk succeeded: {out}")
    })?;
    poweroff_ebb(&mut vm)?;
    ensure(
        std::fs::read(&spare).map_err(|e| e.to_string())?.len() == spare_before,
        || "the read-only image changed size".into(),
    )?;
    Ok(json!({
        "blob_md5": sum.trim(),
        "trim": trim.trim(),
        "allocated_kib": {"before_trim": before_trim, "after_trim": after_trim},
        "readonly_write": out.trim(),
    }))
}
