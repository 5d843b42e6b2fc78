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
pub const SCENARIOS: &[ScenarioDef] = &[ScenarioDef {
    name: "disk-persist",
    help: "the Debian root file system on virtio-blk: a synced file survives power-off and \
           SIGKILL of Ebb, a read-only second disk is read-only in the guest and refuses \
           writes, fstrim makes the image's allocated blocks fall (args: memory_mib=1024)",
    run: disk_persist,
}];

/// The root file system's build output.
fn rootfs_dir() -> PathBuf {
    crate::paths::cache_dir().join("rootfs")
}

fn copy_image(to: &Path) -> Result<(), String> {
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
